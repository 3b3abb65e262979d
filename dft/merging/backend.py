"""Merge a fine-tuned model with its partner through mergekit's Python API.

The partner (usually the instruct model) is mergekit's ``base_model``, so for SLERP ``t=0`` gives
the partner's weights and ``t=1`` the fine-tuned model's, as in arXiv 2409.03444; for the task
vector methods (task arithmetic, TIES, DARE-TIES) the fine-tuned model is the single donor whose
delta from the partner is added back.

mergekit is LGPL-3.0: dft only calls it (``run_merge`` + ``MergeOptions``), and imports it lazily
because importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from dft import DftError

#: Files that make a merged dir loadable with ``AutoTokenizer`` and generate like the partner.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
#: Config fields that must agree for two checkpoints to be merged tensor by tensor.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
MERGEKIT_YAML = "mergekit.yaml"


def _field(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (mergekit's pydantic models want lists and dicts)."""
    from dft.config import plain

    return plain(value)


def _ref(path: str) -> str:
    """Absolute path for a local dir (so ``mergekit.yaml`` is self-contained); hub ids as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def _load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised as one line for the user
        raise DftError(f"cannot read the model config of {path}: {e}") from e


def check_compatible(model_path: str, partner_path: str) -> None:
    """Refuse, from the configs alone (no tensor is read), a pair mergekit cannot merge.

    Raises:
        dft.DftError: architectures, layer shapes or vocabulary sizes differ.
    """
    a, b = _load_config(model_path), _load_config(partner_path)
    arch_a, arch_b = list(a.architectures or []), list(b.architectures or [])
    if arch_a != arch_b:
        raise DftError(
            f"cannot merge {model_path} ({'/'.join(arch_a) or '?'}) with {partner_path} "
            f"({'/'.join(arch_b) or '?'}): architectures differ"
        )
    ta, tb = a.get_text_config(), b.get_text_config()
    va, vb = getattr(ta, "vocab_size", None), getattr(tb, "vocab_size", None)
    if va != vb:
        raise DftError(
            f"cannot merge {model_path} (vocab_size={va}) with {partner_path} (vocab_size={vb}): "
            "vocabulary sizes differ"
        )
    for key in SHAPE_FIELDS:
        xa, xb = getattr(ta, key, None), getattr(tb, key, None)
        if xa != xb:
            raise DftError(f"cannot merge {model_path} ({key}={xa}) with {partner_path} ({key}={xb}): {key} differs")


def _check_params(method: str, params: Dict[str, Any]) -> None:
    """mergekit silently ignores unknown parameter names; dft refuses them."""
    from mergekit import merge_methods

    try:
        spec = merge_methods.get(method).spec
    except Exception as e:  # noqa: BLE001
        raise DftError(f"merge.method={method!r} is not a mergekit merge method: {e}") from e
    known = {p.name for p in spec.parameters}
    unknown = sorted(set(params) - known)
    if unknown:
        raise DftError(
            f"merge.params has {', '.join(unknown)}, which mergekit's {method!r} does not take "
            f"(it takes {', '.join(sorted(known)) or 'none'})"
        )


#: safetensors header dtype names -> torch dtype names mergekit takes
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def weights_dtype(path: str) -> Optional[str]:
    """The floating dtype of a local model's weights, from its first safetensors header (no tensor
    is read); None for a hub id, a folder without safetensors or mixed float dtypes."""
    import json
    import struct

    files = sorted(Path(path).expanduser().glob("*.safetensors")) if Path(path).expanduser().is_dir() else []
    if not files:
        return None
    with open(files[0], "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    found = {_ST_DTYPES.get(v.get("dtype")) for k, v in header.items() if k != "__metadata__"} - {None}
    return found.pop() if len(found) == 1 else None


def resolve_out_dtype(merge_cfg: Any, model_path: str, partner_path: str) -> str:
    """``merge.out_dtype``, or when null the dtype both models' weights are stored in (a bf16
    pair is saved bf16), or float32 when they differ or cannot be read (no precision lost)."""
    explicit = _field(merge_cfg, "out_dtype", None)
    if explicit:
        return explicit
    a, b = weights_dtype(model_path), weights_dtype(partner_path)
    return a if a is not None and a == b else "float32"


def build_merge_config(merge_cfg: Any, model_path: str, partner_path: str):
    """The mergekit ``MergeConfiguration`` for ``merge_cfg`` (a :class:`dft.config.MergeConfig`).

    ``base_model`` is the partner; the fine-tuned model is the other input; ``merge_cfg.params``
    becomes mergekit's top-level ``parameters`` unchanged (e.g. a ``t`` filter list for SLERP).
    ``dtype`` (``merge.dtype``) is what mergekit computes in, ``out_dtype`` what it saves
    (:func:`resolve_out_dtype`). Validated by mergekit's pydantic model plus a check that every
    parameter name is known.
    """
    from mergekit.config import MergeConfiguration

    method = _field(merge_cfg, "method", "none")
    if method in (None, "none"):
        raise DftError("merge.method='none': there is nothing to merge")
    params = dict(_plain(_field(merge_cfg, "params", None)) or {})
    _check_params(method, params)
    partner, model = _ref(partner_path), _ref(model_path)
    doc = {
        "merge_method": method,
        "base_model": partner,
        "models": [{"model": partner}, {"model": model}],
        "dtype": _field(merge_cfg, "dtype", "float32"),
        "out_dtype": resolve_out_dtype(merge_cfg, model_path, partner_path),
    }
    if params:
        doc["parameters"] = params
    try:
        return MergeConfiguration.model_validate(doc)
    except Exception as e:  # noqa: BLE001 - pydantic's message, on one line
        raise DftError(f"invalid mergekit config for merge.method={method!r}: {e}".replace("\n", " ")) from e


def _complete(out_dir: Path) -> bool:
    return (out_dir / MERGEKIT_YAML).is_file() and (out_dir / "config.json").is_file() and any(
        out_dir.glob("*.safetensors")
    )


def _copy_tokenizer(source: str, dest: Path) -> None:
    src = Path(source).expanduser()
    if src.is_dir() and (src / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
        return
    from transformers import AutoTokenizer  # a hub id, or a dir with an unusual tokenizer layout

    AutoTokenizer.from_pretrained(source).save_pretrained(str(dest))


def _respect_umask(folder: Path) -> None:
    """safetensors writes its files 0600; give the merged files the permissions of the umask
    (collaborators on a shared cluster must be able to read the merged model)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


#: glibc ``mallopt`` parameters (malloc.h) and the values its dynamic rule settles on for 64-bit
#: (``DEFAULT_MMAP_THRESHOLD_MAX`` = 32 MiB, trim threshold = 2x the mmap threshold).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_MMAP_MAX, _GLIBC_TRIM_AT_MAX = 32 << 20, 64 << 20


def _glibc(*functions: str):
    """This process's C library via ctypes if it is glibc and has all ``functions``, else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        for name in functions:
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def large_blocks_returned_to_os(threshold: int = 4 << 20):
    """For the duration: allocations >= ``threshold`` bytes that free heap memory cannot serve get
    their own ``mmap`` (unmapped on free) instead of growing the heap.

    Why: glibc raises its mmap threshold each time it frees a mapped block (up to 32 MiB), after
    which tensor-sized blocks (a SmolLM2-135M MLP matrix is 3.5 MB) come from the heap, where
    freed ones can stay resident behind live ones. mergekit allocates and frees one tensor after
    another; on the 135M model that left 112-128 MB of free heap resident at the peak in 4 runs
    of 6 and none in the others (``bench/merge_heap_probe.py``), the merge peaking at ~910 MB or
    ~790 MB from run to run. With blocks >= ``threshold`` mapped (4 MiB: the temporaries of
    mergekit's SLERP; bench/README.md says why not 8) they go back to the OS when freed:
    ``bench/merge_bench.py --glibc-default`` measures the peak and the cost (page faults on fresh
    mappings: the merge ~1.1x slower).

    Afterwards the thresholds are left where glibc's dynamic rule ends up (mmap 32 MiB, trim
    64 MiB; the rule itself cannot be re-enabled) and free memory is trimmed. No-op on other
    C libraries.
    """
    libc = _glibc("mallopt", "malloc_trim")
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_AT_MAX)
        libc.malloc_trim(0)


def malloc_stats() -> Optional[Dict[str, int]]:
    """glibc's ``mallinfo2()`` in bytes: ``heap_in_use`` (``uordblks``), ``heap_free`` (``fordblks``:
    free but still resident unless trimmed) and ``mapped`` (``hblkhd``: blocks with their own mmap);
    None without glibc >= 2.33. Used by tests/test_merging.py and bench/merge_heap_probe.py."""
    libc = _glibc("mallinfo2")
    if libc is None:
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    m = libc.mallinfo2()
    return {"heap_in_use": m.uordblks, "heap_free": m.fordblks, "mapped": m.hblkhd}


class _PreservedRng:
    """run_merge seeds Python/NumPy/torch globally (for DARE); give the caller its RNG back."""

    def __enter__(self):
        import numpy as np
        import torch

        self.state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return self

    def __exit__(self, *exc):
        import numpy as np
        import torch

        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.random.set_rng_state(self.state[2])
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def merge_models(
    merge_cfg: Any,
    model_path: str,
    partner_path: str,
    out_dir: str,
    *,
    tokenizer_source: Optional[str] = None,
    seed: int = 0,
    force: bool = False,
    options: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Merge the fine-tuned ``model_path`` with ``partner_path`` into ``out_dir`` with mergekit.

    Args:
        merge_cfg: a :class:`dft.config.MergeConfig` (or a mapping with its keys).
        model_path: the fine-tuned model (HF dir or hub id).
        partner_path: the partner, mergekit's ``base_model`` (``t=0`` for SLERP).
        out_dir: destination; written atomically (``<out_dir>.tmp-<pid>``, then renamed) and left
            alone if it already holds a complete merge (unless ``force``).
        tokenizer_source: whose tokenizer files to copy (default: the partner's).
        seed: mergekit's random seed (only DARE samples); the caller's RNG state is restored.
        force: merge again even if ``out_dir`` is complete.
        options: ``mergekit.options.MergeOptions`` fields overriding dft's defaults (CPU math,
            lazy loading, low memory, quiet, and ``out_shard_size`` = the largest input
            safetensors file in bytes), e.g. ``{"cuda": True}`` on a GPU node.

    Memory: mergekit reads each input one shard at a time (memory-mapped) and keeps the output
    shard being written in RAM, so the peak is about three shards plus the Python process
    (~0.45 GB with torch, transformers and mergekit imported), not two or three whole models:
    save inputs sharded (``model.max_shard_size``) to bound it. The merge runs inside
    :func:`large_blocks_returned_to_os` (glibc), so freed tensors do not stay resident.
    ``bench/merge_bench.py`` measures it: 1.47x one model for SmolLM2-135M.

    Returns:
        ``{"method", "config_yaml", "seconds", "out_dir", "skipped", "dtype", "out_dtype"}`` (the
        computation and the saved weights' dtype; both also in ``mergekit.yaml``).

    Raises:
        dft.DftError: incompatible models (checked from the configs, before any tensor is read),
            an unknown method or parameter, or an ``out_dir`` holding a different merge.
    """
    out = Path(out_dir)
    method = _field(merge_cfg, "method", "none")
    config = build_merge_config(merge_cfg, model_path, partner_path)
    yaml_text = config.to_yaml() + "\n"
    info = {"method": method, "config_yaml": yaml_text, "seconds": 0.0, "out_dir": str(out), "skipped": False,
            "dtype": config.dtype, "out_dtype": config.out_dtype}
    if _complete(out) and not force:
        existing = (out / MERGEKIT_YAML).read_text()
        if existing != yaml_text:
            raise DftError(f"{out} already holds a different merge (its {MERGEKIT_YAML} differs); remove it or force")
        return {**info, "skipped": True}
    check_compatible(model_path, partner_path)

    from mergekit.merge import MergeOptions, run_merge

    opts = dict(
        cuda=False,
        device="cpu",
        lazy_unpickle=True,
        low_cpu_memory=True,
        random_seed=seed,
        quiet=True,
    )
    largest = _largest_shard(model_path, partner_path)
    if largest:  # one output shard no larger than an input's: peak memory ~ three shards, not a model
        opts["out_shard_size"] = largest
    opts.update(_plain(options) or {})
    if opts.get("cuda") and opts.get("device") == "cpu":
        del opts["device"]  # let MergeOptions derive it from cuda=True
    # dft copies the chosen tokenizer itself and writes mergekit.yaml (not README.md + mergekit_config.yml)
    opts.update(copy_tokenizer=False, write_model_card=False)
    try:
        merge_options = MergeOptions(**opts)
    except Exception as e:  # noqa: BLE001
        raise DftError(f"invalid mergekit options {sorted(_plain(options) or {})}: {e}".replace("\n", " ")) from e
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with _PreservedRng(), large_blocks_returned_to_os():
            run_merge(config, str(tmp), merge_options, config_source=yaml_text)
        (tmp / MERGEKIT_YAML).write_text(yaml_text)
        _copy_tokenizer(tokenizer_source or partner_path, tmp)
        _respect_umask(tmp)
        from dft.faults import fault_point

        fault_point("merge_write")
        if out.exists() and force:
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError as e:
            if not _complete(out):  # not a concurrent writer finishing first: a real problem
                raise DftError(f"cannot move the merge into {out}: {e} (remove {out} if it is a leftover)") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["seconds"] = time.perf_counter() - start
    return info


def _largest_shard(*paths: str) -> int:
    """Size in bytes of the largest ``*.safetensors`` file in the given local dirs (0 if none)."""
    sizes = [f.stat().st_size for p in paths if Path(p).is_dir() for f in Path(p).glob("*.safetensors")]
    return max(sizes, default=0)


def read_merge_yaml(out_dir: str) -> Dict[str, Any]:
    """The mergekit config a merged dir was made with, as a dict."""
    import yaml

    return yaml.safe_load((Path(out_dir) / MERGEKIT_YAML).read_text())


__all__ = ["build_merge_config", "check_compatible", "merge_models", "read_merge_yaml"]

