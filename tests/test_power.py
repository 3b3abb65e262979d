"""Power before compute: the dry-run plan and the start banner state the minimum detectable difference."""

from __future__ import annotations

import logging

import pytest

from conftest import compose
from dft import stats as S
from dft.plan import format_cell, format_power, power_plan


def test_power_plan_values_and_line():
    p = power_plan({"mascqa": 20}, {"mascqa": 650})
    b = p["benchmarks"]["mascqa"]
    assert (p["power"], p["alpha"], p["discordance"]) == (0.8, 0.05, 0.3)
    assert b["mdd"] == pytest.approx(S.min_detectable_difference(20, 0.3)) and b["mdd"] == pytest.approx(0.3018, abs=1e-3)
    assert b["n_full"] == 650 and b["mdd_full"] == pytest.approx(0.0600, abs=1e-3)
    assert format_power(p) == ("power: a paired test (80 % power, alpha 0.05, assuming 30 % of items answered "
                               "differently) detects accuracy differences of at least mascqa 30 (20 items) points; "
                               "with every item (eval=full): mascqa 6.0 (650); recipes closer than that are not separable")
    assert power_plan({}) is None and format_power(None) is None


def test_start_banner_and_dry_run_print_the_power_line(tmp_path, caplog, tiny_model):
    from dft.pipeline import Cell

    cfg = compose(["model=tiny", "data=tiny", "eval.max_items=4", "strategy=none", "merge=none", "logger=none",
                   f"paths.stages={tmp_path / '_stages'}"])
    cell = Cell(cfg, tmp_path / "cell", "c")
    cell.check_inputs()
    with caplog.at_level(logging.INFO, logger="dft"):
        cell.print_start(tiny_model)
    sizes = {b: len(v) for b, v in cell.benchmarks.items()}
    assert sizes == {"mascqa": 4, "mmlu_stem": 4, "anatomy_mcq": 4}
    expected = format_power(power_plan(sizes, cell.benchmark_sizes))
    assert "mascqa 50 (4 items)" in expected  # 4 items (tiny data): only a ~50-point difference is detectable
    assert "  " + expected in caplog.messages
    plan_text = format_cell({"experiment": "e", "cell": "c", "model": "tiny", "start": "instruct", "chain": [],
                             "merge": "none", "peft": "lora", "weights": {"start": "w", "partner": None, "missing": []},
                             "stages": [], "merges": [], "evals": [], "gpu_hours": {"to_train": 0, "chain": 0},
                             "assumptions": {"gpu_peak_tflops": 1, "mfu": 0.4, "world_size": 1},
                             "power": power_plan(sizes, cell.benchmark_sizes)})
    assert plan_text.splitlines()[-1] == "  " + expected
