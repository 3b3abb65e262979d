"""Submitting a sweep's graph to SLURM: one job per node that is not done, ``afterok`` on its parents.

Used by the Hydra launcher plugin ``hydra_plugins/dft_graph_launcher`` (``launcher=slurm``):

1. :func:`plan_cells` composes every cell of the multirun as its job would, plans it
   (:func:`dft.plan.make_plan`: the same lineage keys as the run) and writes
   ``<sweep>/.graph/graph.json``, ``cells.json`` and ``cells/<cell>.yaml``;
2. :func:`submit` walks the graph's not-done nodes in topological order and submits each one as a
   SLURM job (submitit executor) whose ``--dependency=afterok:<parents' job ids>`` names its
   not-done parents, with ``--kill-on-invalid-dep=yes`` so that a failed node's dependants are
   cancelled by SLURM, never started. Nodes with the same resources and the same parents' jobs
   (DPO and ORPO on one SFT, the evaluations of one stage, the start evaluation beside CPT) go out
   as one job array. Resources per kind: ``launcher.<stage|merge|eval|summary>.*`` over the
   launcher's own values. A node done before (cached stage/merge/evaluation, finished summary) is
   not submitted, so rerunning the same command submits only what is missing; nor is a node whose
   job of an earlier submission is still queued or running (:func:`live_jobs`, one ``squeue``):
   its dependants get ``afterok`` on that job and the shell waits on it too, so rerunning the
   command while the first submission runs (a closed terminal, ``launcher.wait=false``) submits
   nothing twice. ``launcher.fuse_eval=true`` (off by default) runs each evaluation in its
   stage's or merge's job instead of its own (:func:`fused_evals`);
3. :func:`wait_for_nodes` polls all jobs together (one ``sacct`` per poll) and, as soon as a node
   fails, raises :class:`NodeFailed` naming it, its log, the nodes SLURM cancels because of it and
   the cells it blocks.

Every submission is recorded in ``<sweep>/.graph/submitted.json`` (per submission: ``nodes``
submitted, node id -> job id; ``live``, the earlier jobs it waits on instead), which
:func:`live_jobs`, tests and ``bench/graph_bench.py`` read.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import OmegaConf

from dft import DftError
from dft.graph import Graph, Node
from dft.launching import CellFailed, _job_state

log = logging.getLogger("dft.graph_launch")

#: fields of ``launcher.<kind>`` (dft.config.NodeResources) and the submitit parameter each sets
RESOURCE_FIELDS = ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min")


class NodeFailed(CellFailed):
    """A node of the graph failed; ``details`` name it, its job and log, and the cells it blocks
    (``python -m dft.train`` prints them, then ``line``: the first failed node, as for a cell)."""


def cell_config(sweep_cfg: Any) -> Any:
    """The task function's view of a composed sweep config: resolved, without ``hydra``, typed."""
    from dft.config import TrainConfig

    plain = {k: OmegaConf.to_container(sweep_cfg[k], resolve=True) if OmegaConf.is_config(sweep_cfg[k]) else sweep_cfg[k]
             for k in sweep_cfg if k != "hydra"}
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)


def plan_cells(compose: Callable[[Sequence[str]], Any], job_overrides: Sequence[Sequence[str]],
               sweep_dir: Path) -> tuple[Graph, dict]:
    """Plan every cell and write the graph (step 1 of the module docstring).

    Args:
        compose: overrides -> the cell's composed sweep config (with ``hydra``; HydraConfig set).
        job_overrides: each cell's overrides, in sweep order.
        sweep_dir: ``hydra.sweep.dir``.

    Returns:
        ``(graph, cells)`` with ``cells[cell] = {"run_dir", "overrides", "index"}``.

    Raises:
        DftError: a cell's config is invalid (one line naming the cell and the key).
    """
    from dft.node import GRAPH_DIR, cell_config_path, cells_path, graph_path
    from dft.pipeline import Cell
    from dft.plan import make_plan
    from dft.runs import write_json

    plans, cells = [], {}
    for i, overrides in enumerate(job_overrides):
        sc = compose(list(overrides))
        run_dir = Path(str(sc.hydra.sweep.dir)) / str(sc.hydra.sweep.subdir)
        cfg = cell_config(sc)
        name = run_dir.name
        try:
            plan = make_plan(Cell(cfg, run_dir, name))
        except DftError as e:
            raise DftError(f"cell {name}: {e}") from e
        if plan["keys_provisional"]:
            raise DftError(f"cell {name}: {plan['weights']['missing'][0]}; the graph launcher computes every node's "
                           "key here from the weights' files: put them on this machine first (or use "
                           "launcher=slurm_cells)")
        plans.append(plan)
        cells[name] = {"run_dir": str(run_dir), "overrides": list(overrides), "index": i}
        path = cell_config_path(sweep_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(OmegaConf.to_yaml(cfg))
        tmp.replace(path)
    graph = Graph.from_plans(plans)
    (Path(sweep_dir) / GRAPH_DIR).mkdir(parents=True, exist_ok=True)
    graph.write(graph_path(sweep_dir))
    write_json(cells_path(sweep_dir), cells)
    return graph, cells


def done(node: Node) -> bool:
    """Whether the node's result exists (the plan's ``cached``; unknown counts as not done)."""
    return node.cached is True


def resources(launcher_cfg: Any, kind: str) -> dict:
    """``launcher.<kind>``'s non-null fields (the job's resources over the launcher's own)."""
    node = OmegaConf.select(launcher_cfg, kind, default=None) if launcher_cfg is not None else None
    if node is None:
        return {}
    return {k: node[k] for k in RESOURCE_FIELDS if k in node and node[k] is not None}


def levels(graph: Graph, todo: set[str]) -> list[list[str]]:
    """The not-done nodes by depth (a node one deeper than its deepest not-done parent)."""
    depth: dict[str, int] = {}
    for i in graph.topological():
        if i in todo:
            depth[i] = 1 + max((depth[p] for p in graph.nodes[i].parents if p in todo), default=-1)
    out: list[list[str]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for i, d in depth.items():
        out[d].append(i)
    return out


def fused_evals(graph: Graph, todo: set[str]) -> dict[str, list[str]]:
    """``launcher.fuse_eval=true``: stage or merge node -> the evaluation nodes of ``todo`` that run in
    its job (each evaluation whose one parent is that node and is in ``todo`` too)."""
    out: dict[str, list[str]] = {}
    for i in graph.topological():
        n = graph.nodes[i]
        if i in todo and n.kind == "eval" and len(n.parents) == 1 and n.parents[0] in todo:
            out.setdefault(n.parents[0], []).append(i)
    return out


def submit(graph: Graph, todo: set[str], submit_group: Callable[[str, list[str], list[str]], list[Any]],
           live: Optional[dict[str, Any]] = None, riders: Optional[dict[str, list[str]]] = None) -> dict[str, Any]:
    """Submit the ``todo`` nodes parents first (step 2 of the module docstring).

    ``submit_group(resources kind, node ids, dependency job ids)`` submits those nodes as one job
    array that starts after every listed job ended well and returns their jobs (in order). Nodes
    of one depth are grouped by (resources, parents' jobs); summaries, one per cell, go alone.
    ``live``: node id -> the job of an earlier submission that is still queued or running
    (:func:`live_jobs`); those nodes are not in ``todo`` and their dependants depend on these jobs.
    ``riders``: node -> nodes that run in its job (:func:`fused_evals`); not in ``todo``, they get
    their host's job.

    Returns:
        node id -> job (submitit job, ``job_id`` like ``123`` or ``123_4``) of the nodes submitted now.
    """
    jobs: dict[str, Any] = {}
    known = dict(live or {})
    for level in levels(graph, todo):
        groups: dict[tuple, list[str]] = {}
        for i in level:
            n = graph.nodes[i]
            deps = tuple(sorted({str(known[p].job_id) for p in n.parents if p in known}))
            groups.setdefault((n.resources, deps), []).append(i)
        for (kind, deps), ids in groups.items():
            for i, job in zip(ids, submit_group(kind, ids, list(deps))):
                jobs[i] = known[i] = job
                for r in (riders or {}).get(i, []):
                    jobs[r] = known[r] = job
    return jobs


def failure_message(graph: Graph, node_id: str, job: Any, error: BaseException, jobs: dict[str, Any]) -> str:
    """What the shell prints when a node fails: the node, its job, state and log, the nodes that will
    never run because of it and the cells it blocks."""
    n = graph.nodes[node_id]
    log_file = getattr(getattr(job, "paths", None), "stderr", None)
    never = [graph.nodes[d] for d in graph.descendants(node_id) if d in jobs]
    tail = "\n".join("    " + ln for ln in f"{type(error).__name__}: {error}".strip().splitlines()[-20:])
    return (f"node {n.name} ({n.kind}, {n.id}) failed (job {job.job_id}, state {_job_state(job)})\n"
            f"  log: {log_file}\n"
            f"  blocks {len(n.cells)} cell(s): {', '.join(n.cells)}\n"
            f"  {len(never)} dependant node(s) will not run (SLURM cancels them: --kill-on-invalid-dep): "
            f"{', '.join(d.name for d in never) or 'none'}\n{tail}")


def wait_for_nodes(graph: Graph, jobs: dict[str, Any], poll_s: Optional[float] = None) -> dict[str, Any]:
    """Wait for every submitted node; raise :class:`NodeFailed` as soon as one fails
    (:func:`dft.launching.poll_jobs`, the poller of the cell array too).

    Returns:
        node id -> the job's result (a summary node's: Hydra's ``JobReturn``).

    Raises:
        NodeFailed: see :func:`failure_message`; the nodes that do not depend on it keep running
            (listed, with how to cancel them).
    """
    from dft.launching import poll_jobs

    def failed(failures: list, pending: set) -> None:
        # a cancelled dependant is a consequence, not a cause: name the causes
        causes = [(i, e) for i, e in failures if not any(i in graph.descendants(j) for j, _ in failures)]
        msg = "\n".join(failure_message(graph, i, jobs[i], e, jobs) for i, e in causes)
        blocked = {d for i, _ in causes for d in graph.descendants(i)} | {i for i, _ in failures}
        others = sorted(i for i in pending if i not in blocked)
        if others:
            ids = sorted({str(jobs[i].job_id).split("_")[0] for i in others})
            msg += (f"\n{len(others)} other node(s) still queued or running; they go on (squeue -j {','.join(ids)}; "
                    f"cancel: scancel {' '.join(ids)})")
        first = msg.splitlines()[0]
        log_file = getattr(getattr(jobs[causes[0][0]], "paths", None), "stderr", None)
        raise NodeFailed(msg, f"{first}; log: {log_file}" + (f" (and {len(causes) - 1} more node(s), above)"
                                                           if len(causes) > 1 else ""))

    return poll_jobs(jobs, failed, poll_s, what="nodes")


def record_submission(sweep_dir: Path, jobs: dict[str, Any], graph: Graph, live: Optional[dict[str, Any]] = None) -> None:
    """Append this submission to ``<sweep>/.graph/submitted.json``: ``nodes`` (node id -> job id, kind,
    name) submitted now, ``live`` the same for the nodes whose earlier job it waits on instead."""
    from dft.node import GRAPH_DIR
    from dft.runs import read_json, write_json

    path = Path(sweep_dir) / GRAPH_DIR / "submitted.json"
    history = read_json(path) or []
    def rec(js: dict[str, Any]) -> dict:
        return {i: {"job": str(j.job_id), "kind": graph.nodes[i].kind, "name": graph.nodes[i].name} for i, j in js.items()}

    history.append({"at": time.time(), "nodes": rec(jobs), "live": rec(live or {})})
    write_json(path, history)


#: SLURM job states (``squeue %T``) of a job that has not ended: its node is not submitted again
LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                         "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"})


def squeue_states() -> dict[str, str]:
    """Job id (``123``, array tasks ``123_4``) -> state of every job ``squeue`` lists (one call).

    Empty when ``squeue`` is missing or fails (then nothing counts as live: a rerun resubmits, as
    before this check existed; a warning says so).
    """
    import subprocess

    try:
        p = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("squeue failed (%s): jobs of an earlier submission are not looked for", e)
        return {}
    if p.returncode != 0:
        log.warning("squeue failed (%s): jobs of an earlier submission are not looked for", p.stderr.strip()[:200])
        return {}
    return dict(line.strip().split("|", 1) for line in p.stdout.splitlines() if "|" in line)


def live_jobs(sweep_dir: Path, graph: Graph, todo: set[str],
              states: Optional[Callable[[], dict[str, str]]] = None) -> dict[str, str]:
    """Nodes of ``todo`` whose job of an earlier submission (``submitted.json``) is still queued or
    running: node id -> that job's id. They are not submitted again; their dependants wait on them.

    A node whose not-done parent is not live itself (that parent failed or was cancelled and is
    resubmitted) is not live either: SLURM cancels its old job (``--kill-on-invalid-dep``), so it
    is submitted again after the new parent.

    ``states``: job id -> SLURM state (default :func:`squeue_states`).
    """
    from dft.node import GRAPH_DIR
    from dft.runs import read_json

    history = read_json(Path(sweep_dir) / GRAPH_DIR / "submitted.json") or []
    last: dict[str, str] = {}
    for sub in history:
        for i, rec in {**sub.get("live", {}), **sub.get("nodes", {})}.items():
            last[i] = str(rec["job"])
    mine = {i: last[i] for i in todo if i in last}
    if not mine:
        return {}
    st = (states or squeue_states)()
    live = {i: j for i, j in mine.items() if st.get(j) in LIVE_STATES}
    for i in graph.topological():  # parents first: a dropped parent drops its dependants
        if i in live and any(p in todo and p not in live for p in graph.nodes[i].parents):
            del live[i]
    return live


def launch_graph(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """``DftGraphLauncher.launch``: plan, submit the graph, wait (see the module docstring).

    ``dry_run=true`` plans the cells here, in this process (Hydra's basic launcher): a dry run
    trains nothing and needs no job.
    """
    import submitit
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from dft.graph import format_costs, layout_costs
    from dft.node import NodeTask
    from dft.runs import read_json

    config = launcher.config
    if OmegaConf.select(config, "dry_run", default=False):
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        basic = BasicLauncher()
        basic.setup(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=config)
        return basic.launch(job_overrides, initial_job_idx)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)

    def compose(overrides: Sequence[str]) -> Any:
        sc = launcher.hydra_context.config_loader.load_sweep_config(config, list(overrides))
        HydraConfig.instance().set_config(sc)
        return sc

    t0 = time.monotonic()
    try:
        graph, cells = plan_cells(compose, job_overrides, sweep_dir)
    except DftError as e:  # a config or weights problem: one line, nothing submitted
        import sys

        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        HydraConfig.instance().set_config(config)
    todo = {i for i, n in graph.nodes.items() if not done(n)}
    counts = graph.counts()
    log.info("graph of %d cell(s): %d nodes (%s), %d done, %d to run; planned in %.1f s", len(cells), len(graph.nodes),
             ", ".join(f"{v} {k}" for k, v in counts.items() if v), len(graph.nodes) - len(todo), len(todo),
             time.monotonic() - t0)
    if all(n.gpu_hours is not None for n in graph.nodes.values()):
        lc = config.launcher
        log.info("%s", format_costs(layout_costs(graph, world=max(1, int(lc.tasks_per_node or 1)),
                                                 gpus=max(1, int(lc.gpus_per_node or 0)))))

    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params.get("max_num_timeout", 0))
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    base = {k: v for k, v in params.items() if k not in ("submitit_folder", "max_num_timeout")}
    user_extra = dict(base.pop("additional_parameters", None) or {})
    name = base.get("name") or "dft"
    sbatch_calls = [0]

    def submit_group(kind: str, ids: list[str], deps: list[str]) -> list[Any]:
        p = dict(base, **resources(config.launcher, kind), name=f"{name}-{kind}")
        extra = dict(user_extra)
        if deps:
            extra.update(dependency="afterok:" + ":".join(deps), kill_on_invalid_dep="yes")
        mapped = {k if k in baseparams else f"slurm_{k}": v for k, v in p.items()}
        executor.update_parameters(**mapped, slurm_additional_parameters=extra)
        sbatch_calls[0] += 1
        if kind == "summary":  # the cell itself, as a Hydra job (its .hydra/ files, its JobReturn)
            args = []
            for i in ids:
                c = cells[graph.nodes[i].key]
                idx = initial_job_idx + c["index"]
                args.append((list(c["overrides"]), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            return executor.map_array(launcher, *zip(*args))
        return executor.map_array(NodeTask(), [str(sweep_dir)] * len(ids), [[i, *riders.get(i, [])] for i in ids])

    live_ids = live_jobs(sweep_dir, graph, todo)
    live = {i: submitit.SlurmJob(folder=executor.folder, job_id=j) for i, j in live_ids.items()}
    if live:
        log.info("%d node(s) still queued or running from an earlier submission: not submitted again, their "
                 "dependants wait on them (%s)", len(live), ", ".join(f"{graph.nodes[i].name}={j}"
                                                                    for i, j in live_ids.items()))
    riders = fused_evals(graph, todo - set(live)) if OmegaConf.select(config, "launcher.fuse_eval", default=False) else {}
    if riders:
        log.info("launcher.fuse_eval=true: %d evaluation(s) run in the job of the stage or merge they evaluate",
                 sum(len(v) for v in riders.values()))
    jobs = submit(graph, todo - set(live) - {r for v in riders.values() for r in v}, submit_group, live=live,
                  riders=riders)
    if jobs or live:
        record_submission(sweep_dir, jobs, graph, live)
    log.info("submitted %d node(s) as %d sbatch call(s) (submitit folder: %s)", len(jobs), sbatch_calls[0],
             executor.folder)
    for i, job in jobs.items():
        n = graph.nodes[i]
        log.info("  %-8s %-12s %s", n.kind, job.job_id, n.name)

    def ret(c: str, value: Any = None, task: str = "finished") -> Any:
        return JobReturn(overrides=list(cells[c]["overrides"]), status=JobStatus.COMPLETED, task_name=task,
                         _return_value=value)

    order = sorted(cells, key=lambda c: cells[c]["index"])
    if not OmegaConf.select(config, "launcher.wait", default=True):
        ids = sorted({str(j.job_id).split("_")[0] for j in {**live, **jobs}.values()})
        log.info("launcher.wait=false: not waiting. Follow with: squeue -j %s", ",".join(ids))
        return [ret(c, task="submitted") for c in order]
    results = wait_for_nodes(graph, {**live, **jobs})
    out = []
    for c in order:
        sid = f"summary/{c}"
        if sid in results:
            out.append(results[sid])
        else:
            s = read_json(Path(cells[c]["run_dir"]) / "summary.json") or {}
            out.append(ret(c, s.get("objective")))
    return out
