"""Training-memory estimate: weights, gradients, optimizer states and activations, in bytes.

Printed at the start of every training stage (:func:`describe`) so a cell that cannot fit is
recognised before it is queued, and a run that does fit shows how close it is. Pure arithmetic:
no torch import, only a transformers config object (or plain numbers).

Model states (per trainable parameter unless noted):

* **weights**: every parameter in the training dtype (2 bytes for bf16/fp16, 4 for fp32). QLoRA
  stores the decoder's linear layers in NF4 with double quantisation: 4 bits + 8/64 bits of
  quantised block scales + 32/(64*256) bits of second-level scales = 4.127 bits/param
  (Dettmers et al. 2023, QLoRA, §3); embeddings, norms and the LM head stay 16-bit.
  LoRA/QLoRA adapters are added on top in their own dtype (PEFT upcasts LoRA adapters to fp32
  on a 16-bit base; TRL 1.x casts QLoRA adapters to bf16, following the QLoRA paper).
* **gradients**: one per trainable parameter, in the trainable parameter's dtype.
* **optimizer**: AdamW keeps two moments (m, v) per trainable parameter, in the parameter's
  dtype (``torch.optim.AdamW`` uses ``zeros_like(param)``). With ``master_weights`` (mixed
  precision as in DeepSpeed ZeRO and Megatron) it keeps an fp32 copy of 16-bit weights and fp32
  moments: 4 + 4 + 4 = 12 bytes, i.e. the 2 + 2 + 12 = **16 bytes/param** of Rajbhandari et al.
  2020 (ZeRO, §3.1, "K = 12"). Plain ``transformers.Trainer`` on a bf16-loaded model keeps bf16
  moments and no master copy: 2 + 2 + 4 = 8 bytes/param.

Activations (after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", §4, redone for a Llama/Mistral block: RMSNorm, GQA, SwiGLU, fused
SDPA/FlashAttention, which stores no s x s score matrix). Counting the tensors autograd saves for
the backward pass, per token (``b * s`` rows), with ``a`` bytes per activation (2 for bf16/fp16,
4 for fp32):

* each RMSNorm: its fp32 upcast of the input (4h), the normalised tensor and its output (2ah);
  two per layer plus the final one;
* attention: Q and K after RoPE, V (``q + 2kv``), the attention output = ``o_proj`` input (``q``);
* MLP: gate and up outputs, SiLU output, their product = ``down_proj`` input (``4I``);
* LoRA/QLoRA: a frozen linear or norm weight needs no saved input, so the norms keep only the
  fp32 upcast (4h) and the MLP keeps ``3I``; each targeted layer of input width ``in`` with
  adapters of ``t`` bytes adds its dropout output and 1-byte mask (p > 0: ``(t + 1) * in``), or its
  input cast to the adapter dtype (``t * in``), or the input itself (same dtype, shared by q/k/v
  and by gate/up), and ``lora_B`` keeps the rank-``r`` intermediate (``t * r``);
* the LM head: the logits (``a * V``) stay alive for the loss and metrics, and the fp32
  log-softmax the cross-entropy saves (``4 * V``).

so, for full fine-tuning, ``act_layer = b * s * (2 * (2a + 4) * h + a * (2q + 2kv + 4I))``, plus
``b * s * ((2a + 4) * h + (a + 4) * V)`` once. With gradient checkpointing only each layer's input
(``a * h`` per token) is kept, plus one layer's full set while it is recomputed. For a Llama 3.1 8B
block at a = 2 this is ~40 h bytes per token per layer (Korthikanti et al.: 34 h for a GPT-3 block
with FlashAttention-style attention). ``tests/test_memory.py`` checks the formula against the
tensors autograd actually saves on CPU (within 2 %).

Not counted: CUDA context and allocator fragmentation (typically 1-3 GB per GPU), temporary
buffers inside kernels, the DPO reference model's activations (it runs without gradients), and
communication buckets of DeepSpeed/FSDP. Treat the total as a lower bound with ~10-20 % headroom.
"""

from __future__ import annotations

from typing import Any, Optional

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
#: NF4 with double quantisation: (4 + 8/64 + 32/(64*256)) / 8 bytes per parameter (QLoRA §3).
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
#: The linear projections of a Llama/Mistral decoder layer (LoRA's default targets here).
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Projections that read the same input tensor.
_INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}


def _bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPE_BYTES)}") from None


def _shape(cfg: Any) -> dict[str, int]:
    """The numbers the formulas need from a transformers config (Llama/Mistral/Qwen-style decoders)."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    return {
        "hidden": h,
        "layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
        "intermediate": cfg.intermediate_size,
        "q_dim": heads * head_dim,
        "kv_dim": kv_heads * head_dim,
        "heads": heads,
        "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
        "attention_bias": bool(getattr(cfg, "attention_bias", False)),
        "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
    }


def _proj_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    h, q, kv, i = s["hidden"], s["q_dim"], s["kv_dim"], s["intermediate"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def count_parameters(hf_config: Any) -> dict[str, int]:
    """Exact parameter count of a Llama/Mistral-style causal LM from its config.

    Returns ``{"total", "embedding", "lm_head", "per_layer", "linear" (all decoder-layer linear
    weights, what QLoRA quantises), "norms"}``; a tied LM head counts once (as the embedding).
    """
    s = _shape(hf_config)
    h, q, kv = s["hidden"], s["q_dim"], s["kv_dim"]
    shapes = _proj_shapes(s)
    linear = sum(i * o for i, o in shapes.values())
    bias = 0
    if s["attention_bias"]:
        bias += q + 2 * kv + h
    if s["mlp_bias"]:
        bias += 2 * s["intermediate"] + h
    norms = 2 * h
    per_layer = linear + bias + norms
    embedding = s["vocab"] * h
    lm_head = 0 if s["tied"] else s["vocab"] * h
    total = embedding + s["layers"] * per_layer + h + lm_head  # + final norm
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "per_layer": per_layer,
        "linear": s["layers"] * linear,
        "norms": s["layers"] * norms + h,
    }


def lora_parameters(hf_config: Any, r: int, target_modules: list[str]) -> int:
    """Trainable parameters LoRA adds: ``r * (in + out)`` per targeted linear layer (no bias).

    Raises:
        ValueError: a target module this estimate does not know.
    """
    s = _shape(hf_config)
    shapes = _proj_shapes(s)
    per_layer, extra = 0, 0
    for t in target_modules:
        if t in shapes:
            i, o = shapes[t]
            per_layer += r * (i + o)
        elif t in ("lm_head", "embed_tokens"):
            extra += r * (s["hidden"] + s["vocab"])
        else:
            raise ValueError(f"unknown LoRA target {t!r}; known: {', '.join(list(shapes) + ['lm_head', 'embed_tokens'])}")
    return s["layers"] * per_layer + extra


def estimate_memory(
    params: int,
    peft_method: str,
    dtype: str,
    batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    *,
    trainable: Optional[int] = None,
    quantized: int = 0,
    vocab: int = 0,
    intermediate: Optional[int] = None,
    q_dim: Optional[int] = None,
    kv_dim: Optional[int] = None,
    adapter_dtype: Optional[str] = None,
    master_weights: bool = False,
    gradient_checkpointing: bool = True,
    lora_targets: tuple = (),
    lora_r: int = 0,
    lora_dropout: float = 0.0,
    shards: int = 1,
) -> dict[str, Any]:
    """Bytes of GPU memory for one training step (see the module docstring for each formula).

    Args:
        params: total parameters of the base model.
        peft_method: ``full`` | ``lora`` | ``qlora``.
        dtype: training dtype of the base weights and activations (``bfloat16``, ``float32``...).
        batch, seq_len: sequences per device and tokens per sequence.
        hidden, layers: model width and depth.
        trainable: trainable parameters (default: ``params`` for ``full``; required otherwise).
        quantized: parameters QLoRA stores in NF4 (the decoder linear layers).
        vocab: vocabulary size (logits memory); 0 leaves the logits out.
        intermediate, q_dim, kv_dim: MLP width, query and key/value widths (default 4h, h, h).
        adapter_dtype: dtype of LoRA adapters (default fp32 for ``lora``, bf16 for ``qlora``).
        master_weights: fp32 master weights and fp32 moments (DeepSpeed/mixed precision, 16 B/param).
        gradient_checkpointing: keep only layer inputs, recompute the rest.
        lora_targets: ``(name, input width)`` of the LoRA-targeted linear layers of one decoder layer.
        lora_r, lora_dropout: LoRA rank and dropout probability (activation terms of the adapters).
        shards: GPUs the model states are sharded over (ZeRO-3 / FSDP full shard); activations
            are per GPU and are not divided.

    Returns:
        ``{"weights", "gradients", "optimizer", "activations", "logits", "total"}`` in bytes
        (``activations`` includes ``logits``; ``total`` is the per-GPU sum), plus
        ``"params"`` and ``"trainable"`` counts.
    """
    if peft_method not in ("full", "lora", "qlora"):
        raise ValueError(f"peft_method={peft_method!r} is not one of full, lora, qlora")
    a = _bytes(dtype)
    if peft_method == "full":
        trainable = params if trainable is None else trainable
        t_bytes = a
        weights = params * a
    else:
        if trainable is None:
            raise ValueError(f"{peft_method} needs the trainable (adapter) parameter count")
        t_bytes = _bytes(adapter_dtype or ("float32" if peft_method == "lora" else "bfloat16"))
        if peft_method == "qlora":
            weights = quantized * NF4_BYTES_PER_PARAM + (params - quantized) * a
        else:
            weights = params * a
        weights += trainable * t_bytes
    gradients = trainable * t_bytes
    if master_weights and t_bytes < 4:
        optimizer = trainable * (4 + 4 + 4)  # fp32 master copy + fp32 m + fp32 v
    else:
        optimizer = trainable * 2 * t_bytes  # m and v in the parameter's dtype
    i = intermediate or 4 * hidden
    q = q_dim or hidden
    kv = kv_dim or hidden
    rows = batch * seq_len
    if peft_method == "full":
        # every weight trains: each linear keeps its input (the norm outputs, attention output, product)
        norm = (2 * a + 4) * hidden  # fp32 upcast + normalised + output, per RMSNorm
        per_row = 2 * norm + a * (2 * q + 2 * kv + 4 * i)
    else:
        # frozen base: linears and norm weights keep no inputs; LoRA's A matrices keep theirs
        norm = 4 * hidden  # the fp32 upcast only
        per_row = 2 * norm + a * (2 * q + 2 * kv + 3 * i)
        groups: dict[str, int] = {}
        for name, width in lora_targets:
            if lora_dropout > 0:
                per_row += (t_bytes + 1) * width  # dropout output + mask, one per module
            elif t_bytes != a:
                per_row += t_bytes * width  # input cast to the adapter dtype, one per module
            else:
                groups[_INPUT_GROUP.get(name, name)] = width  # the input itself, shared (q/k/v, gate/up)
            per_row += t_bytes * lora_r  # lora_B keeps the rank-r intermediate
        per_row += a * sum(groups.values())
    full_layer = rows * per_row
    if gradient_checkpointing:
        layer_acts = layers * a * rows * hidden + full_layer
    else:
        layer_acts = layers * full_layer
    layer_acts += rows * norm  # final norm
    logits = rows * vocab * (a + 4)
    activations = layer_acts + logits
    out = {
        "weights": int(weights / shards),
        "gradients": int(gradients / shards),
        "optimizer": int(optimizer / shards),
        "activations": int(activations),
        "logits": int(logits),
        "params": int(params),
        "trainable": int(trainable),
    }
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def estimate_for_config(
    hf_config: Any,
    peft_method: str,
    *,
    dtype: str = "bfloat16",
    batch: int = 1,
    seq_len: int = 2048,
    r: int = 16,
    target_modules: Optional[list[str]] = None,
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool = True,
    master_weights: bool = False,
    adapter_dtype: Optional[str] = None,
    shards: int = 1,
) -> dict[str, Any]:
    """:func:`estimate_memory` for a transformers config (all linear projections targeted by default)."""
    s = _shape(hf_config)
    counts = count_parameters(hf_config)
    targets = list(target_modules or _PROJ)
    trainable = None if peft_method == "full" else lora_parameters(hf_config, r, targets)
    shapes = _proj_shapes(s)
    widths = tuple((t, shapes[t][0]) for t in targets if t in shapes)
    return estimate_memory(
        counts["total"],
        peft_method,
        dtype,
        batch,
        seq_len,
        s["hidden"],
        s["layers"],
        trainable=trainable,
        quantized=counts["linear"] if peft_method == "qlora" else 0,
        vocab=s["vocab"],
        intermediate=s["intermediate"],
        q_dim=s["q_dim"],
        kv_dim=s["kv_dim"],
        adapter_dtype=adapter_dtype,
        master_weights=master_weights,
        gradient_checkpointing=gradient_checkpointing,
        lora_targets=widths,
        lora_r=r,
        lora_dropout=lora_dropout,
        shards=shards,
    )


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def checkpointing_setting(trainer_kwargs: dict) -> Optional[bool]:
    """The stage YAML's activation (gradient) checkpointing switch, under transformers' new name
    ``activation_checkpointing`` or the old ``gradient_checkpointing``; None when it sets neither."""
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if trainer_kwargs.get(key) is not None:
            return bool(trainer_kwargs[key])
    return None


def describe(
    model_cfg: Any,
    peft_cfg: Any,
    trainer_kwargs: dict,
    hf_config: Any,
    *,
    device: Optional[str] = None,
    stage: Optional[str] = None,
) -> str:
    """One line per quantity, printed by ``dft.train`` before a stage trains.

    Args:
        model_cfg: ``cfg.model`` (dtype, max_length).
        peft_cfg: ``cfg.peft`` (method, r, dropout, target_modules, gradient_checkpointing).
        trainer_kwargs: the TRL config kwargs of the stage (``per_device_train_batch_size``,
            ``max_length``, ``gradient_checkpointing``, ``deepspeed``...); TRL's defaults apply
            to missing keys (batch 8, max_length 1024).
        hf_config: the loaded model's transformers config.
        device: ``cuda`` | ``cpu`` (default: CUDA when available).
        stage: ``dpo``/``orpo`` double the sequences per step (chosen + rejected); full-parameter
            DPO also holds a frozen reference copy of the weights.
    """
    import os

    if device is None:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    dtype = model_cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    batch = int(trainer_kwargs.get("per_device_train_batch_size", 8))
    seq = int(trainer_kwargs.get("max_length") or model_cfg.max_length or 1024)
    gc = checkpointing_setting(trainer_kwargs)
    if gc is None:
        gc = getattr(peft_cfg, "gradient_checkpointing", None)
    if gc is None:
        gc = device == "cuda"
    seqs = batch * (2 if stage in ("dpo", "orpo") else 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = bool(trainer_kwargs.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "") == "true"
    fsdp = bool(trainer_kwargs.get("fsdp")) or os.environ.get("ACCELERATE_USE_FSDP", "") == "true"
    shards = world if (deepspeed or fsdp) else 1
    method = peft_cfg.method
    targets = list(getattr(peft_cfg, "target_modules", None) or model_cfg.lora_target_modules)
    est = estimate_for_config(
        hf_config,
        method,
        dtype=dtype,
        batch=seqs,
        seq_len=seq,
        r=getattr(peft_cfg, "r", 16),
        target_modules=targets,
        lora_dropout=getattr(peft_cfg, "dropout", 0.0),
        gradient_checkpointing=bool(gc),
        master_weights=deepspeed,
        shards=shards,
    )
    ref = 0
    if stage == "dpo" and method == "full":
        ref = est["weights"]  # frozen reference model; LoRA DPO uses the base with adapters disabled
    total = est["total"] + ref
    precision = (
        "fp32 master weights + fp32 AdamW moments (DeepSpeed mixed precision, 16 B/param)"
        if deepspeed and method == "full"
        else "AdamW moments in the trainable parameters' dtype"
    )
    lines = [
        f"memory estimate per {'GPU' if device == 'cuda' else 'process (CPU)'} (dft.memory; {dtype}, {method}"
        + (f" r={getattr(peft_cfg, 'r', '?')}" if method != "full" else "")
        + f", {seqs} seq x {seq} tokens, gradient checkpointing {'on' if gc else 'off'}"
        + (f", states sharded over {shards} GPUs" if shards > 1 else "")
        + "):",
        f"  parameters   {_count(est['params'])} total, {_count(est['trainable'])} trainable "
        f"({100 * est['trainable'] / max(est['params'], 1):.2f} %)",
        f"  weights      {_gb(est['weights'])}" + (" (NF4 decoder linears)" if method == "qlora" else ""),
        f"  gradients    {_gb(est['gradients'])}",
        f"  optimizer    {_gb(est['optimizer'])} ({precision})",
        f"  activations  {_gb(est['activations'])} (of which logits {_gb(est['logits'])})",
    ]
    if ref:
        lines.append(f"  reference    {_gb(ref)} (frozen DPO reference model)")
    lines.append(f"  total        {_gb(total)}" + (" + CUDA context/fragmentation (~1-3 GiB)" if device == "cuda" else
                                                  " + the interpreter with torch and transformers (~0.5 GB)"))
    return "\n".join(lines)
