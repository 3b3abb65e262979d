"""Budgets: the paper grids train by epochs (conf/grid/recipe/paper.yaml), and a hub-model cell left
with the CPU demo step budgets of conf/stage/*.yaml says so in its plan and start banner."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from conftest import compose


def _grid_cell(grid: str, model: str, strategy: str):
    return compose([f"grid={grid}", f"grid/model={model}", f"strategy={strategy}", "merge=slerp"])


def test_hub_model_with_stage_defaults_is_flagged():
    from dft.plan import demo_budgets

    assert demo_budgets(compose(["model=llama3_1_8b", "strategy=dpo"])) == ["dpo max_steps=6"]
    assert demo_budgets(compose(["model=mistral_7b_v0_3", "strategy=cpt_sft",
                                 "strategy.sft.trainer.max_steps=500"])) == ["cpt max_steps=12"]
    assert demo_budgets(compose([])) == []  # the embedded model: what the demo budgets are for
    assert demo_budgets(compose(["model=tiny", "strategy=sft"])) == []
    for grid, model in [("paper_llama", "llama3_1_8b"), ("paper_mistral", "mistral_7b_v0_3_instruct"),
                        ("paper_smol", "smollm_1_7b"), ("paper_all", "smollm_1_7b_instruct")]:
        assert demo_budgets(_grid_cell(grid, model, "cpt_sft_orpo")) == []
        assert demo_budgets(_grid_cell(grid, model, "cpt_sft_dpo")) == []


@pytest.mark.parametrize("grid,model", [("paper_llama", "llama3_1_8b"), ("paper_mistral", "mistral_7b_v0_3"),
                                        ("paper_smol", "smollm_1_7b_instruct")])
def test_paper_grids_train_by_epochs_over_the_whole_data(grid, model, tmp_path):
    """DPO of the paper recipe: 3 epochs of every pair at an effective batch of 2 x 4 = 8, at the
    family's context length; the plan's step count is ceil(3 * pairs / 8), not the demo's 6."""
    from dft.data import load_split
    from dft.plan import estimate_stage
    from dft.stages import build_trl_config

    cfg = _grid_cell(grid, model, "cpt_sft_dpo")
    t = cfg.strategy.dpo.trainer
    assert (t.max_steps, t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (-1, 3, 2, 4)
    assert t.max_length == cfg.model.max_length == 2048
    rows = load_split(cfg.data, "preference")
    args = build_trl_config("dpo", dict(t), output_dir=str(tmp_path), device="cpu", peft_cfg=cfg.peft,
                            model_cfg=cfg.model, report_to="none", seed=1)
    est = estimate_stage("dpo", args, rows, cfg, cfg.model.params_b * 1e9)
    assert est["steps"] == math.ceil(3 * len(rows) / 8) and est["steps"] > 100
    assert est["gpu_hours"] > 100 * 7.97e-05  # the demo budget's estimate for an 8B DPO cell


def test_start_banner_warns_about_the_demo_budget(tmp_path, caplog):
    from dft.pipeline import Cell

    cfg = compose(["model=llama3_1_8b", "strategy=cpt_sft", "device=cpu"])
    with caplog.at_level(logging.INFO, logger="dft"):
        Cell(cfg, tmp_path, "cell").print_start(Path(tmp_path))
    assert ("  WARNING: CPU demo budget on hub model llama3_1_8b: cpt max_steps=12, sft max_steps=10 (conf/stage/*.yaml, "
            "minutes on 2 CPU cores); for the paper's budgets use grid=paper_<family>, or set "
            "strategy.<stage>.trainer.max_steps=-1 and num_train_epochs") in caplog.messages
