"""``python -m dft.report runs/<sweep> [more sweeps] [--out DIR]``: a Markdown report with figures.

Reads only ``summary.json`` and eval JSON (through :mod:`dft.analysis`) and writes ``report.md``
plus PNG figures into ``--out`` (default: ``<sweep>/report`` for one sweep, ``reports/<a>_vs_<b>``
for several):

* results per artefact (every distinct artefact once; the numbers are the summary files',
  printed with ``--digits`` decimals) and their improvement over the family baseline (%);
* the paper's bar charts (each variant relative to the baseline), synergy plot (merged vs
  expected, y = x), a model x strategy x merge heatmap and training-loss curves per stage;
* rankings, the synergy table, training statistics;
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
    add("Units: accuracies are fractions of items answered correctly (`acc`: exact-match letter of "
        "the greedy answer, the paper's protocol; `acc_ll`: argmax log-likelihood over the option "
        "letters); `ppl` is the perplexity of the held-out domain text (lower is better). "
        "Relative improvements are in % of the baseline, positive = better (perplexity inverted). "
        "Baseline: the family's instruct model, or the cell's own start model in a family "
        "without an instruct cell (see `dft.analysis.relative_to_baseline`).\n")

    # -- results
    rel = df
    for m in all_metrics:
        rel = A.relative_to_baseline(rel, m)
    rel_u = A.unique_artefacts(rel)
    add("## Results per artefact\n")
    add("Each distinct artefact once (the shared start model and cached chain prefixes appear in "
        "several cells; `cell` names the first). Values as in `summary.json`.\n")
    id_cols = (["sweep"] if multi else []) + ["family", "model", "strategy", "merge", "artefact", "kind", "cell"]
    add(markdown_table(rel_u[id_cols + all_metrics].reset_index(drop=True), digits))
    add("### Relative to the baseline\n")
    relcols = {f"{m}:relative": f"{m} vs baseline" for m in all_metrics}
    tab = rel_u[id_cols[:-1] + ["baseline_of"] + list(relcols)].rename(columns=relcols)
    add(markdown_table(tab.reset_index(drop=True), digits, formats={v: pct for v in relcols.values()}))

    # -- bar charts
    add("## Improvement over the baseline per variant\n")
    for m in metrics:
        f = _save(A.plot_relative(rel, m), out / f"relative_{A.slug(m)}.png")
        add(f"![{m} relative to the baseline]({f})\n")

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
            "Values as in `summary.json[\"synergy\"]`.\n")
        f = _save(A.plot_synergy(syn, [m for m in metrics if m in set(syn["metric"])] or None),
                  out / "synergy.png")
        add(f"![synergy]({f})\n")
        cols = (["sweep"] if multi else []) + ["model", "strategy", "cell", "merged", "parent_1", "parent_2",
                                               "metric", "p1", "p2", "expected", "merged_score", "deviation",
                                               "improvement", "diversity"]
        cols += [c for c in syn.columns if c.startswith("kinship_")]
        add(markdown_table(syn[cols], digits))

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

    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


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
