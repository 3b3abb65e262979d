"""Sweeps do not mix: each multirun has its own folder, failed or dry-run cells leave no folder,
and the report lists the cell folders it could not read."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CACHE, ROOT

TINY = ["model=tiny", "data=tiny", "merge=none", "eval=none", "logger=none"]


def _train(args, runs, timeout=300):
    env = dict(os.environ, DFT_RUNS=str(runs), DFT_CACHE=str(CACHE))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DFT_SWEEP_NAME", None)
    return subprocess.run([sys.executable, "-m", "dft.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_sweep_name_is_the_sorted_overrides_without_excluded_keys():
    from dft.train import sweep_name

    assert sweep_name(["strategy=dpo,orpo", "model=smollm2_135m", "launcher=slurm", "launcher.partition=gpu"],
                      ["launcher", "launcher.partition"]) == "model=smollm2_135m,strategy=dpo,orpo"
    assert sweep_name([], []) == "default"
    assert sweep_name(["eval=[quick,chat]"]) == "eval=_quick,chat_"


def test_a_multirun_without_experiment_gets_its_own_folder_and_dry_run_cells_leave_none(tmp_path):
    p = _train(["-m", *TINY, "strategy=sft,dpo", "dry_run=true"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    name = "data=tiny,eval=none,merge=none,model=tiny,strategy=sft,dpo"
    assert f"sweep folder: {tmp_path / name} (named after the overrides" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == [name]  # not runs/default
    sweep = tmp_path / name
    # the plans are there; no cell folder (a dry run trains nothing, so Hydra's folder is removed)
    assert sorted(x.name for x in sweep.iterdir()) == [".plan", "multirun.yaml"]
    assert len(list((sweep / ".plan").glob("*.json"))) == 3  # two cells + _grid.json
    plan = json.loads((sweep / ".plan" / "data=tiny,eval=none,merge=none,model=tiny,strategy=sft.json").read_text())
    assert plan["experiment"] == name
    # an explicit experiment= still wins, and a grid's own experiment too
    q = _train(["-m", *TINY, "strategy=sft", "dry_run=true", "experiment=mine"], tmp_path)
    assert q.returncode == 0 and (tmp_path / "mine" / ".plan").is_dir(), q.stderr[-2000:]
    assert "sweep folder:" not in q.stderr


def test_a_cell_that_fails_its_checks_leaves_no_folder(tmp_path):
    p = _train([*TINY, "strategy=cpt", "data.text=null"], tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == ("error: stage 'cpt' needs data.text, but domain 'tiny' has none "
                                                 "(set data.text=<file>)")
    assert list(tmp_path.iterdir()) == []  # neither runs/default/<cell> nor runs/default


def test_remove_if_unused_keeps_folders_with_results(tmp_path):
    from dft.train import remove_if_unused

    hydra_only = tmp_path / "a" / "c1"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / "train.log").write_text("x")
    started = tmp_path / "a" / "c2"
    (started / ".hydra").mkdir(parents=True)
    (started / "meta.json").write_text("{}")
    assert remove_if_unused(hydra_only) and not hydra_only.exists()
    assert not remove_if_unused(started) and started.exists()
    assert (tmp_path / "a").exists()  # the sweep folder still holds c2


def _sweep_builder():
    spec = importlib.util.spec_from_file_location("sweep_builder", ROOT / "tests" / "fixtures" / "sweep_builder.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    return sb


def test_report_lists_the_cells_it_skipped_and_why(tmp_path):
    from dft import analysis
    from dft.report import build_report

    sweep = _sweep_builder().write_sweep(tmp_path, "grid")
    (sweep / "never" / ".hydra").mkdir(parents=True)
    (sweep / "started" / ".hydra").mkdir(parents=True)
    (sweep / "started" / "meta.json").write_text("{}")
    (sweep / "broken" / ".hydra").mkdir(parents=True)
    (sweep / "broken" / "traceback.txt").write_text("Traceback (most recent call last):\n  ...\n"
                                                    "ValueError: Invalid learning rate: -1\n")
    (sweep / "_stages" / "abc" / ".hydra").mkdir(parents=True)  # the stage cache is no cell
    assert analysis.skipped_cells(sweep) == [
        {"cell": "broken", "reason": "failed: ValueError: Invalid learning rate: -1"},
        {"cell": "never", "reason": "never ran (only Hydra's files: failed its checks before starting)"},
        {"cell": "started", "reason": "started, no summary.json (still running, interrupted or killed; see its log)"},
    ]
    text = build_report([sweep], tmp_path / "out", progress=False).read_text()
    assert "**3 cell folder(s) without `summary.json` are not in this report:**" in text
    assert "| grid | `broken` | failed: ValueError: Invalid learning rate: -1 |" in text


def test_find_sweeps_skips_the_stage_cache_and_plans(tmp_path):
    """What compare_sweeps.ipynb compares when not told: ``_stages`` sorts first but is no sweep."""
    from dft import analysis

    sb = _sweep_builder()
    b, a = sb.write_sweep(tmp_path, "b_grid"), sb.write_sweep(tmp_path, "a_grid")
    (tmp_path / "_stages" / "x").mkdir(parents=True)
    (tmp_path / "_stages" / "x" / "summary.json").write_text("{}")
    (tmp_path / ".plan").mkdir()
    (tmp_path / "empty_sweep" / "cell" / ".hydra").mkdir(parents=True)
    assert analysis.find_sweeps(tmp_path) == [a, b]
    nb = (ROOT / "notebooks" / "compare_sweeps.ipynb").read_text()
    assert "A.find_sweeps(" in nb and '(dft.ROOT / \\"runs\\").glob' not in nb


def test_synergy_points_are_labelled_and_coincident_ones_share_a_label():
    import pandas as pd

    from dft import analysis

    syn = pd.DataFrame([
        {"sweep": "g", "family": "llama", "start": "base", "strategy": "cpt_sft", "metric": "mascqa/acc",
         "expected": 0.40, "merged_score": 0.45},
        {"sweep": "g", "family": "llama", "start": "base", "strategy": "cpt_sft_dpo", "metric": "mascqa/acc",
         "expected": 0.40, "merged_score": 0.45},
        {"sweep": "g", "family": "llama", "start": "instruct", "strategy": "cpt", "metric": "mascqa/acc",
         "expected": 0.30, "merged_score": 0.25},
    ])
    fig = analysis.plot_synergy(syn)
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["cpt (instruct)", "cpt_sft (base), cpt_sft_dpo (base)"]


def test_resubmitting_a_finished_sweep_submits_nothing(tmp_path):
    """launcher=submitit_local goes through the same submission code as SLURM: cells whose
    summary.json says finished are not queued (their jobs would only print "already finished")."""
    cells = ["data=tiny,eval=none,merge=none,model=tiny,seed=1,strategy=sft",
             "data=tiny,eval=none,merge=none,model=tiny,seed=2,strategy=sft"]
    for c in cells:
        (tmp_path / "fin" / c).mkdir(parents=True)
        (tmp_path / "fin" / c / "summary.json").write_text(json.dumps({"status": "finished"}))
    p = _train(["-m", *TINY, "strategy=sft", "seed=1,2", "launcher=submitit_local", "experiment=fin"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    for c in cells:
        assert f"/fin/{c}/summary.json): not submitted (force=true recomputes it)" in log, log[-3000:]
    assert "every cell of this sweep has finished; nothing submitted" in log
    assert not (tmp_path / "fin" / ".submitit").exists() or not any((tmp_path / "fin" / ".submitit").iterdir())
