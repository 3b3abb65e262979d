"""A ready-made W&B workspace for one sweep, built with the ``wandb-workspaces`` library.

``python -m dft.report runs/<experiment> --wandb-workspace [--dry-run]`` reads the sweep's
``summary.json`` files (nothing else, no network) and builds a workspace that:

* shows only the sweep's runs (filter: W&B group = the experiment, as :mod:`dft.tracking` sets it)
  and groups them by ``cell.strategy`` then ``cell.merge`` (the flat run config of
  :func:`dft.keys.flat_config`, logged under ``cell``);
* section "Final model": one bar chart per benchmark of ``final/<benchmark>/<acc, acc_ll>``, one of
  ``final/ppl``, and the gains over the start model (``delta/...``);
* section "Model -> strategy -> merge": a parallel-coordinates panel
  ``cell.model -> cell.strategy -> cell.merge -> final/...`` (perplexity axes inverted: up is better);
* section "Merge synergy": the ``synergy`` table every merging cell logs (only when a cell merges);
* section "Training": ``train/<stage>/loss``, ``grad_norm``, ``learning_rate`` against
  ``train/<stage>/step``, one panel per stage kind, so all SFT curves of the sweep share one panel;
* the runs table with the flat config and the uniform ``final/`` and ``delta/`` keys pinned.

Only keys that every finished cell of the sweep has (``final/``, ``delta/``) or that some cell
logs (training curves of its stages) are referenced. ``--dry-run`` prints the specification
(the JSON view that ``Workspace.save()`` would upload) instead of saving; saving needs a W&B
server and login (``wandb login``; ``WANDB_ENTITY``/``--wandb-entity`` and ``WANDB_PROJECT``/
``--wandb-project`` name where the runs are).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from dft import DftError
from dft.keys import is_interval

#: run-config keys (under ``cell``) the runs are grouped by, in order
GROUP_BY = ("strategy", "merge")
#: the parallel-coordinates axes before the metrics
PC_AXES = ("model", "strategy", "merge")
#: the training-curve keys per stage kind: ``train/<stage>/<key>`` against ``train/<stage>/step``
CURVE_KEYS = ("loss", "grad_norm", "learning_rate")


def _need_library():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError:
        raise DftError("--wandb-workspace needs the wandb-workspaces package: pip install 'dft[dashboards]' "
                       "(or pip install wandb-workspaces)") from None
    return ws, wr, expr


def read_sweep(sweep: str | os.PathLike) -> list[dict]:
    """The finished cells' ``summary.json`` dicts of ``sweep`` (``<sweep>/<cell>/summary.json``).

    Raises:
        DftError: no such folder, or no finished cell in it.
    """
    root = Path(sweep)
    if not root.is_dir():
        raise DftError(f"{root}: no such sweep folder")
    out = []
    for f in sorted(root.glob("*/summary.json")):
        try:
            s = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DftError(f"{f}: not JSON ({e})") from None
        if s.get("status") == "finished":
            out.append(s)
    if not out:
        raise DftError(f"{root}: no finished cell (no */summary.json with status 'finished')")
    return out


def sweep_facts(summaries: list[dict]) -> dict[str, Any]:
    """What the workspace is built from: ``group`` (the experiment), the ``final/`` and ``delta/``
    keys every cell has (sorted), the ``benchmarks`` among them, the stage kinds any cell trained
    (in chain order) and whether any cell merges.

    Raises:
        DftError: the summaries come from several experiments (one W&B group per workspace).
    """
    groups = sorted({s.get("experiment") for s in summaries})
    if len(groups) != 1:
        raise DftError(f"the cells belong to several experiments {groups}; build one workspace per sweep")
    common = None
    for s in summaries:
        keys = {k for k, v in (s.get("metrics") or {}).items()
                if k.split("/", 1)[0] in ("final", "delta") and isinstance(v, (int, float))
                and not is_interval(k)}  # the panels plot the metrics; their intervals stay in the runs table
        common = keys if common is None else common & keys
    common = common or set()
    final = sorted(k for k in common if k.startswith("final/"))
    delta = sorted(k for k in common if k.startswith("delta/"))
    benchmarks = sorted({k.split("/")[1] for k in final if k.count("/") == 2})
    stages: list[str] = []
    for s in summaries:
        for st in s.get("chain") or []:
            if st not in stages:
                stages.append(st)
    return {"group": groups[0], "final": final, "delta": delta, "benchmarks": benchmarks, "stages": stages,
            "merges": any(s.get("merge") not in (None, "none") for s in summaries), "cells": len(summaries)}


def _title(key: str) -> str:
    return key.split("/", 1)[1]


def build_workspace(summaries: list[dict], *, entity: str, project: str, name: Optional[str] = None):
    """A ``wandb_workspaces.workspaces.Workspace`` for the sweep of ``summaries`` (see the module
    docstring for its sections). Needs no network; ``.save()`` on the result uploads it."""
    ws, wr, expr = _need_library()
    f = sweep_facts(summaries)
    cfg = lambda k: wr.Config(f"cell.{k}")  # noqa: E731
    summ = wr.SummaryMetric
    finals, deltas = f["final"], f["delta"]

    bars = []
    for b in f["benchmarks"]:
        bars.append(wr.BarPlot(title=f"final model: {b}", metrics=[summ(k) for k in finals if k.startswith(f"final/{b}/")],
                               title_x="fraction correct"))
    if "final/ppl" in finals:
        bars.append(wr.BarPlot(title="final model: held-out perplexity (lower is better)", metrics=[summ("final/ppl")]))
    for b in f["benchmarks"]:
        ks = [k for k in deltas if k.startswith(f"delta/{b}/")]
        if ks:
            bars.append(wr.BarPlot(title=f"gain over the start model: {b}", metrics=[summ(k) for k in ks]))
    if "delta/ppl" in deltas:
        bars.append(wr.BarPlot(title="perplexity change over the start model (negative is better)",
                               metrics=[summ("delta/ppl")]))
    sections = [ws.Section(name="Final model (uniform keys final/, delta/)", panels=bars, is_open=True)]

    pc_cols = [wr.ParallelCoordinatesPlotColumn(metric=cfg(k), display_name=k) for k in PC_AXES]
    pc_cols += [wr.ParallelCoordinatesPlotColumn(metric=summ(k), display_name=_title(k), inverted=k.endswith("ppl") or None)
                for k in finals]
    sections.append(ws.Section(name="Model -> strategy -> merge -> final metrics", is_open=True, panels=[
        wr.ParallelCoordinatesPlot(title="model -> strategy -> merge -> final metrics", columns=pc_cols)]))
    if f["merges"]:
        sections.append(ws.Section(name="Merge synergy", is_open=True, panels=[
            wr.WeavePanelSummaryTable(table_name="synergy")]))
    curves = []
    for st in f["stages"]:
        for k in CURVE_KEYS:
            curves.append(wr.LinePlot(title=f"{st}: {k}", x=f"train/{st}/step", y=[f"train/{st}/{k}"],
                                      title_x=f"{st} step"))
    if curves:
        sections.append(ws.Section(name="Training curves per stage", panels=curves, is_open=True))

    import wandb_workspaces.reports.v2.interface as wri

    columns = [wri._metric_to_backend_pc(cfg(k)) for k in ("model", "family", "start", "strategy", "merge", "peft")]
    columns += [wri._metric_to_backend_pc(summ(k)) for k in finals + deltas]
    return ws.Workspace(
        entity=entity, project=project, name=name or f"dft sweep {f['group']}",
        sections=sections,
        settings=ws.WorkspaceSettings(max_runs=max(10, min(f["cells"], 100))),
        runset_settings=ws.RunsetSettings(
            filters=[expr.Metric("Group") == f["group"]],
            groupby=[expr.Config(f"cell.{k}") for k in GROUP_BY],
            pinned_columns=columns,
        ),
    )


def workspace_spec(workspace) -> dict:
    """The JSON view ``workspace.save()`` uploads (``wandb_workspaces``' internal ``View`` model)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def referenced_keys(spec: dict) -> dict[str, set[str]]:
    """Every run key the spec refers to, by where W&B looks it up: ``summary`` (bar charts,
    parallel-coordinates axes, pinned columns, summary tables), ``config`` (dotted, e.g.
    ``cell.strategy``: axes, columns, grouping), ``history`` (line-plot y and x keys) and ``run``
    (run attributes in filters, e.g. ``group``)."""
    out: dict[str, set[str]] = {"summary": set(), "config": set(), "history": set(), "run": set()}

    def accessor(a: str) -> None:
        section, _, name = a.partition(":")
        if section == "config":
            out["config"].add(name.replace(".value", "", 1))
        elif section == "summary":
            out["summary"].add(name)
        elif section == "run":
            out["run"].add(name)

    def walk_panels(panels: Iterable[dict]) -> None:
        for p in panels:
            c, vt = p.get("config") or {}, p.get("viewType")
            if vt == "Bar Chart":
                out["summary"].update(m.removeprefix("summary_metrics.") for m in c.get("metrics", []))
            elif vt == "Run History Line Plot":
                out["history"].update(c.get("metrics", []))
                if c.get("xAxis") not in (None, "_step"):
                    out["history"].add(c["xAxis"])
            elif vt == "Parallel Coordinates Plot":
                for col in c.get("columns", []):
                    accessor(col["accessor"])
            elif vt == "Weave":
                out["summary"].add(c["panel2Config"]["exp"]["fromOp"]["inputs"]["key"]["val"])

    sec = spec["spec"]["section"]
    for s in sec["panelBankConfig"]["sections"]:
        walk_panels(s.get("panels", []))
    for rs in sec.get("runSets", []):
        for col in rs.get("runFeed", {}).get("columnOrder", []):
            if col != "run:displayName":
                accessor(col)
        for g in rs.get("grouping", []):
            (out["config"] if g["section"] == "config" else out["run"]).add(g["name"].replace(".value", "", 1))
        for flt in rs.get("filters", {}).get("filters", []):
            out[flt["key"]["section"] if flt["key"]["section"] in out else "run"].add(flt["key"]["name"])
    return out


def main_workspace(sweeps: list[str], *, dry_run: bool, entity: Optional[str], project: Optional[str],
                   name: Optional[str] = None) -> int:
    """``python -m dft.report <sweep> --wandb-workspace``: print the spec (``dry_run``) or save it."""
    if len(sweeps) != 1:
        raise DftError(f"--wandb-workspace takes one sweep (one W&B group), got {len(sweeps)}")
    summaries = read_sweep(sweeps[0])
    project = project or os.environ.get("WANDB_PROJECT") or "dft"  # conf/logger/wandb.yaml's default
    entity = entity or os.environ.get("WANDB_ENTITY")
    if entity is None and not dry_run:
        import wandb

        try:
            entity = wandb.Api(timeout=30).default_entity
        except Exception as e:  # no login, no server: one line
            raise DftError(f"saving the workspace needs a W&B server and login ({type(e).__name__}: {e}); "
                           "use --dry-run to print the specification") from None
    w = build_workspace(summaries, entity=entity or "", project=project, name=name)
    if dry_run:
        print(json.dumps(workspace_spec(w), indent=1))
        return 0
    try:
        w.save()
    except Exception as e:
        raise DftError(f"saving the workspace to W&B failed ({type(e).__name__}: {e})") from None
    print(w.url)
    return 0
