"""Run one node of a sweep's graph: ``python -m dft.node <sweep dir> <node id>``.

The graph launcher (``launcher=slurm``, ``hydra_plugins/dft_graph_launcher``) writes the sweep's
graph to ``<sweep dir>/.graph/graph.json`` and each cell's composed config to
``<sweep dir>/.graph/cells/<cell>.yaml``, then submits one SLURM job per node that is not done;
each job calls :func:`run_node` (through :class:`NodeTask`, so a preempted job is requeued).

A node runs exactly the pipeline's code for it, in the first cell that needs it
(:class:`dft.pipeline.Cell`): the same checks and start/partner artefacts as :meth:`Cell.run`,
then :meth:`Cell.train_or_reuse` for a stage, :meth:`Cell.merge` for a merge,
:meth:`Cell.evaluate` for an evaluation. Its parents (earlier stages, the merged stage) are
taken from the cache through the same methods, which find them complete; a parent that is not
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


def _prepare(cell: Any) -> tuple[dict, Any]:
    """What :meth:`Cell.run` does before its first node: checks, start and partner artefacts.

    Returns ``(rows, start identity, partner)``; sets ``cell.start`` and ``cell.dist``.
    """
    from dft.config import validate
    from dft.distributed import init_process_group
    from dft.graph import model_identity, start_key
    from dft.modeling import resolve_model_path
    from dft.pipeline import Artefact

    cfg = cell.cfg
    validate(cfg)
    rows = cell.check_inputs()
    start_path = resolve_model_path(cfg.model, cfg.paths.cache)
    merging = cfg.merge.method != "none"
    partner_path = resolve_model_path(cfg.model, cfg.paths.cache, which="partner") if merging else None
    cell.dist = init_process_group()
    start_id = model_identity(cfg.model, start_path)
    cell.start = Artefact(name="start", kind="start", path=start_path, key=start_key(start_id))
    partner = None
    if merging:
        pid = model_identity(cfg.model, partner_path) if partner_path != start_path else start_id
        pkey = start_key(pid)
        partner = cell.start if pkey == cell.start.key else Artefact(name="partner", kind="partner",
                                                                      path=partner_path, key=pkey)
    return rows, start_id, partner


def run_graph_node(cell: Any, node: Any) -> Optional[dict]:
    """Do ``node``'s work in ``cell`` (a :class:`dft.pipeline.Cell`), walking the chain as :meth:`Cell.run`.

    Returns the evaluation's metrics for an evaluation node, else None.

    Raises:
        DftError: a parent stage or merge is not complete in the cache, or the node is not one of
            this cell's (the graph and the cell's config disagree).
    """
    from dft.config import STAGE_SPLIT
    from dft.distributed import destroy_process_group
    from dft.graph import extend_lineage, merge_lineage, start_lineage
    from dft.runs import canonical_hash

    cfg = cell.cfg
    rows, start_id, partner = _prepare(cell)
    try:
        rank0 = cell.dist.is_rank0
        if node.kind == "eval_start":
            # by name, not by key: an evaluation's key holds the precision resolved where it was
            # computed (a CPU login node plans float32, a GPU job may evaluate in bf16)
            art = {"eval(start)": cell.start, "eval(partner)": partner}.get(node.name)
            if art is None:
                raise DftError(f"node {node.id} ({node.name}): evaluates neither the start nor the partner model "
                               f"of cell {cell.cell}")
            return cell.evaluate(art) if rank0 else None
        lineage = start_lineage(cfg, start_id)
        parent = cell.start
        chain = list(cfg.strategy.chain)
        for i, stage in enumerate(chain):
            lineage = extend_lineage(lineage, cfg, stage, cell.data_identity)
            key = canonical_hash(lineage)
            if node.kind == "stage" and key == node.key:
                cell.train_or_reuse(stage, parent, rows[STAGE_SPLIT[stage]], lineage)
                return None
            if not cell.cache.is_complete(key):
                raise DftError(f"node {node.id} ({node.name}): its parent stage {key} is not complete in "
                               f"{cell.cache.root}; the graph runs a node only after its parents")
            art = cell.train_or_reuse(stage, parent, rows[STAGE_SPLIT[stage]], lineage)  # the cached parent
            last = i == len(chain) - 1
            if node.kind == "eval" and key == _of(node) and (cfg.eval.stages or last):
                return cell.evaluate(art) if rank0 else None
            if partner is not None and (cfg.merge.at == "each" or last):
                mkey = canonical_hash(merge_lineage(cfg, art.key, partner.key))
                if node.kind == "merge" and mkey == node.key:
                    if rank0:
                        cell.merge(art, partner)
                    return None
                if node.kind == "eval" and mkey == _of(node):
                    if not cell.cache.is_complete(mkey):
                        raise DftError(f"node {node.id} ({node.name}): the merge {mkey} it evaluates is not complete")
                    return cell.evaluate(cell.merge(art, partner)) if rank0 else None
            parent = art
        raise DftError(f"node {node.id} ({node.name}) is not a node of cell {cell.cell}")
    finally:
        destroy_process_group()


def _of(node: Any) -> Optional[str]:
    """Key of the stage or merge an evaluation node evaluates (its parent's key)."""
    return node.parents[0].split("/", 1)[1] if node.parents else None


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

    def __call__(self, sweep_dir: str, node_id: str) -> Optional[float]:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s",
                            force=True)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import dft.train  # noqa: F401  registers the resolvers the cell configs may use

        return run_node(sweep_dir, node_id)


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
