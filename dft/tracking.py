"""Weights & Biases, one run per cell.

``group`` = the sweep (experiment), ``job_type`` = the strategy, ``name`` = a readable cell id,
tags = model family, start (base/instruct), chain, merge method. The run id (:func:`run_id`) is
derived from the cell's absolute folder and its attempt, kept in the folder, with
``resume="allow"``, so a requeued SLURM job continues the same run, ``force=true`` starts a new
one, and cells of different run roots never share an id.
``mode: auto`` logs online when ``WANDB_API_KEY`` is set and offline otherwise (offline runs are
written under the run directory; nothing waits on the network). Every cell calls
:meth:`Tracker.finish`, or later cells of a multirun would log into this cell's run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` with a key in the environment, else ``offline``."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


#: file in a cell's folder that keeps its W&B run id (and the attempt and SLURM job that made it)
ID_FILE = "wandb_run.json"


def run_id(run_dir: Path, force: bool = False) -> str:
    """The W&B run id of the cell in ``run_dir``: 16 hex digits of sha256(absolute run dir, attempt).

    The absolute run dir holds the run root, the experiment and the cell, so cells of two run roots
    (or two sweeps) never share an id. The id is kept in ``<run_dir>/wandb_run.json``: a rerun or
    a requeued SLURM job of the cell continues its run. ``force=true`` starts a new attempt (a new
    id), except in the SLURM job that started that attempt (a requeue keeps ``SLURM_JOB_ID``).
    """
    from dft.runs import read_json, write_json

    path = Path(run_dir) / ID_FILE
    old = read_json(path) or {}
    job = os.environ.get("SLURM_JOB_ID")
    if old.get("id") and (not force or (job and old.get("slurm_job_id") == job)):
        return old["id"]
    attempt = int(old.get("attempt", -1)) + 1 if old.get("id") else 0
    rid = hashlib.sha256(f"{Path(run_dir).resolve()}#{attempt}".encode()).hexdigest()[:16]
    write_json(path, {"id": rid, "attempt": attempt, "slurm_job_id": job})
    return rid


class Tracker:
    """A W&B run for one cell, or a no-op when ``logger.backend`` is ``none``/mode ``disabled``;
    with ``logger.trackio.enabled`` also a local trackio run that gets the same calls."""

    def __init__(self, logger_cfg: Any, *, run_dir: Path, experiment: str, cell: str, name: str,
                 job_type: str, tags: list[str], config: dict, enabled: bool = True, force: bool = False):
        self.run = None
        self.trackio = None  # a dft.dashboards.trackio_logger.TrackioRun beside (or instead of) W&B
        self._curve_steps: set[str] = set()
        self.mode = resolve_mode(logger_cfg.mode)
        tk = logger_cfg.get("trackio") if hasattr(logger_cfg, "get") else None
        trackio_on = enabled and tk is not None and tk.get("enabled")
        wandb_on = enabled and logger_cfg.backend != "none" and self.mode != "disabled"
        # one id per attempt, shared by W&B and trackio (computed once: force=true starts a new attempt)
        rid = run_id(run_dir, force) if (trackio_on or wandb_on) else None
        if trackio_on:
            from dft.dashboards.trackio_logger import TrackioRun

            self.trackio = TrackioRun(tk, project=logger_cfg.project, experiment=experiment, name=name,
                                      run_id=rid, config=config)
        if not wandb_on:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ["WANDB_MODE"] = self.mode
        os.environ["WANDB_DIR"] = str(run_dir)
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=experiment,
            job_type=job_type,
            name=name,
            tags=sorted(set(tags) | set(logger_cfg.tags)),
            id=rid,
            resume="allow",
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            reinit="finish_previous",
        )
        log.info("W&B %s run %s (%s)", self.mode, self.run.id, self.run.dir)

    @property
    def report_to(self) -> str:
        """Value for TRL's ``report_to``: ``wandb`` when a run is active, else ``none``."""
        return "wandb" if self.run is not None else "none"

    def log(self, metrics: dict) -> None:
        """A history row (training-time values only: evaluation results go to :meth:`summary`)."""
        if self.run is not None and metrics:
            self.run.log(metrics)
        if self.trackio is not None:
            self.trackio.log(metrics)

    def summary(self, metrics: dict) -> None:
        """Run-summary keys: never a history step, so a later evaluation of a finished run
        (a backfill) cannot log at a step below the run's last one."""
        if self.run is not None:
            self.run.summary.update(metrics)
        if self.trackio is not None:
            self.trackio.summary(metrics)

    def curves(self, stage: str, log_history: Optional[list]) -> None:
        """A stage's training curves as ``train/<stage>/loss|grad_norm|learning_rate`` against the
        step metric ``train/<stage>/step`` (declared with ``define_metric``), the same keys in every
        cell (:func:`dft.keys.stage_curves`); for a reused stage, the curves of the run that trained it."""
        from dft.keys import CURVE_FIELDS, stage_curve_key, stage_curves

        rows = stage_curves(stage, log_history)
        if self.run is not None and rows and stage not in self._curve_steps:
            step = stage_curve_key(stage, "step")
            self.run.define_metric(step)
            for f in CURVE_FIELDS:  # exact names: they win over TRL's "*" -> train/global_step glob
                self.run.define_metric(stage_curve_key(stage, f), step_metric=step)
            self._curve_steps.add(stage)
        for r in rows:
            self.log(r)

    def table(self, key: str, rows: list[dict]) -> None:
        """``rows`` (dicts with the same keys) as a table under ``key`` in the run summary (W&B)
        and in trackio; in the summary, not history, for the same reason as :meth:`summary`."""
        if not rows:
            return
        if self.trackio is not None:
            self.trackio.table(key, rows)
        if self.run is None:
            return
        import wandb

        cols = list(rows[0].keys())
        self.run.summary[key] = wandb.Table(columns=cols, data=[
            [str(r.get(c)) if isinstance(r.get(c), (dict, list)) else r.get(c) for c in cols] for r in rows])

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        if self.trackio is not None:
            self.trackio.finish()
            self.trackio = None


def scrub(obj: Any, secrets: Optional[list[str]] = None) -> Any:
    """Copy of ``obj`` with every secret value from the environment replaced by ``***``."""
    values = [os.environ[k] for k in (secrets or SECRET_ENV) if os.environ.get(k)]
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in values:
            obj = obj.replace(s, "***")
    return obj
