"""The grid as one graph: every lineage key defined once, the nodes a sweep needs, and what they cost.

A sweep is a directed acyclic graph of *nodes*, each keyed by the lineage hash dft already uses
for its cache entry:

============== ============================== ======================================= ==========
kind           node id                        parents                                 resources
============== ============================== ======================================= ==========
``eval_start`` ``eval/<eval key>``            none (the start or partner weights)      ``eval``
``stage``      ``stage/<lineage key>``        the previous stage of the chain          ``stage``
``merge``      ``merge/<merge key>``          the stage it merges                      ``merge``
``eval``       ``eval/<eval key>``            the stage or merge it evaluates          ``eval``
``summary``    ``summary/<cell>``             every other node of the cell             ``summary``
============== ============================== ======================================= ==========

Cells that share a prefix share its nodes (CPT is one node for every cell whose chain starts
with it). A cell's nodes are built in one place, :func:`cell_steps`, and used three ways: the dry
run prints them with their cost (:func:`layout_costs`, via :func:`dft.plan.make_plan`), an
in-process run (``launcher=local``, plain ``python -m dft.train``) executes them in the
topological order of the cell's graph (:func:`cell_order`) through
:meth:`dft.pipeline.Cell.run_node`, and ``launcher=slurm`` submits one job per node
(``hydra_plugins/dft_graph_launcher``; each job runs ``python -m dft.node``, which runs that one
node through the same :meth:`~dft.pipeline.Cell.run_node`).

Keys (one definition each; :mod:`dft.pipeline` and :mod:`dft.plan` import them from here):

* start: ``canonical_hash({"start": model_identity(...)})``;
* stage: ``canonical_hash(lineage)`` where the lineage is :func:`start_lineage` extended by one
  :func:`stage_lineage` per stage (:func:`chain_lineages`);
* merge: ``canonical_hash(merge_lineage(cfg, stage key, partner key))``;
* evaluation: :func:`eval_key`.

Cost model of the two SLURM layouts (:func:`layout_costs`; numbers in hours, unlimited nodes):

* a node runs for ``gpu_hours / world`` hours (``gpu_hours`` from :func:`dft.plan.estimate_stage`,
  ``world`` = the stage's data-parallel processes); evaluation and merging are not estimated (0 h,
  as in the plan's table); cached nodes take 0 h;
* **graph**: each node is a job that starts when its parents finished (``afterok``), so no job
  waits: idle GPU-hours 0; wall time = the critical path (longest path by run time);
* **cell array**: every cell is one job holding ``gpus`` GPUs from the start; it walks its nodes
  in :meth:`Cell.run` order; the first cell to reach a node runs it, a cell that reaches a node
  another cell is running waits on its lock until it ends (idle: wait hours x ``gpus``), a node
  already finished is reused at once (:func:`simulate_cell_array`).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from dft.config import STAGE_SPLIT, plain
from dft.runs import canonical_hash

#: version of how dft turns a split's rows into a stage's training set (part of every stage's lineage,
#: so a change here retrains cached stages instead of reusing them): 2 = rows whose prompt alone
#: fills max_length are dropped (dft.stages.drop_prompts_filling_max_length); 3 = truncation policy
#: (strategy.<stage>.truncation), CPT document-end token, ORPO tokens/NLL scope (dft.stages)
STAGE_PREP_VERSION = 3

#: Part of every evaluation's cache key. Bump it when a change to dft/evaluation can move a
#: number (scoring, prompt, batching that changes float rounding): cached evaluations are then
#: redone instead of mixed with the new code's. 2: shared-prefix KV cache and eval precision.
#: 3: perplexity with the family's BOS per document, per-block NLL kept; stderr and 95 % intervals
#: of every accuracy (dft.stats), documents ended with the family's document-end token (as in CPT)
EVAL_VERSION = 3

#: fields of model config that change how a stage trains (part of every lineage)
MODEL_LINEAGE_KEYS = ("pad_token", "eos_tokens", "chat_template", "system_policy", "max_length", "dtype")

#: node kinds, in the order a cell meets them
KINDS = ("eval_start", "stage", "merge", "eval", "summary")
#: the ``launcher.<kind>`` resources each node kind runs with
RESOURCES = {"eval_start": "eval", "stage": "stage", "merge": "merge", "eval": "eval", "summary": "summary"}


# ------------------------------------------------------------------------------- lineage keys
def model_identity(model_cfg: Any, path: Path) -> dict:
    """What identifies starting weights in a lineage: the config's source plus the files' sizes."""
    files = {p.name: p.stat().st_size for p in sorted(Path(path).glob("*.safetensors"))}
    return {"hub_id": model_cfg.hub_id, "path": str(path) if model_cfg.path else None,
            "embedded": model_cfg.embedded, "weights": files}


def start_key(start_id: dict) -> str:
    """Key of a start (or partner) model: ``canonical_hash({"start": model_identity})``."""
    return canonical_hash({"start": start_id})


def start_lineage(cfg: Any, start_id: dict) -> dict:
    """The lineage every stage of the cell extends (start model, model fields, seed)."""
    return {"start": start_id, "model": {k: plain(cfg.model[k]) for k in MODEL_LINEAGE_KEYS},
            "seed": cfg.seed, "stages": []}


def stage_lineage(cfg: Any, stage: str, data_identity: Callable[[str], dict]) -> dict:
    """A stage's entry in the lineage (its config, PEFT, data and :data:`STAGE_PREP_VERSION`);
    ``data_identity(split)`` is :meth:`dft.pipeline.Cell.data_identity`."""
    return {"kind": stage, "config": plain(cfg.strategy[stage]), "peft": plain(cfg.peft),
            "data": data_identity(STAGE_SPLIT[stage]), "prep": STAGE_PREP_VERSION}


def extend_lineage(lineage: dict, cfg: Any, stage: str, data_identity: Callable[[str], dict]) -> dict:
    """``lineage`` with one more stage (a new dict; the key of the result is the stage's key)."""
    return {**lineage, "stages": lineage["stages"] + [stage_lineage(cfg, stage, data_identity)]}


def chain_lineages(cfg: Any, start_id: dict, data_identity: Callable[[str], dict]) -> list[tuple[str, str, dict]]:
    """``[(stage, artefact name, lineage), ...]`` of the chain, as :meth:`Cell.run` builds them.

    A stage's key is ``canonical_hash(lineage)``; its artefact is named by the chain so far
    (``cpt``, ``cpt_sft``, ...).
    """
    lineage = start_lineage(cfg, start_id)
    out, name = [], None
    for stage in cfg.strategy.chain:
        lineage = extend_lineage(lineage, cfg, stage, data_identity)
        name = stage if name is None else f"{name}_{stage}"
        out.append((stage, name, lineage))
    return out


def merge_lineage(cfg: Any, model_key: str, partner_key: str) -> dict:
    """Lineage of a merge: the merged artefact's and partner's keys and the merge config (without ``at``)."""
    return {"model": model_key, "partner": partner_key,
            "merge": {k: v for k, v in plain(cfg.merge).items() if k != "at"}}


def evaluates(cfg: Any) -> bool:
    """Whether a cell's eval config evaluates anything (MCQ benchmarks, perplexity or chat)."""
    return bool(cfg.eval.benchmarks or cfg.eval.perplexity or cfg.eval.chat)


def eval_key(cell: Any, art_key: str) -> Optional[str]:
    """Key of the evaluation cache entry of an artefact; None: the cell evaluates nothing.

    ``cell`` is a :class:`dft.pipeline.Cell` (its ``eval_precision``, ``data_identity`` and
    ``data_identity_eval``). The key covers the artefact, the eval config, :data:`EVAL_VERSION`,
    the resolved precision (in place of the ``eval.dtype`` name: null, ``auto`` and ``float32``
    on a CPU share one entry) and the identity of the benchmark and held-out files. The
    precision is resolved on this machine: a dry run on a CPU login node of a sweep whose jobs
    run on GPUs with ``model.dtype=auto`` (bf16 there) reports their evaluations as not cached.
    """
    cfg = cell.cfg
    if not evaluates(cfg):
        return None
    ev = plain(cfg.eval)
    return canonical_hash({"artefact": art_key, "eval": {k: v for k, v in ev.items() if k not in ("name", "dtype")},
                           "version": EVAL_VERSION, "precision": cell.eval_precision(),
                           "benchmarks": {b: cell.data_identity_eval(b) for b in cfg.eval.benchmarks},
                           "heldout": cell.data_identity("heldout_text") if cfg.eval.perplexity else None})


def node_id(kind: str, key: str) -> str:
    """``stage/<key>``, ``merge/<key>``, ``eval/<key>`` (also for ``eval_start``), ``summary/<cell>``."""
    return f"{'eval' if kind == 'eval_start' else kind}/{key}"


# ------------------------------------------------------------------------------- the graph
@dataclass
class Node:
    """One unit of work of a sweep (see the module docstring for kinds, ids and parents).

    ``gpu_hours`` is the estimated GPU-hours of the work (None: unknown; 0 for kinds that are
    not estimated); ``cells`` the cells that need it, in sweep order; ``cached`` whether its
    result already exists (None: unknown, the weights are not on this machine).
    """

    id: str
    kind: str
    key: str
    name: str
    parents: list[str] = field(default_factory=list)
    cells: list[str] = field(default_factory=list)
    gpu_hours: Optional[float] = 0.0
    cached: Optional[bool] = False
    model: str = ""

    @property
    def resources(self) -> str:
        """The ``launcher.<kind>`` block this node's job takes its resources from."""
        return RESOURCES[self.kind]


@dataclass
class Graph:
    """The nodes of a sweep, deduplicated by id, and each cell's nodes in :meth:`Cell.run` order."""

    nodes: dict[str, Node] = field(default_factory=dict)
    cells: dict[str, list[str]] = field(default_factory=dict)

    def add(self, cell: str, node: Node) -> Node:
        """Add ``node`` for ``cell`` (an existing node of the same id gains the cell); returns the stored node."""
        have = self.nodes.get(node.id)
        if have is None:
            have = self.nodes[node.id] = Node(**{**asdict(node), "cells": []})
        elif have.kind != node.kind or have.parents != node.parents:
            from dft import DftError

            raise DftError(f"node {node.id} of cell {cell} differs from the same node of cell {have.cells[0]}: "
                           f"{node.kind} {node.parents} vs {have.kind} {have.parents}")
        if have.cached is not True and node.cached is True:
            have.cached = True
        if cell not in have.cells:
            have.cells.append(cell)
        self.cells.setdefault(cell, [])
        if node.id not in self.cells[cell]:
            self.cells[cell].append(node.id)
        return have

    @classmethod
    def from_plans(cls, plans: Iterable[dict]) -> "Graph":
        """The graph of the cells' dry-run plans (:func:`dft.plan.make_plan`, their ``nodes``); plans
        that record a config error are left out."""
        g = cls()
        for p in plans:
            if "error" in p:
                continue
            for n in p["nodes"]:
                g.add(p["cell"], Node(id=n["id"], kind=n["kind"], key=n["key"], name=n["name"],
                                      parents=list(n["parents"]), gpu_hours=n.get("gpu_hours", 0.0),
                                      cached=n.get("cached"), model=p.get("model", "")))
        return g

    def topological(self) -> list[str]:
        """Node ids, every node after its parents (ties in insertion order)."""
        order, seen = [], set()

        def visit(i: str, path: tuple = ()) -> None:
            if i in seen:
                return
            if i in path:
                from dft import DftError

                raise DftError(f"the sweep's graph has a cycle through {i}")
            for p in self.nodes[i].parents:
                visit(p, path + (i,))
            seen.add(i)
            order.append(i)

        for i in self.nodes:
            visit(i)
        return order

    def children(self) -> dict[str, list[str]]:
        """Node id -> ids of the nodes that list it as a parent."""
        out: dict[str, list[str]] = {i: [] for i in self.nodes}
        for n in self.nodes.values():
            for p in n.parents:
                out[p].append(n.id)
        return out

    def descendants(self, node: str) -> list[str]:
        """Every node that (transitively) depends on ``node``, in topological order."""
        kids, out, todo = self.children(), set(), [node]
        while todo:
            for c in kids[todo.pop()]:
                if c not in out:
                    out.add(c)
                    todo.append(c)
        return [i for i in self.topological() if i in out]

    def counts(self) -> dict[str, int]:
        """Nodes per kind."""
        out = {k: 0 for k in KINDS}
        for n in self.nodes.values():
            out[n.kind] += 1
        return out

    def to_json(self) -> dict:
        return {"nodes": [asdict(n) for n in self.nodes.values()], "cells": self.cells}

    @classmethod
    def from_json(cls, obj: dict) -> "Graph":
        g = cls()
        for n in obj["nodes"]:
            g.nodes[n["id"]] = Node(**n)
        g.cells = {c: list(ids) for c, ids in obj["cells"].items()}
        return g

    def write(self, path: Path) -> None:
        """Write the graph as JSON (atomic)."""
        from dft.runs import write_json

        write_json(Path(path), self.to_json())

    @classmethod
    def read(cls, path: Path) -> "Graph":
        return cls.from_json(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------- a cell's nodes
@dataclass
class Step:
    """One node of a cell and what the cell needs to do its work (in memory only, not in graph.json).

    ``stage``/``lineage``: a stage node's stage kind (``cpt`` ...) and full lineage (its key is
    ``canonical_hash(lineage)``); ``of``: for ``eval_start`` the artefact it evaluates (``start`` or
    ``partner``), for ``merge`` and ``eval`` the id of the node whose artefact it merges/evaluates;
    ``index``: the chain position of the stage it belongs to (-1: none).
    """

    node: Node
    stage: Optional[str] = None
    lineage: Optional[dict] = None
    of: Optional[str] = None
    index: int = -1


def cell_steps(cfg: Any, cell: str, start_id: dict, partner_key: Optional[str],
               data_identity: Callable[[str], dict], eval_key_of: Callable[[str], Optional[str]]) -> list[Step]:
    """The nodes of one cell, in the order a cell meets them: the one construction that the dry-run
    plan (:func:`dft.plan.make_plan`), the in-process run (:meth:`dft.pipeline.Cell.run`) and the
    graph launcher's jobs (:func:`dft.node.run_graph_node`) share.

    Args:
        cfg: the cell's composed config.
        cell: the cell's name (its run directory's name; the summary node's key).
        start_id: :func:`model_identity` of the start weights (or the plan's provisional identity).
        partner_key: :func:`start_key` of the partner's weights; None when the cell does not merge.
            Equal to the start's key: the partner is the start model (evaluated once).
        data_identity: :meth:`dft.pipeline.Cell.data_identity`.
        eval_key_of: artefact key -> its evaluation's key (:func:`eval_key`), None: nothing is evaluated.

    Returns:
        ``[eval(start), eval(partner)?, stage, eval(stage)?, merge?, eval(merge)?, ..., summary]``;
        evaluation nodes only when ``eval_key_of`` gives a key, a stage's evaluation when
        ``eval.stages`` or it is the last stage, merges after every stage (``merge.at=each``) or the
        last. Every node's parents precede it, so the list is a topological order.
    """
    steps: list[Step] = []

    def add_eval(name: str, art_key: str, of: str, index: int = -1, parent: Optional[str] = None) -> None:
        ek = eval_key_of(art_key)
        if ek is not None:
            steps.append(Step(Node(id=node_id("eval", ek), kind="eval" if parent else "eval_start", key=ek,
                                   name=f"eval({name})", parents=[parent] if parent else []), of=of, index=index))

    skey = start_key(start_id)
    add_eval("start", skey, "start")
    merging = partner_key is not None
    if merging and partner_key != skey:
        add_eval("partner", partner_key, "partner")
    prev: Optional[str] = None
    chain = chain_lineages(cfg, start_id, data_identity)
    for i, (stage, name, lineage) in enumerate(chain):
        key = canonical_hash(lineage)
        sid = node_id("stage", key)
        steps.append(Step(Node(id=sid, kind="stage", key=key, name=name, parents=[prev] if prev else []),
                          stage=stage, lineage=lineage, index=i))
        prev = sid
        last = i == len(chain) - 1
        if cfg.eval.stages or last:
            add_eval(name, key, sid, i, parent=sid)
        if merging and (cfg.merge.at == "each" or last):
            mlineage = merge_lineage(cfg, key, partner_key)
            mkey = canonical_hash(mlineage)
            mid = node_id("merge", mkey)
            steps.append(Step(Node(id=mid, kind="merge", key=mkey, name=f"{name}+{cfg.merge.method}", parents=[sid]),
                              lineage=mlineage, of=sid, index=i))
            add_eval(f"{name}+{cfg.merge.method}", mkey, mid, i, parent=mid)
    steps.append(Step(Node(id=node_id("summary", cell), kind="summary", key=cell, name=f"summary({cell})",
                           parents=[s.node.id for s in steps])))
    return steps


def cell_order(steps: list[Step]) -> list[Step]:
    """``steps`` in the topological order of their one-cell :class:`Graph` (the order an in-process
    run and the graph launcher's dependencies both follow)."""
    g = Graph()
    by_id = {}
    for s in steps:
        g.add("cell", s.node)
        by_id[s.node.id] = s
    return [by_id[i] for i in g.topological()]


# ------------------------------------------------------------------------------- cost
def run_hours(node: Node, world: int = 1) -> float:
    """Wall hours of a node's own work: ``gpu_hours / world`` (0 if cached or not estimated)."""
    if node.cached or not node.gpu_hours:
        return 0.0
    return float(node.gpu_hours) / max(1, world if node.kind == "stage" else 1)


def critical_path(graph: Graph, world: int = 1) -> tuple[float, list[str]]:
    """Longest path through the graph by :func:`run_hours`: ``(hours, node ids from first to last)``.

    The wall time of the graph launcher with unlimited nodes (each node starts the moment its
    parents end).
    """
    finish: dict[str, float] = {}
    via: dict[str, Optional[str]] = {}
    for i in graph.topological():
        n = graph.nodes[i]
        best = max(n.parents, key=lambda p: finish[p], default=None)
        finish[i] = (finish[best] if best else 0.0) + run_hours(n, world)
        via[i] = best
    if not finish:
        return 0.0, []
    end = max(finish, key=lambda i: finish[i])
    path = [end]
    while via[path[-1]]:
        path.append(via[path[-1]])  # type: ignore[arg-type]
    return finish[end], path[::-1]


def simulate_cell_array(graph: Graph, world: int = 1) -> dict:
    """The cell-array layout with unlimited nodes: every cell starts at 0 and walks its nodes in order.

    Returns ``{"wall_h", "wait_h" (sum over cells of hours blocked on another cell's lock),
    "waits" (cell -> [(node id, hours)])}``. A cell reaching a node no cell has started runs it;
    one reaching a node that another cell is running waits until it ends; a finished node costs
    nothing. Cells reaching a node at the same moment: the first in sweep order runs it.
    """
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    queue = [(0.0, ci, 0) for ci in range(len(graph.cells))]
    heapq.heapify(queue)
    names = list(graph.cells)
    waits: dict[str, list] = {c: [] for c in names}
    wall, wait_h = 0.0, 0.0
    while queue:
        t, ci, step = heapq.heappop(queue)
        steps = graph.cells[names[ci]]
        if step == len(steps):
            wall = max(wall, t)
            continue
        i = steps[step]
        if i not in start:
            start[i] = t
            end[i] = t + run_hours(graph.nodes[i], world)
            t = end[i]
        elif end[i] > t:
            waits[names[ci]].append((i, end[i] - t))
            wait_h += end[i] - t
            t = end[i]
        heapq.heappush(queue, (t, ci, step + 1))
    return {"wall_h": wall, "wait_h": wait_h, "waits": {c: w for c, w in waits.items() if w}}


def layout_costs(graph: Graph, world: int = 1, gpus: int = 1) -> dict:
    """GPU-hours and wall time of the graph launcher and of the cell array (module docstring).

    Args:
        graph: the sweep's graph.
        world: data-parallel processes per stage (a stage runs ``gpu_hours / world`` hours).
        gpus: GPUs one cell-array job holds (``launcher.gpus_per_node``, at least 1).

    Returns:
        ``{"graph": {...}, "cells": {...}}``, each with ``useful_gpu_h`` (the nodes' own
        GPU-hours, not cached), ``idle_gpu_h`` (GPU-hours held while blocked on a lock; 0 for the
        graph), ``held_gpu_h`` (useful + idle) and ``wall_h`` (critical path / last cell's end,
        unlimited nodes); plus ``critical_path`` (node names) and ``jobs`` (jobs submitted).
    """
    useful = sum(float(n.gpu_hours or 0) for n in graph.nodes.values() if not n.cached)
    cp_h, cp = critical_path(graph, world)
    sim = simulate_cell_array(graph, world)
    idle = sim["wait_h"] * max(1, gpus)
    todo = [n for n in graph.nodes.values() if not n.cached]
    return {
        "graph": {"useful_gpu_h": useful, "idle_gpu_h": 0.0, "held_gpu_h": useful, "wall_h": cp_h, "jobs": len(todo)},
        "cells": {"useful_gpu_h": useful, "idle_gpu_h": idle, "held_gpu_h": useful + idle, "wall_h": sim["wall_h"],
                  "jobs": len(graph.cells)},
        "critical_path": [graph.nodes[i].name for i in cp],
        "world": world, "gpus_per_cell": max(1, gpus),
    }


def format_costs(costs: dict) -> str:
    """The two layouts' cost as text (the dry run prints it under the grid's table)."""
    def h(v: float) -> str:
        return "0" if v == 0 else (f"{v:.3g}" if v >= 0.01 else f"{v:.2e}")

    g, c = costs["graph"], costs["cells"]
    head = f"{'layout':<32} {'jobs':>5} {'useful GPU-h':>13} {'idle GPU-h':>11} {'held GPU-h':>11} {'wall h':>9}"
    lines = ["", "SLURM layouts (unlimited nodes; training GPU-hours only, as above):", head, "-" * len(head)]
    for label, d in (("graph (launcher=slurm)", g), ("cell array (launcher=slurm_cells)", c)):
        lines.append(f"{label:<32} {d['jobs']:>5} {h(d['useful_gpu_h']):>13} {h(d['idle_gpu_h']):>11} "
                     f"{h(d['held_gpu_h']):>11} {h(d['wall_h']):>9}")
    ratio = (c["held_gpu_h"] / g["held_gpu_h"]) if g["held_gpu_h"] else None
    lines.append(f"graph idle GPU-hours: {h(g['idle_gpu_h'])}; cell array idle GPU-hours: {h(c['idle_gpu_h'])} "
                 f"({costs['gpus_per_cell']} GPU(s) per cell held while waiting on another cell's stage lock)"
                 + (f"; the cell array holds {ratio:.2f}x the graph's GPU-hours" if ratio else ""))
    lines.append(f"critical path: {' -> '.join(costs['critical_path']) or 'none'} ({h(g['wall_h'])} h)")
    return "\n".join(lines)
