"""A grid with the stage cache vs the same grid without it: trainings executed and wall time.

    .venv/bin/python bench/grid_bench.py                      # paper_demo's 8 cells on the tiny model
    .venv/bin/python bench/grid_bench.py --full --repeats 1   # the real paper_demo (SmolLM2-135M, materials)

The grid is ``grid=paper_demo`` (CPT, CPT->SFT, CPT->SFT->DPO, CPT->SFT->ORPO x merge none/SLERP
= 8 cells). By default it runs on the tiny random model (``model=tiny data=tiny``) with
``--steps`` steps per stage and a small evaluation (``--eval-items`` items per benchmark, 400
held-out tokens), so that a repeat takes minutes; ``--full`` keeps paper_demo's own model, data,
budgets and eval.

Each repeat runs the grid twice, each time as one multirun (one ``python -m dft.train -m``
process, fresh run directory), in alternating order:

* ``cached``: the normal grid: every cell shares one stage cache (``paths.stages``), so a stage,
  merge or evaluation that another cell already produced is reused;
* ``uncached``: the same cells, each with its own empty cache
  (``paths.stages=<runs>/_nocache/<hydra job number>``), so every cell trains, merges and
  evaluates its whole chain, as a grid of independent runs would. No code flag is needed:
  ``paths.stages`` is not part of the cell name, so both variants have the same cells.

What is counted: stage trainings (cache manifests with training facts), merges (manifests of
merges), evaluations (``_eval/*/metrics.json``), from the files each variant wrote; and the
dry-run plan's prediction of the first two (``dry_run=true``, run once). Printed: per variant
the median wall time and the median CPU time of the process (user + system, from
``getrusage(RUSAGE_CHILDREN)``; on a loaded machine CPU time is the steadier number), and the
ratios uncached / cached.

Quiet-machine numbers: bench/README.md ("Grid"). Earlier, on a loaded machine
(2 CPU cores shared with other jobs, load average 5-9, so wall times are inflated;
``python bench/grid_bench.py --repeats 3``, model=tiny, 2 steps per stage, 4 items per benchmark):

    grid=paper_demo on model=tiny (8 cells), 3 repeats, medians
                     cached   uncached    ratio
    trainings           4.0       18.0    4.50x
    merges              4.0        4.0    1.00x
    evaluations         9.0       30.0    3.33x
    wall_s s          208.7      535.3    2.56x
    cpu_s s            53.0      163.1    3.08x
    plan (dry run): 4 distinct stages to train, 18 without the cache; 4 merges

The wall ratio is below the training ratio because a tiny-model stage costs about as much as
the process work around it (imports, data loading, W&B-less cell setup); on real models the
stages dominate and the ratio approaches the counts' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def counts(runs: Path) -> dict[str, int]:
    """Stage trainings, merges and evaluations whose results are on disk under ``runs``."""
    out = {"trainings": 0, "merges": 0, "evaluations": 0}
    for m in runs.glob("_stages/*/manifest.json"):
        d = json.loads(m.read_text())
        out["trainings" if "train" in d else "merges"] += 1
    for m in runs.glob("_nocache/*/*/manifest.json"):
        d = json.loads(m.read_text())
        out["trainings" if "train" in d else "merges"] += 1
    out["evaluations"] = len(list(runs.glob("_stages/_eval/*/metrics.json"))) + \
        len(list(runs.glob("_nocache/*/_eval/*/metrics.json")))
    return out


def run_grid(args: list[str], runs: Path, log: Path) -> tuple[float, float]:
    """Run ``python -m dft.train -m *args`` with DFT_RUNS=runs; return (wall s, CPU s)."""
    env = dict(os.environ, DFT_RUNS=str(runs), WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.run([PY, "-m", "dft.train", "-m", *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"grid run failed ({p.returncode}); log: {log}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default="paper_demo")
    ap.add_argument("--full", action="store_true", help="the grid's own model, data, budgets and eval")
    ap.add_argument("--steps", type=int, default=2, help="steps per stage (not with --full)")
    ap.add_argument("--eval-items", type=int, default=4, help="items per benchmark, 0 = eval=none (not with --full)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "grid")
    ap.add_argument("overrides", nargs="*", help="more dft.train overrides, e.g. strategy=cpt,cpt_sft")
    ns = ap.parse_args()

    grid = [f"grid={ns.grid}", "logger=none", "experiment=bench"]
    if not ns.full:
        grid += ["model=tiny", "data=tiny", *[f"strategy.{s}.trainer.max_steps={ns.steps}" for s in ("cpt", "sft", "dpo", "orpo")]]
        grid += ["eval=none"] if ns.eval_items == 0 else \
            [f"eval.max_items={ns.eval_items}", "eval.ppl_max_tokens=400", "eval.max_new_tokens=3"]
    grid += ns.overrides
    variants = {"cached": [], "uncached": ["paths.stages=${paths.runs}/_nocache/${hydra:job.num}"]}
    shutil.rmtree(ns.workdir, ignore_errors=True)
    ns.workdir.mkdir(parents=True)

    # the plan's prediction (no training)
    plan_runs = ns.workdir / "plan"
    run_grid([*grid, "dry_run=true"], plan_runs, ns.workdir / "plan.log")
    plan = json.loads((plan_runs / "bench" / ".plan" / "_grid.json").read_text())

    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(ns.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            runs = ns.workdir / f"{v}_{r}"
            wall, cpu = run_grid([*grid, *variants[v]], runs, ns.workdir / f"{v}_{r}.log")
            c = counts(runs)
            cells = len(list(runs.glob("bench/*/summary.json")))
            results[v].append({"wall_s": wall, "cpu_s": cpu, "cells": cells, **c})
            print(f"repeat {r} {v:<8}: {cells} cells, {c['trainings']} trainings, {c['merges']} merges, "
                  f"{c['evaluations']} evaluations, wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
            shutil.rmtree(runs, ignore_errors=True)

    med = {v: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for v, rs in results.items()}
    c, u = med["cached"], med["uncached"]
    print(f"\ngrid={ns.grid}{'' if ns.full else ' on model=tiny'} ({int(c['cells'])} cells), {ns.repeats} repeats, medians")
    print(f"{'':<12} {'cached':>10} {'uncached':>10} {'ratio':>8}")
    for k, unit in (("trainings", ""), ("merges", ""), ("evaluations", ""), ("wall_s", " s"), ("cpu_s", " s")):
        print(f"{k + unit:<12} {c[k]:>10.1f} {u[k]:>10.1f} {u[k] / c[k] if c[k] else float('nan'):>7.2f}x")
    print(f"plan (dry run): {plan['distinct_stages']} distinct stages to train, {plan['stage_runs_per_cell']} without the "
          f"cache; {plan['distinct_merges']} merges")
    out = {"grid": ns.grid, "full": ns.full, "args": grid, "repeats": ns.repeats, "results": results, "median": med,
           "plan": {k: plan[k] for k in ("cells", "distinct_stages", "stage_runs_per_cell", "distinct_merges")}}
    (ns.workdir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"results: {ns.workdir / 'results.json'}")


if __name__ == "__main__":
    main()
