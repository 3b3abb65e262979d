"""Missing weights: every missing model at once, before anything starts; a dry run whose cells
cannot run exits non-zero saying so (issue 22, item 8)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import CACHE, ROOT


def _train(args, tmp_path, timeout=300):
    env = dict(os.environ, DFT_RUNS=str(tmp_path / "runs"), DFT_CACHE=str(CACHE), HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(tmp_path / "hub"))  # an empty hub cache: no 7-8B weights
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "dft.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_sweep_reports_every_missing_model_at_once_before_starting(tmp_path):
    p = _train(["-m", "model=llama3_1_8b,mistral_7b_v0_3,tiny", "data=tiny", "strategy=sft", "merge=none,slerp",
                "eval=none", "logger=none"], tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "error: 4 of the 6 cells cannot run on this machine: no weights for meta-llama/Llama-3.1-8B, "
        "meta-llama/Llama-3.1-8B-Instruct, mistralai/Mistral-7B-Instruct-v0.3, mistralai/Mistral-7B-v0.3 "
        "(HF_HUB_OFFLINE=1: nothing is downloaded); nothing was started")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("meta.json"))


def test_a_single_cell_names_model_and_partner_together(tmp_path):
    p = _train(["model=llama3_1_8b", "data=tiny", "strategy=sft", "eval=none", "logger=none"], tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "error: no weights on this machine for model llama3_1_8b: meta-llama/Llama-3.1-8B, "
        "meta-llama/Llama-3.1-8B-Instruct; set model.path / model.partner_path to local copies, or allow downloads "
        "(unset HF_HUB_OFFLINE)")


def test_a_dry_run_whose_cells_cannot_run_exits_2_after_the_plan(tmp_path):
    p = _train(["-m", "model=llama3_1_8b,tiny", "data=tiny", "strategy=sft", "merge=none", "eval=none",
                "logger=none", "dry_run=true"], tmp_path)
    assert "dry-run plan of" in p.stdout and ": 2 cells" in p.stdout, p.stderr[-3000:]
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == ("error: 1 of 2 cell(s) cannot run on this machine: no weights for "
                                                 "meta-llama/Llama-3.1-8B (HF_HUB_OFFLINE=1: nothing is downloaded)")
    # a single-cell dry run: the plan, then the same in one line
    q = _train(["model=mistral_7b_v0_3", "data=tiny", "strategy=sft", "eval=none", "logger=none", "dry_run=true"],
               tmp_path)
    assert q.returncode == 2 and "dry run " in q.stdout
    assert q.stderr.strip().splitlines()[-1] == (
        "error: this cell cannot run on this machine: no weights for mistralai/Mistral-7B-v0.3, "
        "mistralai/Mistral-7B-Instruct-v0.3 (the plan above is provisional)")
