"""Run one node of a sweep's graph: ``python -m dft.node <sweep dir> <node id>``.

The graph launcher (``launcher=slurm``, ``hydra_plugins/dft_graph_launcher``) writes the sweep's
graph to ``<sweep dir>/.graph/graph.json`` and each cell's composed config to
``<sweep dir>/.graph/cells/<cell>.yaml``, then submits one SLURM job per node that is not done;
each job calls :func:`run_node` (through :class:`NodeTask`, so a preempted job is requeued).

A node runs exactly the in-process run's code for it, in the first cell that needs it
(:class:`dft.pipeline.Cell`): the same checks and start/partner artefacts as :meth:`Cell.run`,
the same construction of the cell's nodes (:func:`dft.graph.cell_steps`) and the same per-node
method (:meth:`Cell.run_node`: train or reuse a stage, merge, evaluate). Its ancestors (earlier
stages, the merged stage) are reused from the cache by that method first; one that is not
complete is an error (the launcher submits a node only after its parents, ``afterok``), never
trained here. A cell's ``summary`` node is the cell itself (``run_cell``): every node before it
is cached by then, so it reuses them and writes ``summary.json`` exactly as an in-process run.

``DFT_NODE_FAIL=<node id or name>`` makes that node raise before doing anything (fault injection
for tests and for trying the failure path: its dependants never run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dft import DftError

log = logging.getLogger("dft.node")

#: folder of the sweep directory that holds the graph and the cells' configs
GRAPH_DIR = ".graph"
#: environment variable naming a node (id or name) that fails on purpose
FAIL_ENV = "DFT_NODE_FAIL"


def graph_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / GRAPH_DIR / "graph.json"


def cell_config_path(sweep_dir: Path, cell: str) -> Path:
    return Path(sweep_dir) / GRAPH_DIR / "cells" / f"{cell}.yaml"


def cells_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / GRAPH_DIR / "cells.json"


def load_cell(sweep_dir: Path, cell: str) -> tuple[Any, Path]:
    """The cell's composed config (typed by :class:`dft.config.TrainConfig`) and its run directory."""
    from omegaconf import OmegaConf

    from dft.config import TrainConfig
    from dft.runs import read_json

    cells = read_json(cells_path(sweep_dir)) or {}
    if cell not in cells:
        raise DftError(f"cell {cell} is not in {cells_path(sweep_dir)}")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(cell_config_path(sweep_dir, cell)))
    return cfg, Path(cells[cell]["run_dir"])


def _prepare(cell: Any) -> dict:
    """What :meth:`Cell.run` does before its first node: checks, process group, start and partner
    artefacts (:meth:`Cell.start_artefacts`). Returns the rows of the chain's splits; sets
    ``cell.dist``, ``cell.start``, ``cell.partner`` and ``cell.start_id``."""
    from dft.config import validate
    from dft.distributed import init_process_group
    from dft.modeling import resolve_model_path

    cfg = cell.cfg
    validate(cfg)
    rows = cell.check_inputs()
    start_path = resolve_model_path(cfg.model, cfg.paths.cache)
    merging = cfg.merge.method != "none"
    partner_path = resolve_model_path(cfg.model, cfg.paths.cache, which="partner") if merging else None
    cell.dist = init_process_group()
    cell.start_id, _ = cell.start_artefacts(start_path, partner_path)
    return rows


def find_step(steps: list, node: Any) -> Any:
    """The cell's step of graph node ``node``: by id, or for an evaluation by kind, name and parents
    (an evaluation's key holds the precision resolved where it was computed: a CPU login node plans
    float32, a GPU job may evaluate in bf16). None: not a node of this cell."""
    for s in steps:
        if s.node.id == node.id:
            return s
    if node.kind in ("eval_start", "eval"):
        for s in steps:
            if s.node.kind == node.kind and s.node.name == node.name and s.node.parents == list(node.parents):
                return s
    return None


def ancestors(steps: list, target: Any) -> set[str]:
    """Ids of the steps ``target`` depends on, transitively."""
    parents = {s.node.id: s.node.parents for s in steps}
    out: set[str] = set()
    todo = list(target.node.parents)
    while todo:
        i = todo.pop()
        if i not in out:
            out.add(i)
            todo.extend(parents.get(i, []))
    return out


def run_graph_node(cell: Any, node: Any) -> None:
    """Do ``node``'s work in ``cell`` (a :class:`dft.pipeline.Cell`) with the in-process run's code.

    Builds the cell's nodes (:meth:`Cell.node_steps`, the construction the plan and the launcher
    use), reuses the node's ancestors from the cache in topological order (``reuse_only``: a parent
    that is not complete is an error, never trained here), then runs the node itself
    (:meth:`Cell.run_node`). Not for ``summary`` nodes (:func:`run_node` runs the cell).

    Raises:
        DftError: a parent stage or merge is not complete in the cache, or the node is not one of
            this cell's (the graph and the cell's config disagree).
    """
    from dft.distributed import destroy_process_group

    rows = _prepare(cell)
    try:
        steps = cell.node_steps(cell.start_id, cell.partner)
        target = find_step(steps, node)
        if target is None or target.node.kind == "summary":
            raise DftError(f"node {node.id} ({node.name}) is not a node of cell {cell.cell}")
        need = ancestors(steps, target)
        for step in steps:
            if step.node.id in need:
                cell.run_node(step, rows, reuse_only=True)
        cell.run_node(target, rows)
    finally:
        destroy_process_group()


def run_node(sweep_dir: str | os.PathLike, node_id: str) -> Optional[float]:
    """Run one node of ``<sweep_dir>/.graph/graph.json`` (see the module docstring).

    Returns the cell's objective for a summary node, else None.

    Raises:
        DftError: unknown node, or a parent not complete.
        RuntimeError: ``DFT_NODE_FAIL`` names this node.
    """
    from dft.graph import Graph
    from dft.pipeline import Cell, run_cell

    sweep_dir = Path(sweep_dir)
    graph = Graph.read(graph_path(sweep_dir))
    if node_id not in graph.nodes:
        raise DftError(f"node {node_id} is not in {graph_path(sweep_dir)}")
    node = graph.nodes[node_id]
    fail = os.environ.get(FAIL_ENV)
    if fail and fail in (node.id, node.name):
        raise RuntimeError(f"{FAIL_ENV}={fail}: node {node.name} ({node.id}) fails on purpose")
    cell_name = node.cells[0]
    cfg, run_dir = load_cell(sweep_dir, cell_name)
    log.info("node %s (%s, %s) in cell %s; needed by %d cell(s)", node.name, node.kind, node.id, cell_name,
             len(node.cells))
    t0 = time.monotonic()
    if node.kind == "summary":
        out = run_cell(cfg, run_dir, cell_name)
    else:
        run_graph_node(Cell(cfg, run_dir, cell_name), node)
        out = None
    log.info("node %s finished in %.1f s (its own work, after imports)", node.id, time.monotonic() - t0)
    return out


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object  # type: ignore[misc,assignment]


class NodeTask(_Checkpointable):  # type: ignore[misc,valid-type]
    """The callable each node's SLURM job runs (pickled by submitit): :func:`run_node`.

    A ``submitit`` Checkpointable: on preemption (and on a time-out, up to ``max_num_timeout``
    times) submitit requeues the job, which runs the node again from the top; a stage resumes
    from its last trainer checkpoint in the cache entry's ``work/`` folder, as in a cell.
    """

    def __call__(self, sweep_dir: str, node_id: "str | list[str]") -> Optional[float]:
        """Run ``node_id`` (or each of a list, in order: a stage and the evaluations fused into its
        job, ``launcher.fuse_eval``); returns the last one's :func:`run_node` value."""
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s",
                            force=True)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import dft.train  # noqa: F401  registers the resolvers the cell configs may use

        out = None
        for i in [node_id] if isinstance(node_id, str) else list(node_id):
            out = run_node(sweep_dir, i)
        from dft.launching import register_fast_exit

        register_fast_exit()  # the job's slot is not held through the interpreter's teardown
        return out


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dft.node <sweep dir> <node id>``: run one node (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m dft.node", description=main.__doc__)
    ap.add_argument("sweep", help="sweep directory holding .graph/graph.json")
    ap.add_argument("node", help="node id (stage/<key>, merge/<key>, eval/<key>, summary/<cell>)")
    ns = ap.parse_args(argv)
    try:
        NodeTask()(ns.sweep, ns.node)
    except DftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
