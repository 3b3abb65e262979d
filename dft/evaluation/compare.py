"""Paired comparisons of a cell's artefacts, item by item (``summary.json["comparisons"]``).

Which pairs (:func:`comparison_pairs`): each trained stage against its parent (the previous
stage, or ``start``; the nearest evaluated ancestor when ``eval.stages=false`` skipped it), each
merge against each of its parents, and each merge against the mean of its parents (the paper's
"expected" score; per item: merged minus the mean of the parents).

How (:func:`paired_comparisons`, :mod:`dft.stats`): per benchmark and accuracy key, the items
every artefact was scored on; the difference a - b with a 95 % paired percentile bootstrap
interval over items (one vectorised bootstrap for all pairs), and the exact McNemar test for two
artefacts (``test: mcnemar_exact``) or the bootstrap p-value for the mean of parents
(``test: paired_bootstrap``). Perplexity (``ppl``): paired bootstrap over the same token blocks
(artefacts of one tokenizer only; pairs whose blocks differ are left out).

Record (one per pair and metric, docs/CONTRACTS.md): ``kind``, ``a``, ``b`` (artefact names as
in ``eval/<artefact>/``; ``mean(<p1>,<p2>)`` for the mean of parents, whose names are in
``b_parts``), ``metric`` (``<benchmark>/acc``, ``<benchmark>/acc_ll``, ``ppl``), ``a_value``,
``b_value``, ``diff`` (a - b, the metric's unit: a fraction for accuracies), ``ci_low``,
``ci_high``, ``p``, ``test``, ``n`` (items or blocks) and, for McNemar, ``n10``/``n01`` (items
only a / only b got right).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dft import stats as S

ACC_KEYS = (("acc", "correct"), ("acc_ll", "correct_ll"))
#: the fields every comparison record has (docs/CONTRACTS.md); McNemar records add ``n10``/``n01``,
#: mean-of-parents records ``b_parts``
COMPARISON_FIELDS = ["kind", "a", "b", "metric", "a_value", "b_value", "diff", "ci_low", "ci_high", "p", "test", "n"]


def comparison_pairs(artefacts: Sequence[dict], evaluated: Optional[set] = None) -> list[dict]:
    """The pairs to compare among ``artefacts`` (records with ``name``, ``kind``, ``stages``,
    ``parents``, as :meth:`dft.pipeline.Artefact.record` writes them).

    ``evaluated``: names that have evaluations (default: every artefact). Returns
    ``[{"kind", "a", "b": [names]}]``: ``b`` has one name, or the two parents for
    ``merge_vs_mean_of_parents``.
    """
    names = {a["name"] for a in artefacts}
    ev = names if evaluated is None else set(evaluated)
    out = []
    for a in artefacts:
        if a["name"] not in ev:
            continue
        if a.get("kind") == "stage":
            stages = list(a.get("stages") or [])
            parent = None
            for i in range(len(stages) - 1, -1, -1):  # the nearest evaluated ancestor
                cand = "_".join(stages[:i]) if i else "start"
                if cand in ev:
                    parent = cand
                    break
            if parent is not None:
                out.append({"kind": "stage_vs_parent", "a": a["name"], "b": [parent]})
        elif a.get("kind") == "merge":
            parents = [p for p in a.get("parents") or [] if p in ev]
            for p in parents:
                out.append({"kind": "merge_vs_parent", "a": a["name"], "b": [p]})
            if len(parents) == 2 and parents[0] != parents[1]:
                out.append({"kind": "merge_vs_mean_of_parents", "a": a["name"], "b": parents})
    return out


def _b_name(b: Sequence[str]) -> str:
    return b[0] if len(b) == 1 else f"mean({','.join(b)})"


def paired_comparisons(outcomes: dict[str, np.ndarray], pairs: Sequence[dict], metric: str, *,
                       n_resamples: int = S.N_RESAMPLES, seed: int = S.SEED) -> list[dict]:
    """Comparison records of ``pairs`` on one accuracy ``metric``.

    ``outcomes``: artefact name -> 0/1 outcomes on the same items in the same order (``[n]``).
    Pairs naming an artefact without outcomes are skipped. All pairs share one bootstrap.
    """
    pairs = [p for p in pairs if p["a"] in outcomes and all(b in outcomes for b in p["b"])]
    if not pairs:
        return []
    names = list(outcomes)
    col = {nm: i for i, nm in enumerate(names)}
    x = np.stack([np.asarray(outcomes[nm], dtype=float) for nm in names], axis=1)
    contrasts = [{col[p["a"]]: 1.0, **{col[b]: -1.0 / len(p["b"]) for b in p["b"]}} for p in pairs]
    boot = S.bootstrap_contrasts(x, contrasts, n_resamples=n_resamples, seed=seed)
    means = x.mean(axis=0)
    recs = []
    for j, p in enumerate(pairs):
        rec = {"kind": p["kind"], "a": p["a"], "b": _b_name(p["b"]), "metric": metric,
               "a_value": float(means[col[p["a"]]]), "b_value": float(np.mean([means[col[b]] for b in p["b"]])),
               "diff": float(boot["estimate"][j]), "ci_low": float(boot["ci_low"][j]),
               "ci_high": float(boot["ci_high"][j]), "n": int(x.shape[0])}
        if len(p["b"]) == 1:
            mc = S.mcnemar_exact(outcomes[p["a"]], outcomes[p["b"][0]])
            rec.update(p=mc["p"], test="mcnemar_exact", n10=mc["n10"], n01=mc["n01"])
        else:
            rec.update(p=float(boot["p"][j]), test="paired_bootstrap", b_parts=list(p["b"]))
        recs.append(rec)
    return recs


def perplexity_comparisons(blocks: dict[str, dict], pairs: Sequence[dict], *,
                           n_resamples: int = S.N_RESAMPLES, seed: int = S.SEED) -> list[dict]:
    """Comparison records of ``pairs`` on ``ppl`` (paired bootstrap over token blocks).

    ``blocks``: artefact name -> ``{"nll": [...], "tokens": [...]}`` (``perplexity.json``).
    A pair is compared only when all its artefacts have the same block token counts (one
    tokenizer, one text).
    """
    pairs = [p for p in pairs if p["a"] in blocks and all(b in blocks for b in p["b"])
             and all(blocks[b]["tokens"] == blocks[p["a"]]["tokens"] for b in p["b"])]
    if not pairs:
        return []
    recs = []
    by_tokens: dict[tuple, list[dict]] = {}
    for p in pairs:
        by_tokens.setdefault(tuple(blocks[p["a"]]["tokens"]), []).append(p)
    for tokens, group in by_tokens.items():
        names = list(dict.fromkeys([p["a"] for p in group] + [b for p in group for b in p["b"]]))
        col = {nm: i for i, nm in enumerate(names)}
        nll = np.stack([np.asarray(blocks[nm]["nll"], dtype=float) for nm in names], axis=1)
        contrasts = [{col[p["a"]]: 1.0, **{col[b]: -1.0 / len(p["b"]) for b in p["b"]}} for p in group]
        boot = S.bootstrap_perplexity(nll, np.asarray(tokens), contrasts, n_resamples=n_resamples, seed=seed)
        ppl = np.exp(nll.sum(axis=0) / sum(tokens))
        for j, p in enumerate(group):
            rec = {"kind": p["kind"], "a": p["a"], "b": _b_name(p["b"]), "metric": "ppl",
                   "a_value": float(ppl[col[p["a"]]]), "b_value": float(np.mean([ppl[col[b]] for b in p["b"]])),
                   "diff": float(boot["estimate"][j]), "ci_low": float(boot["ci_low"][j]),
                   "ci_high": float(boot["ci_high"][j]), "p": float(boot["p"][j]), "test": "paired_bootstrap",
                   "n": len(tokens)}
            if len(p["b"]) > 1:
                rec["b_parts"] = list(p["b"])
            recs.append(rec)
    return recs


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cell_comparisons(eval_dir: Path, artefacts: Sequence[dict], benchmarks: Sequence[str], **kw) -> list[dict]:
    """Every comparison of one cell from its ``eval/<artefact>/*.json`` files.

    Items are matched by ``id``: each benchmark's comparisons use the items every compared
    artefact was scored on, in the order of the first artefact's file.
    """
    eval_dir = Path(eval_dir)
    evaluated = {a["name"] for a in artefacts if (eval_dir / a["name"]).is_dir()}
    pairs = comparison_pairs(artefacts, evaluated)
    if not pairs:
        return []
    involved = list(dict.fromkeys([p["a"] for p in pairs] + [b for p in pairs for b in p["b"]]))
    out: list[dict] = []
    for bench in benchmarks:
        recs = {nm: _read(eval_dir / nm / f"{bench}.json") for nm in involved}
        recs = {nm: r for nm, r in recs.items() if r and r.get("items")}
        if not recs:
            continue
        ids = None
        for r in recs.values():
            these = [it["id"] for it in r["items"]]
            keep = set(these)
            ids = these if ids is None else [i for i in ids if i in keep]
        for name, field in ACC_KEYS:
            outcomes = {}
            for nm, r in recs.items():
                by_id = {it["id"]: it.get(field) for it in r["items"]}
                vals = [by_id[i] for i in ids]
                if vals and all(v is not None for v in vals):
                    outcomes[nm] = np.asarray(vals, dtype=float)
            out += paired_comparisons(outcomes, pairs, f"{bench}/{name}", **kw)
    blocks = {}
    for nm in involved:
        r = _read(eval_dir / nm / "perplexity.json")
        if r and r.get("blocks"):
            blocks[nm] = r["blocks"]
    out += perplexity_comparisons(blocks, pairs, **kw)
    return out
