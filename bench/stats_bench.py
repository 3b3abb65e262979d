"""How long the uncertainty analysis of a big sweep takes: 64 cells x 3 seeds, eval=full-sized items.

``python bench/stats_bench.py [--cells 64] [--seeds 3] [--resamples 10000] [--json FILE]``

A SYNTHETIC sweep (nothing is trained): 64 cells per seed, 3 seeds (192 cells), each cell with
four evaluated artefacts (``start``, ``cpt``, ``cpt_sft``, ``cpt_sft+slerp`` whose parents are
``cpt_sft`` and ``start``) scored on eval=full's item sets (mascqa 307, mmlu_stem 1,525,
anatomy_mcq 426: 2,258 items per artefact; 0/1 outcomes for ``acc`` and ``acc_ll`` drawn around
a per-item difficulty, so artefacts agree on most items as real ones do) and 400 perplexity
blocks of 512 tokens. Timed, in order, with 10,000 bootstrap resamples:

1. **comparisons**: every cell's five paired comparisons (each stage vs its parent, the merge vs
   each parent and vs their mean) on the six accuracy metrics and ``ppl``: the exact McNemar
   test per pair and the paired percentile bootstrap, vectorised as
   :func:`dft.evaluation.compare.paired_comparisons` / ``perplexity_comparisons`` run it (one
   scipy.stats.bootstrap call per metric for all 192 cells' pairs: the resampled item counts
   times the outcome matrix);
2. **Holm + claims**: :func:`dft.analysis.comparisons_table` over the 192 summaries
   (deduplication, Holm over the sweep, one sentence per comparison);
3. **seeds**: :func:`dft.analysis.seed_table` (two-level bootstrap, seeds then items) for every
   artefact and metric of the 64 seed groups.

It also times one cell the way ``Cell.summary`` runs it (:func:`cell_comparisons` from eval
files of full size) and, as the baseline, scipy.stats.bootstrap called once per comparison on
the per-item differences (timed on 30 comparisons, extrapolated to the sweep's count). Goal:
the whole analysis (1-3) under 30 s on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dft import analysis as A  # noqa: E402
from dft.evaluation.compare import cell_comparisons, paired_comparisons, perplexity_comparisons  # noqa: E402

BENCHMARKS = {"mascqa": 307, "mmlu_stem": 1525, "anatomy_mcq": 426}  # data/*: eval=full's item counts
ARTEFACTS = [{"name": "start", "kind": "start", "stages": [], "parents": []},
             {"name": "cpt", "kind": "stage", "stages": ["cpt"], "parents": []},
             {"name": "cpt_sft", "kind": "stage", "stages": ["cpt", "sft"], "parents": []},
             {"name": "cpt_sft+slerp", "kind": "merge", "stages": ["cpt", "sft"], "parents": ["cpt_sft", "start"]}]
PAIRS = [{"kind": "stage_vs_parent", "a": "cpt", "b": ["start"]},
         {"kind": "stage_vs_parent", "a": "cpt_sft", "b": ["cpt"]},
         {"kind": "merge_vs_parent", "a": "cpt_sft+slerp", "b": ["cpt_sft"]},
         {"kind": "merge_vs_parent", "a": "cpt_sft+slerp", "b": ["start"]},
         {"kind": "merge_vs_mean_of_parents", "a": "cpt_sft+slerp", "b": ["cpt_sft", "start"]}]
N_BLOCKS, BLOCK = 400, 512


def synth(cells: int, seeds: int, rng: np.random.Generator):
    """``outcomes[(bench, key)][cell|artefact] -> [n] 0/1``, ``blocks[cell|artefact]``, cell names."""
    names = [f"model=m{c % 4},seed={s},strategy=s{c // 4}" for s in range(1, seeds + 1) for c in range(cells)]
    difficulty = {b: rng.normal(0, 1.5, n) for b, n in BENCHMARKS.items()}
    outcomes: dict = {}
    for b, n in BENCHMARKS.items():
        for key in ("acc", "acc_ll"):
            d = {}
            for cell in names:
                for j, art in enumerate(a["name"] for a in ARTEFACTS):
                    skill = -0.3 + 0.1 * j + rng.normal(0, 0.1)
                    d[f"{cell}|{art}"] = (rng.random(n) < 1 / (1 + np.exp(-(skill - difficulty[b])))).astype(float)
            outcomes[(b, key)] = d
    base = rng.uniform(2.0, 3.0, N_BLOCKS) * BLOCK
    blocks = {f"{cell}|{a['name']}": {"nll": list(base * rng.uniform(0.97, 1.03, N_BLOCKS)), "tokens": [BLOCK] * N_BLOCKS}
              for cell in names for a in ARTEFACTS}
    return outcomes, blocks, names


def sweep_pairs(names: list[str]) -> list[dict]:
    return [{"kind": p["kind"], "a": f"{c}|{p['a']}", "b": [f"{c}|{b}" for b in p["b"]], "cell": c}
            for c in names for p in PAIRS]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    outcomes, blocks, names = synth(args.cells, args.seeds, rng)
    pairs = sweep_pairs(names)
    n_items = sum(BENCHMARKS.values())
    print(f"synthetic sweep: {len(names)} cells ({args.cells} x {args.seeds} seeds), {len(ARTEFACTS)} artefacts each, "
          f"{n_items} items per artefact, {N_BLOCKS} ppl blocks, {args.resamples} resamples", flush=True)

    t0 = time.perf_counter()
    comps: dict[str, list[dict]] = {c: [] for c in names}
    for (b, key), d in outcomes.items():
        for rec in paired_comparisons(d, pairs, f"{b}/{key}", n_resamples=args.resamples):
            cell = rec["a"].split("|")[0]
            comps[cell].append({**rec, "a": rec["a"].split("|")[1], "b": rec["b"].replace(cell + "|", "")})
    for rec in perplexity_comparisons(blocks, pairs, n_resamples=args.resamples):
        cell = rec["a"].split("|")[0]
        comps[cell].append({**rec, "a": rec["a"].split("|")[1], "b": rec["b"].replace(cell + "|", "")})
    t_comp = time.perf_counter() - t0
    n_comp = sum(len(v) for v in comps.values())

    summaries = []
    for cell in names:
        seed = int(cell.split("seed=")[1].split(",")[0])
        arts = []
        for a in ARTEFACTS:
            m = {}
            for (b, key), d in outcomes.items():
                x = d[f"{cell}|{a['name']}"]
                m[f"{b}/{key}"], m[f"{b}/n"] = float(x.mean()), int(x.size)
            bl = blocks[f"{cell}|{a['name']}"]
            m["ppl"] = float(np.exp(sum(bl["nll"]) / sum(bl["tokens"])))
            arts.append({**a, "key": f"{cell}|{a['name']}", "metrics": m})
        summaries.append({"_sweep": "bench", "_dir": None, "experiment": "bench", "cell": cell, "model": cell.split(",")[0],
                          "family": "f", "strategy": cell.split("strategy=")[1], "chain": ["cpt", "sft"], "merge": "slerp",
                          "peft": "lora", "seed": seed, "status": "finished", "artefacts": arts,
                          "comparisons": comps[cell]})
    t1 = time.perf_counter()
    table = A.comparisons_table(summaries)
    t_holm = time.perf_counter() - t1

    t2 = time.perf_counter()
    import pandas as pd

    df = pd.DataFrame(A._rows(summaries))  # the frame load_sweep builds from summary.json files
    seeds = A.seed_table(df, n_resamples=args.resamples)
    t_seed = time.perf_counter() - t2
    total = time.perf_counter() - t0
    print(f"1. comparisons: {n_comp} (McNemar + paired bootstrap): {t_comp:.1f} s", flush=True)
    print(f"2. Holm + claims over {len(table)} distinct comparisons ({int(table['significant'].sum())} survive): "
          f"{t_holm:.1f} s", flush=True)
    print(f"3. seed aggregation: {len(seeds)} (group, artefact, metric) rows, two-level bootstrap: {t_seed:.1f} s", flush=True)
    print(f"analysis total: {total:.1f} s (goal < 30 s)", flush=True)

    # one cell as Cell.summary computes it, from eval files of full size
    with tempfile.TemporaryDirectory() as tmp:
        cell = names[0]
        for a in ARTEFACTS:
            out = Path(tmp) / a["name"]
            out.mkdir()
            for b in BENCHMARKS:
                acc, ll = outcomes[(b, "acc")][f"{cell}|{a['name']}"], outcomes[(b, "acc_ll")][f"{cell}|{a['name']}"]
                (out / f"{b}.json").write_text(json.dumps({"items": [
                    {"id": i, "correct": bool(x), "correct_ll": bool(y)} for i, (x, y) in enumerate(zip(acc, ll))]}))
            (out / "perplexity.json").write_text(json.dumps({"blocks": blocks[f"{cell}|{a['name']}"]}))
        t3 = time.perf_counter()
        one = cell_comparisons(Path(tmp), ARTEFACTS, list(BENCHMARKS), n_resamples=args.resamples)
        t_cell = time.perf_counter() - t3
    print(f"one cell at summary time (cell_comparisons from eval files): {len(one)} comparisons in {t_cell:.2f} s", flush=True)

    # baseline: scipy.stats.bootstrap once per comparison on the per-item differences
    from scipy.stats import bootstrap

    d = outcomes[("mmlu_stem", "acc")]
    sample = pairs[:30]
    t4 = time.perf_counter()
    for p in sample:
        diff = d[p["a"]] - np.mean([d[b] for b in p["b"]], axis=0)
        bootstrap((diff,), np.mean, n_resamples=args.resamples, method="percentile", rng=np.random.default_rng(0))
    per = (time.perf_counter() - t4) / len(sample)
    n_acc = sum(1 for v in comps.values() for c in v if c["metric"] != "ppl")
    print(f"baseline (scipy.stats.bootstrap per comparison, {BENCHMARKS['mmlu_stem']} items): {per * 1000:.0f} ms each; "
          f"x {n_acc} accuracy comparisons = {per * n_acc:.0f} s (extrapolated; items per benchmark vary)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"comparisons": n_comp, "t_comparisons": t_comp, "t_holm": t_holm,
                                               "t_seeds": t_seed, "total": total, "t_one_cell": t_cell,
                                               "baseline_per_comparison": per}, indent=1))
    return 0 if total < 30 else 1


if __name__ == "__main__":
    sys.exit(main())
