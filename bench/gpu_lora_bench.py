"""LoRA and QLoRA SFT steps on a Llama-3.1-8B-shaped model (random weights) on one GPU.

Measures what a grid cell will see on the cluster before any weights are downloaded:
tokens/s, MFU and peak memory of a few optimizer steps at sequence length 2048, for LoRA on a
bf16 base and QLoRA on an NF4 base, next to dft.memory's estimate (printed as a ratio).

    python bench/gpu_lora_bench.py                        # H100/H200 defaults, ~2-3 minutes
    python bench/gpu_lora_bench.py --peak-tflops 312      # A100 (bf16 dense peak)
    python bench/gpu_lora_bench.py --shape tiny --device cpu --dtype float32 --seq 64   # smoke test

What one step does mirrors TRL 1.x's SFTTrainer on CUDA (dft's defaults): bf16 base weights,
``torch.autocast(bfloat16)``, LoRA r=16 / alpha 32 / dropout 0.05 on all seven linear
projections (PEFT keeps LoRA adapters in fp32; TRL casts QLoRA adapters to bf16), non-reentrant
gradient checkpointing with ``enable_input_require_grads``, AdamW, causal-LM loss on every token
(random token ids; the throughput of a matmul does not depend on the values). QLoRA replaces
every decoder linear with a bitsandbytes ``Linear4bit`` (NF4, double quantisation, bf16
compute), quantised from the random bf16 weights on the GPU, as ``BitsAndBytesConfig`` does at load.

MFU (model FLOPs utilisation, Chowdhery et al. 2022, PaLM, App. B) = 6 * N * tokens/s / peak,
N = all 8.03 B parameters; the attention term adds 12 * layers * hidden * seq per token. By this
convention a LoRA step does ~2/3 of those FLOPs (no weight gradients for the frozen base: 4 N),
and gradient checkpointing recomputes the forward (+2 N) without counting it: read MFU as
"the speed of full fine-tuning at this throughput", comparable across methods and GPUs.
``--peak-tflops`` is the dense bf16 peak of the GPU: 989 for H100/H200 SXM, 312 for A100.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: A small model with the same structure, for a CPU smoke test of this script.
TINY = dict(
    hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Prints one line per method and a JSON summary (--json).")
    p.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--shape", default="llama3_1_8b", choices=["llama3_1_8b", "mistral_7b_v0_3", "smollm_1_7b", "tiny"],
                   help="architecture of the random-weight model (tiny: CPU smoke test)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels autotuning)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU in TFLOP/s (H100/H200: 989)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="base weights and compute")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def build_config(shape: str):
    from dft.families import REAL_ARCH, hf_config

    if shape == "tiny":
        return hf_config(dict(REAL_ARCH["llama3_1_8b"], vocab_size=4096, bos_token_id=1, eos_token_id=2), **TINY)
    return hf_config(REAL_ARCH[shape])


def quantize_linears_(model, compute_dtype) -> int:
    """Replace every decoder-layer ``nn.Linear`` by an NF4 ``bnb.nn.Linear4bit`` (double quant), in place.

    Quantises on the weight's device, one layer at a time, so the bf16 copy is freed as it goes.
    Returns the number of parameters now stored in 4 bits.
    """
    import bitsandbytes as bnb
    import torch

    n = 0
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
                )._quantize(child.weight.device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                n += child.weight.numel()
                setattr(block, name, q)
                del child
    model.is_loaded_in_4bit = True  # what TRL checks to treat the model as QLoRA
    return n


def run_method(method: str, args, cfg) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dft.memory import count_parameters, estimate_for_config

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    t_build = time.perf_counter()
    torch.manual_seed(args.seed)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=args.attn)
    if method == "qlora":
        quantize_linears_(model, compute_dtype=dtype)
        if cuda:
            torch.cuda.empty_cache()
    model.config.use_cache = False
    lora = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    if method == "qlora":  # TRL 1.x: QLoRA adapters in bf16 (QLoRA paper)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    build_s = time.perf_counter() - t_build

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None

    n = count_parameters(cfg)["total"]
    tokens_s = args.batch * args.seq * args.steps / elapsed
    flops_token = 6 * n
    flops_token_attn = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.seq
    est = estimate_for_config(
        cfg, method, dtype=args.dtype, batch=args.batch, seq_len=args.seq, r=args.r,
        lora_dropout=args.dropout, gradient_checkpointing=args.gradient_checkpointing,
    )
    result = {
        "method": method,
        "params": n,
        "trainable": sum(p.numel() for p in trainable),
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "build_s": round(build_s, 1),
        "step_s": round(elapsed / args.steps, 4),
        "tokens_per_s": round(tokens_s, 1),
        "mfu": round(flops_token * tokens_s / (args.peak_tflops * 1e12), 4),
        "mfu_with_attention": round(flops_token_attn * tokens_s / (args.peak_tflops * 1e12), 4),
        "peak_memory_gib": None if peak is None else round(peak / 2**30, 2),
        "estimated_gib": round(est["total"] / 2**30, 2),
        "measured_over_estimate": None if peak is None else round(peak / est["total"], 3),
        "losses": [round(x, 4) for x in losses],
    }
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise RuntimeError(f"{method}: non-finite loss {losses}")
    del model, opt, trainable, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --shape tiny --device cpu --dtype float32 for a smoke test)")
        return 2
    cfg = build_config(args.shape)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.shape} (random weights) on {where}: seq {args.seq} x batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}, LoRA r={args.r} on {len(ALL_LINEAR)} projections, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, peak {args.peak_tflops:g} TFLOP/s")
    results = []
    for method in args.methods:
        r = run_method(method, args, cfg)
        results.append(r)
        mem = "" if r["peak_memory_gib"] is None else (
            f", peak {r['peak_memory_gib']:.1f} GiB (dft.memory estimate {r['estimated_gib']:.1f} GiB, "
            f"ratio {r['measured_over_estimate']:.2f})"
        )
        print(f"{method:6s} {r['tokens_per_s']:9.0f} tokens/s  {r['step_s']:.3f} s/step  MFU {100 * r['mfu']:.1f} % "
              f"(with attention {100 * r['mfu_with_attention']:.1f} %){mem}  build {r['build_s']:.0f} s  "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    if len(results) == 2:
        a, b = results
        print(f"{b['method']}/{a['method']}: throughput x{b['tokens_per_s'] / a['tokens_per_s']:.2f}"
              + ("" if a["peak_memory_gib"] is None else f", peak memory x{b['peak_memory_gib'] / a['peak_memory_gib']:.2f}"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
