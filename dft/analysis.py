"""Tables and figures over finished sweeps. Reads ``summary.json`` (and eval JSON), never logs.

Input formats are those of ``docs/CONTRACTS.md``. One *sweep* is a folder holding run
directories (``runs/<experiment>``, or ``runs/`` for all experiments); every ``summary.json``
below it is one Hydra cell. The long table :func:`load_sweep` returns has one row per
(cell, artefact) and is what every other function here takes.

Units: MCQ accuracies (``<benchmark>/acc``, ``<benchmark>/acc_ll``) are fractions in [0, 1];
perplexity (``ppl``) is exp(mean NLL per token in nats) of the held-out domain text (lower is
better); relative improvements are fractions (0.12 = 12 % better than the baseline), signed so
that positive is always better; training ``loss`` is the TRL trainer's logged loss (nats per
token for CPT/SFT, the preference loss for DPO/ORPO: not comparable across stage kinds).

Where the quantities come from (Lu, Luu & Buehler, "Fine-tuning large language models for domain
adaptation", arXiv 2409.03444). Section names, not numbers, are given because the arXiv and the
npj Computational Materials versions number them differently:

* baseline and relative improvement: the Results' bar charts report every variant's benchmark
  score relative to the family's *instruct* model (Llama-3.1-8B-Instruct, Mistral-7B-Instruct);
  :func:`relative_to_baseline`;
* synergy: the Results' model-merging analysis plots each merged model's actual score against
  the score "expected" from its two parents (their mean), with the y = x line separating
  synergistic (above) from sub-additive (below) merges, and relates the deviation to the parents'
  diversity. dft computes these numbers once per cell with :func:`dft.merging.synergy`
  (expected = (p1 + p2) / 2, deviation = merged - expected, improvement = merged - max(p1, p2),
  diversity = |p1 - p2|, for the MCQ metrics, not perplexity) into ``summary.json["synergy"]``;
  here they are only collected (:func:`synergy_table`), never recomputed;
* open-ended assessment: the Results' conversation experiments score each model on several
  criteria (reasoning depth, creativity, clarity, quantitative precision, 1-10 each; four criteria
  give the total out of 40) and compare totals normalised to the best model; :func:`judge_table`.

Plots import matplotlib lazily and draw on a new figure they return; they never call
``plt.show()`` (notebooks display the returned figure, :mod:`dft.report` saves it).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from dft import DftError
from dft.evaluation.compare import COMPARISON_FIELDS  # the fields of summary.json["comparisons"]

#: Identity columns of :func:`load_sweep` (in order); every other column is a metric or ``train/*``.
ID_COLUMNS = [
    "sweep", "experiment", "cell", "model", "family", "start", "strategy", "chain", "merge",
    "peft", "data", "eval_dtype", "seed", "status", "artefact", "kind", "stages", "parents", "key", "cell_dir",
]
#: ``summary.json["train"][<artefact>]`` fields shown first (all scalar fields become ``train/*``).
TRAIN_FIELDS = ("train_loss", "runtime_s", "steps", "rows", "tokens", "trainable_params", "total_params", "cached")
#: Folders never searched for ``summary.json`` (model weights, caches, W&B files).
_SKIP_DIRS = {"stages", "merged", "eval", "wandb", ".hydra", "final", "checkpoints", ".git"}
#: Metric name endings for which lower is better.
_LOWER_IS_BETTER = {"ppl", "nll", "nll_per_token", "loss", "train_loss", "eval_loss"}


# --------------------------------------------------------------------------------------- loading
def _as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise DftError("no sweep folder given")
    return out


def sweep_labels(paths: Sequence[Path]) -> list[str]:
    """Short names for sweep folders: the folder name, or the whole path where names collide."""
    names = [p.resolve().name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def find_summaries(sweep: str | os.PathLike) -> list[Path]:
    """Every cell's ``summary.json`` under ``sweep`` (recursively), sorted.

    A folder holding ``summary.json`` is a cell: its subfolders are not searched (they hold model
    weights), nor are ``stages/``, ``merged/``, ``wandb/`` anywhere. Symlinks are not followed.
    """
    root = Path(sweep)
    if not root.is_dir():
        raise DftError(f"sweep folder not found: {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "summary.json" in filenames:
            found.append(Path(dirpath) / "summary.json")
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    return sorted(found)


def find_sweeps(runs: str | os.PathLike) -> list[Path]:
    """The sweep folders directly under ``runs`` that hold a ``summary.json``, sorted by name.

    Folders whose name starts with ``_`` or ``.`` are not sweeps (``_stages`` is the stage cache
    shared by every sweep, ``.plan`` a dry run's plans) and are skipped, as are folders without any
    finished cell. ``notebooks/compare_sweeps.ipynb`` compares the first two when it is not told which.
    """
    root = Path(runs)
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(("_", ".")) and find_summaries(p)]


def _point_labels(s: pd.DataFrame) -> list[tuple[float, float, str]]:
    """``(x, y, text)`` per distinct point of a synergy panel: the merged artefacts' short names
    (strategy, and the start when both occur), joined when several land on the same spot."""
    both_starts = s["start"].nunique() > 1 if "start" in s else False
    spots: dict[tuple, list[str]] = {}
    for _, r in s.iterrows():
        name = str(r.get("strategy") or r.get("merged") or "?")
        if both_starts and r.get("start"):
            name += f" ({r['start']})"
        key = (round(float(r["expected"]), 6), round(float(r["merged_score"]), 6))
        if name not in spots.setdefault(key, []):
            spots[key].append(name)
    return [(x, y, ", ".join(names)) for (x, y), names in sorted(spots.items())]


def skipped_cells(sweep: str | os.PathLike) -> list[dict]:
    """Cell folders under ``sweep`` without a ``summary.json``, which :func:`load_sweep` leaves out.

    A cell folder is one Hydra made (``.hydra/``) or dft wrote ``meta.json`` into. Returns
    ``[{"cell": folder relative to sweep, "reason": ...}]`` sorted by folder; the reason says
    what is known: the exception of a ``traceback.txt`` (``dft.train`` writes one when a cell
    fails unexpectedly), ``started, no summary.json`` (still running, interrupted, or killed:
    its log is ``<folder>/*.log``), or ``never ran`` (Hydra's files only). Folders whose name
    starts with ``.`` or ``_`` (the stage cache, plans, submitit) are not cells.
    """
    root = Path(sweep)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if "summary.json" in filenames:
            dirnames[:] = []
            continue
        is_cell = ".hydra" in dirnames or "meta.json" in filenames
        dirnames[:] = sorted(x for x in dirnames if x not in _SKIP_DIRS and not x.startswith((".", "_")))
        if not is_cell:
            continue
        dirnames[:] = []
        if "traceback.txt" in filenames:
            lines = [ln for ln in (d / "traceback.txt").read_text(errors="replace").splitlines() if ln.strip()]
            reason = f"failed: {lines[-1].strip() if lines else 'see traceback.txt'}"
        elif "meta.json" in filenames:
            reason = "started, no summary.json (still running, interrupted or killed; see its log)"
        else:
            reason = "never ran (only Hydra's files: failed its checks before starting)"
        out.append({"cell": str(d.relative_to(root)) if d != root else ".", "reason": reason})
    return sorted(out, key=lambda r: r["cell"])


def load_summaries(paths, progress: bool = False) -> list[dict]:
    """Read every ``summary.json`` under one or more sweep folders.

    Each returned dict is the file's content plus ``_sweep`` (the sweep's short name, see
    :func:`sweep_labels`) and ``_dir`` (the cell folder, a :class:`Path`). ``progress`` shows a
    tqdm bar over cells. Raises :class:`DftError` if a folder is missing or holds no summary.
    """
    roots = _as_paths(paths)
    labels = sweep_labels(roots)
    files: list[tuple[str, Path]] = []
    for label, root in zip(labels, roots):
        found = find_summaries(root)
        if not found:
            raise DftError(f"no summary.json under {root} (is the sweep finished? a cell writes it last)")
        files += [(label, f) for f in found]
    it: Iterable = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc="cells", unit="cell")
    out = []
    for label, f in it:
        try:
            s = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DftError(f"{f}: not valid JSON ({e})") from None
        s["_sweep"], s["_dir"] = label, f.parent
        out.append(s)
    return out


def _summaries_from(obj) -> list[dict]:
    """Summaries from a :func:`load_sweep` frame (re-read via ``cell_dir``), paths or dicts."""
    if isinstance(obj, pd.DataFrame):
        cells = obj[["sweep", "cell_dir"]].dropna().drop_duplicates()
        if cells.empty and not obj.empty:
            raise DftError("this table has no cell_dir (e.g. from load_wandb): synergy and training "
                           "curves are read from the run folders, use load_sweep")
        out = []
        for sweep, d in cells.itertuples(index=False):
            s = json.loads((Path(d) / "summary.json").read_text())
            s["_sweep"], s["_dir"] = sweep, Path(d)
            out.append(s)
        return out
    if isinstance(obj, (str, os.PathLike)) or (
        isinstance(obj, Sequence) and obj and isinstance(obj[0], (str, os.PathLike))
    ):
        return load_summaries(obj)
    out = []
    for s in obj:
        s = dict(s)
        s.setdefault("_sweep", s.get("experiment", ""))
        s.setdefault("_dir", None)
        out.append(s)
    return out


def _rows(summaries: Iterable[Mapping]) -> list[dict]:
    rows = []
    for s in summaries:
        ident = {
            "sweep": s.get("_sweep", s.get("experiment")),
            "experiment": s.get("experiment"),
            "cell": s.get("cell"),
            "model": s.get("model"),
            "family": s.get("family"),
            "start": s.get("start"),
            "strategy": s.get("strategy"),
            # the chain as one string, the way artefacts are named: ["cpt","sft"] -> "cpt_sft"
            "chain": "_".join(s.get("chain") or []),
            "merge": s.get("merge") or "none",
            "peft": s.get("peft"),
            "data": s.get("data"),
            "eval_dtype": s.get("eval_dtype"),  # absent in summaries written before eval.dtype existed
            "seed": s.get("seed"),
            "status": s.get("status"),
            "cell_dir": str(s["_dir"]) if s.get("_dir") is not None else None,
        }
        train = s.get("train") or {}
        for a in s.get("artefacts") or []:
            row = dict(ident)
            row.update(artefact=a["name"], kind=a.get("kind"),
                       stages="_".join(a.get("stages") or []),
                       parents=",".join(a.get("parents") or []), key=a.get("key"))
            row.update(a.get("metrics") or {})
            t = train.get(a["name"])
            if t:  # scalars only: log_history is read by train_histories
                row.update({f"train/{k}": v for k, v in t.items()
                            if v is None or isinstance(v, (int, float, str, bool))})
            rows.append(row)
    return rows


def load_sweep(paths, progress: bool = False) -> pd.DataFrame:
    """One row per (cell, artefact) from every ``summary.json`` under the sweep folder(s).

    ``paths``: a sweep folder (``runs/<experiment>``; ``runs/`` works too) or a list of them.
    Columns: :data:`ID_COLUMNS` (``sweep`` tells several sweeps apart, ``chain`` is the stage
    list joined by ``_``, ``cell_dir`` locates the eval files), then one column per metric
    found in ``artefacts[].metrics`` (``<benchmark>/acc``, ``<benchmark>/acc_ll`` as fractions,
    ``ppl``), then the scalar fields of ``summary.json["train"][<artefact>]`` prefixed ``train/``
    (``train_loss``, ``runtime_s`` in seconds, ``steps``, ``rows``, ``trainable_params``,
    ``cached`` ... as ``dft.pipeline`` writes them) for trained stages, NaN elsewhere.
    Source: ``docs/CONTRACTS.md`` and ``dft.pipeline.Cell.summary``.
    """
    rows = _rows(load_summaries(paths, progress=progress))
    df = pd.DataFrame(rows)
    for c in ID_COLUMNS:
        if c not in df:
            df[c] = None
    metrics = [c for c in df.columns if c not in ID_COLUMNS and not c.startswith("train/")]
    train = [f"train/{k}" for k in TRAIN_FIELDS if f"train/{k}" in df]
    train += sorted(c for c in df.columns if c.startswith("train/") and c not in train)
    return df[ID_COLUMNS + metrics + train]


def load_wandb(project: str, entity: str | None = None, filters: dict | None = None,
               api: Any = None) -> pd.DataFrame:
    """The same long table as :func:`load_sweep`, from the W&B public API (online only).

    Reads each run's summary keys ``eval/<artefact>/<metric...>`` (the flat ``metrics`` of
    ``summary.json``, which ``dft.pipeline`` logs to W&B under the same names) and the cell's
    identity from the run's config, which is the resolved Hydra config (``model.name``,
    ``model.family``, ``model.start``, ``strategy.name``, ``strategy.chain``, ``merge.method``,
    ``peft.method``, ``data.name``, ``experiment``), falling back to the run's ``group``
    (experiment) and ``job_type`` (strategy). ``cell`` is the run's name (``model|strategy|merge``,
    ``dft.tracking``), not the folder name. ``filters`` is W&B's MongoDB-style run filter, e.g.
    ``{"group": "grid"}``. There is no ``cell_dir``: judge files and training curves need the
    run folders (:func:`load_sweep`).
    """
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise DftError(f"load_wandb needs the W&B API but WANDB_MODE={os.environ['WANDB_MODE']}; "
                       "read the run folders with dft.analysis.load_sweep instead")
    if api is None:
        try:
            import wandb  # lazy: slow to import and only needed online
        except ImportError:
            raise DftError("load_wandb needs the wandb package (pip install wandb)") from None
        try:
            api = wandb.Api(timeout=30)
        except Exception as e:  # no key, no network: one clear line instead of a traceback
            raise DftError(f"cannot reach the W&B API ({type(e).__name__}: {e}); "
                           "use dft.analysis.load_sweep on the run folders") from None
    path = f"{entity}/{project}" if entity else project
    try:
        runs = list(api.runs(path, filters=filters or {}))
    except Exception as e:
        raise DftError(f"W&B query {path!r} failed ({type(e).__name__}: {e})") from None
    summaries = []
    for run in runs:
        cfg = dict(getattr(run, "config", {}) or {})

        def conf(group: str, key: str, default=None):
            node = cfg.get(group)
            return node.get(key, default) if isinstance(node, Mapping) else (node if node is not None else default)

        flat = {k: v for k, v in dict(run.summary).items() if isinstance(k, str) and k.startswith("eval/")}
        by_art: dict[str, dict] = {}
        for k, v in flat.items():
            parts = k.split("/")
            if len(parts) < 3 or not isinstance(v, (int, float)):
                continue
            metric = "/".join(parts[2:])
            by_art.setdefault(parts[1], {})[metric] = v
        chain = conf("strategy", "chain") or []
        model = cfg.get("model")
        summaries.append({
            "_sweep": cfg.get("experiment") or run.group, "_dir": None,
            "experiment": cfg.get("experiment") or run.group, "cell": run.name,
            "model": conf("model", "name"), "family": conf("model", "family") or cfg.get("family"),
            "start": conf("model", "start") if isinstance(model, Mapping) else cfg.get("start"),
            "strategy": conf("strategy", "name", run.job_type),
            "chain": list(chain) if not isinstance(chain, str) else chain.split("_"),
            "merge": conf("merge", "method", "none"), "peft": conf("peft", "method"),
            "data": conf("data", "name"), "seed": cfg.get("seed"), "status": run.state,
            "artefacts": [{"name": a, "kind": _kind_of(a), "metrics": m} for a, m in by_art.items()],
        })
    df = pd.DataFrame(_rows(summaries))
    if df.empty:
        return pd.DataFrame(columns=ID_COLUMNS)
    for c in ID_COLUMNS:
        if c not in df:
            df[c] = None
    return df[ID_COLUMNS + [c for c in df.columns if c not in ID_COLUMNS]]


def _kind_of(artefact: str) -> str:
    """The artefact kind from its name (CONTRACTS naming), for sources that do not store it."""
    if artefact in ("start", "partner"):
        return artefact
    return "merge" if "+" in artefact else "stage"


# ---------------------------------------------------------------------------------------- tables
def metric_columns(df: pd.DataFrame) -> list[str]:
    """The evaluation metric columns of a :func:`load_sweep` frame (not identity, not ``train/``,
    not a metric's uncertainty companions ``<metric>_stderr``/``_ci_low``/``_ci_high`` or
    ``<benchmark>/n``: see :func:`interval_columns`)."""
    from dft.stats import is_uncertainty_key

    return [c for c in df.columns if c not in ID_COLUMNS and not c.startswith("train/")
            and ":" not in c and c not in ("baseline_of", "is_baseline") and not is_uncertainty_key(c)]


def interval_columns(df: pd.DataFrame, metric: str) -> tuple[str | None, str | None]:
    """The ``(<metric>_ci_low, <metric>_ci_high)`` columns of ``df``, None where absent (summaries
    written before dft recorded intervals)."""
    lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
    return (lo if lo in df else None), (hi if hi in df else None)


def primary_metrics(df: pd.DataFrame) -> list[str]:
    """The metrics the paper reports: every ``<benchmark>/acc`` (greedy exact match), then ``ppl``."""
    cols = metric_columns(df)
    return [c for c in cols if c.endswith("/acc")] + [c for c in cols if c == "ppl"]


def higher_is_better(metric: str) -> bool:
    """False for perplexity and losses (``ppl``, ``nll*``, ``*loss``), True otherwise."""
    return metric.split("/")[-1] not in _LOWER_IS_BETTER


def unique_artefacts(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct artefact: drops the repeats a grid produces.

    The same model is the ``start`` of every cell that starts from it, and a cached chain prefix
    (``cpt_sft`` of the SFT, DPO and ORPO chains) appears in each cell that reuses it. Rows are
    the same artefact when (sweep, experiment, model, peft, artefact, cache ``key``) match and
    all their metric values are equal (the same weights under another eval config stay apart);
    the first cell (sorted) is kept.
    """
    if df.empty:
        return df
    metrics = metric_columns(df)
    ident = _key_of(df, ["sweep", "experiment", "model", "peft", "artefact", "key"])
    values = _key_of(df[metrics].round(12), metrics) if metrics else ""
    dup = (ident + "\x1e" + values).duplicated()
    return df[~dup]


def final_artefacts(df: pd.DataFrame) -> pd.DataFrame:
    """The artefact each cell is about, one row per cell: the merge of the whole chain
    (``<chain>+<merge>``) if the cell has it, else the whole chain's artefact (``<chain>``), else
    ``start`` (strategy without stages). With ``merge.at=each`` the earlier merges are skipped."""
    chain = df["chain"].fillna("").astype(str)
    merged_name = chain + "+" + df["merge"].astype(str)
    stage_name = chain.where(chain != "", "start")
    cell = ["sweep", "experiment", "cell", "cell_dir"]
    is_merge = df["artefact"].eq(merged_name)
    has_merge = is_merge.groupby([df[c].astype(str) for c in cell]).transform("any")
    return df[is_merge | (df["artefact"].eq(stage_name) & ~has_merge)]


def relative_to_baseline(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Add each row's baseline and relative improvement for ``metric``.

    Baseline (the paper's bar charts, Results): within one (sweep, experiment, family), the
    ``start`` artefact of cells whose model is the family's instruct model (``start ==
    "instruct"``; the mean if several cells evaluated it); for a family without an instruct
    cell, each cell's own ``start`` artefact.

    Added columns: ``<metric>:baseline`` (the baseline's value, same unit as the metric),
    ``<metric>:relative`` = (x - b) / b for higher-is-better metrics and (b - x) / b for
    perplexity/losses, a fraction where positive is better; ``baseline_of`` says which artefact
    the baseline is (``instruct:<model>`` or ``own start``); ``is_baseline`` marks the rows that
    are a baseline themselves (their relative value is 0 by definition).
    """
    if metric not in df:
        raise DftError(f"no metric {metric!r}; the sweep has {metric_columns(df)}")
    out = df.copy()
    fam = _key_of(out, ["sweep", "experiment", "family"])
    cell = _key_of(out, ["sweep", "experiment", "cell", "cell_dir"])
    is_start = out["kind"].eq("start")
    inst = is_start & out["start"].eq("instruct") & out[metric].notna()
    out["_fam"] = fam.map(out[metric][inst].groupby(fam[inst]).mean())
    out["_fam_model"] = fam.map(out["model"][inst].groupby(fam[inst]).first())
    out["_own"] = cell.map(out[metric][is_start].groupby(cell[is_start]).mean())
    base = out["_fam"].where(out["_fam"].notna(), out["_own"])
    sign = 1.0 if higher_is_better(metric) else -1.0
    out[f"{metric}:baseline"] = base
    out[f"{metric}:relative"] = sign * (out[metric] - base) / base
    out["baseline_of"] = ("instruct:" + out["_fam_model"].astype(str)).where(out["_fam"].notna(), "own start")
    out["is_baseline"] = is_start & (out["_fam"].isna() | out["start"].eq("instruct"))
    return out.drop(columns=["_fam", "_fam_model", "_own"])


def _key_of(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """One string per row identifying ``cols`` (None/NaN-safe, unlike a multi-column join)."""
    # map(str), not astype(str): pandas 3's string dtype keeps NaN as NaN
    return pd.Series(["\x1f".join(t) for t in zip(*(df[c].map(str) for c in cols))], index=df.index, dtype=object)


def rankings(df: pd.DataFrame, metric: str, by: str | list[str] | None = None,
             unique: bool = True, top: int | None = None) -> pd.DataFrame:
    """Artefacts ranked by ``metric``, best first (highest accuracy, lowest perplexity).

    ``by`` ranks within groups (e.g. ``"family"`` or ``["sweep", "family"]``); ``unique`` ranks
    each distinct artefact once (:func:`unique_artefacts`); ``top`` keeps the best N per group.
    Ties share the better rank (``method="min"``). If ``<metric>:relative`` is present (from
    :func:`relative_to_baseline`) it is kept.
    """
    if metric not in df:
        raise DftError(f"no metric {metric!r}; the sweep has {metric_columns(df)}")
    d = unique_artefacts(df) if unique else df
    d = d[d[metric].notna()].copy()
    groups = [by] if isinstance(by, str) else list(by or [])
    asc = not higher_is_better(metric)
    if groups:
        d["rank"] = d.groupby(groups, dropna=False)[metric].rank(method="min", ascending=asc)
    else:
        d["rank"] = d[metric].rank(method="min", ascending=asc)
    d["rank"] = d["rank"].astype(int)
    d = d.sort_values(groups + ["rank", "model", "artefact"])
    if top is not None:
        d = d[d["rank"] <= top]
    cols = groups + ["rank", "model", "strategy", "merge", "artefact", "kind", "cell", metric]
    cols += [c for c in (f"{metric}:relative",) if c in d]
    return d[list(dict.fromkeys(cols))].reset_index(drop=True)


SYNERGY_FIELDS = ["merged", "parent_1", "parent_2", "metric", "p1", "p2", "expected", "merged_score",
                  "deviation", "improvement", "diversity", "ci_low", "ci_high", "p"]


def synergy_table(obj) -> pd.DataFrame:
    """Every merge's synergy record, one row per (cell, merged artefact, metric).

    ``obj``: a :func:`load_sweep` frame, sweep folder(s), or summary dicts. Columns: the cell's
    identity, the ``summary.json["synergy"]`` fields as :func:`dft.merging.synergy` wrote them
    (``expected`` = the parents' mean score, ``deviation`` = merged_score - expected: the
    paper's synergy measure, positive = above the y = x line; ``improvement`` = merged_score -
    the better parent, positive = emergent; ``diversity`` = |p1 - p2|; all in the metric's
    unit; ``ci_low``/``ci_high``/``p`` = the deviation's 95 % paired bootstrap interval and
    p-value, None in summaries written before they were recorded), plus the kinship of the merged model's parents
    (``kinship_pearson``, ``kinship_cosine``, ``kinship_euclidean``) when recorded.
    """
    ident_cols = ["sweep", "experiment", "cell", "model", "family", "start", "strategy", "chain", "merge"]
    rows = []
    for s in _summaries_from(obj):
        ident = {"sweep": s.get("_sweep"), "experiment": s.get("experiment"), "cell": s.get("cell"),
                 "model": s.get("model"), "family": s.get("family"), "start": s.get("start"),
                 "strategy": s.get("strategy"), "chain": "_".join(s.get("chain") or []),
                 "merge": s.get("merge") or "none"}
        kin = s.get("kinship") or {}
        for rec in s.get("synergy") or []:
            row = dict(ident)
            row.update({k: rec.get(k) for k in SYNERGY_FIELDS})
            for k, v in (kin.get(rec.get("merged")) or {}).items():
                row[f"kinship_{k}"] = v
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=ident_cols + SYNERGY_FIELDS)
    return pd.DataFrame(rows)



# ------------------------------------------------------------------------------ uncertainty
_SEED_RE = re.compile(r"(^|,)seed=[^,]*")


def missing_uncertainty(obj) -> dict[str, list[str]]:
    """Which cells' summaries lack the uncertainty fields (written before dft recorded them).

    Returns ``{"comparisons": [cell dirs without "comparisons"], "intervals": [cells whose MCQ/ppl
    metrics have no ``_ci_low``]}``; cells that evaluate nothing count in neither.
    """
    out: dict[str, list[str]] = {"comparisons": [], "intervals": []}
    for s in _summaries_from(obj):
        name = str(s.get("_dir") or s.get("cell"))
        arts = s.get("artefacts") or []
        keys = {k for a in arts for k in (a.get("metrics") or {})}
        if not keys:
            continue
        if "comparisons" not in s:
            out["comparisons"].append(name)
        from dft.stats import is_uncertainty_key

        if any(not is_uncertainty_key(k) and f"{k}_ci_low" not in keys for k in keys):
            out["intervals"].append(name)
    return out


def comparisons_table(obj, alpha: float = 0.05) -> pd.DataFrame:
    """Every paired comparison of a sweep, each distinct one once, Holm-corrected per sweep.

    ``obj``: a :func:`load_sweep` frame, sweep folder(s) or summary dicts. One row per record of
    ``summary.json["comparisons"]`` (:data:`COMPARISON_FIELDS`, see docs/CONTRACTS.md) with the
    cell's identity; a comparison repeated in several cells (the same cached stages compared
    again) is kept once: same sweep, experiment, model, peft, metric and the artefacts' cache
    keys. ``n10``/``n01``: discordant items of McNemar pairs (None otherwise). Added: ``p_adj`` = Holm-adjusted p over all of the sweep's comparisons
    (:func:`dft.stats.holm`), ``significant`` = ``p_adj < alpha``, and ``claim`` (one sentence,
    :func:`claim_sentence`). Empty frame with these columns when no summary has comparisons.
    """
    from dft.stats import holm

    ident_cols = ["sweep", "experiment", "cell", "model", "family", "strategy", "chain", "merge", "peft", "seed"]
    rows, seen = [], set()
    for s in _summaries_from(obj):
        keys = {a["name"]: a.get("key") for a in s.get("artefacts") or []}
        ident = {"sweep": s.get("_sweep"), "experiment": s.get("experiment"), "cell": s.get("cell"),
                 "model": s.get("model"), "family": s.get("family"), "strategy": s.get("strategy"),
                 "chain": "_".join(s.get("chain") or []), "merge": s.get("merge") or "none",
                 "peft": s.get("peft"), "seed": s.get("seed")}
        for c in s.get("comparisons") or []:
            parts = c.get("b_parts") or [c.get("b")]
            dedup = (ident["sweep"], ident["experiment"], ident["model"], ident["peft"], c.get("metric"),
                     c.get("kind"), keys.get(c.get("a"), c.get("a")), tuple(keys.get(b, b) for b in parts))
            if dedup in seen:
                continue
            seen.add(dedup)
            rows.append({**ident, **{k: c.get(k) for k in COMPARISON_FIELDS + ["n10", "n01"]}})
    cols = ident_cols + COMPARISON_FIELDS + ["n10", "n01", "p_adj", "significant", "claim"]
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)
    out["p_adj"], out["significant"] = None, None
    for sw, idx in out.groupby("sweep", dropna=False).groups.items():
        adj, rej = holm(out.loc[idx, "p"].tolist(), alpha)
        out.loc[idx, "p_adj"] = pd.Series(adj, index=idx, dtype=object)
        out.loc[idx, "significant"] = pd.Series(rej, index=idx, dtype=object)
    out["claim"] = [claim_sentence(r) for r in out.to_dict("records")]
    return out[cols]


def _diff_text(metric: str, diff: float, lo: float, hi: float) -> str:
    if metric.split("/")[-1] == "ppl":
        return f"{diff:+.3g} ppl [{lo:.3g}, {hi:.3g}]"
    return f"{100 * diff:+.1f} points [{100 * lo:.1f}, {100 * hi:.1f}]"


def claim_sentence(r: Mapping) -> str:
    """One plain sentence for a :func:`comparisons_table` row.

    ``"<model>/<a> beats <b> on <metric>: +4.1 points [1.2, 7.0], p_adj = 0.01"`` (or ``is worse
    than``; for perplexity lower is better), or ``"... is not distinguishable from <b> on
    <metric>: ..."`` when the Holm-adjusted p is not below 0.05 (``significant`` false).
    """
    who = f"{r.get('model')}/{r.get('a')}"
    b = r.get("b") or ""
    if r.get("kind") == "merge_vs_mean_of_parents" and b.startswith("mean("):
        b = f"the mean of its parents ({b[5:-1].replace(',', ', ')})"
    m = r.get("metric")
    if r.get("diff") is None or r.get("ci_low") is None:
        return f"{who} vs {b} on {m}: no interval recorded"
    stats = _diff_text(m, r["diff"], r["ci_low"], r["ci_high"])
    p = r.get("p_adj")
    from dft.stats import format_p

    ptxt = format_p(p, "p_adj") if p is not None and not (isinstance(p, float) and math.isnan(p)) else "no p"
    if r.get("significant"):
        better = (r["diff"] > 0) == higher_is_better(m)
        return f"{who} {'beats' if better else 'is worse than'} {b} on {m}: {stats}, {ptxt}"
    return f"{who} is not distinguishable from {b} on {m}: {stats}, {ptxt}"


def merge_claims(comp: pd.DataFrame) -> list[str]:
    """One sentence per (merged artefact, metric) about both of its parents (the paper's question):
    ``"... beats both parents on m: +a [..] vs p1, +b [..] vs p2 (p_adj ..)"``, ``"... is not
    distinguishable from its parents on m: ..."``, or each parent's verdict when they differ."""
    from dft.stats import format_p

    out = []
    d = comp[comp["kind"] == "merge_vs_parent"]
    for (_, _, model, a, m), g in d.groupby(["sweep", "cell", "model", "a", "metric"], sort=False):
        rows = g.to_dict("records")
        parts = ", ".join(f"{_diff_text(m, r['diff'], r['ci_low'], r['ci_high'])} vs {r['b']} "
                          f"({format_p(r['p_adj'], 'p_adj')})" for r in rows if r.get("ci_low") is not None and r.get("p_adj") is not None)
        sig = [bool(r.get("significant")) for r in rows]
        better = [(r["diff"] > 0) == higher_is_better(m) for r in rows]
        if len(rows) == 2 and all(sig) and all(better):
            out.append(f"{model}/{a} beats both parents on {m}: {parts}")
        elif not any(sig):
            out.append(f"{model}/{a} is not distinguishable from its parents on {m}: {parts}")
        else:
            out.extend(claim_sentence(r) for r in rows)
    return out


def seed_table(df: pd.DataFrame, metrics: Sequence[str] | None = None, n_resamples: int | None = None) -> pd.DataFrame:
    """Seeds as replicates: cells that differ only in ``seed``, aggregated per artefact and metric.

    Cells are grouped by (sweep, experiment, the cell name without its ``seed=`` override); each
    group with two or more distinct seeds gives, per artefact and metric, ``n_seeds``, ``seeds``,
    ``mean`` over seeds, ``ci_low``/``ci_high`` = 95 % two-level bootstrap (seeds, then items;
    :func:`dft.stats.seed_bootstrap_many`; items only for accuracies whose ``<benchmark>/n`` is
    recorded, else seeds only: ``levels`` says which), ``seed_sd`` (between-seed spread, SD
    over seeds) and ``item_se`` (item-sampling spread of one seed's value, binomial SE). All
    rows with the same number of seeds and levels share one vectorised bootstrap.
    """
    from dft.stats import N_RESAMPLES, seed_bootstrap_many

    cols = ["sweep", "experiment", "model", "strategy", "merge", "group", "artefact", "metric", "n_seeds", "seeds",
            "mean", "ci_low", "ci_high", "seed_sd", "item_se", "levels"]
    if df.empty or "seed" not in df or df["seed"].isna().all():
        return pd.DataFrame(columns=cols)
    metrics = [m for m in (metrics or metric_columns(df)) if m in df]
    d = df[df["status"].eq("finished") | df["status"].isna()].copy()
    d["group"] = d["cell"].astype(str).map(lambda c: _SEED_RE.sub("", c).strip(",") or "default")
    pending: dict[tuple, list] = {}  # (n_seeds, items) -> [(row identity, values, n)]
    for (sw, ex, grp, art), g in d.groupby(["sweep", "experiment", "group", "artefact"], sort=True, dropna=False):
        g = g.drop_duplicates("seed").sort_values("seed")
        if g["seed"].nunique() < 2:
            continue
        ident = {"sweep": sw, "experiment": ex, "model": g["model"].iloc[0], "strategy": g["strategy"].iloc[0],
                 "merge": g["merge"].iloc[0], "group": grp, "artefact": art,
                 "seeds": ",".join(str(int(x)) for x in g["seed"])}
        for m in metrics:
            vals = g[m].to_numpy(dtype=float)
            if np.isnan(vals).any():
                continue
            ncol = f"{m.rsplit('/', 1)[0]}/n" if "/" in m else None
            items = bool(ncol and ncol in g and g[ncol].notna().all() and m.split("/")[-1] in ("acc", "acc_ll"))
            pending.setdefault((len(vals), items), []).append(
                ({**ident, "metric": m}, vals, g[ncol].to_numpy(dtype=np.int64) if items else None))
    rows = []
    for (S, items), batch in pending.items():
        r = seed_bootstrap_many(np.stack([b[1] for b in batch]), np.stack([b[2] for b in batch]) if items else None,
                                n_resamples=n_resamples or N_RESAMPLES)
        for i, (ident, _, _) in enumerate(batch):
            rows.append({**ident, "n_seeds": S, "mean": float(r["mean"][i]), "ci_low": float(r["ci_low"][i]),
                         "ci_high": float(r["ci_high"][i]),
                         "seed_sd": None if np.isnan(r["seed_sd"][i]) else float(r["seed_sd"][i]),
                         "item_se": None if np.isnan(r["item_se"][i]) else float(r["item_se"][i]),
                         "levels": "seeds, items" if items else "seeds"})
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["sweep", "experiment", "group", "artefact", "metric"]).reset_index(drop=True)

def train_histories(obj) -> pd.DataFrame:
    """Training-loss curves from ``summary.json["train"][<artefact>]["log_history"]``.

    Long format: sweep, experiment, cell, model, family, artefact, stage (the artefact's last
    stage kind: cpt, sft, dpo, orpo), cached, step, loss. Only TRL log entries with a ``loss``
    are kept (the final entry holds ``train_loss`` instead). A stage reused from the cache by
    several cells is kept once (same sweep, model, artefact and history).
    """
    rows, seen = [], set()
    for s in _summaries_from(obj):
        for art, t in (s.get("train") or {}).items():
            hist = [h for h in (t.get("log_history") or []) if "loss" in h and "step" in h]
            if not hist:
                continue
            key = (s.get("_sweep"), s.get("model"), s.get("peft"), art,
                   tuple((h["step"], h["loss"]) for h in hist))
            if key in seen:
                continue
            seen.add(key)
            for h in hist:
                rows.append({"sweep": s.get("_sweep"), "experiment": s.get("experiment"),
                             "cell": s.get("cell"), "model": s.get("model"), "family": s.get("family"),
                             "artefact": art, "stage": art.split("_")[-1], "cached": t.get("cached"),
                             "step": h["step"], "loss": h["loss"]})
    return pd.DataFrame(rows, columns=["sweep", "experiment", "cell", "model", "family", "artefact",
                                       "stage", "cached", "step", "loss"])


def _judge_row(doc: dict) -> dict:
    """Per-criterion means, total and max_total of one ``judge.json``.

    The format is :func:`dft.evaluation.judge.write_judge_json`'s (``judgements`` scored by
    :func:`dft.evaluation.judge.score_table`: each criterion's mean over the ``ok`` judgements,
    total = their sum out of 40). A flat ``{"scores": {criterion: x}, "total", "max_total"}``
    is accepted too.
    """
    if "judgements" in doc:
        try:
            from dft.evaluation.judge import score_table  # the judge's own definition of the totals
        except ImportError:  # pragma: no cover - ships with dft
            score_table = None
        if score_table is not None:
            row = score_table({doc.get("artefact") or "": doc})[0]
            crit = list(doc.get("criteria") or [k for k in row if k not in _JUDGE_META])
            return {"total": row.get("total"), "max_total": row.get("max_total"),
                    "n_scored": row.get("n_scored"), "n_failed": row.get("n_failed"),
                    "judge_model": row.get("judge_model"),
                    **{f"judge/{c}": row.get(c) for c in crit}}
    scores = doc.get("scores") or {}
    total = doc.get("total", sum(v for v in scores.values() if isinstance(v, (int, float))) if scores else None)
    return {"total": total, "max_total": doc.get("max_total", 40), "judge_model": doc.get("judge_model"),
            **{f"judge/{k}": v for k, v in scores.items()}}


_JUDGE_META = {"artefact", "n_scored", "n_failed", "n_skipped", "total", "max_total", "normalised",
               "judge_model", "prompt_version"}


def judge_table(df: pd.DataFrame) -> pd.DataFrame:
    """Open-ended judge scores (the paper's Table 3), from ``<cell>/eval/<artefact>/judge.json``.

    One row per distinct artefact that has a judge file: its identity, ``total`` (points; the
    sum of the four criteria's means over the scored conversations, see
    :func:`dft.evaluation.judge.score_table`; None if nothing was scored), ``max_total`` (40),
    ``normalised`` = total / the best total in the same (sweep, experiment) (the paper
    normalises to the best model), ``judge/<criterion>`` (1-10), ``n_scored``/``n_failed``,
    ``judge_model``, ``judge_path`` and ``chat_path`` (the transcripts
    ``eval/<artefact>/chat.json``, None if absent). Empty frame if no judge file exists.
    """
    rows = []
    d = unique_artefacts(df)
    for r in d[d["cell_dir"].notna()].to_dict("records"):
        jp = Path(r["cell_dir"]) / "eval" / r["artefact"] / "judge.json"
        if not jp.is_file():
            continue
        cp = jp.with_name("chat.json")
        row = {k: r[k] for k in ("sweep", "experiment", "cell", "model", "family", "strategy", "merge",
                                 "artefact", "kind")}
        row.update(_judge_row(json.loads(jp.read_text())))
        row.update(judge_path=str(jp), chat_path=str(cp) if cp.is_file() else None)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["sweep", "experiment", "cell", "model", "artefact", "total",
                                     "max_total", "normalised", "judge_path", "chat_path"])
    out = pd.DataFrame(rows)
    out["total"] = pd.to_numeric(out["total"], errors="coerce")
    best = out.groupby(["sweep", "experiment"])["total"].transform("max")
    out.insert(out.columns.get_loc("max_total") + 1, "normalised", out["total"] / best)
    return out.sort_values(["sweep", "experiment", "total"], ascending=[True, True, False],
                           na_position="last").reset_index(drop=True)


def compare_sweeps(df: pd.DataFrame, metric: str, a: str | None = None, b: str | None = None) -> pd.DataFrame:
    """Side by side: ``metric`` of each distinct artefact in sweep ``a`` and sweep ``b``.

    Rows: (family, model, peft, artefact) (the artefact name carries the chain and the merge);
    columns: ``a``, ``b`` and ``delta`` = b - a (positive = b is better for accuracies; for
    perplexity negative is better). ``a``/``b`` default to the first two sweeps of ``df``. Cells
    of one sweep that differ in other overrides but give the same row are averaged (``n_a``,
    ``n_b`` count them).
    """
    sweeps = list(dict.fromkeys(df["sweep"]))
    a = a or sweeps[0]
    b = b or (sweeps[1] if len(sweeps) > 1 else None)
    if b is None or a not in sweeps or b not in sweeps:
        raise DftError(f"compare_sweeps needs two sweeps, the frame has {sweeps}")
    d = unique_artefacts(df[df["sweep"].isin([a, b])])
    d = d.assign(peft=d["peft"].fillna("-"))
    key = ["family", "model", "peft", "artefact"]
    piv = d.pivot_table(index=key, columns="sweep", values=metric, aggfunc=["mean", "count"])
    out = pd.DataFrame({a: piv[("mean", a)], b: piv[("mean", b)]})
    out["delta"] = out[b] - out[a]
    out["n_a"], out["n_b"] = piv[("count", a)], piv[("count", b)]
    return out


def variant_labels(df: pd.DataFrame) -> pd.Series:
    """A readable label per row, ``<model>/<artefact>``, with the cell appended where two distinct
    rows would otherwise share a label (e.g. the same model trained with two PEFT settings)."""
    label = df["model"].astype(str) + "/" + df["artefact"].astype(str)
    key = df["sweep"].astype(str) + "|" + label
    clash = key.duplicated(keep=False)
    return label.where(~clash, label + " [" + df["cell"].astype(str) + "]")


# -------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib.pyplot as plt  # lazy: loading tables must not need a display backend

    return plt


def _pct(metric: str) -> str:
    return f"{metric}: improvement over baseline (%)"


def plot_relative(df: pd.DataFrame, metric: str):
    """The paper's bar chart: each variant's ``metric`` relative to its family's baseline (%),
    with the metric's 95 % interval as error bars where recorded (the baseline's own uncertainty
    is not propagated: compare two variants with :func:`comparisons_table`, which is paired).

    One panel per family, one horizontal bar per distinct artefact (baselines themselves, and
    the merge partner when it is the instruct baseline, are left out: they are 0 by
    definition); with several sweeps, one bar colour per sweep. Positive
    = better (perplexity is inverted, see :func:`relative_to_baseline`). Returns the Figure.
    """
    plt = _plt()
    rel = relative_to_baseline(df, metric) if f"{metric}:relative" not in df else df
    d = unique_artefacts(rel)
    # a merge partner is the family's instruct model (ModelConfig.partner): with an instruct
    # baseline its bar is the baseline again, so it is left out like the baseline itself
    partner_is_base = d["kind"].eq("partner") & d["baseline_of"].str.startswith("instruct:")
    d = d[~d["is_baseline"] & ~partner_is_base & d[f"{metric}:relative"].notna()].copy()
    d["label"] = variant_labels(d)
    lo_col, hi_col = interval_columns(d, metric)
    if lo_col and hi_col:  # error bars: the 95 % interval of the metric, relative to the same baseline
        sign, base = (1.0 if higher_is_better(metric) else -1.0), d[f"{metric}:baseline"]
        d["rel_lo"], d["rel_hi"] = sign * (d[lo_col] - base) / base, sign * (d[hi_col] - base) / base
    families = sorted(d["family"].dropna().unique()) or ["(none)"]
    sweeps = sorted(d["sweep"].unique())
    heights = [max(1.5, 0.28 * d[d["family"] == f]["label"].nunique() * max(1, len(sweeps) * 0.6) + 1)
               for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, fam in zip(axes[:, 0], families):
        sub = d[d["family"] == fam]
        if sub.empty:
            ax.set_axis_off()
            continue
        piv = sub.pivot_table(index="label", columns="sweep", values=f"{metric}:relative", aggfunc="mean") * 100
        piv = piv.loc[piv.mean(axis=1).sort_values().index]
        err = {}
        for end in ("rel_lo", "rel_hi"):  # the metric's 95 % interval, on the same relative scale
            if end in sub and sub[end].notna().any():
                err[end] = sub.pivot_table(index="label", columns="sweep", values=end, aggfunc="mean").reindex(
                    index=piv.index, columns=piv.columns) * 100
        n = len(sweeps)
        width = 0.8 / max(n, 1)
        ys = range(len(piv))
        for i, sw in enumerate(piv.columns):
            vals = piv[sw].to_numpy()
            pos = [y - 0.4 + width * (i + 0.5) for y in ys]
            colors = ["tab:green" if v >= 0 else "tab:red" for v in vals] if n == 1 else None
            xerr = None
            if len(err) == 2:
                a, b = err["rel_lo"][sw].to_numpy(), err["rel_hi"][sw].to_numpy()
                lo, hi = np.fmin(a, b), np.fmax(a, b)  # perplexity's sign flip swaps the ends
                xerr = np.vstack([vals - lo, hi - vals]).clip(min=0)
                xerr = np.where(np.isfinite(xerr), xerr, 0.0)  # a zero baseline has no relative interval
            ax.barh(pos, vals, height=width, color=colors, label=str(sw) if n > 1 else None,
                    xerr=xerr, error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(list(ys), piv.index, fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        base = sub["baseline_of"].iloc[0]
        ax.set_title(f"{fam} (baseline: {base})", fontsize=9)
        ax.set_xlabel(_pct(metric), fontsize=8)
        if n > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_synergy(syn: pd.DataFrame, metrics: Sequence[str] | None = None):
    """The paper's synergy plot: merged model's actual score vs the expected score (parents'
    mean), one panel per metric, with the y = x line (above it: synergy; for perplexity below
    it is better). Colour = family, marker = sweep; each point is labelled with its strategy
    (:func:`_point_labels`); vertical error bars = the 95 % paired bootstrap interval of
    merged - expected (``ci_low``/``ci_high`` of the synergy records) where recorded.
    Returns the Figure."""
    plt = _plt()
    metrics = list(metrics or sorted(syn["metric"].unique())) if not syn.empty else []
    n = max(len(metrics), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    markers = "osD^vP*X"
    fams = sorted(syn["family"].dropna().unique()) if not syn.empty else []
    sweeps = sorted(syn["sweep"].unique()) if not syn.empty else []
    cmap = plt.get_cmap("tab10")
    for ax, m in zip(axes[0], metrics):
        sub = syn[syn["metric"] == m]
        for fi, fam in enumerate(fams):
            for si, sw in enumerate(sweeps):
                s = sub[(sub["family"] == fam) & (sub["sweep"] == sw)]
                if s.empty:
                    continue
                lab = fam if len(sweeps) == 1 else f"{fam} · {sw}"
                yerr = None
                if {"ci_low", "ci_high"} <= set(s) and s["ci_low"].notna().all():
                    # the deviation's paired interval, drawn around the merged score
                    dev = s["merged_score"] - s["expected"]
                    yerr = np.vstack([(dev - s["ci_low"].astype(float)).clip(lower=0),
                                      (s["ci_high"].astype(float) - dev).clip(lower=0)])
                ax.errorbar(s["expected"], s["merged_score"], yerr=yerr, color=cmap(fi % 10), fmt=markers[si % len(markers)],
                            label=lab, ms=5, alpha=0.85, elinewidth=0.8, capsize=2)
        for x, y, text in _point_labels(sub):  # which merge each point is; coincident points share one label
            ax.annotate(text, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=5.5, alpha=0.9)
        lo = min(sub["expected"].min(), sub["merged_score"].min())
        hi = max(sub["expected"].max(), sub["merged_score"].max())
        pad = 0.05 * (hi - lo or 1)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="y = x")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel(f"expected {m} (mean of parents)", fontsize=8)
        ax.set_ylabel(f"merged {m}", fontsize=8)
        ax.set_title(m + (" (lower is better)" if not higher_is_better(m) else ""), fontsize=9)
        ax.legend(fontsize=6)
    if not metrics:
        axes[0, 0].text(0.5, 0.5, "no merges in this sweep", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.tight_layout()
    return fig



def plot_comparisons(comp: pd.DataFrame, metrics: Sequence[str], top: int = 40):
    """Forest plot of :func:`comparisons_table`: per metric, each comparison's a - b with its 95 %
    paired interval (horizontal error bar), filled where it survives Holm at 0.05, hollow where
    not; the ``top`` largest |diff| per metric. Accuracies in points, perplexity in its unit.
    Returns the Figure."""
    plt = _plt()
    metrics = [m for m in metrics if m in set(comp["metric"])] or ["(none)"]
    subs = []
    for m in metrics:
        sub = comp[comp["metric"] == m].dropna(subset=["diff", "ci_low", "ci_high"])
        subs.append(sub.reindex(sub["diff"].abs().sort_values(ascending=False).index[:top]).iloc[::-1])
    fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                             figsize=(7 * len(metrics), max(2.5, 0.22 * max(len(x) for x in subs) + 1.2)))
    for ax, m, sub in zip(axes[0], metrics, subs):
        if sub.empty:
            ax.set_axis_off()
            continue
        k = 1.0 if m.split("/")[-1] == "ppl" else 100.0
        ys = np.arange(len(sub))
        sig = sub["significant"].fillna(False).astype(bool).to_numpy()
        d, lo, hi = (sub[c].astype(float).to_numpy() * k for c in ("diff", "ci_low", "ci_high"))
        ax.errorbar(d, ys, xerr=np.vstack([(d - lo).clip(min=0), (hi - d).clip(min=0)]), fmt="none",
                    ecolor="0.4", elinewidth=0.8, capsize=2)
        ax.scatter(d[sig], ys[sig], color="tab:blue", s=18, zorder=3, label="p_adj < 0.05")
        ax.scatter(d[~sig], ys[~sig], facecolors="white", edgecolors="tab:blue", s=18, zorder=3, label="not distinguishable")
        ax.axvline(0, color="k", lw=0.8)
        one_model = sub["model"].nunique() == 1
        ax.set_yticks(ys, [f"{a} vs {b}" if one_model else f"{mo}/{a} vs {b}"
                           for mo, a, b in zip(sub["model"], sub["a"], sub["b"])], fontsize=6)
        ax.set_xlabel(f"{m}: a − b" + (" (points)" if k == 100 else ""), fontsize=8)
        ax.set_title(m + (" (lower is better)" if not higher_is_better(m) else ""), fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig

def heatmap_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """model x (strategy / merge) table of each cell's final artefact (:func:`final_artefacts`),
    one block of rows per sweep; the mean if several cells share the combination."""
    d = final_artefacts(df).copy()
    d["column"] = d["strategy"].astype(str) + " / " + d["merge"].astype(str)
    return d.pivot_table(index=["sweep", "model"], columns="column", values=metric, aggfunc="mean")


def plot_heatmap(df: pd.DataFrame, metric: str):
    """model x strategy x merge heatmap of ``metric`` for each cell's final artefact, one panel
    per sweep, values printed in the cells (darker = better). Returns the Figure."""
    plt = _plt()
    tab = heatmap_table(df, metric)
    sweeps = list(dict.fromkeys(tab.index.get_level_values(0)))
    fig, axes = plt.subplots(len(sweeps), 1, squeeze=False,
                             figsize=(1.3 * tab.shape[1] + 3, sum(0.45 * len(tab.loc[s]) + 1.4 for s in sweeps)))
    cmap = "viridis" if higher_is_better(metric) else "viridis_r"
    vmin, vmax = tab.min().min(), tab.max().max()
    for ax, sw in zip(axes[:, 0], sweeps):
        t = tab.loc[sw]
        im = ax.imshow(t.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(t.shape[1]), t.columns, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(t.shape[0]), t.index, fontsize=7)
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                v = t.iat[i, j]
                if not (isinstance(v, float) and math.isnan(v)):
                    frac = (v - vmin) / ((vmax - vmin) or 1)
                    light = frac > 0.6 if higher_is_better(metric) else frac < 0.4
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="k" if light else "w")
        ax.set_title(f"{sw}: {metric} of each cell's final artefact", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def plot_training(hist: pd.DataFrame):
    """Training loss vs optimizer step, one panel per stage kind (cpt, sft, dpo, orpo), one line
    per (sweep, model, artefact). Losses of different stage kinds are not comparable."""
    plt = _plt()
    stages = [s for s in ("cpt", "sft", "dpo", "orpo") if s in set(hist["stage"])]
    stages += sorted(set(hist["stage"]) - set(stages))
    n = max(len(stages), 1)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False)
    multi = hist["sweep"].nunique() > 1
    for ax, st in zip(axes[0], stages):
        sub = hist[hist["stage"] == st]
        for (sw, model, art), g in sub.groupby(["sweep", "model", "artefact"], sort=True):
            ax.plot(g["step"], g["loss"], lw=1, label=f"{sw}:{model}/{art}" if multi else f"{model}/{art}")
        ax.set_title(st, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        ax.legend(fontsize=5)
    if not stages:
        axes[0, 0].text(0.5, 0.5, "no training log_history", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.tight_layout()
    return fig


def slug(text: str) -> str:
    """A file-name-safe version of a metric or sweep name (``matsci_mcq/acc`` -> ``matsci_mcq-acc``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"
