"""Every option of every config group composes; every strategy's TRL config builds; bad keys fail."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose

GROUPS = ["model", "data", "strategy", "peft", "merge", "eval", "logger", "launcher"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if option.startswith("slurm"):
        overrides.append("launcher.partition=debug")
    cfg = compose(overrides)
    # resolve everything dft reads (hydra.* needs a running app and is checked by the e2e tests)
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    from dft.config import validate

    if group != "data" or option in ("materials", "tiny"):
        validate(cfg)


def test_groups_listed_by_the_issue_exist():
    for g in GROUPS:
        assert options(g), f"conf/{g}/ has no options"
    for s in ["none", "cpt", "sft", "dpo", "orpo", "cpt_sft", "cpt_sft_dpo", "cpt_sft_orpo", "sft_dpo", "sft_orpo"]:
        assert s in options("strategy")
    assert {"full", "lora", "qlora"} <= set(options("peft"))


@pytest.mark.parametrize("strategy", options("strategy"))
def test_every_strategy_builds_its_trl_configs(strategy, tmp_path):
    from dft.stages import build_trl_config

    cfg = compose([f"strategy={strategy}"])
    for stage in cfg.strategy.chain:
        trainer = OmegaConf.to_container(cfg.strategy[stage].trainer, resolve=True)
        args = build_trl_config(stage, trainer, output_dir=str(tmp_path), device="cpu", peft_cfg=cfg.peft,
                                model_cfg=cfg.model, report_to="none", seed=1)
        assert args.learning_rate == trainer["learning_rate"]
        assert args.bf16 is False and args.gradient_checkpointing is False  # CPU settings
        assert args.max_length == trainer.get("max_length", cfg.model.max_length)


def test_trl_config_takes_the_checkpointing_setting_without_deprecation_warnings(tmp_path):
    """Off on CPU, on when the YAML says so, under whichever name this transformers version uses."""
    import warnings

    from dft.stages import build_trl_config

    cfg = compose(["strategy=sft"])
    trainer = OmegaConf.to_container(cfg.strategy.sft.trainer, resolve=True)
    for extra, expected in (({}, False), ({"gradient_checkpointing": True}, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = build_trl_config("sft", {**trainer, **extra}, output_dir=str(tmp_path), device="cpu",
                                    peft_cfg=cfg.peft, model_cfg=cfg.model, report_to="none", seed=1)
        assert args.gradient_checkpointing is expected
        assert getattr(args, "activation_checkpointing", expected) is expected


def test_unknown_key_fails_at_compose_naming_it():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(["peft.rank=8"])
    assert "rank" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails_at_compose_naming_the_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(["peft.r=eight"])
    msg = str(e.value.__cause__ or e.value)
    assert "peft.r" in msg or "'r'" in msg


def test_unknown_trl_field_is_rejected_naming_the_key(tmp_path):
    from dft import DftError
    from dft.stages import build_trl_config

    cfg = compose([])
    with pytest.raises(DftError, match=r"^strategy\.sft\.trainer\.lerning_rate is not a field of trl\..*SFTConfig$"):
        build_trl_config("sft", {"lerning_rate": 1e-4}, output_dir=str(tmp_path), device="cpu",
                         peft_cfg=cfg.peft, model_cfg=cfg.model, report_to="none", seed=1)


def test_orpo_config_comes_from_trl_experimental(tmp_path):
    from dft.stages import build_trl_config

    cfg = compose(["strategy=orpo"])
    args = build_trl_config("orpo", OmegaConf.to_container(cfg.strategy.orpo.trainer), output_dir=str(tmp_path),
                            device="cpu", peft_cfg=cfg.peft, model_cfg=cfg.model, report_to="none", seed=1)
    assert type(args).__module__.startswith("trl.experimental.orpo")
    assert args.beta == cfg.strategy.orpo.trainer.beta


def test_validate_rejects_a_chain_stage_without_config():
    from dft import DftError
    from dft.config import validate

    cfg = compose(["strategy=cpt"])
    cfg.strategy.sft = None
    cfg.strategy.chain = ["cpt", "sft"]
    with pytest.raises(DftError, match=r"^strategy\.sft is missing: strategy 'cpt' lists it in its chain$"):
        validate(cfg)


@pytest.mark.parametrize("overrides", [["eval=full", "eval.ppl_batch_size=null"], ["eval.dtype=bfloat16"],
                                       ["model.max_shard_size=250MB"]])
def test_validate_accepts(overrides):
    from dft.config import validate

    validate(compose(overrides))


@pytest.mark.parametrize("override,message", [
    ("eval.ppl_batch_size=0", r"^eval\.ppl_batch_size=0 must be at least 1 \(or null\)$"),
    ("eval.batch_size=-2", r"^eval\.batch_size=-2 must be at least 1$"),
    ("eval.dtype=bf16", r"^eval\.dtype='bf16' is not one of auto, float32, bfloat16, float16$"),
    ("model.dtype=fp32", r"^model\.dtype='fp32' is not one of auto, float32, bfloat16, float16$"),
    ("model.max_shard_size=abc", r"^model\.max_shard_size='abc' is not a size like 100MB or 5GB$"),
    # a `+key=` override adds a key the schema does not have: refused, naming it and its parent's keys
    ("+strategy.sft.foo=1", r"^strategy\.sft\.foo is not a dft setting \(strategy\.sft has kind, max_samples, "
                            r"truncation, nll_over, trainer\); a TRL argument goes under strategy\.sft\.trainer\.foo$"),
    ("+eval.max_itms=3", r"^eval\.max_itms is not a dft setting \(eval has .*max_items.*\)$"),
    ("+lerning_rate=1", r"^lerning_rate is not a dft setting \(the top level has model, data, strategy, .*\)$"),
])
def test_validate_rejects_in_one_line_naming_the_key(override, message):
    from dft import DftError
    from dft.config import validate

    with pytest.raises(DftError, match=message):
        validate(compose([override]))


@pytest.mark.parametrize("overrides,message", [
    (["strategy=dpo", "strategy.dpo.trainer.learning_rate=-1e-4"],
     r"^strategy\.dpo\.trainer\.learning_rate=-0\.0001 is out of range: allowed \(0, 1\]$"),
    (["strategy=sft", "strategy.sft.trainer.learning_rate=3"],
     r"^strategy\.sft\.trainer\.learning_rate=3 is out of range: allowed \(0, 1\]$"),
    (["strategy=dpo", "strategy.dpo.trainer.beta=0"], r"^strategy\.dpo\.trainer\.beta=0 is out of range: allowed \(0, inf\)$"),
    (["strategy=orpo", "strategy.orpo.trainer.beta=-0.1"], r"^strategy\.orpo\.trainer\.beta=-0\.1 is out of range"),
    (["strategy=sft", "+strategy.sft.trainer.adam_beta2=1.0"],
     r"^strategy\.sft\.trainer\.adam_beta2=1\.0 is out of range: allowed \[0, 1\)$"),
    (["strategy=sft", "strategy.sft.trainer.max_steps=0"],
     r"^strategy\.sft\.trainer\.max_steps=0 must be -1 \(train num_train_epochs\) or an integer >= 1 \(0 would train one step\)$"),
    (["strategy=cpt", "strategy.cpt.trainer.num_train_epochs=0"],
     r"^strategy\.cpt\.trainer\.num_train_epochs=0 is out of range: allowed \(0, inf\)$"),
    (["strategy=sft", "strategy.sft.trainer.per_device_train_batch_size=0"],
     r"^strategy\.sft\.trainer\.per_device_train_batch_size=0 is out of range: allowed \[1, inf\)$"),
    (["strategy=sft", "strategy.sft.trainer.gradient_accumulation_steps=1.5"],
     r"^strategy\.sft\.trainer\.gradient_accumulation_steps=1\.5 must be an integer in \[1, inf\)$"),
    (["strategy=sft", "strategy.sft.trainer.learning_rate=fast"],
     r"^strategy\.sft\.trainer\.learning_rate='fast' must be a number in \(0, 1\]$"),
    (["peft.r=0"], r"^peft\.r=0 is out of range: allowed \[1, inf\)$"),
    (["peft.alpha=-8"], r"^peft\.alpha=-8 is out of range: allowed \(0, inf\)$"),
    (["peft.dropout=1.0"], r"^peft\.dropout=1\.0 is out of range: allowed \[0, 1\)$"),
    (["merge=slerp", "merge.params.t=1.5"], r"^merge\.params\.t=1\.5 is out of range: allowed \[0, 1\]$"),
    (["merge=slerp", "merge.params.t.0.value=[0,0.5,-0.3,0.7,1]"], r"^merge\.params\.t=-0\.3 is out of range"),
    (["merge=dare_ties", "merge.params.density=0"], r"^merge\.params\.density=0 is out of range: allowed \(0, 1\]$"),
    (["merge=slerp", "merge.out_dtype=fp8"], r"^merge\.out_dtype='fp8' is not one of float32, bfloat16, float16$"),
    (["eval.max_items=0"], r"^eval\.max_items=0 is out of range: allowed \[1, inf\)$"),
    (["eval.ppl_max_tokens=-5"], r"^eval\.ppl_max_tokens=-5 is out of range: allowed \[1, inf\)$"),
])
def test_validate_rejects_out_of_range_numbers_naming_key_and_range(overrides, message):
    from dft import DftError
    from dft.config import validate

    with pytest.raises(DftError, match=message):
        validate(compose(overrides))


@pytest.mark.parametrize("overrides", [
    ["strategy=sft", "strategy.sft.trainer.max_steps=-1"], ["strategy=dpo", "strategy.dpo.trainer.learning_rate=1"],
    ["merge=slerp", "merge.params.t=0"], ["merge=task_arithmetic"], ["merge=dare_ties"], ["peft.dropout=0"],
    ["eval.max_items=null"], ["strategy=cpt", "strategy.cpt.trainer.warmup_steps=0.05"]])
def test_validate_accepts_in_range_numbers(overrides):
    from dft.config import validate

    validate(compose(overrides))


def test_dry_run_refuses_a_negative_learning_rate_in_one_line(tmp_path):
    from conftest import run_train

    p = run_train(["strategy=dpo", "strategy.dpo.trainer.learning_rate=-1e-4", "dry_run=true", "model=tiny", "data=tiny"],
                  tmp_path, check=False, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "error: strategy.dpo.trainer.learning_rate=-0.0001 is out of range: allowed (0, 1]")
    assert "Traceback" not in p.stderr


def test_shard_size_check_reads_sizes_as_transformers_does():
    """dft.config.parse_size (validate's check of model.max_shard_size, without importing transformers)
    accepts and reads every size as transformers' save_pretrained does."""
    from transformers.utils.hub import convert_file_size_to_int

    from dft.config import parse_size

    for v in [100, "100MB", "5GB", "5GiB", "5gb", "1Gb", "10KiB", "10kb", "2MIB", "1.5GB", "xx", "12", "5TB", "GB", ""]:
        try:
            want = convert_file_size_to_int(v)
        except (ValueError, TypeError):
            want = None
        assert parse_size(v) == want, v
    assert parse_size(True) is None and parse_size(None) is None
