#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs on a GPU machine that has torch, transformers, peft,
# accelerate, pyarrow, pandas, tiktoken and sentencepiece but no package registry (this workplace's
# nvidia-h200 image, described in the device tool's KINDS.md), for CPython 3.12 on x86-64.
#
#   bench/gpu_wheels.sh [DIR]        # default DIR: .whl (add /.whl/ to .git/info/exclude; never commit it)
#
# What it fetches (the versions this repository's CPU tests run with):
#   trl 1.16.0, datasets 5.2.0 + dill + multiprocess   the stage trainers and their datasets
#   hydra-core 1.3.8, omegaconf 2.3.1, antlr4 4.9.3     conf/ composition (antlr4 4.9.3 ships as an
#                                                       sdist only: built into a wheel here)
#   llama-models 0.3.0, mistral-common 1.13.1            the real tokenizers' files (dft.tokenizers_offline)
#   pydantic, jsonschema, pycountry, ... (10 wheels)     mistral-common's imports: transformers imports
#                                                       mistral_common when it is installed and a tokenizer
#                                                       of model_type mistral loads (AutoTokenizer)
#   bitsandbytes 0.50.2, slimmed                         QLoRA: the wheel is 43 MB with kernels for
#                                                       CUDA 11.8-13.2 and ROCm; only the CPU and CUDA 13.x
#                                                       libraries are kept (the image's torch is cu130), ~4 MB
# and prints the total, which must leave room for the working tree in a 64 MiB transfer.
set -euo pipefail
DIR=${1:-.whl}
PY=${PY:-python3}
mkdir -p "$DIR"
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$DIR" \
  trl==1.16.0 datasets==5.2.0 "dill>=0.3.0,<0.4.2" "multiprocess<0.70.20" \
  hydra-core==1.3.8 omegaconf==2.3.1 llama-models==0.3.0 mistral-common==1.13.1 bitsandbytes==0.50.2 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  pydantic-extra-types==2.11.1 pycountry==26.2.16 jsonschema==4.26.0 referencing==0.37.0 \
  jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
"$PY" -m pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
# keep bitsandbytes' CPU and CUDA 13.x libraries only; its RECORD loses the dropped files' lines
"$PY" - "$DIR" <<'EOF'
import re, sys, zipfile
from pathlib import Path
for whl in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    if whl.name.endswith(".slim.whl") or "slim" in whl.stem:
        continue
    keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
    out = whl.with_name(whl.name + ".tmp")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n in src.namelist() if n.endswith(".so") and not keep.search(n)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if l.split(b",")[0].decode() not in dropped)
            dst.writestr(info, data)
    out.replace(whl)
    print(f"{whl.name}: dropped {len(dropped)} libraries, {whl.stat().st_size / 2**20:.1f} MiB left")
EOF
ls -l "$DIR"
du -sh "$DIR"
