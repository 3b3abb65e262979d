"""dft.memory: exact parameter counts, the ZeRO 16 bytes/param, activations vs autograd; accelerate configs."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from dft.families import REAL_ARCH, TINY_SPECS, hf_config, tiny_config
from dft.memory import (
    GIB,
    NF4_BYTES_PER_PARAM,
    count_parameters,
    describe,
    estimate_for_config,
    estimate_memory,
    lora_parameters,
)

ROOT = Path(__file__).resolve().parent.parent
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _measured(model) -> tuple[int, int]:
    """(total, trainable) over unique tensors (a tied LM head counts once)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return total, trainable


@pytest.mark.parametrize("family", sorted(TINY_SPECS))
def test_parameter_count_matches_tiny_models(family):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(cfg)["total"] == _measured(model)[0] == model.num_parameters()


def test_parameter_count_with_biases():
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama3")
    cfg.attention_bias, cfg.mlp_bias = True, True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(cfg)["total"] == _measured(model)[0]


@pytest.mark.parametrize("family,targets", [("llama3", ALL_LINEAR), ("mistral", ["q_proj", "v_proj"]), ("smollm2", ALL_LINEAR)])
def test_lora_count_matches_peft(family, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=8, target_modules=targets))
    total, trainable = _measured(model)
    assert trainable == lora_parameters(cfg, 8, targets)
    assert total == count_parameters(cfg)["total"] + trainable


def test_paper_models_published_counts():
    counts = {name: count_parameters(hf_config(arch))["total"] for name, arch in REAL_ARCH.items()}
    assert counts == {"llama3_1_8b": 8_030_261_248, "mistral_7b_v0_3": 7_248_023_552, "smollm_1_7b": 1_711_376_384}
    # LoRA r=16 on every linear projection of Llama 3.1 8B: 41.9 M trainable (0.52 %)
    assert lora_parameters(hf_config(REAL_ARCH["llama3_1_8b"]), 16, ALL_LINEAR) == 41_943_040


def _states(e) -> int:
    return e["weights"] + e["gradients"] + e["optimizer"]


def test_model_state_bytes_per_parameter():
    n = 1_000_000
    common = dict(batch=1, seq_len=8, hidden=64, layers=2)
    # ZeRO accounting (Rajbhandari et al. 2020): fp16/bf16 weights + grads, fp32 master + m + v
    assert _states(estimate_memory(n, "full", "bfloat16", master_weights=True, **common)) == 16 * n
    assert _states(estimate_memory(n, "full", "bfloat16", **common)) == 8 * n  # pure bf16 AdamW
    assert _states(estimate_memory(n, "full", "float32", **common)) == 16 * n
    # LoRA: 16-bit frozen base + fp32 adapters with grads and two fp32 moments
    e = estimate_memory(n, "lora", "bfloat16", trainable=1000, **common)
    assert (e["weights"], e["gradients"], e["optimizer"]) == (2 * n + 4 * 1000, 4 * 1000, 8 * 1000)
    q = estimate_memory(n, "qlora", "bfloat16", trainable=1000, quantized=n, **common)
    assert q["weights"] == pytest.approx(n * NF4_BYTES_PER_PARAM + 2 * 1000) and q["gradients"] == 2 * 1000
    with pytest.raises(ValueError, match="trainable"):
        estimate_memory(n, "lora", "bfloat16", **common)


def test_llama_8b_estimates_are_ordered():
    cfg = hf_config(REAL_ARCH["llama3_1_8b"])
    full = estimate_for_config(cfg, "full", master_weights=True)
    lora = estimate_for_config(cfg, "lora", lora_dropout=0.05)
    qlora = estimate_for_config(cfg, "qlora", lora_dropout=0.05)
    assert _states(full) == 16 * 8_030_261_248
    assert qlora["total"] < lora["total"] < full["total"]
    assert 14 * GIB < lora["weights"] < 16 * GIB and 5 * GIB < qlora["weights"] < 6 * GIB
    no_ckpt = estimate_for_config(cfg, "lora", gradient_checkpointing=False)
    assert no_ckpt["activations"] > 5 * estimate_for_config(cfg, "lora")["activations"]
    sharded = estimate_for_config(cfg, "full", master_weights=True, shards=8)
    assert _states(sharded) == pytest.approx(_states(full) / 8, abs=3)
    assert sharded["activations"] == full["activations"]
    for e in (full, lora, qlora, sharded):
        assert e["total"] == _states(e) + e["activations"] and e["logits"] < e["activations"]


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the tensors autograd saves for backward (unique storages, parameters excluded),
    plus the logits the output keeps alive."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    logits = out.logits.untyped_storage()
    return sum(seen.values()) + (logits.nbytes() if logits.data_ptr() not in seen else 0)


@pytest.mark.parametrize("dtype,method", [("float32", "full"), ("bfloat16", "full"), ("bfloat16", "lora")])
def test_activation_formula_matches_autograd(dtype, method):
    """The per-layer activation formula against what autograd really keeps (CPU, SDPA, no dropout)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    arch = dict(REAL_ARCH["llama3_1_8b"], vocab_size=1000, bos_token_id=1, eos_token_id=2)
    cfg = hf_config(arch, hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(getattr(torch, dtype))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_dropout=0.0, target_modules=ALL_LINEAR))
    model.train()
    ids = torch.randint(0, 1000, (2, 32))
    measured = _saved_activation_bytes(model, ids)
    est = estimate_for_config(cfg, method, dtype=dtype, batch=2, seq_len=32, r=8, gradient_checkpointing=False)
    assert est["activations"] == pytest.approx(measured, rel=0.03)


def _cfgs(method="lora", dtype="auto"):
    model = SimpleNamespace(dtype=dtype, max_length=2048, lora_target_modules=ALL_LINEAR)
    peft = SimpleNamespace(method=method, r=16, dropout=0.05, target_modules=None, gradient_checkpointing=None)
    return model, peft


def test_describe(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    cfg = hf_config(REAL_ARCH["llama3_1_8b"])
    text = describe(*_cfgs("lora"), {"per_device_train_batch_size": 1}, cfg, device="cuda")
    assert "8.03 B total" in text and "41.94 M trainable" in text and "bfloat16" in text
    assert "1 seq x 2048 tokens" in text and "gradient checkpointing on" in text and "total" in text
    cpu = describe(*_cfgs("lora"), {"per_device_train_batch_size": 2, "max_length": 256}, cfg, device="cpu", stage="dpo")
    assert "float32" in cpu and "4 seq x 256 tokens" in cpu and "checkpointing off" in cpu
    assert text.startswith("memory estimate per GPU") and "CUDA context" in text
    assert cpu.startswith("memory estimate per process (CPU)") and "CUDA" not in cpu
    assert "checkpointing on" in describe(*_cfgs("lora"), {"activation_checkpointing": True}, cfg, device="cpu")
    assert "reference" in describe(*_cfgs("full"), {}, cfg, device="cuda", stage="dpo")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    zero = describe(*_cfgs("full"), {"per_device_train_batch_size": 1}, cfg, device="cuda")
    assert "sharded over 8 GPUs" in zero and "16 B/param" in zero


# --------------------------------------------------------------------------- accelerate configs

ACCEL = sorted((ROOT / "conf" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCEL, ids=[p.stem for p in ACCEL])
def test_accelerate_configs_parse_for_8_gpus(path):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    cluster = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    assert (cluster.num_processes, cluster.num_machines, cluster.mixed_precision) == (8, 1, "bf16")
    raw = yaml.safe_load(path.read_text())
    known = {a.dest for a in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section) or {}:
            flag = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert flag in known, f"{path.name}: {section}.{key} is not an accelerate launch option"


def test_fsdp_config_reaches_the_plugin(monkeypatch):
    """accelerate's own launch path turns fsdp.yaml into the FSDP2 plugin settings."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "conf/accelerate/fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading and str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    assert os.environ["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
