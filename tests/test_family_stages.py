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


# --------------------------------------------------------------------------- token-exact training inputs
# One CPT document, one SFT row, one DPO pair and one ORPO pair per family, with the real tokenizers:
# the ids below are what the trainer's collator hands the model (read from the stage's audit, which is
# the collator's output for the first example), written out by hand-checked decoding:
#   SmolLM2 (no BOS, ChatML with its default system turn): <|im_start|>=1, <|im_end|>=2, "\n"=198, <|endoftext|>=0
#   Llama 3.1: <|begin_of_text|>=128000, <|start_header_id|>=128006, <|end_header_id|>=128007,
#              <|eot_id|>=128009, <|end_of_text|>=128001 (the CPT document end)
#   Mistral v0.3: <s>=1, [INST]=3, [/INST]=4, </s>=2

DOC = [{"id": "d", "text": "Steel is strong."}]
SFT_ROW = [{"id": "s", "messages": [{"role": "user", "content": "Is steel strong?"},
                                    {"role": "assistant", "content": "Yes."}]}]
PAIR = [{"id": "p", "prompt": "Is steel strong?", "chosen": "Yes.", "rejected": "No."}]
SMOL_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
               8182, 2, 198, 1, 4093, 198, 4182, 6752, 1837, 47, 2, 198, 1, 520, 9531, 198]
LLAMA_PROMPT = [128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724,
                2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 128009, 128006, 882, 128007, 271, 3957, 9699, 3831,
                30, 128009, 128006, 78191, 128007, 271]
MISTRAL_PROMPT = [1, 3, 2459, 10213, 3735, 29572, 4]
TOKENS = {
    # model config: (bos id or None, CPT ids, prompt ids, "Yes." answer ids, "No." answer ids, turn end, doc end)
    "tiny": (None, [16949, 299, 314, 1837, 30, 0], SMOL_PROMPT, [10539, 30, 2, 198], [5230, 30, 2, 198], 2, 0),
    "tiny_llama3": (128000, [128000, 66048, 374, 3831, 13, 128001], LLAMA_PROMPT, [9642, 13, 128009], [2822, 13, 128009],
                    128009, 128001),
    "tiny_mistral": (1, [1, 16642, 1117, 3735, 29491, 2], MISTRAL_PROMPT, [6360, 29491, 2], [2538, 29491, 2], 2, 2),
}


def _first_example(model, kind, cache_dir, tmp_path, **stage):
    from dft.modeling import resolve_model_path
    from dft.stages import build_trainer

    cfg = compose([f"model={model}", "data=tiny", "peft=lora", f"strategy={kind}"])
    sc = cfg.strategy[kind]
    for k, v in stage.items():
        sc[k] = v
    rows = {"cpt": DOC, "sft": SFT_ROW, "dpo": PAIR, "orpo": PAIR}[kind]
    trainer, tok, audit = build_trainer(kind=kind, stage_cfg=sc, rows=rows, start_path=resolve_model_path(cfg.model, cache_dir),
                                        model_cfg=cfg.model, peft_cfg=cfg.peft, work_dir=tmp_path, device="cpu",
                                        report_to="none", seed=0)
    return trainer, audit


@pytest.mark.parametrize("model", list(TOKENS))
def test_cpt_document_is_one_bos_text_and_the_document_end_token(model, cache_dir, tmp_path):
    """CPT appends the family's document-end token, not the instruct tokenizer's turn end (``<|im_end|>``,
    ``<|eot_id|>``), and the tokenizer's one BOS where the family has one."""
    bos, cpt, *_, doc_end = TOKENS[model]
    _, audit = _first_example(model, "cpt", cache_dir, tmp_path)
    fe = audit["first_example"]
    assert fe["input_ids"] == cpt
    assert fe["input_ids"][-1] == doc_end and audit["end_token"]["id"] == doc_end
    if bos is not None:
        assert fe["input_ids"].count(bos) == 1
    assert fe["loss_mask"] == [0] + [1] * (len(cpt) - 1)  # every next token is predicted, the doc end included
    assert audit["rows_missing_end_token"] == 0


@pytest.mark.parametrize("model", list(TOKENS))
def test_sft_row_labels_are_the_answer_and_its_end_token(model, cache_dir, tmp_path):
    bos, _, prompt, yes, _, turn_end, _ = TOKENS[model]
    _, audit = _first_example(model, "sft", cache_dir, tmp_path)
    fe = audit["first_example"]
    assert fe["input_ids"] == prompt + yes
    assert fe["loss_mask"] == [0] * len(prompt) + [1] * len(yes)
    labelled = [i for i, m in zip(fe["input_ids"], fe["loss_mask"]) if m]
    assert labelled.count(turn_end) == 1  # one end-of-turn per assistant turn
    if bos is not None:
        assert fe["input_ids"].count(bos) == 1


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
@pytest.mark.parametrize("model", list(TOKENS))
def test_preference_pair_tokens_are_exact(model, kind, cache_dir, tmp_path):
    """DPO and ORPO see the same ids: one BOS where the family has one, the answer, one end-of-turn
    token (TRL's ORPO appended a second EOS: ``<|im_end|>\\n<|im_end|>``), labels on the answer only."""
    bos, _, prompt, yes, no, turn_end, _ = TOKENS[model]
    _, audit = _first_example(model, kind, cache_dir, tmp_path)
    fe = audit["first_example"]
    for side, answer in (("chosen", yes), ("rejected", no)):
        assert fe[side]["input_ids"] == prompt + answer, side
        assert fe[side]["loss_mask"] == [0] * len(prompt) + [1] * len(answer), side
        assert fe[side]["input_ids"][len(prompt):].count(turn_end) == 1
        if bos is not None:
            assert fe[side]["input_ids"].count(bos) == 1
    if kind == "orpo":  # the NLL term covers the answer only, as the paper's L_SFT; recorded
        assert audit["nll_over"] == "completion" and fe["nll_mask"] == fe["chosen"]["loss_mask"]


def test_orpo_nll_over_the_prompt_is_a_recorded_setting(cache_dir, tmp_path):
    _, audit = _first_example("tiny_mistral", "orpo", cache_dir, tmp_path, nll_over="prompt_and_completion")
    assert audit["nll_over"] == "prompt_and_completion"
    assert audit["first_example"]["nll_mask"] == [1] * len(MISTRAL_PROMPT + [6360, 29491, 2])


# --------------------------------------------------------------------------- a saved artefact is the trained model

def _start_like_the_hub(model, cache_dir, tmp_path):
    """The tiny start model with its config.json / generation_config.json as the real base ships them:
    Llama 3.1 without ``pad_token_id`` (Meta's), SmolLM2 with ``pad_token_id: 2`` (its EOS), Mistral
    without a pad; generation stops on one id only."""
    import json
    import shutil

    from dft.modeling import resolve_model_path

    cfg = compose([f"model={model}", "data=tiny"])
    src = resolve_model_path(cfg.model, cache_dir)
    start = tmp_path / "start"
    shutil.copytree(src, start)
    for name in ("config.json", "generation_config.json"):
        d = json.loads((start / name).read_text())
        d.pop("pad_token_id", None)
        if model == "tiny":
            d["pad_token_id"] = 2
        d["eos_token_id"] = {"tiny": 2, "tiny_llama3": 128001, "tiny_mistral": 2}[model]
        (start / name).write_text(json.dumps(d))
    return start


SAVED_SPECIAL = {  # model: (pad id of the tokenizer, the family's end tokens in config order)
    "tiny": (0, 2),
    "tiny_llama3": (128004, [128009, 128008, 128001]),
    "tiny_mistral": (0, 2),
}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("model", list(SAVED_SPECIAL))
def test_saved_artefact_is_the_trained_model(model, method, cache_dir, tmp_path):
    """After a save, the folder's logits on the probe equal the in-memory trained model's (fp32: max |diff|
    <= 1e-4 x max(1, max |logit|); QLoRA: against the trained adapter on the unquantised base, since the
    artefact is that merge by design), and config.json / generation_config.json carry the tokenizer's pad
    and the family's end tokens whatever the start folder said."""
    import json

    from dft.data import load_split
    from dft.stages import train_stage

    start = _start_like_the_hub(model, cache_dir, tmp_path)
    cfg = compose([f"model={model}", "data=tiny", f"peft={method}", "strategy=sft"])
    sc = cfg.strategy.sft
    sc.trainer.max_steps, sc.trainer.learning_rate = 1, 5e-2
    out = tmp_path / "final"
    facts = train_stage(kind="sft", stage_cfg=sc, rows=load_split(cfg.data, "messages")[:4], start_path=start,
                        model_cfg=cfg.model, peft_cfg=cfg.peft, work_dir=tmp_path / "work", out_dir=out, device="cpu",
                        report_to="none", seed=0)
    probe = facts["probe"]
    assert probe["max_abs_diff"] <= probe["tolerance"] <= 1e-4 * max(1.0, probe["max_abs_logit"]) + 1e-12
    assert probe["reference"] == ("trained adapter on the unquantised base" if method == "qlora" else "trained model")
    if method == "qlora":
        # the 4-bit trained model itself is not the artefact: its distance is recorded (null where bitsandbytes'
        # CPU inference kernel refuses the tiny Llama/Mistral shapes)
        assert probe["qlora_gap"] is None if model != "tiny" else probe["qlora_gap"] > 0
    pad, ends = SAVED_SPECIAL[model]
    for name in ("config.json", "generation_config.json"):
        d = json.loads((out / name).read_text())
        assert d["pad_token_id"] == pad and d["eos_token_id"] == ends, (name, d)


def test_lora_on_tied_embeddings_is_refused_and_the_probe_catches_it(tiny_model, tmp_path, monkeypatch):
    """SmolLM ties embed_tokens to lm_head: a LoRA on embed_tokens trains the input side only, but the merge
    writes W + BA into the shared tensor, so the saved model is not the trained one. dft refuses the
    setting; with the refusal bypassed, the probe check after the save stops the stage."""
    from dft import DftError
    from dft.data import load_split
    from dft.stages import train_stage

    cfg = compose(["model=tiny", "data=tiny", "peft=lora", "strategy=sft", "peft.target_modules=[q_proj,embed_tokens]"])
    sc = cfg.strategy.sft
    sc.trainer.max_steps, sc.trainer.learning_rate = 2, 5e-2
    kw = dict(kind="sft", stage_cfg=sc, rows=load_split(cfg.data, "messages")[:4], start_path=tiny_model,
              model_cfg=cfg.model, peft_cfg=cfg.peft, device="cpu", report_to="none", seed=0)
    with pytest.raises(DftError, match=r"^peft.target_modules lists 'embed_tokens', but this model ties its input "
                                       r"embedding to lm_head"):
        train_stage(work_dir=tmp_path / "w1", out_dir=tmp_path / "o1", **kw)
    import dft.modeling

    monkeypatch.setattr(dft.modeling, "check_peft_targets", lambda model, pc: None)
    with pytest.raises(DftError, match=r"is not the trained model: its logits on the probe differ by"):
        train_stage(work_dir=tmp_path / "w2", out_dir=tmp_path / "o2", **kw)
    assert not (tmp_path / "o2").exists()


def test_orpo_on_the_base_llama_tokenizer_ends_the_answer_once(cache_dir, tmp_path):
    """Base Llama 3.1's tokenizer EOS is <|end_of_text|>: TRL's ORPO appended it after the template's
    <|eot_id|> (``Yes.<|eot_id|><|end_of_text|>``). dft's ORPO rows end with the template's one <|eot_id|>,
    and CPT on the base tokenizer ends documents with <|end_of_text|>."""
    import shutil

    from dft import tokenizers_offline
    from dft.modeling import resolve_model_path
    from dft.stages import build_trainer

    cfg = compose(["model=tiny_llama3", "data=tiny", "peft=lora", "strategy=cpt_orpo", "model.start=base"])
    start = tmp_path / "base"
    shutil.copytree(resolve_model_path(cfg.model, cache_dir), start)
    base_tok = tokenizers_offline.load_llama3_tokenizer(cache_dir, instruct=False)
    assert base_tok.eos_token == "<|end_of_text|>"
    base_tok.save_pretrained(start)
    out = {}
    for kind, rows in (("orpo", PAIR), ("cpt", DOC)):
        _, _, audit = build_trainer(kind=kind, stage_cfg=cfg.strategy[kind], rows=rows, start_path=start,
                                    model_cfg=cfg.model, peft_cfg=cfg.peft, work_dir=tmp_path / kind, device="cpu",
                                    report_to="none", seed=0)
        out[kind] = audit["first_example"]
    assert out["orpo"]["chosen"]["input_ids"] == LLAMA_PROMPT + [9642, 13, 128009]
    assert out["cpt"]["input_ids"] == [128000, 66048, 374, 3831, 13, 128001]


def test_a_run_refuses_a_mistral_row_that_breaks_alternation_before_any_model_loads(tmp_path):
    """The cell loads rows with the model's template rules (``Cell.check_inputs``): the dry run, which
    loads no model, already names the file and line."""
    import json

    from conftest import run_train

    bad = tmp_path / "m.jsonl"
    good = {"id": "g", "messages": SFT_ROW[0]["messages"]}
    broken = {"id": "b", "messages": [{"role": "user", "content": "A?"}, {"role": "user", "content": "B?"},
                                      {"role": "assistant", "content": "C."}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(broken) + "\n")
    args = ["model=tiny_mistral", "data=tiny", f"data.messages={bad}", "strategy=sft", "eval=none", "merge=none",
            "logger=none", "dry_run=true"]
    p = run_train(args, tmp_path, check=False)
    assert p.returncode != 0
    assert f"{bad}:2: roles must alternate user/assistant for family 'mistral'" in p.stdout + p.stderr
    p = run_train(args + ["data.skip_bad_rows=true"], tmp_path, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
