"""``python -m dft.report runs/<sweep> [more sweeps] [--out DIR]``: a Markdown report with figures.

Reads only ``summary.json`` and eval JSON (through :mod:`dft.analysis`) and writes ``report.md``
plus PNG figures into ``--out`` (default: ``<sweep>/report`` for one sweep, ``reports/<a>_vs_<b>``
for several):

* results per artefact (every distinct artefact once; the numbers are the summary files',
  printed with ``--digits`` decimals) and their improvement over the family baseline (%);
* the paper's bar charts (each variant relative to the baseline), synergy plot (merged vs
  expected, y = x), a model x strategy x merge heatmap and training-loss curves per stage;
* every number with its 95 % interval (``metric [low, high]``) and figures with error bars;
* the paired comparisons of the sweep (each stage vs its parent, each merge vs each parent and vs
  the mean of its parents) Holm-corrected over the sweep, with one plain sentence per claim;
* seeds as replicates: cells that differ only in ``seed`` as mean [95 % interval] over seeds,
  between-seed vs item-sampling spread;
* rankings, the synergy table (with interval and adjusted p), training statistics;
* open-ended judge scores, only where ``eval/<artefact>/judge.json`` files exist (with links to
  the transcripts ``eval/<artefact>/chat.json``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from dft import DftError, __version__
from dft import analysis as A


# ------------------------------------------------------------------------------------ markdown
def fmt(v, digits: int = 4) -> str:
    """One table cell: floats with ``digits`` decimals, NaN/None as an en dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    try:  # numpy scalars
        import numpy as np

        if isinstance(v, np.bool_):
            return "yes" if v else "no"
        if isinstance(v, np.integer):
            return str(int(v))
        if isinstance(v, np.floating):
            return fmt(float(v), digits)
    except ImportError:  # pragma: no cover
        pass
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, digits: int = 4, formats: dict | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``formats`` maps a column to a formatter."""
    if df.empty:
        return "_(none)_\n"
    formats = formats or {}
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [formats[c](v) if c in formats else fmt(v, digits) for c, v in zip(df.columns, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def with_interval(v, lo, hi, digits: int = 4) -> str:
    """``0.4500 [0.2582, 0.6579]``: a value and its 95 % interval (just the value when no interval
    is recorded; an en dash when there is no value)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if lo is None or hi is None or any(isinstance(x, float) and math.isnan(x) for x in (lo, hi)):
        return fmt(v, digits)
    return f"{fmt(v, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def interval_frame(df: pd.DataFrame, metrics: Sequence[str], digits: int = 4) -> pd.DataFrame:
    """``df[metrics]`` as ``metric [95 % CI]`` strings (:func:`with_interval`)."""
    out = pd.DataFrame(index=df.index)
    for m in metrics:
        lo, hi = A.interval_columns(df, m)
        out[m] = [with_interval(v, a, b, digits) for v, a, b in zip(
            df[m], df[lo] if lo else [None] * len(df), df[hi] if hi else [None] * len(df))]
    return out


def pct(v) -> str:
    """A relative improvement (fraction) as a signed percentage."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = round(100 * float(v), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{v:+.1f} %"


_INT_FIELDS = {"steps", "rows", "tokens", "trainable_params", "total_params"}


def _int(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))


def parse_markdown_tables(text: str) -> list[pd.DataFrame]:
    """The tables of a Markdown document as DataFrames of strings (for tests and tooling)."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            split = [[c.strip().replace("\\|", "|") for c in _split_row(b)] for b in block]
            tables.append(pd.DataFrame(split[2:], columns=split[0]))
        block = []
    return tables


def _split_row(line: str) -> list[str]:
    cells, cur, esc = [], "", False
    for ch in line.strip()[1:-1]:
        if ch == "|" and not esc:
            cells.append(cur)
            cur = ""
        else:
            cur += ch
        esc = ch == "\\"
    return cells + [cur]


# -------------------------------------------------------------------------------------- report
def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def default_out(sweeps: Sequence[Path]) -> Path:
    if len(sweeps) == 1:
        return Path(sweeps[0]) / "report"
    return Path("reports") / "_vs_".join(A.slug(n) for n in A.sweep_labels(list(sweeps)))


def build_report(sweeps, out: str | os.PathLike | None = None, metrics: Sequence[str] | None = None,
                 digits: int = 4, progress: bool = True, top: int = 10) -> Path:
    """Write ``report.md`` and its figures; returns the path of ``report.md``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display

    sweeps = A._as_paths(sweeps)
    df = A.load_sweep(sweeps, progress=progress)  # first: a wrong path must not create folders
    out = Path(out) if out is not None else default_out(sweeps)
    out.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics or A.primary_metrics(df))
    missing = [m for m in metrics if m not in df]
    if missing:
        raise DftError(f"unknown metric(s) {missing}; the sweep has {A.metric_columns(df)}")
    all_metrics = A.metric_columns(df)
    multi = df["sweep"].nunique() > 1
    uniq = A.unique_artefacts(df)
    md: list[str] = []
    add = md.append

    # -- header
    names = A.sweep_labels(sweeps)
    add("# dft sweep report\n")
    add(f"Generated by `python -m dft.report` (dft {__version__}) from `summary.json` files only.\n")
    cells = df.drop_duplicates(["sweep", "cell_dir"])
    add("| sweep | folder | cells | finished | experiments | families | models |")
    add("|---|---|---|---|---|---|---|")
    for name, path in zip(names, sweeps):
        c = cells[cells["sweep"] == name]
        add(f"| {name} | `{path}` | {len(c)} | {int(c['status'].eq('finished').sum())} | "
            f"{', '.join(sorted(c['experiment'].dropna().unique()))} | "
            f"{', '.join(sorted(c['family'].dropna().unique()))} | {', '.join(sorted(c['model'].dropna().unique()))} |")
    add("")
    skipped = [(name, r) for name, path in zip(names, sweeps) for r in A.skipped_cells(path)]
    if skipped:  # folders without summary.json: not in any table below, and why
        add(f"**{len(skipped)} cell folder(s) without `summary.json` are not in this report:**\n")
        add("| sweep | folder | why |")
        add("|---|---|---|")
        for name, r in skipped:
            add(f"| {name} | `{r['cell']}` | {r['reason'].replace('|', '/')} |")
        add("")
    # cells without a recorded precision (eval=none, or summaries older than eval.dtype) are left out
    precisions = cells.dropna(subset=["eval_dtype"]).groupby("eval_dtype")["cell_dir"].nunique()
    if len(precisions) > 1:
        add("**Warning: these cells were evaluated in different precisions** (" +
            ", ".join(f"{k}: {v} cell{'s' if v != 1 else ''}" for k, v in precisions.items()) +
            "). bf16 rounding decides near-tie items, so their scores are not comparable item by item "
            "(bench/eval_precision.py); rerun with one `eval.dtype`.\n")
    missing_unc = A.missing_uncertainty(df)
    if missing_unc["intervals"] or missing_unc["comparisons"]:
        n_i, n_c = len(missing_unc["intervals"]), len(missing_unc["comparisons"])
        add(f"**Note: {n_i} cell(s) have no intervals and {n_c} cell(s) no paired comparisons in their "
            "`summary.json`** (written by a dft before they were recorded); their numbers are shown bare "
            "and they take no part in the tests below. Rerun them (the evaluation cache is keyed by "
            "`EVAL_VERSION`, so `python -m dft.train` with the same overrides and `force=true` recomputes them). "
            "Cells: " + ", ".join(f"`{Path(c).name}`" for c in sorted(set(missing_unc["intervals"] + missing_unc["comparisons"]))[:10])
            + (" ..." if len(set(missing_unc["intervals"] + missing_unc["comparisons"])) > 10 else "") + "\n")
    if not all_metrics:
        add("_No evaluation metrics in these summaries (eval=none, or nothing finished evaluating): "
            "no results, comparisons or figures._\n")
        return _finish_without_metrics(md, df, uniq, multi, digits, out)
    add("Units: accuracies are fractions of items answered correctly (`acc`: exact-match letter of "
        "the greedy answer, the paper's protocol; `acc_ll`: argmax log-likelihood over the option "
        "letters); `ppl` is the perplexity of the held-out domain text (lower is better). "
        "Relative improvements are in % of the baseline, positive = better (perplexity inverted). "
        "Baseline: the family's instruct model, or the cell's own start model in a family "
        "without an instruct cell (see `dft.analysis.relative_to_baseline`). `x [a, b]`: the value and its "
        "95 % interval (Wilson for an accuracy, bootstrap over token blocks for `ppl`); with `eval=quick`'s 20 "
        "items per benchmark one item moves an accuracy by 5 points and the interval is about ±20 points wide.\n")

    # -- results
    rel = df
    for m in all_metrics:
        rel = A.relative_to_baseline(rel, m)
    rel_u = A.unique_artefacts(rel)
    add("## Results per artefact\n")
    add("Each distinct artefact once (the shared start model and cached chain prefixes appear in "
        "several cells; `cell` names the first). Values as in `summary.json`.\n")
    id_cols = (["sweep"] if multi else []) + ["family", "model", "strategy", "merge", "artefact", "kind", "cell"]
    res = pd.concat([rel_u[id_cols], interval_frame(rel_u, all_metrics, digits)], axis=1)
    add(markdown_table(res.reset_index(drop=True), digits, formats={m: str for m in all_metrics}))
    add("### Relative to the baseline\n")
    relcols = {f"{m}:relative": f"{m} vs baseline ({'+ = higher' if A.higher_is_better(m) else '+ = lower'})"
               for m in all_metrics}
    tab = rel_u[id_cols[:-1] + ["baseline_of"] + list(relcols)].rename(columns=relcols)
    add(markdown_table(tab.reset_index(drop=True), digits, formats={v: pct for v in relcols.values()}))

    # -- bar charts
    add("## Improvement over the baseline per variant\n")
    for m in metrics:
        f = _save(A.plot_relative(rel, m), out / f"relative_{A.slug(m)}.png")
        add(f"![{m} relative to the baseline]({f})\n")

    # -- paired comparisons, Holm over the sweep
    add("## Paired comparisons (Holm-corrected)\n")
    comp = A.comparisons_table(df)
    if comp.empty:
        add("_No paired comparisons recorded in these summaries._\n")
    else:
        n_sig = int(comp["significant"].fillna(False).astype(bool).sum())
        add(f"{len(comp)} distinct comparisons (each stage vs its parent, each merge vs each parent and vs the mean "
            "of its parents; items matched one by one). `diff` = a − b with its 95 % paired bootstrap interval; "
            "`p`: exact McNemar test (accuracies) or paired bootstrap (mean of parents, `ppl`); `p_adj`: Holm over all "
            f"of the sweep's comparisons. **{n_sig} of {len(comp)} survive at α = 0.05.** The intervals are per "
            "comparison, not adjusted: an interval that excludes 0 with `p_adj` ≥ 0.05 is not a finding once the "
            "sweep's number of comparisons is accounted for.\n")
        mc = comp[comp["test"] == "mcnemar_exact"].dropna(subset=["n10", "n01"])
        if not mc.empty:
            disc = ((mc["n10"] + mc["n01"]) / mc["n"]).astype(float)
            add(f"Measured discordance (items two compared artefacts answer differently, one right and one wrong): "
                f"median {100 * disc.median():.0f} % (the dry run's power line assumes 30 %).\n")
        add("### Claims\n")
        lines = A.merge_claims(comp) + [r["claim"] for r in comp[comp["kind"] != "merge_vs_parent"].to_dict("records")]
        for line in sorted(lines, key=lambda t: " is not distinguishable " in t):  # claims that survive first
            add(f"- {line}")
        add("")
        t = comp.assign(**{"diff [95 % CI]": [with_interval(d, lo, hi, digits) for d, lo, hi in
                                             zip(comp["diff"], comp["ci_low"], comp["ci_high"])]})
        ccols = (["sweep"] if multi else []) + ["model", "cell", "kind", "a", "b", "metric", "a_value", "b_value",
                                               "diff [95 % CI]", "n", "test", "p", "p_adj", "significant"]
        add(markdown_table(t[ccols].reset_index(drop=True), digits, formats={"diff [95 % CI]": str}))
        sig_metrics = [m for m in metrics if m in set(comp["metric"])]
        if sig_metrics:
            f = _save(A.plot_comparisons(comp, sig_metrics), out / "comparisons.png")
            add(f"![paired comparisons]({f})\n")

    # -- seeds as replicates
    seeds = A.seed_table(df, all_metrics)
    if not seeds.empty:
        add("## Seeds as replicates\n")
        add("Cells that differ only in `seed`: the mean over seeds with a 95 % two-level bootstrap interval "
            "(resample seeds, then items within each seed; `levels`), `seed_sd` = the spread between seeds (SD of "
            "the per-seed values), `item_se` = the item-sampling spread of one seed's value (binomial standard "
            "error). `seed_sd` well above `item_se` means the training seed, not the choice of items, moves the "
            "number.\n")
        st = seeds.assign(**{"mean [95 % CI]": [with_interval(v, lo, hi, digits) for v, lo, hi in
                                                zip(seeds["mean"], seeds["ci_low"], seeds["ci_high"])]})
        scols = (["sweep"] if multi else []) + ["model", "group", "artefact", "metric", "seeds", "mean [95 % CI]",
                                               "seed_sd", "item_se", "levels"]
        add(markdown_table(st[scols].reset_index(drop=True), digits, formats={"mean [95 % CI]": str}))

    # -- rankings
    add("## Rankings\n")
    for m in metrics:
        add(f"### {m} ({'higher' if A.higher_is_better(m) else 'lower'} is better)\n")
        r = A.rankings(rel, m, by=["sweep", "family"] if multi else "family", top=top)
        add(markdown_table(r, digits, formats={f"{m}:relative": pct}))

    # -- heatmap
    add("## Model × strategy × merge\n")
    add("Each cell's final artefact (its merge if it merges, else the whole chain's).\n")
    for m in metrics:
        f = _save(A.plot_heatmap(df, m), out / f"heatmap_{A.slug(m)}.png")
        add(f"![{m} heatmap]({f})\n")
        t = A.heatmap_table(df, m).reset_index()
        if not multi:
            t = t.drop(columns="sweep")
        t.columns.name = None
        add(f"{m}:\n")
        add(markdown_table(t, digits))

    # -- synergy
    add("## Synergy of merges (expected vs actual)\n")
    syn = A.synergy_table(df)
    if syn.empty:
        add("_No merges in this sweep._\n")
    else:
        add("Expected = mean of the two parents' scores; deviation = merged − expected (above the "
            "y = x line: the merge beats its parents' mean; for perplexity, below is better). "
            "Values as in `summary.json[\"synergy\"]`; `deviation [95 % CI]` and `p`: paired bootstrap of merged − "
            "mean of parents over items; `p_adj`: Holm over the sweep (section above). Error bars: that interval.\n")
        f = _save(A.plot_synergy(syn, [m for m in metrics if m in set(syn["metric"])] or None),
                  out / "synergy.png")
        add(f"![synergy]({f})\n")
        # the deviation's Holm-adjusted p: the merge_vs_mean_of_parents comparison of the same merge (matched by
        # model, merged artefact, metric and value: the deduplicated comparison may come from another cell)
        padj = {}
        if not comp.empty:
            for r in comp[comp["kind"] == "merge_vs_mean_of_parents"].to_dict("records"):
                padj[(r["model"], r["a"], r["metric"], round(float(r["diff"]), 9))] = r["p_adj"]
        syn = syn.assign(**{
            "deviation [95 % CI]": [with_interval(d, lo, hi, digits) for d, lo, hi in
                                    zip(syn["deviation"], syn["ci_low"], syn["ci_high"])],
            "p_adj": [padj.get((m, a, k, round(float(d), 9))) for m, a, k, d in zip(syn["model"], syn["merged"],
                                                                                    syn["metric"], syn["deviation"])]})
        cols = (["sweep"] if multi else []) + ["model", "strategy", "cell", "merged", "parent_1", "parent_2",
                                               "metric", "p1", "p2", "expected", "merged_score", "deviation",
                                               "deviation [95 % CI]", "p", "p_adj", "improvement", "diversity"]
        cols += [c for c in syn.columns if c.startswith("kinship_")]
        add(markdown_table(syn[cols], digits, formats={"deviation [95 % CI]": str}))

    _training_and_judge(md, df, uniq, multi, digits, out)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _finish_without_metrics(md, df, uniq, multi, digits, out) -> Path:
    _training_and_judge(md, df, uniq, multi, digits, out)
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _training_and_judge(md: list, df, uniq, multi: bool, digits: int, out: Path) -> None:
    add = md.append
    # -- training
    add("## Training\n")
    hist = A.train_histories(df)
    if hist.empty:
        add("_No training log_history in the summaries._\n")
    else:
        f = _save(A.plot_training(hist), out / "training_loss.png")
        add(f"![training loss]({f})\n")
    tcols = [c for c in df.columns if c.startswith("train/")]
    if tcols:
        tr = uniq[uniq[tcols].notna().any(axis=1)]  # the trained stages
        tr = tr[(["sweep"] if multi else []) + ["model", "strategy", "artefact", "cell"] + tcols]
        add("Each trained stage once. `train/runtime_s` in seconds; `train/cached`: reused from the "
            "stage cache (its numbers are those of the run that trained it).\n")
        ints = {c: _int for c in tcols if c.split("/", 1)[1] in _INT_FIELDS}
        add(markdown_table(tr.reset_index(drop=True), digits, formats=ints))

    # -- judge (open-ended assessment), only when judge files exist
    judge = A.judge_table(df)
    if not judge.empty:
        add("## Open-ended assessment (judge)\n")
        add("Total out of `max_total` (40 = four criteria scored 1–10), normalised to the best "
            "artefact of the sweep. Transcripts: `chat` links.\n")
        j = judge.copy()
        j["chat"] = [f"[chat]({Path(os.path.relpath(p, out)).as_posix()})" if p else "–" for p in j["chat_path"]]
        crit = [c for c in j.columns if c.startswith("judge/")]
        cols = (["sweep"] if multi else []) + ["model", "strategy", "merge", "artefact", "total", "max_total",
                                               "normalised"] + crit + ["chat"]
        add(markdown_table(j[cols], digits, formats={"chat": str}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dft.report", description=__doc__.split("\n")[0])
    p.add_argument("sweeps", nargs="+", help="sweep folder(s), e.g. runs/<experiment>")
    p.add_argument("--out", help="output folder (default: <sweep>/report, or reports/<a>_vs_<b>)")
    p.add_argument("--metrics", nargs="+", help="metrics for the figures and rankings "
                   "(default: every <benchmark>/acc and ppl)")
    p.add_argument("--digits", type=int, default=4, help="decimals in the tables (default 4)")
    p.add_argument("--top", type=int, default=10, help="rows per group in the rankings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # a ready-made W&B workspace instead of the Markdown report (dft.dashboards.workspace)
    p.add_argument("--wandb-workspace", action="store_true", help="build a W&B workspace for the sweep")
    p.add_argument("--dry-run", action="store_true", help="with --wandb-workspace: print its JSON spec, save nothing")
    p.add_argument("--wandb-entity", help="W&B entity of the runs (default: $WANDB_ENTITY, else your default)")
    p.add_argument("--wandb-project", help="W&B project of the runs (default: $WANDB_PROJECT, else dft)")
    args = p.parse_args(argv)
    try:
        if args.wandb_workspace:
            from dft.dashboards.workspace import main_workspace

            return main_workspace(args.sweeps, dry_run=args.dry_run, entity=args.wandb_entity,
                                  project=args.wandb_project)
        path = build_report(args.sweeps, args.out, args.metrics, args.digits,
                            progress=not args.no_progress, top=args.top)
    except DftError as e:
        print(f"dft.report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
