"""``python -m dft.train`` ends every failure in one line on stderr, with exit status 2 (130 for Ctrl-C).

Each test runs the command as a user would (no ``HYDRA_FULL_ERROR``) and asserts the last stderr
line, the exit status and that no traceback was printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CACHE, ROOT

TINY = ["model=tiny", "data=tiny", "merge=none", "eval=none", "logger=none"]


def _env(runs: Path) -> dict:
    env = dict(os.environ, DFT_RUNS=str(runs), DFT_CACHE=str(CACHE))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _train(args: list[str], runs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft.train", *args], cwd=ROOT, env=_env(runs), capture_output=True,
                          text=True, timeout=timeout)


def _last(p) -> str:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("override,message,absent", [
    pytest.param("strategy=dpoo",
                 "error: strategy=dpoo: no option 'dpoo' in config group 'strategy'; choose one of: cpt, cpt_dpo, "
                 "cpt_orpo, cpt_sft, cpt_sft_dpo, cpt_sft_orpo, dpo, none, orpo, sft, sft_dpo, sft_orpo",
                 "Traceback", id="typo_in_group_option_lists_the_choices"),
    pytest.param("strategy.sft.lerning_rate=1e-4",
                 "error: unknown key strategy.sft.lerning_rate: strategy.sft (StageConfig) has only kind, "
                 "max_samples, truncation, nll_over, trainer",
                 "+strategy", id="unknown_typed_key_names_the_valid_keys_without_the_plus_hint"),
    pytest.param("strategy=dpo,orpo",
                 "error: ConfigCompositionException: Ambiguous value for argument 'strategy=dpo,orpo'; "
                 "to sweep over the values, add -m (--multirun)",
                 "Traceback", id="a_sweep_without_-m_says_to_add_it"),
])
def test_compose_error_is_one_line(override, message, absent, tmp_path):
    """A bad override ends in exactly one stderr line, exit status 2, without what must not be there
    (a traceback; for a typed key, the ``+key`` hint that only pass-through dicts take)."""
    p = _train([override], tmp_path)
    assert p.returncode == 2
    assert _last(p) == message
    assert absent not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_unknown_trl_field_says_how_to_add_it(tmp_path):
    """Under ``strategy.<stage>.trainer`` (a pass-through dict) ``+`` is the documented way to add a field."""
    p = _train(["strategy.sft.trainer.neftune_noise_alpha=5"], tmp_path)
    assert p.returncode == 2
    assert _last(p).startswith("error: unknown key strategy.sft.trainer.neftune_noise_alpha: the YAML does not set "
                               "it; add a new key with +strategy.sft.trainer.neftune_noise_alpha=5 ")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_wrong_type_is_one_line(tmp_path):
    p = _train(["peft.r=abc"], tmp_path)
    assert p.returncode == 2
    assert _last(p) == "error: peft.r: Value 'abc' of type 'str' could not be converted to Integer"


def test_exception_inside_a_cell_is_one_line_and_the_traceback_goes_to_a_file(tmp_path):
    """A value only the trainer rejects (here a negative learning rate, which torch's optimiser
    refuses) ends in one line naming the cell; the traceback is kept in the run dir."""
    p = _train(TINY + ["strategy=sft", "strategy.sft.trainer.max_steps=1", "strategy.sft.trainer.learning_rate=-1"],
               tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    last = _last(p)
    assert last.startswith("error: "), p.stderr[-3000:]
    assert "Traceback (most recent call last)" not in p.stderr, p.stderr[-3000:]
    if "traceback: " in last:  # an exception dft does not check itself: its traceback is in the cell's folder
        where = Path(last.rsplit("traceback: ", 1)[1].rstrip(")"))
        assert where.is_file() and "Traceback (most recent call last)" in where.read_text()
        assert "learning rate" in last.lower()


def _start(args: list[str], runs: Path) -> tuple[subprocess.Popen, list[str], list[str]]:
    """Start dft.train; collect its stdout (the log) and stderr lines in threads (no pipe fills)."""
    proc = subprocess.Popen([sys.executable, "-m", "dft.train", *args], cwd=ROOT, env=_env(runs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    lines: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return proc, out, lines


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in ln for ln in lines):
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n" + "".join(lines)[-3000:]
        time.sleep(0.2)


def _stderr_of(lines: list[str]) -> tuple[str, str]:
    """The ended process's stderr and its last non-empty line (after a moment for the reader thread)."""
    time.sleep(0.5)
    err = "".join(lines)
    return err, next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")


def test_ctrl_c_during_a_stage_is_one_line_exit_130_saying_it_restarts_from_step_0(tmp_path):
    args = TINY + ["strategy=sft", "strategy.sft.trainer.max_steps=100000", "strategy.sft.trainer.save_steps=50000"]
    proc, out, lines = _start(args, tmp_path)
    try:
        _wait_for(out, "trainable /", proc)  # dft.stages logs it right before trainer.train()
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err, last = _stderr_of(lines)
    assert proc.returncode == 130, err[-3000:]
    assert last.startswith("error: interrupted (Ctrl-C) in cell data=tiny,"), err[-3000:]
    assert last.endswith("while training stage sft before its first checkpoint (save_steps=50000): a rerun "
                         "restarts this stage from step 0"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def _pids_of(pattern: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if pattern in cmd:
                out.append(int(d.name))
    return out


def test_killed_cell_of_a_submitit_sweep_ends_in_one_line_naming_it(tmp_path):
    """``launcher=submitit_local`` goes through the same waiting code as SLURM: a SIGKILLed cell
    (as the OOM killer would) ends the submitting process with one line naming the cell, status 2."""
    args = ["-m", *TINY, "strategy=sft", "launcher=submitit_local", "launcher.cpus_per_task=1", "experiment=kill",
            "strategy.sft.trainer.max_steps=100000", "strategy.sft.trainer.save_steps=50000"]
    proc, _, lines = _start(args, tmp_path)
    try:
        deadline = time.monotonic() + 180
        pids: list[int] = []
        while not pids:
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "the cell never started"
            time.sleep(0.5)
            pids = [p for p in _pids_of("submitit.core._submit") if str(tmp_path) in
                    (Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode())]
        time.sleep(3)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err, last = _stderr_of(lines)
    assert proc.returncode == 2, err[-3000:]
    assert last.startswith("error: cell #0 'model=tiny data=tiny "), err[-3000:]
    assert "strategy.sft.trainer.max_steps=100000" in last, last
    assert "failed (job " in last and "_log.err" in last, last
    assert "Traceback (most recent call last)" not in err, err[-3000:]


def test_bitsandbytes_optional_kernel_warning_is_silenced():
    """Importing dft before bitsandbytes (as every dft entry point and bootstrap.sh's check do) keeps
    bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line off stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", "import dft, peft, bitsandbytes.functional"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "gemm_4bit_forward" not in p.stderr and "publisher trust" not in p.stderr, p.stderr[-2000:]
