"""The graph launcher vs the cell-array launcher on the local SLURM: allocated slot-seconds and wall time.

    sudo launch/slurm.sh start                  # the local single-node SLURM (8 CPU slots)
    .venv/bin/python bench/graph_bench.py       # 6 cells on the tiny model, both layouts, once each

The grid: ``strategy=cpt_sft,cpt_sft_dpo,cpt_sft_orpo merge=none,slerp`` (6 cells: CPT and
CPT->SFT shared by all, DPO/ORPO leaves, SLERP merges) on the tiny random model, ``--steps``
steps per stage, a small evaluation. Every job takes 1 CPU, no GPU and 2 GB, so the node's
``DFT_SLURM_CPUS`` (8 by default) are the fixed number of slots both layouts share.

* ``graph``: ``launcher=slurm``: one job per distinct node, ``afterok`` on its parents;
* ``graph_fused``: the same with ``launcher.fuse_eval=true`` (each evaluation in the job of the
  stage or merge it evaluates);
* ``cells``: ``launcher=slurm_cells``: one array task per cell; cells sharing a stage wait on its
  lock while holding their slot.

Each side runs in a fresh run directory (its own stage cache), one after the other (``--sides``).
From ``sacct`` (``ElapsedRaw x AllocCPUS`` summed over the side's jobs) the allocated slot-seconds;
the wall time of the submitting ``python -m dft.train -m`` process; for the graph the sum of the
nodes' own work (``node ... finished in X s`` in each job's log, ``cell ... finished in X s`` for a
summary job: after the imports) and of the jobs' elapsed times; the load average before and after
each side. Printed: every side and the ratios cells / graph; ``--json`` writes them.

Measured (bench/README.md, loaded 2-core machine), before this session's cuts of a job's fixed
cost: 2 steps, 8 slots: graph 470 slot-s / 188 s wall, cells 357 / 68 (cells/graph 0.76x, 0.36x);
``--steps 200 --slots 2``: graph 1142 / 817, cells 1027 / 516 (0.90x, 0.63x). After them,
``--steps 60 --slots 2 --cpus-per-job 3`` (load 4-7): graph 438 / 334, graph_fused 508 / 406,
cells 528 / 340 (cells/graph 1.21x, 1.02x), graph slot-seconds 1.26x its nodes' own work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env(runs: Path) -> dict:
    return dict(os.environ, DFT_RUNS=str(runs), WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DFT_LAUNCH_POLL_S="2",
                OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def grid(steps: int, items: int) -> list[str]:
    return ["model=tiny", "data=tiny", "logger=none", "strategy=cpt_sft,cpt_sft_dpo,cpt_sft_orpo", "merge=none,slerp",
            *[f"strategy.{s}.trainer.max_steps={steps}" for s in ("cpt", "sft", "dpo", "orpo")],
            f"eval.max_items={items}", "eval.ppl_max_tokens=200", "eval.max_new_tokens=2", "eval.stages=false",
            "experiment=gbench"]


#: the sides, in the order they run: the graph, the graph with each evaluation in its producer's job
#: (``launcher.fuse_eval=true``), the cell array
SIDES = ("graph", "graph_fused", "cells")


def launcher_args(layout: str, partition: str, cpus: int = 1) -> list[str]:
    """Every job: ``cpus`` CPUs (one slot), 2 GB, no GPU."""
    if layout == "cells":
        return ["launcher=slurm_cells", f"launcher.partition={partition}", "launcher.timeout_min=60",
                "launcher.gpus_per_node=0", f"launcher.cpus_per_task={cpus}", "launcher.mem_gb=2",
                "launcher.array_parallelism=64"]
    args = ["launcher=slurm", f"launcher.partition={partition}", "launcher.timeout_min=60", "launcher.gpus_per_node=0"]
    for kind in ("stage", "merge", "eval", "summary"):
        args += [f"launcher.{kind}.gpus_per_node=0", f"launcher.{kind}.cpus_per_task={cpus}", f"launcher.{kind}.mem_gb=2"]
    return args + (["launcher.fuse_eval=true"] if layout == "graph_fused" else [])


def job_ids(sweep: Path, layout: str) -> list[str]:
    """The side's SLURM jobs: the graph's from .graph/submitted.json, the array's from .submitit/<id>/."""
    if layout.startswith("graph"):
        subs = json.loads((sweep / ".graph" / "submitted.json").read_text())
        return sorted({rec["job"] for s in subs for rec in s["nodes"].values()})
    return sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name))


def sacct(ids: list[str], timeout: float = 120) -> list[dict]:
    """One row per job or array task (``-X``), once all have ended."""
    roots = sorted({i.split("_")[0] for i in ids})
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(roots), "-o",
                              "JobID,JobName,State,ElapsedRaw,AllocCPUS"], capture_output=True, text=True).stdout
        rows = [dict(zip(("id", "name", "state", "elapsed", "cpus"), ln.split("|"))) for ln in out.splitlines() if ln]
        if rows and all(r["state"].split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise SystemExit(f"sacct: jobs {roots} not ended after {timeout:.0f} s")
        time.sleep(2)


def run_side(layout: str, work: Path, partition: str, steps: int, items: int, cpus: int = 1) -> dict:
    runs = work / layout
    subprocess.run(["rm", "-rf", str(runs)], check=True)
    load = os.getloadavg()
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dft.train", "-m", *grid(steps, items), *launcher_args(layout, partition, cpus)],
                       cwd=ROOT, env=_env(runs), capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    (work / f"{layout}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{layout}: dft.train failed ({p.returncode}); log {work / f'{layout}.log'}:\n{p.stderr[-2000:]}")
    sweep = runs / "gbench"
    rows = sacct(job_ids(sweep, layout))
    logs = "".join(f.read_text(errors="replace") for f in (sweep / ".submitit").glob("*/*_log.*"))
    # "node <id> finished in X s (its own work, ...)" (dft.node), "cell <name> finished in X s (...)"
    # (dft.train: a graph summary job, a whole cell-array task, its lock waits included)
    own = [float(x) for x in re.findall(r"node \S+ finished in ([0-9.]+) s \(its own work", logs)]
    cell_own = [float(x) for x in re.findall(r"cell \S+ finished in ([0-9.]+) s \(its own work", logs)]
    return {"layout": layout, "wall_s": wall, "jobs": len(rows),
            "states": sorted({r["state"] for r in rows}),
            "slot_s": sum(int(r["elapsed"]) * int(r["cpus"]) for r in rows) / cpus,
            "elapsed_s": sum(int(r["elapsed"]) for r in rows),
            "node_work_s": sum(own) + (sum(cell_own) if layout != "cells" else 0.0),
            "nodes_timed": len(own) + (len(cell_own) if layout != "cells" else 0),
            "cell_work_s": sum(cell_own), "load_before": load, "load_after": os.getloadavg(),
            "sbatch_jobs": len({r["id"].split("_")[0] for r in rows}),
            "lock_waits": logs.count("waiting for lock"),
            "trainings": sum(1 for m in (runs / "_stages").glob("*/manifest.json") if "train" in json.loads(m.read_text()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="training steps per stage (default 2)")
    ap.add_argument("--eval-items", type=int, default=2, help="items per benchmark (default 2)")
    ap.add_argument("--partition", default="debug")
    ap.add_argument("--slots", type=int, default=0,
                    help="job slots on the node (each job asks node CPUs / slots CPUs); default: one per CPU")
    ap.add_argument("--cpus-per-job", type=int, default=0,
                    help="CPUs each job asks (default: node CPUs / --slots); fewer leave room for other users' jobs "
                         "on a shared node while keeping --slots of ours running at once")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "graph_bench"))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated, run in this order (default {','.join(SIDES)}; graph_fused = "
                         "launcher.fuse_eval=true)")
    ns = ap.parse_args()
    work = Path(ns.workdir)
    work.mkdir(parents=True, exist_ok=True)
    node_cpus = int(subprocess.run(["sinfo", "-h", "-p", ns.partition, "-o", "%c"], capture_output=True,
                                   text=True).stdout.split()[0])
    cpus = ns.cpus_per_job or (max(1, node_cpus // ns.slots) if ns.slots else 1)
    sides = [s for s in ns.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise SystemExit(f"--sides: unknown {', '.join(bad)} (known: {', '.join(SIDES)})")
    res = {side: run_side(side, work, ns.partition, ns.steps, ns.eval_items, cpus) for side in sides}
    slots = ns.slots or node_cpus // cpus
    print(f"\n6-cell tiny grid on the local SLURM ({ns.steps} steps per stage), {slots} slots "
          f"({cpus} of the node's {node_cpus} CPUs per job)")
    c = res.get("cells")
    print(f"{'':<36}" + "".join(f" {s:>12}" for s in sides) + "".join(f" {'cells/' + s:>18}" for s in sides
                                                                      if c and s != "cells"))
    for key, label in (("jobs", "jobs"), ("trainings", "stage trainings"), ("lock_waits", "lock waits in job logs"),
                       ("slot_s", "allocated slot-seconds (sacct)"), ("wall_s", "wall time of the submitting shell s")):
        line = f"{label:<36}" + "".join(f" {res[s][key]:>12.0f}" for s in sides)
        for s in sides:
            if c and s != "cells":
                line += f" {(f'{c[key] / res[s][key]:.2f}x' if res[s][key] else '-'):>18}"
        print(line)
    for s in sides:
        r = res[s]
        print(f"{s}: load average {r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after (1 min)")
        if s != "cells":
            print(f"  slot-seconds / sum of the jobs' elapsed = {r['slot_s'] / max(1, r['elapsed_s']):.2f} (1.00 = no "
                  f"slot held beyond its job); / sum of the nodes' own work after imports ({r['nodes_timed']} nodes "
                  f"timed, summaries included) = {r['slot_s'] / max(1e-9, r['node_work_s']):.2f}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
