"""Stale temporary folders and one runner per cell (issue 17 items 4 and 5)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CACHE, ROOT, run_gloo_ranks, run_train


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_tmp_of_dead_writers_removed_live_ones_kept(tmp_path):
    import fcntl

    from dft.runs import remove_stale_tmp

    root = tmp_path / "_stages"
    dead = _dead_pid()
    stale_stage = root / "aaaa" / f"final.tmp-{dead}"
    live_stage = root / "bbbb" / f"final.tmp-{os.getpid()}"
    stale_eval = root / "_eval" / f"cccc.tmp-{dead}"
    for d in (stale_stage, live_stage, stale_eval):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
    run_dir = tmp_path / "runs" / "e" / "cell"
    run_dir.mkdir(parents=True)
    old_json = run_dir / f".summary.json.tmp-{dead}"
    new_json = run_dir / f".meta.json.tmp-{dead}"
    mine_json = run_dir / f".config.json.tmp-{os.getpid()}"
    for f in (old_json, new_json, mine_json):
        f.write_text("{")
    past = time.time() - 3600
    os.utime(old_json, (past, past))
    os.utime(mine_json, (past, past))
    # a live writer (another open file description) holds entry bbbb's lock
    with open(root / "bbbb.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        removed = remove_stale_tmp(root, run_dir)
    assert sorted(removed) == sorted([stale_stage, stale_eval, old_json])
    assert not stale_stage.exists() and not stale_eval.exists() and not old_json.exists()
    assert live_stage.is_dir()  # its entry's lock is held: a live writer's
    assert new_json.exists()  # dead pid but younger than a minute: left for the next start
    assert mine_json.exists()  # a live process's
    assert remove_stale_tmp(root, run_dir) == [live_stage]  # lock released: now nobody writes it


CELL = ["model=tiny", "data=tiny", "strategy=sft", "merge=none", "eval=none", "strategy.sft.trainer.max_steps=2",
        "logger.mode=offline", "experiment=busy"]


def _cell(runs: Path) -> Path:
    (d,) = [p for p in (runs / "busy").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return d


def test_second_launch_of_a_running_cell_waits_and_skips(tmp_path, tiny_model):
    """Two launches of one cell at once: one runs it, the other says who holds it, waits, and
    skips the finished cell: one W&B run, one summary write, one training."""
    env = dict(os.environ, DFT_RUNS=str(tmp_path), DFT_CACHE=str(CACHE), HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, "-m", "dft.train", *CELL]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = None
    for _ in range(600):  # the first holds the cell's lock once its holder record is written
        lock = next((tmp_path / "busy").glob("*/.cell.lock"), None) if (tmp_path / "busy").is_dir() else None
        if lock is not None and lock.read_text():
            break
        time.sleep(0.1)
    assert lock is not None and json.loads(lock.read_text())["pid"] == first.pid
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out1, _ = first.communicate(timeout=600)
    out2 = second.stdout + second.stderr
    assert first.returncode == 0 and second.returncode == 0, out1[-2000:] + out2[-2000:]
    assert f"is already running (pid {first.pid} on {socket.gethostname()} since " in out2
    assert "waiting for it to finish" in out2 and "already finished" in out2
    assert "training SFT" in out1 and "training SFT" not in out2
    cell = _cell(tmp_path)
    assert len(list((cell / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "_stages").glob("*/manifest.json"))) == 1


def test_busy_exit_names_the_cell_and_the_holder(tmp_path, tiny_model):
    from dft.runs import cell_lock

    cell = tmp_path / "busy" / "data=tiny,eval=none,merge=none,model=tiny,strategy.sft.trainer.max_steps=2,strategy=sft"
    with cell_lock(cell, "held-by-test"):
        p = run_train([*CELL, "busy=exit"], tmp_path, check=False, timeout=300)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cell busy/{cell.name} is already running (pid {os.getpid()} on "
                           f"{socket.gethostname()} since "), last
    assert last.endswith("; busy=wait waits for it")
    assert not list(cell.glob("wandb")) and not (cell / "summary.json").exists()


@pytest.mark.parametrize("delay,flag", [(None, "#SBATCH --signal=USR2@120"), (300, "#SBATCH --signal=USR2@300")])
def test_slurm_launcher_asks_for_the_signal_ahead_of_the_limit(tmp_path, monkeypatch, delay, flag):
    from test_slurm import _sbatch_script

    if not shutil.which("srun"):  # submitit's executor looks for srun before writing a script
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
        (tmp_path / "bin" / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    extra = [] if delay is None else [f"launcher.signal_delay_s={delay}"]
    script = _sbatch_script(["launcher=slurm", "launcher.partition=gpu", *extra], tmp_path)
    assert flag in script.splitlines()


SIG_CELL = ["model=tiny", "data=tiny", "strategy=sft", "merge=none", "eval=none", "logger.mode=offline",
            "experiment=sig", "strategy.sft.trainer.max_steps=5", "strategy.sft.trainer.save_steps=50",
            "strategy.sft.trainer.logging_steps=1", "strategy.sft.trainer.lr_scheduler_type=constant",
            "strategy.sft.trainer.warmup_steps=0"]


def _sft(runs: Path) -> tuple[dict, bytes]:
    (cell,) = [p for p in (runs / "sig").iterdir() if p.is_dir() and not p.name.startswith(".")]
    s = json.loads((cell / "summary.json").read_text())
    return s, (cell / "stages" / "sft" / "final" / "model.safetensors").read_bytes()


def wandb_records(path: Path):
    """The protobuf records of a wandb ``run-*.wandb`` file: a 7-byte ``:W&B`` header, then
    LevelDB's log format (32 KiB blocks; each chunk: crc32, 2-byte length, type FULL/FIRST/MIDDLE/
    LAST). Parsed with wandb's own ``Record`` class."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        buf += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def summary_values(offline_run: Path, key: str) -> list[float]:
    """Every update of run-summary key ``key`` in a wandb offline run (transformers' W&B callback
    puts the end-of-training metrics such as ``train_loss`` there)."""
    (f,) = offline_run.glob("run-*.wandb")
    out = []
    for r in wandb_records(f):
        if r.WhichOneof("record_type") == "summary":
            for i in r.summary.update:
                if (i.key or "/".join(i.nested_key)) == key:
                    out.append(json.loads(i.value_json))
    return out


def logged_steps(offline_run: Path) -> list[int]:
    """``train/global_step`` of every training-loss row of a wandb offline run."""
    (f,) = offline_run.glob("run-*.wandb")
    steps = []
    for r in wandb_records(f):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if "train/loss" in items and "train/global_step" in items:
                steps.append(int(json.loads(items["train/global_step"])))
    return steps


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, tiny_model):
    runs = tmp_path_factory.mktemp("sig_ref")
    run_train(SIG_CELL, runs)
    return _sft(runs)


@pytest.mark.parametrize("sig", [pytest.param("TERM"), pytest.param("USR2", marks=pytest.mark.slow)])
def test_preemption_signal_checkpoints_at_the_next_step_and_the_rerun_matches(sig, tmp_path, sft_reference):
    """SIGTERM/SIGUSR2 at step 3 of 5 (no checkpoint is due before step 50): the stage writes
    checkpoint-3 at once and exits 128+signal; the rerun resumes from it (nothing lost but the
    step in flight) and ends bit-identical to an uninterrupted run, with the same train_loss."""
    import signal as sg

    p = run_train([*SIG_CELL, "experiment=sig"], tmp_path, env={"DFT_FAULT": f"step:3:{sig}"}, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 128 + getattr(sg, f"SIG{sig}"), out[-3000:]
    assert f"received SIG{sig}: saving a checkpoint at the next step boundary, then exiting" in out
    (work,) = list((tmp_path / "_stages").glob("*/work"))
    assert sorted(c.name for c in work.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not list(tmp_path.rglob("summary.json"))
    run_train(SIG_CELL, tmp_path)
    s, w = _sft(tmp_path)
    ref_s, ref_w = sft_reference
    assert w == ref_w
    t, ref_t = s["train"]["sft"], ref_s["train"]["sft"]
    assert (t["steps"], t["resumed_from"], t["attempts"]) == (5, "checkpoint-3", 2)
    assert t["train_loss"] == ref_t["train_loss"]
    # one W&B run id for the cell, its two attempts' offline runs
    (cell,) = [c for c in (tmp_path / "sig").iterdir() if c.is_dir() and not c.name.startswith(".")]
    ids = {d.name.rsplit("-", 1)[1] for d in (cell / "wandb").glob("offline-run-*")}
    attempts = sorted((cell / "wandb").glob("offline-run-*"))
    assert len(ids) == 1 and len(attempts) == 2
    # the run's history continues: steps 1-3 in the first attempt, 4-5 in the second (no gap, no repeat)
    assert [logged_steps(a) for a in attempts] == [[1, 2, 3], [4, 5]]
    # W&B's train_loss is the whole run's too (transformers would log the mean over steps 4-5)
    assert summary_values(attempts[1], "train_loss") == [t["train_loss"]]
    resumed = [e["loss"] for e in t["log_history"] if "loss" in e][3:]  # steps 4-5
    assert len(resumed) == 2 and t["train_loss"] != pytest.approx(sum(resumed) / 2, rel=1e-6)


def test_ranks_agree_on_a_preemption_signal_one_of_them_received(tmp_path):
    """Two gloo ranks; only rank 1 receives SIGTERM (at step 3): both ranks' StageCallback ask to save
    and stop at step 3, and both then hold the signal (so both exit after the checkpoint)."""
    code = (
        "import signal, types\n"
        "from transformers import TrainerControl, TrainerState\n"
        "from dft.distributed import init_process_group, destroy_process_group\n"
        "from dft.stages.resume import PreemptionSignals, StageCallback\n"
        "d = init_process_group()\n"
        "sig = PreemptionSignals(); cb = StageCallback(sig)\n"
        "args = types.SimpleNamespace(device='cpu')\n"
        "state = TrainerState(); state.max_steps = 10\n"
        "for step in range(1, 11):\n"
        "    state.global_step = step\n"
        "    if d.rank == 1 and step == 3:\n"
        "        sig.received = int(signal.SIGTERM)\n"
        "    control = cb.on_step_end(args, state, TrainerControl())\n"
        "    if control.should_training_stop:\n"
        "        break\n"
        "print(d.rank, step, control.should_save, sig.received)\n"
        "destroy_process_group()\n"
    )
    outs = run_gloo_ranks(code, str(os.getpid() + 7))
    term = str(int(signal.SIGTERM))
    assert sorted(o.split() for o in outs) == [["0", "3", "True", term], ["1", "3", "True", term]]
