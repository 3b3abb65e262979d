"""Resuming, preemption signals and whole-run facts of a training stage (used by ``train_stage``).

* :class:`StageCallback` (a ``transformers.TrainerCallback``) logs at every step that saves a
  checkpoint and at the last step, so the logged history covers every step and a resumed run's
  history is the uninterrupted run's; it replaces the trainer's ``train_loss`` (the mean over the
  steps of *this* ``train()`` call) by :func:`whole_run_loss` before W&B sees it; on SIGTERM or
  SIGUSR2 it asks the trainer to save a checkpoint and stop at the next step boundary (every rank of a
  multi-process job at the same step: :func:`agree_on_signal`); and after
  each checkpoint it is the ``checkpoint`` fault point (:mod:`dft.faults`).
* :func:`finished_checkpoint`: a checkpoint at the last step is *saved* from, not trained on
  (transformers trains one more step when resumed at ``max_steps``).
* :class:`PreemptionSignals`: the SIGTERM/SIGUSR2 handlers while a stage trains; after the
  checkpoint they hand over to the handler that was there before (submitit's requeue for SIGUSR2),
  or exit with 128 + the signal number (SLURM requeues a SIGTERM'd job itself).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from dft.faults import fault_point

log = logging.getLogger(__name__)

#: signals a cluster sends before preempting or at the time limit (``sbatch --signal``)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def whole_run_loss(log_history: list[dict], global_step: int) -> Optional[float]:
    """Mean training loss over steps 1..``global_step`` from the logged history.

    Each logged ``loss`` is the mean over the steps since the previous log, so the sum is
    ``sum(loss_i * (step_i - step_{i-1}))``; divided by ``global_step``. It is the number
    transformers' ``training_loss`` gives for an uninterrupted run, and stays right after a resume
    (where ``training_loss`` covers only the resumed part). None when the history does not reach
    ``global_step`` (a log is missing).
    """
    total, prev = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > prev:
            total += float(entry["loss"]) * (entry["step"] - prev)
            prev = entry["step"]
    if global_step <= 0 or prev != global_step:
        return None
    return total / global_step


class PreemptionSignals:
    """Catch SIGTERM and SIGUSR2 while a stage trains; ``received`` is the signal number or None.

    Use as a context manager around ``trainer.train()``; :meth:`hand_over` then passes the signal
    on once the checkpoint is written. Only in the main thread (elsewhere it does nothing).
    """

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                        signal.Signals(signum).name)
        self.received = signum

    def __enter__(self):
        try:
            for s in PREEMPT_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False

    def hand_over(self) -> None:
        """After the checkpoint, for SIGTERM and SIGUSR2 alike: call the SIGUSR2 handler that was
        there before (submitit's: requeue the job and exit; submitit itself only logs SIGTERM,
        which is how a requeue lost work), else exit with 128 + the signal number."""
        signum = self.received
        if signum is None:
            return
        prev = self._previous.get(signal.SIGUSR2)
        log.warning("stage checkpointed after %s; exiting so the job is requeued", signal.Signals(signum).name)
        if callable(prev):
            prev(signal.SIGUSR2, None)
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(128 + signum)


def agree_on_signal(received: Optional[int], device: Any = None) -> Optional[int]:
    """The preemption signal every rank acts on at this step: the largest signal number any rank of
    the default ``torch.distributed`` process group has received (None when none has).

    SLURM signals every task of a step, but not at the same instant: without this a rank that sees
    SIGTERM after its step ended would stop one step after the others, and the ranks would save
    different checkpoints (or wait on each other forever in the next collective). One ``all_reduce``
    (MAX) of one integer per step, on ``device`` (NCCL needs the rank's GPU; gloo: CPU). A single
    process (no process group, or world size 1) returns ``received`` unchanged.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return received
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return received
    flag = torch.tensor([received or 0], dtype=torch.int64, device=device if device is not None else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item())
    if agreed and received is None:
        log.warning("another rank received %s: saving a checkpoint at this step boundary with it, then exiting",
                    signal.Signals(agreed).name)
    return agreed or None


class StageCallback(TrainerCallback):
    """See the module docstring. ``signals`` is a :class:`PreemptionSignals` (or None)."""

    def __init__(self, signals: Optional[PreemptionSignals] = None):
        self.signals = signals

    def on_step_end(self, args, state, control, **kwargs):
        fault_point("step")
        if self.signals is not None:
            self.signals.received = agree_on_signal(self.signals.received, getattr(args, "device", None))
            if self.signals.received is not None:
                control.should_save = True
                control.should_training_stop = True
        if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            control.should_log = True  # the history then covers every step up to each checkpoint
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "train_loss" in logs:
            whole = whole_run_loss(state.log_history, state.global_step)
            if whole is not None:
                logs["train_loss"] = whole
                if state.log_history and "train_loss" in state.log_history[-1]:
                    state.log_history[-1]["train_loss"] = whole
        return control

    def on_save(self, args, state, control, **kwargs):
        fault_point("checkpoint")
        return control


def install(trainer, signals: Optional[PreemptionSignals]) -> StageCallback:
    """Add a :class:`StageCallback` right after transformers' flow callback (before the reporting
    callbacks, so W&B logs the corrected ``train_loss``)."""
    from transformers.trainer_callback import DefaultFlowCallback

    cb = StageCallback(signals)
    cbs = trainer.callback_handler.callbacks
    at = next((i + 1 for i, c in enumerate(cbs) if isinstance(c, DefaultFlowCallback)), len(cbs))
    cbs.insert(at, cb)
    return cb


def finished_checkpoint(checkpoint: Optional[str], max_steps: int = -1) -> bool:
    """True when ``checkpoint`` is at the last step: ``global_step >= max_steps`` (this run's
    ``max_steps`` when > 0, else the total its trainer state recorded for an epoch budget)."""
    if not checkpoint:
        return False
    try:
        st = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    last = max_steps if max_steps and max_steps > 0 else st.get("max_steps", 0)
    return last > 0 and st.get("global_step", 0) >= last


def restore_token_count(trainer, checkpoint: Optional[str]) -> None:
    """TRL's SFT/DPO trainers count the tokens seen (logged ``num_tokens``) in an attribute that a
    checkpoint does not save, so a resumed run would log the count of the resumed part only:
    start it from the checkpoint's last logged count instead."""
    if not checkpoint or not hasattr(trainer, "_total_train_tokens"):
        return
    try:
        hist = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("log_history", [])
    except (OSError, ValueError):
        return
    seen = [e["num_tokens"] for e in hist if "num_tokens" in e]
    if seen:
        trainer._total_train_tokens = type(trainer._total_train_tokens)(seen[-1])


def restore_finished(trainer, checkpoint: str) -> None:
    """Load the weights and trainer state of a finished ``checkpoint`` into ``trainer`` (no step
    runs): the stage is then saved exactly as the uninterrupted run saved it."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)  # weights or adapter, as transformers resumes them
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    st = trainer.state
    # the entry transformers appends when training ends (timings 0: no step ran in this call)
    st.log_history.append({"train_runtime": 0.0, "train_samples_per_second": 0.0, "train_steps_per_second": 0.0,
                           "total_flos": st.total_flos, "train_loss": whole_run_loss(st.log_history, st.global_step),
                           "epoch": st.epoch, "step": st.global_step})
    log.info("stage: %s is at the last step (%d); saving it without training again", checkpoint, st.global_step)
