"""Side by side: MCQ log-likelihood scoring through dft vs lm-evaluation-harness, same items.

    .venv/bin/python bench/mcq_bench.py [--bench anatomy_mcq] [-n 100] [--batch-size 16] [--repeats 2]
                                        [--dtype float32] [--json FILE] [--compare EARLIER_JSON]

Needs the PyPI package ``lm-eval`` (0.4.13 measured here; ``pip install lm-eval``).

Both sides score the first ``-n`` items of ``data.eval.<bench>`` (``data/materials/eval_*.jsonl``)
with the embedded SmolLM2-135M-Instruct on CPU, batch size ``--batch-size``, both in ``--dtype``
(float32 by default; bfloat16 is what ``model.dtype=auto`` gives on CUDA, so run it there too):

* **dft**: ``dft.evaluation.mcq.evaluate_mcq(..., generate=False, loglik=True)``: the paper's
  prompt in the chat template with the assistant turn pre-filled with "The correct answer is:",
  one forward pass per item asking for the last position's logits only (``logits_to_keep=1``),
  prediction = the option letter token (" A", " B", ...) with the highest log-probability there;
* **lm-eval**: a local YAML task written to a temp dir (``output_type: multiple_choice``,
  ``doc_to_text: prompt`` (a docs column) where ``prompt`` is dft's rendered prompt, stored in the docs
  file, so both sides see the same string; ``doc_to_choice`` the letters " A", " B", ... with
  ``target_delimiter: ""``), run with ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<the same
  local folder>)`` offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``). lm-eval sees one
  request per (item, letter); its default ``logits_cache`` groups the requests of one item, as
  their contexts are equal and each continuation is one token, so it also runs one forward pass
  per item.

Each side runs in its own process per repeat (order alternating); the time is that of the
scoring call with the model already loaded (``evaluate_mcq``; ``simple_evaluate``, which also
builds the task and reads its docs), median over repeats. Both accuracies are printed with the
number of items whose predictions differ (goal: within one item per hundred) and the
lm-eval/dft time ratio (goal: dft no slower, ratio >= 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (OUT, compose, machine_line, median, model_path, offline_env, run_child,  # noqa: E402
                          self_maxrss_mb, table, write_result)

LETTERS = "ABCDEFGH"


def _items(cfg, bench: str, n: int) -> list[dict]:
    from dft.data import load_benchmark

    return load_benchmark(cfg.data, bench)[:n]


def _load(cfg):
    from dft.modeling import load_model, load_tokenizer

    path = model_path(cfg)
    tok = load_tokenizer(path, cfg.model)
    model = load_model(path, cfg.model, device="cpu")
    return path, tok, model


def child_dft(args, cfg) -> dict:
    import torch

    from dft.evaluation.mcq import evaluate_mcq
    from dft.modeling import generation_eos_ids

    torch.manual_seed(0)
    t0 = time.perf_counter()
    _, tok, model = _load(cfg)
    load_s = time.perf_counter() - t0
    items = _items(cfg, args.bench, args.n)
    eos = generation_eos_ids(tok, cfg.model)
    run = functools.partial(evaluate_mcq, model, tok, cfg.model, items, eos_ids=eos, generate=False, loglik=True,
                            batch_size=args.batch_size, progress=False)
    out: dict = {"load_s": load_s}
    t0 = time.perf_counter()
    rec = run()
    out.update(eval_s=time.perf_counter() - t0, acc=rec["acc_ll"], n=rec["n"],
               preds={r["id"]: r["pred_ll"] for r in rec["items"]})
    out["eval_peak_rss_mb"] = self_maxrss_mb()
    return out


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(cfg, tok, args, folder: Path) -> str:
    """The local lm-eval task: docs with dft's rendered prompt, letters as choices, index as label."""
    from dft.evaluation.mcq import render_prompt

    task = f"dft_bench_{args.bench}"
    docs = folder / "docs.jsonl"
    with open(docs, "w") as fh:
        for it in _items(cfg, args.bench, args.n):
            fh.write(json.dumps({"id": it["id"], "prompt": render_prompt(it, tok, cfg.model),
                                 "choices": [" " + L for L in LETTERS[: len(it["options"])]],
                                 "label": LETTERS.index(it["answer"])}) + "\n")
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, docs=docs))
    return task


def child_lmeval(args, cfg) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    path = model_path(cfg)
    from dft.modeling import load_tokenizer

    tok = load_tokenizer(path, cfg.model)
    folder = Path(tempfile.mkdtemp(prefix="mcq-lmeval-", dir=args.workdir))
    task = write_task(cfg, tok, args, folder)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(path), device="cpu", dtype=args.dtype, batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    calls = {"s": 0.0}
    orig = lm.loglikelihood

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            calls["s"] += time.perf_counter() - t

    lm.loglikelihood = timed
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    eval_s = time.perf_counter() - t0
    samples = res["samples"][task]
    preds = {}
    for s in samples:
        lls = [r[0] for r in s["filtered_resps"]]
        preds[s["doc"]["id"]] = LETTERS[max(range(len(lls)), key=lambda i: lls[i])]
    acc = res["results"][task]["acc,none"]
    return {"load_s": load_s, "eval_s": eval_s, "loglikelihood_s": calls["s"], "acc": acc, "n": len(samples),
            "eval_peak_rss_mb": self_maxrss_mb(), "preds": preds, "lm_eval_version": lm_eval.__version__}


def child(args) -> None:
    offline_env()
    cfg = compose([f"model.dtype={args.dtype}"])
    out = child_dft(args, cfg) if args.child == "dft" else child_lmeval(args, cfg)
    write_result(args.result, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="anatomy_mcq", help="data.eval.<name>: anatomy_mcq, mmlu_stem, mascqa")
    ap.add_argument("-n", type=int, default=100, help="first N items")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides' model dtype")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating order")
    ap.add_argument("--workdir", type=Path, default=OUT / "mcq")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None,
                    help="an earlier --json file (e.g. the other dtype): per side, how many predictions changed")
    ap.add_argument("--child", choices=["dft", "lmeval"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare and not args.compare.is_file():
        ap.error(f"--compare {args.compare}: no such file (an earlier run's --json)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)

    offline_env()
    cfg = compose()
    path = model_path(cfg)
    items = _items(cfg, args.bench, args.n)
    print(f"mcq_bench: {time.strftime('%Y-%m-%d %H:%M')}, {machine_line()}")
    print(f"model {path.name} ({args.dtype}), benchmark {args.bench}: first {len(items)} items, batch size "
          f"{args.batch_size}, {args.repeats} repeat(s)\n")
    common = [__file__, "--bench", args.bench, "-n", str(args.n), "--batch-size", str(args.batch_size),
              "--dtype", args.dtype, "--workdir", str(args.workdir)]
    runs: dict[str, list[dict]] = {"dft": [], "lmeval": []}
    for r in range(args.repeats):
        for side in (("dft", "lmeval") if r % 2 == 0 else ("lmeval", "dft")):
            res = run_child(common + ["--child", side, "--repeat", str(r), "--result", str(args.workdir / f"{side}.json")],
                            args.workdir / f"{side}.json", args.workdir / f"{side}-{r}.log")
            runs[side].append(res)
            extra = f", of which loglikelihood {res['loglikelihood_s']:.1f} s" if "loglikelihood_s" in res else ""
            print(f"  repeat {r + 1} {side:>6}: acc {res['acc']:.3f}, eval {res['eval_s']:.1f} s{extra}, load "
                  f"{res['load_s']:.1f} s, process {res['process_wall_s']:.0f} s, peak RSS "
                  f"{res['process_peak_rss_mb']:.0f} MB", flush=True)

    d, e = runs["dft"], runs["lmeval"]
    pd, pe = d[0]["preds"], e[0]["preds"]
    differ = [k for k in pd if pd[k] != pe.get(k)]
    m = lambda rs, k: median([x[k] for x in rs])  # noqa: E731
    rows = [["dft evaluate_mcq (loglik)", f"{d[0]['acc']:.3f}", m(d, "eval_s"), m(d, "load_s"), m(d, "process_wall_s"),
             m(d, "process_peak_rss_mb")],
            [f"lm-eval {e[0]['lm_eval_version']} HFLM multiple_choice", f"{e[0]['acc']:.3f}", m(e, "eval_s"),
             m(e, "load_s"), m(e, "process_wall_s"), m(e, "process_peak_rss_mb")]]
    print()
    print(table(rows, ["side", "acc", "eval s (median)", "load s", "process s", "process peak RSS MB"]))
    ratios = [b["eval_s"] / a["eval_s"] for a, b in zip(d, e)]
    print(f"\naccuracy: dft {d[0]['acc']:.3f} vs lm-eval {e[0]['acc']:.3f} on {len(pd)} items; predictions differ on "
          f"{len(differ)} item(s){': ' + ', '.join(differ[:5]) if differ else ''} -> "
          f"{'agree' if len(differ) <= max(1, len(pd) // 100) else 'DISAGREE'} (goal: within 1 item per 100)")
    print(f"time lm-eval / dft: {median(ratios):.2f}x (per repeat: {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"lm-eval's loglikelihood call alone: {m(e, 'loglikelihood_s') / m(d, 'eval_s'):.2f}x dft's eval; "
          f"goal dft no slower -> {'MET' if median(ratios) >= 1 else 'NOT met'}")
    if args.compare:
        other = json.loads(args.compare.read_text())
        for side in ("dft", "lmeval"):
            mine, theirs = runs[side][0]["preds"], other[side][0]["preds"]
            changed = [k for k in mine if k in theirs and mine[k] != theirs[k]]
            print(f"{side}: {len(changed)} of {sum(k in theirs for k in mine)} predictions differ from {args.compare}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
