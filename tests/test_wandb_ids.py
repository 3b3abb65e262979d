"""W&B run ids: unique per run root and attempt, kept across a requeue (dft.tracking.run_id)."""

from __future__ import annotations

import hashlib
import json


def test_ids_differ_across_run_roots_and_stay_for_a_rerun(tmp_path, monkeypatch):
    from dft.tracking import run_id

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    a = tmp_path / "runs_a" / "grid" / "strategy=sft"
    b = tmp_path / "runs_b" / "grid" / "strategy=sft"  # same experiment and cell, another run root
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    ida, idb = run_id(a), run_id(b)
    assert ida == hashlib.sha256(f"{a.resolve()}#0".encode()).hexdigest()[:16]
    assert ida != idb
    assert run_id(a) == ida  # a rerun of the unfinished cell continues its run
    assert json.loads((a / "wandb_run.json").read_text()) == {"id": ida, "attempt": 0, "slurm_job_id": None}


def test_force_starts_a_new_attempt_but_a_requeue_keeps_it(tmp_path, monkeypatch):
    from dft.tracking import run_id

    cell = tmp_path / "grid" / "seed=1"
    cell.mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    first = run_id(cell)
    assert run_id(cell) == first  # requeued job 100, no force
    # force=true inside job 100, which made the stored attempt: a requeue of that job keeps its id
    assert run_id(cell, force=True) == first
    monkeypatch.setenv("SLURM_JOB_ID", "200")  # a new submission with force=true: attempt 1
    second = run_id(cell, force=True)
    assert second == hashlib.sha256(f"{cell.resolve()}#1".encode()).hexdigest()[:16] and second != first
    assert run_id(cell, force=True) == second  # job 200 requeued: same attempt
    monkeypatch.delenv("SLURM_JOB_ID")
    third = run_id(cell, force=True)  # a local force=true rerun: attempt 2
    assert third == hashlib.sha256(f"{cell.resolve()}#2".encode()).hexdigest()[:16]
    assert run_id(cell) == third  # and a plain rerun continues it
