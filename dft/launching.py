"""Launching a grid: the launcher configs' resolvers, and how the submitting shell waits.

``conf/launcher/*.yaml`` select a Hydra launcher (``basic`` in-process, ``submitit_local``,
``submitit_slurm``) and fill ``hydra.launcher.*`` from dft's ``launcher.*`` node. Two things here
make that work well:

* the ``dft.required`` resolver (:func:`register_resolvers`, called by ``dft/train.py`` at import):
  ``${dft.required:launcher.partition,'where to set it'}`` returns the value of the key, or fails
  before anything is submitted with a message saying where to set it (cluster values live in the
  gitignored ``conf/local/``, never in committed configs); :class:`LauncherCheck`, a Hydra
  callback of the submitit launcher configs, turns that failure into one line;
* a replacement for how hydra-submitit-launcher 1.2.0 waits on its job array. The plugin's own
  ``launch`` waits on the cells one after another, in order, and asks ``sacct`` at most every
  10 minutes once a sweep is old: a cell that dies hard (SIGKILL, out of memory, node failure)
  behind a long-running one is noticed late, and its error names an array index, not the cell.
  :func:`wait_for_cells` polls all cells together (:func:`poll_jobs`, the poller the graph launcher
  uses too: one ``sacct`` call per poll, every
  ``DFT_LAUNCH_POLL_S`` seconds, default 5), fails as soon as any cell fails, naming its overrides
  and its log, and leaves the other cells running (they are SLURM jobs, independent of the shell).
  With ``launcher.wait=false`` it returns right after submitting.

A job that succeeded (a graph node, a graph summary, a cell-array task) ends without the
interpreter's teardown (:func:`register_fast_exit`), so its slot is not held for it.

The replacement (:func:`install_waiting`, run by :class:`LauncherCheck` when a multirun starts) is
a patch of ``BaseSubmititLauncher.launch``, applied only for the pinned plugin version, because
Hydra instantiates launchers only from the ``hydra_plugins`` package, which dft does not ship. It
acts in the submitting process only; the jobs use the plugin unchanged (``__call__`` and
``checkpoint``, the requeue-on-preemption path).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence, TypeVar

from omegaconf import OmegaConf

log = logging.getLogger("dft.launching")
K = TypeVar("K")

#: seconds between two status polls of a running sweep (one ``sacct`` call for the whole array)
POLL_S = float(os.environ.get("DFT_LAUNCH_POLL_S", "5"))
#: the plugin version whose ``launch`` :func:`_launch` replaces (pinned in pyproject.toml)
PLUGIN_VERSION = "1.2.0"


def required(key: str, hint: str = "", *, _root_: Any) -> Any:
    """Resolver ``${dft.required:<key>,'<hint>'}``: the value at ``key``, or an error with the hint.

    Raises:
        dft.DftError: ``launcher.partition is not set: <hint>`` (OmegaConf adds the full key of the
            node being resolved, e.g. ``hydra.launcher.partition``).
    """
    from dft import DftError

    value = OmegaConf.select(_root_, key, default=None)
    if value is None or value == "":
        raise DftError(f"{key} is not set: {hint}" if hint else f"{key} is not set")
    return value


def register_resolvers() -> None:
    """Register the ``dft.required`` resolver (idempotent; call at import, before Hydra composes)."""
    if not OmegaConf.has_resolver("dft.required"):
        OmegaConf.register_new_resolver("dft.required", required)


def _cause(error: BaseException) -> str:
    """The user-facing part of a resolution error (the resolver's own message, if it raised one)."""
    from dft import DftError

    e: Optional[BaseException] = error
    while e is not None:
        if isinstance(e, DftError):
            return str(e)
        e = e.__cause__ or e.__context__
    return str(error).splitlines()[0]


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _Callback = object  # type: ignore[misc,assignment]


class LauncherCheck(_Callback):  # type: ignore[misc,valid-type]
    """Hydra callback of the submitit launcher configs (``hydra.callbacks.dft_launcher``).

    * multirun: resolves ``hydra.launcher`` before anything is submitted, so a missing partition
      is one line (``error: launcher.partition is not set: ...``, exit status 2) instead of a
      traceback from inside the launcher's instantiation;
      Then installs :func:`install_waiting` (the sweeper instantiates the launcher next);
    * single run: warns that the launcher is not used (it takes effect with ``-m`` only).
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        import sys

        try:
            OmegaConf.to_container(config.hydra.launcher, resolve=True)
        except Exception as e:  # noqa: BLE001 - any resolution error: report it in one line
            print(f"error: {_cause(e)}", file=sys.stderr)
            sys.exit(2)
        if OmegaConf.select(config, "launcher.name", default=None) == "slurm_cells" and \
                not OmegaConf.select(config, "dry_run", default=False):
            log.warning("launcher=slurm_cells: one job per cell; cells that share a stage all start and wait on its "
                        "lock holding their GPUs (dry_run=true prints the idle GPU-hours); launcher=slurm submits "
                        "each distinct stage once, after its parents")
        install_waiting()

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        name = OmegaConf.select(config, "launcher.name", default="?")
        log.warning("launcher=%s is used with -m (multirun) only; this single run runs here, in this process", name)


# --- waiting on a submitted sweep ----------------------------------------------------------------


class CellFailed(RuntimeError):
    """A cell of a multirun failed; the message names its overrides, job id, state and log.

    ``line`` is the one-line summary ``python -m dft.train`` ends with (the first failed cell, its
    job, state and log); ``details`` the lines printed above it (run dir, the error's tail, the
    cells still running). ``str()`` is both.
    """

    def __init__(self, details: str, line: str = ""):
        super().__init__(f"{details}\n{line}" if line else details)
        self.details = details
        self.line = line or details.splitlines()[0]


def _job_state(job: Any) -> str:
    try:
        return str(job.state)
    except Exception:  # noqa: BLE001 - a state is only decoration in a message
        return "UNKNOWN"


def _refresh(jobs: Sequence[Any]) -> None:
    """One status update for all jobs: a single ``sacct`` for a SLURM array, nothing for local jobs."""
    watcher = getattr(type(jobs[0]), "watcher", None) if jobs else None
    if watcher is not None and hasattr(watcher, "update") and type(jobs[0]).__name__ == "SlurmJob":
        watcher.update()


def _tail(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    return "\n".join(("    " + line) for line in lines[-n:])


def _failure(i: int, cell: str, job: Any, error: BaseException, run_dir: Optional[str]) -> tuple[str, str]:
    """(details, one line) of a failed cell."""
    paths = getattr(job, "paths", None)
    log_file = getattr(paths, "stderr", None)
    what = f"{type(error).__name__}: {error}"
    return (
        f"cell #{i} {cell} failed (job {job.job_id}, state {_job_state(job)})\n"
        f"  run dir: {run_dir or '?'}\n  log: {log_file}\n{_tail(what)}",
        f"cell #{i} {cell} failed (job {job.job_id}, state {_job_state(job)}); log: {log_file}",
    )


def poll_jobs(jobs: Mapping[K, Any], on_failures: Callable[[list, set], None], poll_s: Optional[float] = None,
              what: str = "jobs") -> dict[K, Any]:
    """The one poller of the submitting shell: wait for every job, hand failures over as soon as seen.

    Used by :func:`wait_for_cells` (the cell array) and :func:`dft.graph_launch.wait_for_nodes` (the
    graph): each poll is one status update for all jobs (:func:`_refresh`: one ``sacct``), then
    every job that ended is collected. A job failed when reading its result raises (killed, timed
    out, cancelled, failed outside Python; submitit waits up to 15 s for a result file) or its
    result is a Hydra ``JobReturn`` with status FAILED (the task function raised).

    Args:
        jobs: key (cell index, node id) -> submitit job.
        on_failures: called with ``[(key, error), ...]`` of the jobs found failed in one poll and the
            set of keys still pending; it is expected to raise (the caller's message). If it returns,
            polling goes on.
        poll_s: seconds between polls (default :data:`POLL_S`).
        what: the jobs' noun in the progress line logged every minute (``cells``, ``nodes``).

    Returns:
        key -> the job's result (for Hydra jobs a ``JobReturn``).
    """
    from hydra.core.utils import JobStatus

    poll_s = POLL_S if poll_s is None else poll_s
    order = list(jobs)
    results: dict[K, Any] = {}
    pending = set(order)
    last_report = time.monotonic()
    try:
        while pending:
            _refresh([jobs[k] for k in order])
            failures = []
            for k in [k for k in order if k in pending]:
                job = jobs[k]
                if not job.done():
                    continue
                pending.discard(k)
                try:
                    ret = job.results()[0]
                except Exception as e:  # noqa: BLE001 - killed, timed out, cancelled, or failed outside Python
                    failures.append((k, e))
                    continue
                if getattr(ret, "status", None) == JobStatus.FAILED:  # the task function raised
                    failures.append((k, ret._return_value))
                results[k] = ret
            if failures:
                on_failures(failures, pending)
            if pending:
                if time.monotonic() - last_report > 60:
                    states: dict = {}
                    for k in pending:
                        states[_job_state(jobs[k])] = states.get(_job_state(jobs[k]), 0) + 1
                    log.info("%d/%d %s done; waiting on %s", len(jobs) - len(pending), len(jobs), what,
                             ", ".join(f"{n} {st}" for st, n in sorted(states.items())))
                    last_report = time.monotonic()
                time.sleep(poll_s)
    except KeyboardInterrupt:
        ids = " ".join(sorted({str(jobs[k].job_id) for k in pending}))
        log.warning("interrupted: submitted %s keep running (%s); scancel them to stop", what, ids)
        raise
    return results


def wait_for_cells(
    jobs: Sequence[Any],
    cells: Sequence[str],
    poll_s: Optional[float] = None,
    run_dir: Optional[Callable[[int], Optional[str]]] = None,
    numbers: Optional[Sequence[int]] = None,
) -> List[Any]:
    """Wait for every submitted cell; fail as soon as one fails (:func:`poll_jobs`).

    Args:
        jobs: submitit jobs, one per cell (a job array's tasks), in cell order.
        cells: each cell's overrides as one string, for messages.
        poll_s: seconds between polls (default :data:`POLL_S`).
        run_dir: cell index -> its run directory (asked only for failed cells).
        numbers: each job's cell number in the sweep, for messages (default 0, 1, ...; differs when
            finished cells were not submitted).

    Returns:
        Each job's result (for the Hydra launcher: a ``JobReturn``), in cell order.

    Raises:
        CellFailed: names every cell found failed in the same poll, with its job id, state and log
            (a hard-killed cell has no result file; submitit waits up to 15 s for one first), and
            lists the cells still running, which are left to run.
    """
    num = list(numbers) if numbers is not None else list(range(len(jobs)))

    def failed(found: list, pending: set) -> None:
        failures = [_failure(num[i], cells[i], jobs[i], e, run_dir(i) if run_dir else None) for i, e in found]
        still = [f"#{num[i]} {jobs[i].job_id} {cells[i]}" for i in sorted(pending)]
        msg = "\n".join(f for f, _ in failures)
        line = failures[0][1] + (f" (and {len(failures) - 1} more cell(s), above)" if len(failures) > 1 else "")
        if still:
            array = str(jobs[0].job_id).split("_")[0]
            msg += (
                f"\n{len(still)} other cell(s) still running; they go on (squeue -j {array}; "
                f"cancel: scancel {array}):\n  " + "\n  ".join(still)
            )
            line += f"; {len(still)} other cell(s) still running (scancel {array} stops them)"
        raise CellFailed(msg, line)

    results = poll_jobs(dict(enumerate(jobs)), failed, poll_s, what="cells")
    return [results.get(i) for i in range(len(jobs))]


def _launch(self: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
    """``BaseSubmititLauncher.launch`` of hydra-submitit-launcher 1.2.0, waiting with :func:`wait_for_cells`.

    Identical up to the submission (same executor, parameters and job array); then, instead of
    ``[j.results()[0] for j in jobs]``, it waits on all cells together, or not at all when
    ``launcher.wait`` is false.
    """
    from pathlib import Path

    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    assert self.config is not None
    num_jobs = len(job_overrides)
    assert num_jobs > 0
    params = self.params
    init_params = {"folder": self.params["submitit_folder"]}
    specific_init_keys = {"max_num_timeout"}
    init_params.update(**{f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys})
    init_keys = specific_init_keys | {"submitit_folder"}
    executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)

    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {x if x in baseparams else f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x not in init_keys}
    executor.update_parameters(**params)

    log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
    sweep_dir = Path(str(self.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in self.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

    def run_dir(i: int) -> Optional[str]:
        """The cell's run directory, composed as the job composes it."""
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.instance()
        saved = hc.cfg
        try:
            sweep_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job_overrides[i]))
            hc.set_config(sweep_cfg)
            return str(Path(str(sweep_cfg.hydra.sweep.dir)) / str(sweep_cfg.hydra.sweep.subdir))
        except Exception:  # noqa: BLE001 - only decoration in an error message
            return None
        finally:
            hc.cfg = saved

    # a finished cell would only print "already finished" in its job: do not queue it at all
    finished = {} if OmegaConf.select(self.config, "dry_run", default=False) else finished_cells(job_overrides, run_dir)
    for i, where in sorted(finished.items()):
        log.info("cell %s already finished (%s/summary.json): not submitted (force=true recomputes it)",
                 " ".join(filter_overrides(job_overrides[i])) or "(no overrides)", where)
    todo = [i for i in range(num_jobs) if i not in finished]
    if not todo:
        log.info("every cell of this sweep has finished; nothing submitted")
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, task_name="finished", _return_value=None)
                for o in job_overrides]

    job_params: List[Any] = []
    cells: List[str] = []
    for idx, overrides in [(i, job_overrides[i]) for i in todo]:
        idx = initial_job_idx + idx
        lst = " ".join(filter_overrides(overrides))
        cells.append("'" + (" ".join(filter_overrides(overrides)) or "(no overrides)") + "'")
        log.info(f"\t#{idx} : {lst}")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))

    jobs = executor.map_array(self, *zip(*job_params))
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    log.info("submitted %d cell(s) as job %s (submitit folder: %s)", len(todo), ", ".join(ids), executor.folder)

    if not OmegaConf.select(self.config, "launcher.wait", default=True):
        log.info("launcher.wait=false: not waiting. Follow with: squeue -j %s; sacct -j %s", ",".join(ids), ",".join(ids))
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED, task_name="submitted", _return_value=None)
            for o in job_overrides
        ]

    results = wait_for_cells(jobs, cells, run_dir=lambda k: run_dir(todo[k]), numbers=[initial_job_idx + i for i in todo])
    out: List[Any] = [None] * num_jobs
    for k, r in zip(todo, results):
        out[k] = r
    for i in finished:
        out[i] = JobReturn(overrides=list(job_overrides[i]), status=JobStatus.COMPLETED, task_name="finished",
                           _return_value=None)
    return out


def finished_cells(job_overrides: Sequence[Sequence[str]], run_dir: Callable[[int], Optional[str]]) -> dict:
    """``{job index: run dir}`` of the cells whose ``summary.json`` says ``finished`` and that do not
    ask for ``force=true`` (their job would only print "already finished"; dft.pipeline)."""
    import json
    from pathlib import Path

    out = {}
    for i, overrides in enumerate(job_overrides):
        if any(o.split("=", 1)[0].lstrip("+") == "force" and o.split("=", 1)[1].lower() == "true" for o in overrides):
            continue
        where = run_dir(i)
        if not where:
            continue
        try:
            status = json.loads((Path(where) / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            continue
        if status == "finished":
            out[i] = where
    return out


def install_waiting() -> None:
    """Replace ``BaseSubmititLauncher.launch`` by :func:`_launch` (idempotent).

    Called by :class:`LauncherCheck` at the start of a multirun, after Hydra's plugin scan: the
    scan re-executes every ``hydra_plugins`` module, which would undo a patch made earlier.
    """
    try:
        from importlib.metadata import version

        from hydra.core.plugins import Plugins
        from hydra_plugins.hydra_submitit_launcher import submitit_launcher
    except ImportError:  # the plugin is not installed: only the basic launcher is available
        return
    Plugins.instance()  # the scan, if it has not run yet
    base = submitit_launcher.BaseSubmititLauncher
    if getattr(base.launch, "__dft__", False):
        return
    installed = version("hydra-submitit-launcher")
    if installed != PLUGIN_VERSION:
        log.warning(
            "hydra-submitit-launcher %s is not %s: keeping its own waiting (in cell order, slow to "
            "notice a killed cell)", installed, PLUGIN_VERSION,
        )
        return
    _launch.__dft__ = True  # type: ignore[attr-defined]
    base.launch = _launch


# ------------------------------------------------------------------------------- a job's exit
#: ``0``: a job that succeeded exits through the interpreter's normal teardown (:func:`register_fast_exit`)
FAST_EXIT_ENV = "DFT_NODE_FAST_EXIT"

_fast_exit = {"registered": False, "uncaught": False}


def register_fast_exit() -> None:
    """Let a submitit SLURM job whose work succeeded end without the interpreter's teardown.

    Called when a node (:class:`NodeTask`) or a cell (``dft.train``'s task function: a graph
    summary job, a cell-array task) returned. The teardown of a process that imported torch,
    transformers, TRL, peft and their dependencies took 2-8 s per job on the 2-core test machine
    (measured: 5.2 s from a node's last log line to its exit with it, 0.24 s without, load ~5:
    ``DFT_NODE_FAST_EXIT=0|1 SUBMITIT_EXECUTOR=slurm python -m dft.node <sweep> <stage node>``), time
    the job's slot stays allocated. At exit (after submitit wrote the result) :func:`_exit_now`
    flushes the logs and calls ``os._exit(0)``; it is the last atexit function registered, so the
    first to run. Only in a submitit SLURM job (``SUBMITIT_EXECUTOR=slurm``), never when an
    exception went uncaught or ``sys.exit`` was called with a non-zero status after the
    registration (then the normal exit keeps that status; a bare ``raise SystemExit(n)`` is not
    seen), and not with ``DFT_NODE_FAST_EXIT=0``.
    """
    if os.environ.get(FAST_EXIT_ENV, "1") == "0" or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if _fast_exit["registered"]:
        return
    import atexit

    previous = sys.excepthook

    def hook(*args: Any) -> None:
        _fast_exit["uncaught"] = True
        previous(*args)

    sys.excepthook = hook
    real_exit = sys.exit

    def exit_(status: Any = None) -> None:  # a later sys.exit(<non-zero>) keeps its status
        if status not in (None, 0):
            _fast_exit["uncaught"] = True
        real_exit(status)

    sys.exit = exit_
    atexit.register(_exit_now)
    _fast_exit["registered"] = True


def _exit_now() -> None:
    """See :func:`register_fast_exit`."""
    if _fast_exit["uncaught"]:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to flush
            pass
    os._exit(0)
