"""``python -m dft.sync``: finished cells only, each once, attempts merged into one run id,
project/entity from the cell's config; against the real ``wandb`` client (offline, --dry-run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def _offline_run(cell: Path, run_id: str, steps: range) -> Path:
    """One real wandb offline run (an attempt) in ``cell``, logging ``train/global_step`` ``steps``."""
    import wandb

    before = set((cell / "wandb").glob("offline-run-*"))
    run = wandb.init(project="ignored", id=run_id, resume="allow", dir=str(cell), mode="offline",
                     reinit="finish_previous")
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    for s in steps:
        run.log({"train/global_step": s, "train/loss": 1.0 / s})
    run.finish()
    (folder,) = set((cell / "wandb").glob("offline-run-*")) - before
    return folder


def _cell(sweep: Path, name: str, *, finished: bool, project="projA", entity="entA") -> Path:
    cell = sweep / name
    cell.mkdir(parents=True)
    (cell / "config.yaml").write_text(f"logger:\n  project: {project}\n  entity: {entity}\n")
    if finished:
        (cell / "summary.json").write_text(json.dumps({"status": "finished", "cell": name}))
    return cell


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from dft.runs import cell_lock

    os.environ["WANDB_SILENT"] = "true"
    root = tmp_path_factory.mktemp("sweep") / "exp"
    a = _cell(root, "a_requeued", finished=True)
    first = _offline_run(a, "aaaa1111", range(1, 4))
    time.sleep(1.2)  # offline folder names carry the start second
    second = _offline_run(a, "aaaa1111", range(4, 7))
    b = _cell(root, "b_unfinished", finished=False)
    _offline_run(b, "bbbb2222", range(1, 3))
    c = _cell(root, "c_running", finished=True)
    _offline_run(c, "cccc3333", range(1, 3))
    _cell(root, "d_no_wandb", finished=True)
    (root / ".submitit").mkdir()
    (root / "_plan").mkdir()
    (root / "report").mkdir()  # what dft.report writes into a sweep: not a cell
    (root / "report" / "report.md").write_text("# report\n")
    return root, (first, second), c, cell_lock


def test_dry_run_with_the_real_client_lists_only_the_finished_cells_runs(sweep, capsys):
    from dft.sync import sync

    root, (first, second), running, cell_lock = sweep
    with cell_lock(running, "held-by-test"):
        rc = sync(root, dry_run=True)
    out = capsys.readouterr().out
    assert rc == 0
    assert "Would sync 2 run(s):" in out  # wandb's own dry-run output: both attempts of cell a
    assert f"{first.name}/run-aaaa1111.wandb" in out and f"{second.name}/run-aaaa1111.wandb" in out
    assert "bbbb2222" not in out.split("skipped:")[0] and "cccc3333.wandb" not in out
    assert "would upload: a_requeued -> entA/projA run aaaa1111 (2 offline run(s))" in out
    assert "skipped: b_unfinished: not finished (no finished summary.json)" in out
    assert f"skipped: c_running: running now (pid {os.getpid()} on " in out
    assert "skipped: d_no_wandb: no offline W&B run (logged online, or logger disabled)" in out
    assert "1 cell(s) would upload, 3 skipped" in out and "report" not in out
    assert not (root / "a_requeued" / "wandb" / ".dft-synced.json").exists()  # a dry run marks nothing


def test_upload_once_into_one_id_with_the_cells_project(sweep, capsys):
    from dft.sync import sync

    root, (first, second), running, _ = sweep
    calls = []

    def runner(cmd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert sync(root, runner=runner) == 0
    cmd_a = [c for c in calls if str(first) in c]
    assert len(cmd_a) == 1
    assert cmd_a[0][1:] == ["-m", "wandb", "sync", "--id", "aaaa1111", "--project", "projA", "--entity", "entA",
                            str(first), str(second)]  # attempts in order of start, into one run
    marker = json.loads((root / "a_requeued" / "wandb" / ".dft-synced.json").read_text())
    assert marker["folders"] == [first.name, second.name] and marker["run_id"] == "aaaa1111"
    # the not-running finished cell c is uploaded too now; the unfinished one never
    assert not any("bbbb2222" in " ".join(c) for c in calls)
    capsys.readouterr()
    calls.clear()
    assert sync(root, runner=runner) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "skipped: a_requeued: already uploaded (2 offline run(s), wandb/.dft-synced.json)" in out


def test_cli_names_a_missing_sweep(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dft.sync", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {tmp_path / 'nope'} is not a sweep folder (runs/<experiment>)"
