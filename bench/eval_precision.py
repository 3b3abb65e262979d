"""The full MCQ evaluation in fp32 and in bf16 on CPU, and the fp32 floor of this machine.

    .venv/bin/python bench/eval_precision.py [--bench mascqa,mmlu_stem,anatomy_mcq] [-n N]
                                             [--batch-size 32] [--dtypes float32,bfloat16] [--json FILE]

Each dtype runs in its own process: the embedded SmolLM2-135M-Instruct loaded in that dtype by
``dft.modeling.load_model(..., dtype=...)`` (what ``eval.dtype`` does in a run), then
``dft.evaluation.mcq.evaluate_mcq`` with ``eval=full``'s settings (greedy answer and
log-likelihood, 8 new tokens, batch 32) over every item of each benchmark (or the first ``-n``).
Printed per dtype: the time of each benchmark's evaluation with the model loaded, both
accuracies, and against the first dtype (fp32) the time ratio and how many greedy answers and
log-likelihood letters changed.

The fp32 floor: after its evaluation, the first child times this machine's GEMMs on the model's
own linear layer shapes (``F.linear`` of a ``[2048, in]`` activation with a random ``[out, in]``
weight per decoder layer, as many weights as the model has, lm_head excluded; median of 5
passes over all layers), in fp32 and bf16.
The evaluation's prefill runs ``prefilled tokens x 2 x (those layers' parameters)`` FLOPs through
exactly those GEMMs (the ``tokens`` record of ``evaluate_mcq``); divided by the measured rate it is
the time these GEMMs alone take at the speed torch reaches here: a lower bound for fp32
evaluation of the same tokens on this machine (attention, norms, the decode steps and lm_head
come on top). With ``--dtypes`` not starting with float32, the floor is given for that dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import OUT, compose, machine_line, median, model_path, offline_env, run_child, table, write_result  # noqa: E402

BENCHES = ("mascqa", "mmlu_stem", "anatomy_mcq")


def gemm_rates(model, rows: int = 2048, passes: int = 5) -> dict:
    """GFLOP/s of ``F.linear`` over every decoder ``nn.Linear`` of ``model`` at ``rows`` tokens.

    Returns ``{"params": linear parameters timed (lm_head excluded), "float32": GFLOP/s,
    "bfloat16": GFLOP/s}``; each rate is ``2 * rows * params`` over the median time of one pass.
    """
    import torch
    import torch.nn.functional as F

    shapes = [tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    params = sum(o * i for o, i in shapes)
    out = {"params": params, "rows": rows}
    for dt in (torch.float32, torch.bfloat16):
        weights = [torch.randn(*s, dtype=dt) for s in shapes]  # one per layer, as many bytes as the model's
        acts = {i: torch.randn(rows, i, dtype=dt) for _, i in set(shapes)}
        times = []
        for p in range(passes + 1):
            t0 = time.perf_counter()
            for w in weights:
                F.linear(acts[w.shape[1]], w)
            if p:  # the first pass warms up
                times.append(time.perf_counter() - t0)
        out[str(dt).removeprefix("torch.")] = 2 * rows * params / median(times) / 1e9
    return out


def child(args) -> None:
    import torch

    from dft.data import load_benchmark
    from dft.evaluation.mcq import evaluate_mcq
    from dft.modeling import generation_eos_ids, load_model, load_tokenizer

    offline_env()
    cfg = compose(["eval=full"])
    path = model_path(cfg)
    tok = load_tokenizer(path, cfg.model)
    tok.padding_side = "left"
    model = load_model(path, cfg.model, device="cpu", dtype=args.child)
    out: dict = {"dtype": args.child, "threads": torch.get_num_threads(), "benchmarks": {}}
    for bench in args.bench:
        items = load_benchmark(cfg.data, bench)[: args.n]
        t0 = time.perf_counter()
        rec = evaluate_mcq(model, tok, cfg.model, items, eos_ids=generation_eos_ids(tok, cfg.model),
                           max_new_tokens=cfg.eval.max_new_tokens, batch_size=args.batch_size, progress=False)
        out["benchmarks"][bench] = {
            "eval_s": time.perf_counter() - t0, "n": rec["n"], "acc": rec["acc"], "acc_ll": rec["acc_ll"],
            "tokens": rec["tokens"], "preds": {r["id"]: [r["pred"], r["pred_ll"]] for r in rec["items"]}}
        print(bench, out["benchmarks"][bench]["eval_s"], flush=True)
    if args.gemm:
        out["gemm"] = gemm_rates(model)
    write_result(args.result, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default=",".join(BENCHES), help="comma-separated data.eval names")
    ap.add_argument("-n", type=int, default=None, help="first N items per benchmark (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; the first is the reference")
    ap.add_argument("--workdir", type=Path, default=OUT / "eval_precision")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.bench = args.bench.split(",")
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            ap.error(f"--dtypes: {d!r} is not one of float32, bfloat16, float16")
    for b in args.bench:
        if b not in BENCHES:
            ap.error(f"--bench: {b!r} is not one of {', '.join(BENCHES)}")
    if args.child:
        return child(args)

    args.workdir.mkdir(parents=True, exist_ok=True)
    offline_env()
    print(f"eval_precision: {time.strftime('%Y-%m-%d %H:%M')}, {machine_line()}")
    print(f"model {model_path(compose()).name}, benchmarks {', '.join(args.bench)}"
          f"{f' (first {args.n} items each)' if args.n else ' (all items)'}, batch size {args.batch_size}\n", flush=True)
    runs = {}
    for i, d in enumerate(dtypes):
        argv = [__file__, "--bench", ",".join(args.bench), "--batch-size", str(args.batch_size), "--child", d,
                "--result", str(args.workdir / f"{d}.json")] + (["-n", str(args.n)] if args.n else []) + \
               (["--gemm"] if i == 0 else [])
        runs[d] = run_child(argv, args.workdir / f"{d}.json", args.workdir / f"{d}.log")
        print(f"  {d}: {sum(b['eval_s'] for b in runs[d]['benchmarks'].values()):.0f} s of evaluation, process "
              f"{runs[d]['process_wall_s']:.0f} s, peak RSS {runs[d]['process_peak_rss_mb']:.0f} MB", flush=True)

    ref = runs[dtypes[0]]
    rows = []
    for d in dtypes:
        total = sum(b["eval_s"] for b in runs[d]["benchmarks"].values())
        for bench, b in runs[d]["benchmarks"].items():
            r = ref["benchmarks"][bench]
            moved_gen = sum(b["preds"][k][0] != r["preds"][k][0] for k in b["preds"])
            moved_ll = sum(b["preds"][k][1] != r["preds"][k][1] for k in b["preds"])
            rows.append([d, bench, b["n"], f"{b['eval_s']:.0f}", f"{r['eval_s'] / b['eval_s']:.2f}x",
                         f"{b['acc']:.3f}", f"{b['acc_ll']:.3f}", moved_gen, moved_ll])
        n = sum(b["n"] for b in runs[d]["benchmarks"].values())
        moved = [sum(b["preds"][k][j] != ref["benchmarks"][bn]["preds"][k][j] for bn, b in runs[d]["benchmarks"].items()
                     for k in b["preds"]) for j in (0, 1)]
        rows.append([d, "all", n, f"{total:.0f}", f"{sum(b['eval_s'] for b in ref['benchmarks'].values()) / total:.2f}x",
                     "", "", moved[0], moved[1]])
    print()
    print(table(rows, ["dtype", "benchmark", "items", "eval s", f"speed vs {dtypes[0]}", "acc (greedy)", "acc_ll",
                       f"greedy answers moved vs {dtypes[0]}", "ll letters moved"]))
    g = ref["gemm"]
    print(f"\nGEMM rate of this machine on the model's {g['params'] / 1e6:.1f}M decoder linear parameters "
          f"({g['rows']} rows, {ref['threads']} threads): float32 {g['float32']:.0f} GFLOP/s, bfloat16 "
          f"{g['bfloat16']:.0f} GFLOP/s ({g['bfloat16'] / g['float32']:.2f}x)")
    if dtypes[0] in g:
        prefilled = sum(b["tokens"]["prefilled"] for b in ref["benchmarks"].values())
        flops = prefilled * 2 * g["params"]
        ref_s = sum(b["eval_s"] for b in ref["benchmarks"].values())
        floor = flops / g[dtypes[0]] / 1e9
        print(f"{dtypes[0]} prefill: {prefilled:,} tokens x 2 x {g['params'] / 1e6:.1f}M = {flops / 1e12:.1f} TFLOP in "
              f"those GEMMs -> {floor:.0f} s at the measured {dtypes[0]} rate, the floor; measured evaluation "
              f"{ref_s:.0f} s ({ref_s / floor:.2f}x the floor)")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
