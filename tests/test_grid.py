"""The grid as one sweep: the stage cache across cells, its invalidation, concurrency and repair,
dry-run plans, and the paper grids of ``conf/grid/``.

Every training here is the tiny random model (``model=tiny data=tiny``), one step per stage.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CACHE, PAPER_DEMO, ROOT, compose, run_train

STAGES = ("cpt", "sft", "dpo", "orpo")
ONE_STEP = [f"strategy.{s}.trainer.max_steps=1" for s in STAGES]
BASE = ["model=tiny", "data=tiny", "eval=none", "logger=none", *ONE_STEP]
CHAINS = "strategy=cpt,cpt_sft,cpt_sft_dpo,cpt_sft_orpo"


def summaries(runs: Path, experiment: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((runs / experiment).glob("*/summary.json"))]


def trained(sums: list[dict]) -> list[str]:
    """Artefacts whose stage was trained (not taken from the cache) in these cells."""
    return sorted(a for s in sums for a, f in s["train"].items() if not f["cached"])


def manifests(runs: Path) -> dict[str, dict]:
    """Stage-cache entries (not merges, not evaluations) by key."""
    out = {}
    for p in (runs / "_stages").glob("*/manifest.json"):
        m = json.loads(p.read_text())
        if "train" in m:
            out[m["key"]] = m
    return out


def keys(s: dict) -> dict[str, str]:
    return {a["name"]: a["key"] for a in s["artefacts"]}


@pytest.fixture(scope="module")
def grid4(tmp_path_factory, tiny_model):
    """The 4-cell grid strategy=cpt,cpt_sft,cpt_sft_dpo,cpt_sft_orpo merge=none, trained once."""
    runs = tmp_path_factory.mktemp("grid4")
    run_train(["-m", CHAINS, "merge=none", *BASE, "experiment=g4"], runs)
    return runs


def test_grid_trains_each_distinct_stage_once(grid4):
    sums = summaries(grid4, "g4")
    assert len(sums) == 4
    # 1 + 2 + 3 + 3 = 9 stage artefacts across the cells, 4 distinct: cpt, sft, dpo, orpo
    assert sum(len(s["train"]) for s in sums) == 9
    assert trained(sums) == ["cpt", "cpt_sft", "cpt_sft_dpo", "cpt_sft_orpo"]
    assert sum(s["cache"]["trained"] for s in sums) == 4
    assert len(manifests(grid4)) == 4
    # every cell that has cpt_sft points at the same cache entry
    by_key = {keys(s)["cpt_sft"] for s in sums if "cpt_sft" in keys(s)}
    assert len(by_key) == 1


def test_second_run_trains_nothing(grid4):
    before = {k: (grid4 / "_stages" / k / "manifest.json").stat().st_mtime_ns for k in manifests(grid4)}
    # the same grid again: every cell is finished and exits early
    p = run_train(["-m", CHAINS, "merge=none", *BASE, "experiment=g4"], grid4)
    assert (p.stdout + p.stderr).count("already finished") == 4
    # the same grid as new cells (another experiment): every stage comes from the cache
    run_train(["-m", CHAINS, "merge=none", *BASE, "experiment=g4_again"], grid4)
    sums = summaries(grid4, "g4_again")
    assert len(sums) == 4 and trained(sums) == []
    assert sum(s["cache"]["reused"] for s in sums) == 9
    after = {k: (grid4 / "_stages" / k / "manifest.json").stat().st_mtime_ns for k in manifests(grid4)}
    assert after == before
    assert [keys(s) for s in sums] == [keys(s) for s in summaries(grid4, "g4")]


def test_changing_the_sft_learning_rate_retrains_sft_and_later_not_cpt(grid4):
    run_train(["strategy=cpt_sft_dpo", "merge=none", *BASE, "strategy.sft.trainer.learning_rate=1e-3",
               "experiment=lr"], grid4)
    (s,) = summaries(grid4, "lr")
    assert trained([s]) == ["cpt_sft", "cpt_sft_dpo"]
    old = next(keys(x) for x in summaries(grid4, "g4") if x["strategy"] == "cpt_sft_dpo")
    new = keys(s)
    assert new["cpt"] == old["cpt"]
    assert new["cpt_sft"] != old["cpt_sft"] and new["cpt_sft_dpo"] != old["cpt_sft_dpo"]
    assert len(manifests(grid4)) == 6


def test_dry_run_plans_match_the_trained_keys(grid4):
    """After training, a dry run of the same grid finds every stage cached, under the same keys."""
    p = run_train(["-m", CHAINS, "merge=none", *BASE, "experiment=g4", "dry_run=true"], grid4)
    assert "distinct stages: 4 (0 to train, 4 cached)" in p.stdout
    for s in summaries(grid4, "g4"):
        plan = json.loads((grid4 / "g4" / ".plan" / f"{s['cell']}.json").read_text())
        assert {st["artefact"]: st["key"] for st in plan["stages"]} == {k: v for k, v in keys(s).items() if k != "start"}
        assert all(st["cached"] for st in plan["stages"]) and plan["gpu_hours"]["to_train"] == 0


def test_force_recomputes_a_finished_cell_and_its_stages(grid4):
    (cell,) = [s for s in summaries(grid4, "g4") if s["strategy"] == "cpt"]
    key = keys(cell)["cpt"]
    before = (grid4 / "_stages" / key / "manifest.json").stat().st_mtime_ns
    run_train(["strategy=cpt", "merge=none", *BASE, "experiment=g4", "force=true"], grid4)
    (again,) = [s for s in summaries(grid4, "g4") if s["strategy"] == "cpt"]
    assert trained([again]) == ["cpt"] and keys(again)["cpt"] == key and again["finished_at"] > cell["finished_at"]
    assert (grid4 / "_stages" / key / "manifest.json").stat().st_mtime_ns > before


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, tiny_model):
    p = run_train(["-m", CHAINS, "merge=none,slerp", *BASE, "experiment=dry", "dry_run=true"], tmp_path)
    out = p.stdout
    assert "dry-run plan of" in out and "8 cells" in out
    assert "distinct stages: 4 (4 to train, 0 cached); a grid without the stage cache would train 18" in out
    assert "merges: 4 distinct (4 to run)" in out
    assert "GPU-hours to train:" in out and "k*N*tokens" in out
    plans = sorted((tmp_path / "dry" / ".plan").glob("*.json"))
    assert len([q for q in plans if q.name != "_grid.json"]) == 8
    grid = json.loads((tmp_path / "dry" / ".plan" / "_grid.json").read_text())
    assert grid["distinct_stages"] == 4 and grid["stage_runs_per_cell"] == 18 and grid["gpu_hours_to_train"] > 0
    plan = json.loads(next(q for q in plans if "cpt_sft_dpo" in q.name and "slerp" in q.name).read_text())
    dpo = plan["stages"][-1]
    # the estimate's inputs: 1 step x batch 1 x (chosen + rejected), 8 FLOPs/param/token (LoRA + grad ckpt + reference)
    assert dpo["steps"] == 1 and dpo["batch"] == 1 and dpo["k"] == 8
    assert dpo["gpu_hours"] == pytest.approx(8 * 3.2e6 * dpo["tokens"] / (989e12 * 0.35) / 3600, rel=0.02)
    assert plan["mergekit_config"] == "valid" and plan["merges"][0]["artefact"] == "cpt_sft_dpo+slerp"
    # nothing trained, merged or evaluated; no run directory has a summary
    assert not (tmp_path / "_stages").exists() or not list((tmp_path / "_stages").rglob("manifest.json"))
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.rglob("checkpoint-*"))
    # the table again, from the files
    q = subprocess.run([sys.executable, "-m", "dft.plan", str(tmp_path / "dry")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert q.returncode == 0 and "distinct stages: 4 (4 to train" in q.stdout


def test_a_dry_run_lists_every_invalid_cell_and_fails(tmp_path, tiny_model):
    p = run_train(["-m", "strategy=cpt,cpt_sft_dpo,cpt_sft_orpo", "merge=none", *BASE, "experiment=bad", "dry_run=true",
                   "+strategy.dpo.trainer.no_such_field=1", "+strategy.orpo.trainer.no_such_field=1"], tmp_path, check=False)
    assert p.returncode == 2
    errors = [ln for ln in p.stdout.splitlines() if ln.startswith("! error in cell")]
    assert len(errors) == 2 and all("trainer.no_such_field is not a field of" in e for e in errors)
    assert "distinct stages: 1 (1 to train" in p.stdout   # the valid cell (cpt) is still planned
    assert "2 cell(s) of the grid have invalid configs" in p.stderr


def _popen(args: list[str], runs: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, DFT_RUNS=str(runs), DFT_CACHE=str(CACHE), HYDRA_FULL_ERROR="1")
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "dft.train", *args], cwd=ROOT, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, text=True)


def _waiters(lock: Path, pids: set[int]) -> set[int]:
    """Processes of ``pids`` blocked on the flock of ``lock`` (from /proc/locks)."""
    ino = f":{lock.stat().st_ino}"
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) > 6 and parts[1] == "->" and parts[6].endswith(ino) and int(parts[5]) in pids:
            out.add(int(parts[5]))
    return out


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks to see blocked flock waiters")
def test_two_processes_wanting_the_same_stage_train_it_once(tmp_path, tiny_model):
    cell = ["strategy=cpt", "merge=none", *BASE]
    run_train([*cell, "experiment=plan", "dry_run=true"], tmp_path)
    (plan,) = [json.loads(p.read_text()) for p in (tmp_path / "plan" / ".plan").glob("*.json")]
    key = plan["stages"][0]["key"]
    lock = tmp_path / "_stages" / f"{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        # hold the entry's lock so that both cells reach it before either can train
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [_popen([*cell, f"experiment={e}"], tmp_path, tmp_path / f"{e}.log") for e in ("a", "b")]
        pids = {p.pid for p in procs}
        deadline = time.time() + 600
        while _waiters(lock, pids) != pids:
            assert all(p.poll() is None for p in procs), "a cell exited before reaching the stage lock"
            assert time.time() < deadline, "the two cells never both waited on the stage lock"
            time.sleep(0.5)
        fcntl.flock(held, fcntl.LOCK_UN)
    for p in procs:
        assert p.wait(timeout=900) == 0, (tmp_path / "a.log").read_text()[-3000:] + (tmp_path / "b.log").read_text()[-3000:]
    sums = summaries(tmp_path, "a") + summaries(tmp_path, "b")
    assert sorted(s["train"]["cpt"]["cached"] for s in sums) == [False, True]
    assert {keys(s)["cpt"] for s in sums} == {key}
    assert list(manifests(tmp_path)) == [key]
    entries = {(tmp_path / e / s["cell"] / "stages" / "cpt").resolve() for e, s in zip("ab", sums)}
    assert entries == {(tmp_path / "_stages" / key).resolve()}
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert logs.count("another cell trained it meanwhile; reusing") == 1


def test_a_truncated_cache_entry_is_retrained(tmp_path, tiny_model):
    cell = ["strategy=cpt", "merge=none", *BASE]
    run_train([*cell, "experiment=one"], tmp_path)
    (key,) = manifests(tmp_path)
    weights = tmp_path / "_stages" / key / "final" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    run_train([*cell, "experiment=two"], tmp_path)
    (s,) = summaries(tmp_path, "two")
    assert trained([s]) == ["cpt"] and keys(s)["cpt"] == key
    assert weights.stat().st_size == size
    assert json.loads((tmp_path / "_stages" / key / "manifest.json").read_text())["files"]["model.safetensors"] == size


# ------------------------------------------------------------------------------- conf/grid
def _sweep(grid: str) -> list[list[str]]:
    """The cells of ``grid``: the cartesian product of its hydra.sweeper.params, as override lists."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import dft.train  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"grid={grid}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [[f"grid={grid}", *combo] for combo in itertools.product(*axes)]


@pytest.mark.parametrize("grid,n", [("paper_all", 48), ("paper_demo", 8)])
def test_every_cell_of_the_paper_grids_composes_and_its_configs_build(grid, n):
    """Every cell composes and validates; every (model, stage) TRL config and the mergekit config build."""
    from omegaconf import OmegaConf

    from dft.config import validate
    from dft.merging import build_merge_config
    from dft.stages import build_trl_config

    cells = _sweep(grid)
    assert len(cells) == n
    seen, models, starts = set(), set(), set()
    for ov in cells:
        cfg = compose(ov)
        validate(cfg)
        assert cfg.experiment == grid and cfg.data.name == "materials"
        assert list(cfg.strategy.chain) in (["cpt"], ["cpt", "sft"], ["cpt", "sft", "dpo"], ["cpt", "sft", "orpo"])
        models.add(cfg.model.name)
        starts.add(cfg.model.start)
        for stage in cfg.strategy.chain:
            if (cfg.model.name, stage) not in seen:
                seen.add((cfg.model.name, stage))
                build_trl_config(stage, OmegaConf.to_container(cfg.strategy[stage].trainer, resolve=True),
                                 output_dir="/tmp/dft-grid-test", device="cpu", peft_cfg=cfg.peft,
                                 model_cfg=cfg.model, report_to="none", seed=cfg.seed)
        if cfg.merge.method != "none":
            build_merge_config(cfg.merge, "/models/finetuned", cfg.model.partner or cfg.model.hub_id)
    if grid == "paper_demo":
        assert models == {"smollm2_135m"} and starts == {"instruct"}
    else:
        assert starts == {"base", "instruct"} and len(models) == 6


def test_the_family_grids_are_16_cell_slices_of_paper_all():
    everything = {tuple(sorted(c[1:])) for c in _sweep("paper_all")}
    families = set()
    for fam in ("paper_llama", "paper_mistral", "paper_smol"):
        cells = {tuple(sorted(c[1:])) for c in _sweep(fam)}
        assert len(cells) == 16 and cells <= everything
        families |= cells
    assert families == everything


def test_paper_all_cells_are_the_family_grids_cells():
    """A cell of paper_all resolves to the same config as in its family grid: same stage cache entries."""
    from omegaconf import OmegaConf

    def resolved(ov):
        c = OmegaConf.to_container(compose(ov), resolve=True)
        return {k: c[k] for k in ("model", "strategy", "peft", "merge", "data", "eval", "seed")}

    for fam, model in [("paper_llama", "llama3_1_8b"), ("paper_mistral", "mistral_7b_v0_3_instruct"),
                       ("paper_smol", "smollm_1_7b")]:
        for strat in ("cpt_sft_dpo", "cpt_sft_orpo"):
            ov = [f"grid/model={model}", f"strategy={strat}", "merge=slerp"]
            assert resolved(["grid=paper_all", *ov]) == resolved([f"grid={fam}", *ov])


def test_a_paper_grid_plans_without_its_weights(tmp_path):
    """No Llama weights here: the dry run still plans (keys provisional) and never downloads."""
    p = run_train(["-m", "grid=paper_llama", "strategy=cpt_sft_dpo", "dry_run=true", "logger=none"], tmp_path,
                  env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert "dry-run plan of" in p.stdout and "4 cells" in p.stdout
    assert "distinct stages: 6 (6 to train, 0 cached)" in p.stdout   # cpt, sft, dpo for base and instruct
    assert "have no weights on this machine" in p.stdout
    # each model's missing-weights reason in full once, then one short line per cell naming the model
    full = [ln for ln in p.stdout.splitlines() if "cannot load" in ln]
    assert len(full) == len(set(full)) and any("'meta-llama/Llama-3.1-8B'" in ln for ln in full), full
    assert "  ! start: no weights for 'meta-llama/Llama-3.1-8B' (why: above) (keys are provisional" in p.stdout
    grid = json.loads((tmp_path / "paper_llama" / ".plan" / "_grid.json").read_text())
    assert 0 < grid["gpu_hours_all"] < 10
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").rglob("*.safetensors"))


def test_paper_demo_runs_and_reports(paper_demo_local, tmp_path):
    """grid=paper_demo end to end (on the tiny model, one step per stage, 2 items per benchmark).

    The grid's run is conftest's session fixture (tests/test_slurm.py compares it with the same grid
    through SLURM); the dry run and the report write into a copy of it."""
    shutil.copytree(paper_demo_local, tmp_path, symlinks=True, dirs_exist_ok=True)  # stage links are relative
    sums = summaries(tmp_path, "paper_demo")
    assert len(sums) == 8
    assert trained(sums) == ["cpt", "cpt_sft", "cpt_sft_dpo", "cpt_sft_orpo"]
    assert {s["merge"] for s in sums} == {"none", "slerp"}
    # 9 distinct artefacts (start, 4 stages, 4 merges), each evaluated once through the eval cache
    assert len(list((tmp_path / "_stages" / "_eval").glob("*/metrics.json"))) == 9
    assert sum(len(s["artefacts"]) for s in sums) == 8 + 18 + 4   # a start per cell, 9 stages per merge setting, 4 merges
    # a dry run of the same grid finds every evaluation cached: plans and runs share one eval key
    run_train(["-m", *PAPER_DEMO, "dry_run=true"], tmp_path)
    plans = [json.loads(q.read_text()) for q in (tmp_path / "paper_demo" / ".plan").glob("*.json") if q.name != "_grid.json"]
    assert len(plans) == 8 and all(e["cached"] is True for pl in plans for e in pl["evals"])
    assert sum(len(pl["evals"]) for pl in plans) == 8 + 18 + 4
    q = subprocess.run([sys.executable, "-m", "dft.report", str(tmp_path / "paper_demo")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    report = (tmp_path / "paper_demo" / "report" / "report.md").read_text()
    assert "cpt_sft_dpo+slerp" in report and "cpt_sft_orpo" in report
