"""Keys that every cell of a sweep shares, so W&B panels and tables compare cells across strategies.

A cell's per-artefact keys (``eval/<artefact>/<benchmark>/<metric>``) differ between strategies
(``eval/cpt_sft_dpo+slerp/...`` vs ``eval/cpt_sft_orpo+slerp/...``), so no chart can put "the
cell's final model" of two strategies side by side. :func:`uniform_metrics` adds, beside them,
one key per *role* of an artefact in its cell:

* ``start/<metric>``: the model the cell started from (artefact ``kind == "start"``);
* ``trained/<metric>``: the last trained stage (the last artefact of ``kind == "stage"``);
* ``merged/<metric>``: that stage's merge with the partner (the ``kind == "merge"`` artefact
  whose first parent is the trained one), when the cell merges;
* ``final/<metric>``: the cell's final artefact (the last one that is not the merge partner:
  the merge when the cell merges, else the last stage, else the start model);
* ``delta/<metric>``: ``final`` minus ``start``, for every metric both have, intervals and item
  counts (``<benchmark>/n``) excepted;
* ``artefact/<role>``: the artefact's name (a string, kept out of the numeric namespaces).

``<metric>`` is the artefact's own metric key (``<benchmark>/acc``, ``<benchmark>/acc_ll``,
``ppl``, ...), intervals included (keys ending in ``_ci_low``, ``_ci_high``, ``_stderr``) as they
appear in the artefact's metrics. A role without an artefact (``trained`` with ``strategy=none``,
``merged`` with ``merge=none``) has no keys; ``start``, ``final`` and ``delta`` exist in every
cell that evaluated its start model.

:func:`flat_config` gives the flat top-level keys a W&B run config is grouped by (``model``,
``family``, ``start``, ``strategy``, ``chain``, ``merge``, ``peft``, ``seed``, ``data``, ``eval``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

ROLES = ("start", "trained", "merged", "final")
#: metric-key suffixes of an interval around a metric; copied into every role, never differenced
INTERVAL_SUFFIXES = ("_ci_low", "_ci_high", "_stderr")
#: the flat run-config keys, in order
FLAT_CONFIG_KEYS = ("model", "family", "start", "strategy", "chain", "merge", "peft", "seed", "data", "eval")


def _artefacts(source: Union[dict, Sequence[dict]]) -> list[dict]:
    if isinstance(source, dict):
        if "artefacts" not in source:
            raise KeyError("uniform_metrics: the summary has no 'artefacts' list")
        return list(source["artefacts"])
    return list(source)


def role_artefacts(source: Union[dict, Sequence[dict]]) -> dict[str, Optional[dict]]:
    """``{role: artefact record or None}`` for a summary (or its ``artefacts`` list, in cell order).

    Each record needs ``name``, ``kind`` (``start``/``stage``/``merge``/``partner``) and, for
    merges, ``parents`` (first parent = the trained artefact), as ``Artefact.record()`` writes them.
    """
    arts = _artefacts(source)
    start = next((a for a in arts if a.get("kind") == "start"), None)
    stages = [a for a in arts if a.get("kind") == "stage"]
    trained = stages[-1] if stages else None
    merged = None
    if trained is not None:
        merged = next((a for a in reversed(arts) if a.get("kind") == "merge"
                       and list(a.get("parents") or [])[:1] == [trained["name"]]), None)
    own = [a for a in arts if a.get("kind") != "partner"]
    final = own[-1] if own else None
    return {"start": start, "trained": trained, "merged": merged, "final": final}


def is_interval(key: str) -> bool:
    """An interval key, or an item count (``<benchmark>/n``): copied into every role, never differenced."""
    return key.endswith(INTERVAL_SUFFIXES) or key.endswith("/n")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def uniform_metrics(source: Union[dict, Sequence[dict]]) -> dict[str, Any]:
    """The role keys of one cell (see the module docstring) from its summary or artefact records.

    Returns a flat dict: ``start/<metric>``, ``trained/<metric>``, ``merged/<metric>``,
    ``final/<metric>``, ``delta/<metric>`` (numbers) and ``artefact/<role>`` (names). Metrics
    that are None are left out.

    Raises:
        KeyError: a summary dict without ``artefacts``.
    """
    roles = role_artefacts(source)
    out: dict[str, Any] = {}
    for role in ROLES:
        art = roles[role]
        if art is None:
            continue
        out[f"artefact/{role}"] = art["name"]
        for key, value in (art.get("metrics") or {}).items():
            if value is not None:
                out[f"{role}/{key}"] = value
    start, final = roles["start"], roles["final"]
    if start is not None and final is not None:
        s, f = start.get("metrics") or {}, final.get("metrics") or {}
        for key, value in f.items():
            if not is_interval(key) and _number(value) and _number(s.get(key)):
                out[f"delta/{key}"] = value - s[key]
    return out


def flat_config(source: Any) -> dict[str, Any]:
    """``model, family, start, strategy, chain, merge, peft, seed, data, eval`` as plain values,
    from a composed cell config (``cfg.model.name``, ...) or from a ``summary.json`` dict
    (its top-level keys). ``chain`` is the stage names joined by ``_`` (``cpt_sft``; ``""`` without
    training), the name an artefact of that chain gets.
    """
    if isinstance(source, dict) and isinstance(source.get("model"), str):  # a summary
        out = {k: source.get(k) for k in FLAT_CONFIG_KEYS}
        out["chain"] = "_".join(source.get("chain") or [])
        return out
    c = source
    return {"model": c.model.name, "family": c.model.family, "start": c.model.start, "strategy": c.strategy.name,
            "chain": "_".join(c.strategy.chain), "merge": c.merge.method, "peft": c.peft.method, "seed": c.seed,
            "data": c.data.name, "eval": c.eval.name}


#: TRL/transformers ``log_history`` fields that become a stage's shared training-curve keys
CURVE_FIELDS = ("loss", "grad_norm", "learning_rate")


def stage_curve_key(stage: str, field: str) -> str:
    """``train/<stage>/<field>``: a training-curve key every cell with that stage kind shares
    (``field == "step"`` is its step metric)."""
    return f"train/{stage}/{field}"


def stage_curves(stage: str, log_history: Optional[Sequence[dict]]) -> list[dict[str, float]]:
    """The rows to log for one stage's training curves, from TRL's ``trainer.state.log_history``.

    One row per logged training step (entries with a numeric ``loss``; the closing entry with
    ``train_loss``/``train_runtime`` and evaluation entries are left out), each with
    ``train/<stage>/step`` (the trainer's ``step``) and ``train/<stage>/loss``, ``grad_norm``,
    ``learning_rate`` where logged. ``stage`` is the stage kind (``cpt``, ``sft``, ``dpo``,
    ``orpo``), so all SFT curves of a sweep have the same keys whatever their chain.
    """
    rows = []
    for e in log_history or []:
        if not _number(e.get("loss")) or not _number(e.get("step")):
            continue
        row = {stage_curve_key(stage, "step"): e["step"]}
        row.update({stage_curve_key(stage, f): e[f] for f in CURVE_FIELDS if _number(e.get(f))})
        rows.append(row)
    return rows
