"""Load models and tokenizers: the embedded GGUF default, hub ids, local copies, PEFT wrapping.

Every model, whatever its origin, ends up as a Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) and loads through :func:`load_model` /
:func:`load_tokenizer`, so the embedded SmolLM2-135M-Instruct follows the same path as
Llama 3.1 8B on a cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from dft import DftError

log = logging.getLogger(__name__)

# the embedded model and the file lock live in their own modules (no families <-> modeling cycle);
# re-exported here, where callers have always found them
from dft.embedded import EMBEDDED_GGUF, EMBEDDED_PACKAGE, EMBEDDED_SHARD_SIZE, embedded_gguf_path, ensure_embedded_model  # noqa: E402,F401
from dft.locks import file_lock  # noqa: E402,F401


# --------------------------------------------------------------------------- hardware


def has_cuda() -> bool:
    """True when a CUDA device is usable (imports torch lazily)."""
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU raises DftError."""
    if device == "auto":
        return "cuda" if has_cuda() else "cpu"
    if device == "cuda" and not has_cuda():
        raise DftError("device=cuda but no CUDA device is available (use device=auto or device=cpu)")
    return device


def resolve_dtype(name: str, device: str, key: str = "model.dtype"):
    """Map a dtype name to ``torch.dtype``; ``auto`` is bf16 on CUDA (the paper's setting), fp32 on CPU.

    Raises:
        DftError: ``name`` is not a known dtype; the message names the config ``key`` it came from.
    """
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        from dft.config import DTYPES

        raise DftError(f"{key}={name!r} is not one of {', '.join(DTYPES)}") from None


# --------------------------------------------------------------------------- locating weights


def resolve_model_path(model_cfg: Any, cache_dir: str | os.PathLike, *, which: str = "model") -> Path:
    """Find the weights of ``model_cfg`` (``which='partner'`` for its merge partner) on disk.

    Order: ``path`` (must exist) -> embedded GGUF -> the local Hugging Face cache for
    ``hub_id`` (``snapshot_download`` with ``local_files_only`` when ``HF_HUB_OFFLINE=1``,
    else a normal download).

    Raises:
        DftError: one line naming the hub id, the local path tried and the override to use.
    """
    if which == "partner":
        path, hub_id = model_cfg.partner_path, model_cfg.partner
        if path is None and hub_id is None:
            return resolve_model_path(model_cfg, cache_dir)
        key = "model.partner_path"
    else:
        path, hub_id = model_cfg.path, model_cfg.hub_id
        key = "model.path"
        if path is None and model_cfg.embedded:
            return ensure_embedded_model(cache_dir)
        if path is None:
            from dft.families import ensure_tiny_model, tiny_family

            family = tiny_family(hub_id)
            if family is not None:  # model=tiny*: random weights built on demand, for tests
                return ensure_tiny_model(cache_dir, family)
    if path is not None:
        p = Path(path).expanduser()
        if not (p / "config.json").exists():
            raise DftError(f"{key}={path}: no model there (expected a Hugging Face folder with config.json)")
        return p
    if hub_id and Path(hub_id).expanduser().is_dir():
        return Path(hub_id).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(hub_id, local_files_only=offline, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
        return Path(local)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one readable line
        from huggingface_hub.constants import HF_HUB_CACHE

        tried = Path(HF_HUB_CACHE) / ("models--" + str(hub_id).replace("/", "--"))
        raise DftError(
            f"cannot load {hub_id!r}: not in the local cache ({tried}) and the hub is "
            f"{'offline (HF_HUB_OFFLINE=1)' if offline else 'unreachable'} ({type(e).__name__}); "
            f"point at a local copy with {key}=/path/to/model"
        ) from None


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike, model_cfg: Any):
    """Load the tokenizer of ``path`` and apply the family's rules (pad token, chat template).

    See :func:`dft.families.prepare_tokenizer`.
    """
    from transformers import AutoTokenizer

    from dft.families import prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return prepare_tokenizer(tok, model_cfg)


def load_model(
    path: str | os.PathLike,
    model_cfg: Any,
    *,
    device: str = "cpu",
    peft_cfg: Any = None,
    for_training: bool = False,
    dtype: Optional[str] = None,
):
    """Load a causal LM from a HF folder in the dtype the hardware runs best.

    ``dtype`` (a name as in ``model.dtype``) overrides ``model_cfg.dtype``; evaluation passes the
    precision :meth:`dft.pipeline.Cell.eval_precision` resolved from ``eval.dtype``.

    With ``peft_cfg.method == 'qlora'`` and ``for_training``, the base is loaded in 4-bit NF4
    through bitsandbytes (``BitsAndBytesConfig``); LoRA adapters are added by the TRL trainer
    from :func:`peft_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype, device, "dtype") if dtype is not None else resolve_dtype(model_cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if for_training and peft_cfg is not None and peft_cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = dtype if peft_cfg.bnb_4bit_compute_dtype == "auto" else resolve_dtype(peft_cfg.bnb_4bit_compute_dtype, device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=peft_cfg.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=peft_cfg.bnb_4bit_use_double_quant,
        )
        if device == "cpu":
            _warn_once("qlora on CPU: bitsandbytes 4-bit runs, but it is no faster than full precision on this hardware")
            kwargs["device_map"] = {"": "cpu"}
        else:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def peft_config(peft_cfg: Any, model_cfg: Any):
    """The ``peft.LoraConfig`` for ``lora``/``qlora`` (None for ``full``).

    Target modules default to the model config's ``lora_target_modules`` (all linear
    projections of the attention and MLP blocks, as in QLoRA, Dettmers et al. 2023).
    """
    if peft_cfg.method == "full":
        return None
    from peft import LoraConfig

    targets = list(peft_cfg.target_modules or model_cfg.lora_target_modules)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def check_peft_targets(model, lora_config) -> None:
    """Refuse a LoRA on an embedding that is tied to ``lm_head``.

    With ``tie_word_embeddings`` (SmolLM, SmolLM2), a LoRA on ``embed_tokens`` trains the input
    embedding only (``lm_head`` keeps reading the base weight), but merging writes ``W + BA`` into
    the one shared tensor, so the saved model's output head differs from the trained one's.

    Raises:
        DftError: naming ``peft.target_modules`` and the tied module.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    if hasattr(model.config, "get_text_config"):
        tied = getattr(model.config.get_text_config(), "tie_word_embeddings", tied)
    if not tied:
        return
    targets = lora_config.target_modules
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    bad = [t for t in targets if t in ("embed_tokens", "lm_head") or t.endswith((".embed_tokens", ".lm_head"))]
    if bad:
        raise DftError(
            f"peft.target_modules lists {bad[0]!r}, but this model ties its input embedding to lm_head: merging the "
            "adapter would change both and the saved model would differ from the trained one; drop it from "
            "peft.target_modules (or train the embeddings with peft=full)"
        )


def write_special_tokens(model, tokenizer, model_cfg: Any) -> None:
    """Set the tokenizer's pad and BOS ids and the family's end tokens on ``model.config`` and
    ``model.generation_config``, so that a saved folder's ``config.json`` / ``generation_config.json``
    tell other tools (vLLM, lm-eval, mergekit) what dft trained with, whatever the base's files said
    (Meta's Llama 3.1 ships no ``pad_token_id``; SmolLM2's says 2, its EOS)."""
    from transformers import GenerationConfig

    from dft.families import stop_token_ids

    stops = stop_token_ids(tokenizer, model_cfg)
    eos = stops[0] if len(stops) == 1 else stops
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = eos
        cfg.bos_token_id = tokenizer.bos_token_id
    gen = getattr(model, "generation_config", None) or GenerationConfig()
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, eos, tokenizer.bos_token_id
    model.generation_config = gen


def save_merged(trained_model, base_path: str | os.PathLike, model_cfg: Any, out_dir: Path, tokenizer) -> None:
    """Save a trained model as a plain HF folder (LoRA adapters merged into an unquantised base).

    A PEFT model is saved as an adapter, then the adapter is merged into the base weights
    reloaded *unquantised* (merging into a 4-bit base degrades the model, see DESIGN.md §6)
    and the full weights are written with ``safe_serialization``; the adapter is kept in
    ``adapter/`` next to them, in safetensors shards of at most ``model_cfg.max_shard_size``
    (a later merge holds about one shard per model in memory, not whole models). ``config.json`` and
    ``generation_config.json`` carry the tokenizer's pad / BOS and the family's end tokens
    (:func:`write_special_tokens`). ``out_dir`` must not exist; the caller renames it into place.
    """
    from peft import PeftModel

    shard = getattr(model_cfg, "max_shard_size", None) or "5GB"
    out_dir.mkdir(parents=True)
    if isinstance(trained_model, PeftModel):
        adapter_dir = out_dir / "adapter"
        trained_model.save_pretrained(adapter_dir)
        base = load_model(base_path, model_cfg, device="cpu")
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        write_special_tokens(merged, tokenizer, model_cfg)
        merged.save_pretrained(out_dir, max_shard_size=shard)
    else:
        write_special_tokens(trained_model, tokenizer, model_cfg)
        trained_model.save_pretrained(out_dir, max_shard_size=shard)
    tokenizer.save_pretrained(out_dir)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a torch module (unique tensors)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def generation_eos_ids(tokenizer, model_cfg: Any) -> list[int]:
    """Token ids generation stops on: the model's end-of-turn tokens plus the tokenizer's EOS."""
    ids = []
    for t in list(model_cfg.eos_tokens) + [tokenizer.eos_token]:
        if t is None:
            continue
        i = tokenizer.convert_tokens_to_ids(t)
        if i is not None and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return ids


def optional_path(p: Optional[str]) -> Optional[Path]:
    return None if p is None else Path(p).expanduser()
