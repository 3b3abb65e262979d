"""Budgets: the paper grids carry the authors' training configs (conf/grid/recipe/, from
github.com/lamm-mit/LLM-finetuning), the dry run estimates their cost from those budgets, and a
hub-model cell left with the CPU demo step budgets of conf/stage/*.yaml says so in its plan and
start banner."""

from __future__ import annotations

import itertools
import json
import logging
import math
import types
from pathlib import Path

import pytest

from conftest import compose, run_train

MODELS = ["llama3_1_8b", "llama3_1_8b_instruct", "mistral_7b_v0_3", "mistral_7b_v0_3_instruct",
          "smollm_1_7b", "smollm_1_7b_instruct"]
KEYS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
        "max_length", "beta")
# The authors' values per (start model, stage), read off their YAMLs (lamm-mit/LLM-finetuning@8553c93;
# Mistral DPO @28dba1e): lr, epochs, per-device batch, accumulation, max_seq_length/max_length, beta.
# SmolLM ORPO and the SmolLM instruct start are ours (the authors trained neither): marked in smol.yaml.
_L = {"cpt": (2e-5, 5, 6, 2, 3072, None), "sft": (2e-5, 1, 6, 2, 3076, None),
      "dpo": (5e-7, 1, 2, 2, 2048, 0.05), "orpo": (3e-6, 1, 3, 1, 2048, 0.1)}
_M = {"cpt": (2e-5, 3, 12, 4, 3072, None), "sft": (2e-5, 1, 12, 4, 3076, None),
      "dpo": (5e-7, 1, 4, 2, 2048, 0.01), "orpo": (5e-6, 1, 10, 4, 3072, 0.1)}
_S = {"cpt": (5e-5, 2, 6, 2, 2048, None), "sft": (2e-5, 5, 6, 2, 2048, None),
      "dpo": (5e-7, 1, 2, 2, 2048, 0.05), "orpo": (3e-6, 1, 2, 2, 2048, 0.1)}
AUTHORS = {
    "llama3_1_8b": _L,
    "llama3_1_8b_instruct": {**_L, "orpo": (3e-6, 3, 3, 1, 2500, 0.1)},
    "mistral_7b_v0_3": _M,
    "mistral_7b_v0_3_instruct": {"cpt": (2e-5, 3, 12, 2, 3072, None), "sft": (2e-5, 1, 12, 2, 3076, None),
                                 "dpo": (5e-7, 1, 4, 2, 2048, 0.05), "orpo": (3e-6, 3, 8, 1, 3072, 0.1)},
    "smollm_1_7b": _S,
    "smollm_1_7b_instruct": _S,
}
GRIDS = {"llama3_1_8b": "paper_llama", "llama3_1_8b_instruct": "paper_llama", "mistral_7b_v0_3": "paper_mistral",
         "mistral_7b_v0_3_instruct": "paper_mistral", "smollm_1_7b": "paper_smol", "smollm_1_7b_instruct": "paper_smol"}


def _grid_cell(grid: str, model: str, strategy: str, *extra: str):
    return compose([f"grid={grid}", f"grid/model={model}", f"strategy={strategy}", "merge=slerp", *extra])


def _trl_args(cfg, stage: str, tmp_path):
    from dft.stages import build_trl_config

    return build_trl_config(stage, dict(cfg.strategy[stage].trainer), output_dir=str(tmp_path), device="cpu",
                            peft_cfg=cfg.peft, model_cfg=cfg.model, report_to="none", seed=1)


def test_hub_model_with_stage_defaults_is_flagged():
    from dft.plan import demo_budgets

    assert demo_budgets(compose(["model=llama3_1_8b", "strategy=dpo"])) == ["dpo max_steps=6"]
    assert demo_budgets(compose(["model=mistral_7b_v0_3", "strategy=cpt_sft",
                                 "strategy.sft.trainer.max_steps=500"])) == ["cpt max_steps=12"]
    assert demo_budgets(compose([])) == []  # the embedded model: what the demo budgets are for
    assert demo_budgets(compose(["model=tiny", "strategy=sft"])) == []


def test_no_paper_grid_cell_has_a_demo_budget():
    """Every one of paper_all's 48 cells (= the three family grids' cells) trains by epochs."""
    from dft.plan import demo_budgets

    for model, strategy, merge in itertools.product(MODELS, ["cpt", "cpt_sft", "cpt_sft_dpo", "cpt_sft_orpo"],
                                                    ["none", "slerp"]):
        cfg = compose(["grid=paper_all", f"grid/model={model}", f"strategy={strategy}", f"merge={merge}"])
        assert demo_budgets(cfg) == [], (model, strategy, merge)
        assert all(cfg.strategy[s].trainer.max_steps == -1 for s in cfg.strategy.chain)


@pytest.mark.parametrize("model", MODELS)
def test_paper_grid_cells_carry_the_authors_values(model, tmp_path):
    """Per family and start: the authors' rates, epochs, batches and lengths, full fine-tuning, the
    same in paper_all and in the family grid, and TRL builds every stage's config from them."""
    for grid in ("paper_all", GRIDS[model]):
        cfg = _grid_cell(grid, model, "cpt_sft_dpo")
        orpo = _grid_cell(grid, model, "cpt_sft_orpo").strategy.orpo.trainer
        assert cfg.peft.method == "full" and cfg.data.name == "materials"
        for stage, want in AUTHORS[model].items():
            t = orpo if stage == "orpo" else cfg.strategy[stage].trainer
            assert tuple(t.get(k) for k in KEYS) == pytest.approx(want), (grid, model, stage)
            assert t.max_steps == -1
        smol = cfg.model.family == "smollm"
        assert cfg.strategy.cpt.trainer.lr_scheduler_type == ("constant" if smol else "cosine")
        assert cfg.strategy.cpt.trainer.warmup_steps == (0 if smol else 0.1)  # constant ignores warmup
        assert (cfg.strategy.sft.trainer.warmup_steps, cfg.strategy.dpo.trainer.warmup_steps, orpo.warmup_steps) == (0.1, 0.1, 100)
    for stage in ("cpt", "sft", "dpo"):
        args = _trl_args(cfg, stage, tmp_path)
        assert args.learning_rate == AUTHORS[model][stage][0] and args.max_length == AUTHORS[model][stage][4]


@pytest.mark.parametrize("examples,per_device,accumulation,world,epochs",
                         [(523, 6, 2, 1, 5), (523, 6, 2, 8, 5), (442, 2, 2, 1, 1), (442, 3, 1, 8, 3),
                          (7, 12, 4, 8, 1), (100, 4, 3, 2, 2.5)])
def test_epoch_steps_is_the_trainers_count(examples, per_device, accumulation, world, epochs):
    """dft.plan.epoch_steps against transformers.Trainer.set_initial_training_values itself (a
    dataloader of ceil(examples / (per_device * world)) batches per process)."""
    from transformers import Trainer, TrainingArguments

    from dft.plan import epoch_steps

    args = TrainingArguments(output_dir="/tmp/unused", per_device_train_batch_size=per_device, use_cpu=True,
                             gradient_accumulation_steps=accumulation, num_train_epochs=epochs, max_steps=-1,
                             report_to="none")
    stub = types.SimpleNamespace(get_total_train_batch_size=lambda a: per_device * accumulation * world,
                                 get_sp_size=lambda: 1, num_examples=lambda dl: examples)
    loader = [None] * math.ceil(examples / (per_device * world))
    max_steps = Trainer.set_initial_training_values(stub, args, loader)[-1]
    assert epoch_steps(examples, per_device, accumulation, world, epochs) == max_steps


@pytest.mark.parametrize("world", [1, 8])
def test_8b_cpt_estimate_follows_from_the_authors_budget(world, tmp_path):
    """Llama 3.1 8B CPT: 5 epochs of our text packed into 3072-token blocks, 6 x 2 x world blocks a
    step, full fine-tuning with gradient checkpointing (k = 8 FLOPs per parameter and token)."""
    from dft.data import load_split
    from dft.plan import estimate_stage

    cfg = _grid_cell("paper_llama", "llama3_1_8b", "cpt", f"launcher.tasks_per_node={world}")
    t, pc = cfg.strategy.cpt.trainer, cfg.plan
    rows = load_split(cfg.data, "text")
    blocks = math.ceil(sum(len(r["text"]) for r in rows) / pc.chars_per_token / t.max_length)
    per_process = math.ceil(blocks / (t.per_device_train_batch_size * world))
    steps = math.ceil(t.num_train_epochs * math.ceil(per_process / t.gradient_accumulation_steps))
    tokens = steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * world * t.max_length
    hours = 8 * cfg.model.params_b * 1e9 * tokens / (pc.gpu_peak_tflops * 1e12 * pc.mfu) / 3600
    est = estimate_stage("cpt", _trl_args(cfg, "cpt", tmp_path), rows, cfg, cfg.model.params_b * 1e9)
    assert (est["steps"], est["batch"], est["max_length"], est["k"]) == (steps, 6 * 2 * world, 3072, 8)
    assert est["tokens"] == tokens and est["gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert est["gpu_hours"] > 1000 * 7.97e-05  # issue 22: the demo budget planned an 8B DPO cell at 7.97e-05 h


def test_8b_dry_run_plans_the_authors_budgets(tmp_path):
    """The dry run of one Llama 3.1 8B cell (no weights here): every stage's steps follow from the
    authors' epochs, batch and accumulation on our data, its GPU-hours from its tokens; no demo-budget
    warning."""
    from dft.data import load_split
    from dft.plan import epoch_steps

    p = run_train(["-m", "grid=paper_llama", "grid/model=llama3_1_8b", "strategy=cpt_sft_dpo", "merge=none",
                   "dry_run=true", "logger=none"], tmp_path,
                  env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})  # plans without weights, fetches none
    assert "CPU demo budget" not in p.stdout + p.stderr
    (path,) = [q for q in (tmp_path / "paper_llama" / ".plan").glob("*.json") if q.name != "_grid.json"]
    plan = json.loads(path.read_text())
    assert plan["demo_budget"] == [] and plan["peft"] == "full"
    cfg = _grid_cell("paper_llama", "llama3_1_8b", "cpt_sft_dpo")
    pc, n = cfg.plan, cfg.model.params_b * 1e9
    pairs = len(load_split(cfg.data, "preference"))
    by = {s["kind"]: s for s in plan["stages"]}
    for stage, s in by.items():
        t = cfg.strategy[stage].trainer
        examples = math.ceil(s["data_tokens"] / t.max_length) if stage in ("cpt", "sft") else s["rows"]
        assert s["steps"] == epoch_steps(examples, t.per_device_train_batch_size, t.gradient_accumulation_steps, 1,
                                         t.num_train_epochs), stage
        assert (s["batch"], s["max_length"]) == (t.per_device_train_batch_size * t.gradient_accumulation_steps,
                                                 t.max_length)
        per_token = s["k"] * n / (pc.gpu_peak_tflops * 1e12 * pc.mfu) / 3600
        # the plan records tokens rounded to an integer, the GPU-hours from the unrounded count
        assert (s["tokens"] - 0.5) * per_token <= s["gpu_hours"] <= (s["tokens"] + 0.5) * per_token, stage
    assert by["dpo"]["rows"] == pairs and by["dpo"]["steps"] == math.ceil(math.ceil(pairs / 2) / 2)
    assert (by["cpt"]["k"], by["sft"]["k"], by["dpo"]["k"]) == (8, 8, 10)  # full + checkpointing (+ DPO reference)
    assert plan["gpu_hours"]["chain"] == pytest.approx(sum(s["gpu_hours"] for s in by.values()))


def test_accelerate_readme_commands_compose():
    """conf/accelerate/README.md's `accelerate launch ... -m dft.train <overrides>` lines: each
    file exists and the overrides compose and validate (running them needs 4-8 GPUs)."""
    import shlex

    from conftest import ROOT
    from dft.config import validate

    lines = [ln for ln in (ROOT / "conf" / "accelerate" / "README.md").read_text().splitlines()
             if ln.startswith("accelerate launch ")]
    assert len(lines) == 3 and any("grid=paper_llama" in ln for ln in lines)
    for ln in lines:
        words = shlex.split(ln)
        assert (ROOT / words[words.index("--config_file") + 1]).is_file()
        overrides = words[words.index("dft.train") + 1:]
        cfg = compose(overrides)
        validate(cfg)
        assert cfg.peft.method == "full", ln


def test_no_materials_prompt_reaches_the_authors_max_prompt_length(cache_dir, embedded_model):
    """The authors' max_prompt_length (1500-2000 tokens; no TRL 1.x field, so not in the recipe)
    would cut no prompt of ours: the longest rendered preference prompt, in each family's real
    tokenizer, is far below 1500."""
    from transformers import AutoTokenizer

    from dft.data import load_split
    from dft.families import prepare_tokenizer
    from dft.tokenizers_offline import llama3_tokenizer_dir, mistral_v3_tokenizer_dir

    folders = {"llama3_1_8b_instruct": llama3_tokenizer_dir(cache_dir), "mistral_7b_v0_3_instruct":
               mistral_v3_tokenizer_dir(cache_dir), "smollm_1_7b_instruct": embedded_model}
    for model, folder in folders.items():
        cfg = compose(["grid=paper_all", f"grid/model={model}", "strategy=cpt_sft_dpo"])
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(folder), cfg.model)
        rows = load_split(cfg.data, "preference")
        longest = max(len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False)) for r in rows)
        assert 100 < longest < 1500, (model, longest)


def test_start_banner_warns_about_the_demo_budget(tmp_path, caplog):
    from dft.pipeline import Cell

    cfg = compose(["model=llama3_1_8b", "strategy=cpt_sft", "device=cpu"])
    with caplog.at_level(logging.INFO, logger="dft"):
        Cell(cfg, tmp_path, "cell").print_start(Path(tmp_path))
    assert ("  WARNING: CPU demo budget on hub model llama3_1_8b: cpt max_steps=12, sft max_steps=10 (conf/stage/*.yaml, "
            "minutes on 2 CPU cores); for the paper's budgets use grid=paper_<family>, or set "
            "strategy.<stage>.trainer.max_steps=-1 and num_train_epochs") in caplog.messages
