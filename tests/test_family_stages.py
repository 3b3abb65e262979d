"""Tiny random-weight models with each family's real architecture and tokenizer (Llama 3.1:
128256 vocab, llama3 RoPE, untied; Mistral v0.3: 32768 vocab; SmolLM2: tied) run SFT and DPO for
a step, save, reload, merge with their start model and generate."""

from __future__ import annotations

import math

import pytest

from conftest import compose


@pytest.mark.parametrize("model", ["tiny_llama3", "tiny_mistral", "tiny"])
def test_family_runs_stages_merges_and_generates(model, cache_dir, tmp_path):
    from omegaconf import OmegaConf

    from dft.data import load_split
    from dft.merging import merge_models
    from dft.modeling import generation_eos_ids, load_model, load_tokenizer, resolve_model_path
    from dft.stages import train_stage

    cfg = compose([f"model={model}", "data=tiny", "peft=lora"])
    start = resolve_model_path(cfg.model, cache_dir)
    path = start
    for kind, split in (("sft", "messages"), ("dpo", "preference")):
        sc = cfg.strategy[kind]
        sc.trainer.max_steps = 1
        out = tmp_path / kind / "final"
        facts = train_stage(kind=kind, stage_cfg=sc, rows=load_split(cfg.data, split)[:4], start_path=path,
                            model_cfg=cfg.model, peft_cfg=cfg.peft, work_dir=tmp_path / kind / "work", out_dir=out,
                            device="cpu", report_to="none", seed=0)
        assert math.isfinite(facts["train_loss"]) and facts["steps"] == 1
        path = out
    merged = tmp_path / "merged"
    merge_models(OmegaConf.load(cfg.paths.root + "/conf/merge/slerp.yaml"), path, start, merged)
    tok = load_tokenizer(merged, cfg.model)
    assert tok.pad_token_id not in generation_eos_ids(tok, cfg.model)
    m = load_model(merged, cfg.model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Define stress."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = m.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                     eos_token_id=generation_eos_ids(tok, cfg.model))
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert m.config.vocab_size == load_model(start, cfg.model).config.vocab_size
