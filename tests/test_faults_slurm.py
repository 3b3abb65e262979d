"""A small SLURM sweep whose cells are signalled mid-training (issue 17): SIGTERM to one cell,
SIGUSR2 to the other, each at a random step. Each cell checkpoints at the next step, submitit
requeues it, it resumes and finishes with the weights and train_loss of an uninterrupted run,
one W&B run id and a history without gaps. Needs the local SLURM (launch/slurm.sh start)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_train
from slurm_fixtures import ROOT, LocalSlurm, slurm  # noqa: F401  (fixture)
from test_faults_runs import logged_steps
from test_slurm import _cells, _slurm_args, _train_env

STEPS = 60
SWEEP = ["model=tiny", "data=tiny", "strategy=sft", "merge=none", "eval=none", "logger.mode=offline",
         f"strategy.sft.trainer.max_steps={STEPS}", "strategy.sft.trainer.save_steps=1000",
         "strategy.sft.trainer.logging_steps=1", "strategy.sft.trainer.lr_scheduler_type=constant",
         "strategy.sft.trainer.warmup_steps=0", "seed=1,2", "experiment=sigsweep"]


def _weights(cell: Path) -> bytes:
    return (cell / "stages" / "sft" / "final" / "model.safetensors").read_bytes()


@pytest.mark.slurm
@pytest.mark.slurm_heavy
def test_signalled_sweep_resumes_bit_identical(slurm: LocalSlurm, tmp_path, tiny_model):
    ref_root = tmp_path / "ref"
    run_train(["-m", *SWEEP], ref_root, timeout=900)
    ref = {json.loads((c / "summary.json").read_text())["seed"]: c for c in _cells(ref_root / "sigsweep")}
    runs = tmp_path / "slurm"
    args = SWEEP + _slurm_args(slurm, timeout_min=30, max_num_timeout=3)
    proc = subprocess.Popen([sys.executable, "-m", "dft.train", "-m", *args], cwd=ROOT, env=_train_env(runs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(17)
    signalled: dict[str, str] = {}
    at: dict[str, int] = {}  # the step each cell is signalled after
    array = None
    try:
        deadline = time.monotonic() + 400
        while len(signalled) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            for err in (runs / "sigsweep" / ".submitit").glob("*/*_log.err"):
                task = err.name.split("_log")[0]  # <array>_<index>_<k>
                array, index = task.split("_")[0], task.split("_")[1]
                job = f"{array}_{index}"
                done = [int(n) for n in re.findall(rf"(\d+)/{STEPS} \[", err.read_text(errors="replace"))]
                if job in signalled or not done or max(done) < at.setdefault(job, rng.randint(2, 8)):
                    continue  # not yet at this cell's random step
                sig = "TERM" if index == "0" else "USR2"
                subprocess.run(["scancel", f"--signal={sig}", job], check=True)
                signalled[job] = sig
        assert len(signalled) == 2, f"cells never trained: {signalled}"
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if array and proc.returncode != 0:
            subprocess.run(["scancel", array], capture_output=True)
    logs = "".join(f.read_text(errors="replace") for f in (runs / "sigsweep" / ".submitit").glob("*/*_log.*"))
    for sig in ("SIGTERM", "SIGUSR2"):
        assert f"received {sig}: saving a checkpoint at the next step boundary" in logs
    # submitit requeued both (its "Requeued job" line can be cut off by the requeue itself)
    assert logs.count("DUE TO JOB REQUEUE") + logs.count("Requeued job") >= 2, logs[-3000:]
    for cell in _cells(runs / "sigsweep"):
        s = json.loads((cell / "summary.json").read_text())
        t = s["train"]["sft"]
        assert s["status"] == "finished" and t["steps"] == STEPS and t["attempts"] == 2, t
        assert t["resumed_from"] and t["resumed_from"].startswith("checkpoint-"), t
        stopped = int(t["resumed_from"].split("-")[1])
        assert 0 < stopped < STEPS
        r = ref[s["seed"]]
        assert _weights(cell) == _weights(r), cell.name
        assert t["train_loss"] == json.loads((r / "summary.json").read_text())["train"]["sft"]["train_loss"]
        attempts = sorted((cell / "wandb").glob("offline-run-*"))
        assert len({a.name.rsplit("-", 1)[1] for a in attempts}) == 1 and len(attempts) == 2
        steps = [logged_steps(a) for a in attempts]
        assert steps == [list(range(1, stopped + 1)), list(range(stopped + 1, STEPS + 1))]
        print(f"{cell.name}: signalled, checkpointed at step {stopped}, requeued, resumed, bit-identical")
