"""Each stage trains a few steps on a tiny random-weight model: finite loss, the right weights
change, frozen weights do not, the artefact reloads and generates."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose

STAGES = ["cpt", "sft", "dpo", "orpo"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _train(kind, tiny_model, tmp_path, peft="lora", steps=3, extra=None, n_rows=12):
    from dft.data import load_split
    from dft.stages import train_stage

    cfg = compose(["model=tiny", "data=tiny", f"strategy={kind}", f"peft={peft}"])
    split = {"cpt": "text", "sft": "messages", "dpo": "preference", "orpo": "preference"}[kind]
    rows = load_split(cfg.data, split)[:n_rows]
    sc = cfg.strategy[kind]
    sc.trainer.max_steps = steps
    sc.trainer.learning_rate = 1e-2 if kind in ("cpt", "sft") else 1e-3
    sc.trainer.logging_steps = 1
    sc.trainer.save_steps = 2
    for k, v in (extra or {}).items():
        sc.trainer[k] = v
    out = tmp_path / "final"
    facts = train_stage(kind=kind, stage_cfg=sc, rows=rows, start_path=tiny_model, model_cfg=cfg.model,
                        peft_cfg=cfg.peft, work_dir=tmp_path / "work", out_dir=out, device="cpu",
                        report_to="none", seed=0)
    return cfg, facts, out


@pytest.mark.parametrize("kind", STAGES)
def test_lora_stage_changes_only_adapted_weights(kind, tiny_model, tmp_path):
    cfg, facts, out = _train(kind, tiny_model, tmp_path)
    assert math.isfinite(facts["train_loss"]) and facts["steps"] == 3
    assert 0 < facts["trainable_params"] < facts["total_params"]
    before, after = _weights(tiny_model), _weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapted = {k for k in before if any(f".{t}." in k for t in LORA_TARGETS)}
    assert changed, "training changed no weight"
    assert changed <= adapted, f"frozen weights changed under LoRA: {sorted(changed - adapted)[:3]}"
    assert (out / "adapter" / "adapter_config.json").exists()
    # the artefact is a plain HF folder that reloads and generates
    from dft.modeling import load_model, load_tokenizer

    tok = load_tokenizer(out, cfg.model)
    model = load_model(out, cfg.model)
    ids = tok("Bone is", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4 or int(gen[0, -1]) in (tok.eos_token_id,)


def test_full_finetuning_changes_the_embeddings(tiny_model, tmp_path):
    _, facts, out = _train("cpt", tiny_model, tmp_path, peft="full", steps=2)
    assert facts["trainable_params"] == facts["total_params"]
    before, after = _weights(tiny_model), _weights(out)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not (out / "adapter").exists()


def test_cpt_loss_falls_on_repeated_text(tiny_model, tmp_path):
    """Over-fitting a few blocks: the logged loss at the end is well below the start."""
    _, facts, _ = _train("cpt", tiny_model, tmp_path, peft="full", steps=10, n_rows=1,
                         extra={"learning_rate": 1e-2, "lr_scheduler_type": "constant", "warmup_steps": 0,
                                "num_train_epochs": 10})
    losses = [h["loss"] for h in facts["log_history"] if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses


def test_resume_from_checkpoint(tiny_model, tmp_path):
    """A stage whose work dir holds a checkpoint resumes from it (a requeued job loses little)."""
    _train("sft", tiny_model, tmp_path / "a", steps=2)
    from dft.stages import last_checkpoint

    # simulate a preempted job: the checkpoint stays in work/, the final artefact was never written
    work = tmp_path / "a" / "work"
    assert last_checkpoint(work) and last_checkpoint(work).endswith("checkpoint-2")
    import shutil

    shutil.move(str(work), str(tmp_path / "b" / "work")) if (tmp_path / "b").mkdir() is None else None
    _, facts, _ = _train("sft", tiny_model, tmp_path / "b", steps=4)
    assert facts["resumed_from"].endswith("checkpoint-2")
    assert facts["steps"] == 4


def test_sft_trains_on_assistant_tokens_only(tiny_model):
    """The SFT dataset is prompt-completion: TRL's labels cover the assistant turn + end token only."""
    from trl import SFTConfig, SFTTrainer

    from dft.data import load_split
    from dft.modeling import load_model, load_tokenizer
    from dft.stages import sft

    cfg = compose(["model=tiny", "data=tiny"])
    tok = load_tokenizer(tiny_model, cfg.model)
    row = load_split(cfg.data, "messages")[0]
    ds = sft.build_dataset([row], tok, cfg.model)
    args = SFTConfig(output_dir="/tmp/unused-sft", max_length=4096, report_to="none", use_cpu=True, bf16=False)
    tr = SFTTrainer(model=load_model(tiny_model, cfg.model), args=args, train_dataset=ds, processing_class=tok)
    ex = tr.train_dataset[0]
    ids = ex["input_ids"]
    mask = [lab != -100 for lab in ex["labels"]]  # TRL 1.x stores the completion mask as -100 labels
    answer = row["messages"][-1]["content"]
    completion = tok.decode([i for i, m in zip(ids, mask) if m])
    assert completion.startswith(answer[:20]) and completion.rstrip().endswith("<|im_end|>")
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert row["messages"][0]["content"][:30] in prompt and "<|im_start|>assistant" in prompt


def test_packed_documents_do_not_attend_across_boundaries(tiny_model):
    """Packed CPT rows carry restarting position_ids; the logits of a document packed after another
    equal its logits alone (no cross-document attention), as TRL's bfd packing relies on.
    transformers builds the block-diagonal mask from position_ids only without a KV cache, which is
    how TRL's SFTTrainer calls the model (``use_cache=False``)."""
    from dft.modeling import load_model

    cfg = compose(["model=tiny"])
    model = load_model(tiny_model, cfg.model).eval()
    a, b = torch.arange(5, 17), torch.arange(100, 109)
    with torch.no_grad():
        alone = model(input_ids=b[None], use_cache=False).logits[0]
        packed = model(input_ids=torch.cat([a, b])[None], use_cache=False,
                       position_ids=torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]).logits[0, len(a):]
        leaky = model(input_ids=torch.cat([a, b])[None], use_cache=False).logits[0, len(a):]
    assert torch.allclose(alone, packed, atol=1e-5)
    assert not torch.allclose(alone, leaky, atol=1e-3)


def test_qlora_trains_on_cpu_and_saves_an_unquantised_model(tiny_model, tmp_path, caplog):
    """peft=qlora: 4-bit NF4 base through bitsandbytes (CPU works, slowly); the saved artefact is
    the adapter merged into the unquantised base, a plain fp32 folder."""
    import json
    import logging

    from dft import modeling

    modeling._WARNED.clear()  # warned once per process: an earlier in-process QLoRA test may have said it
    with caplog.at_level(logging.WARNING, logger="dft.modeling"):
        _, facts, out = _train("sft", tiny_model, tmp_path, peft="qlora", steps=2)
    assert math.isfinite(facts["train_loss"])
    assert any("no faster than full precision" in r.message for r in caplog.records)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    w = _weights(out)
    assert all(t.dtype == torch.float32 for t in w.values())
    before = _weights(tiny_model)
    changed = {k for k in before if not torch.equal(before[k], w[k])}
    assert changed and all(any(f".{t}." in k for t in LORA_TARGETS) for k in changed)


def test_orpo_drops_pairs_whose_prompt_fills_max_length(tiny_model, tmp_path, caplog):
    """A pair whose prompt alone fills max_length would be truncated to empty completions: ORPO's
    mean log-probability is then 0/0 and NaN gradients poison every weight (seen on the real
    LAMM pairs at max_length 256). dft drops such rows, says so, and the weights stay finite."""
    import logging

    from dft.data import load_split
    from dft.stages import train_stage

    cfg = compose(["model=tiny", "data=tiny", "strategy=orpo", "peft=lora"])
    rows = load_split(cfg.data, "preference")[:4]
    # conf/stage/orpo.yaml sets max_length 256: this prompt alone is longer (300+ tokens)
    rows = [{**rows[0], "prompt": " ".join(["stress strain modulus"] * 100)}] + rows
    sc = cfg.strategy.orpo
    sc.trainer.max_steps, sc.trainer.logging_steps, sc.trainer.learning_rate = 5, 1, 1e-3
    with caplog.at_level(logging.WARNING, logger="dft.stages"):
        facts = train_stage(kind="orpo", stage_cfg=sc, rows=rows, start_path=tiny_model, model_cfg=cfg.model,
                            peft_cfg=cfg.peft, work_dir=tmp_path / "work", out_dir=tmp_path / "final", device="cpu",
                            report_to="none", seed=0)
    assert facts["rows_dropped_long_prompt"] == 1 and facts["audit"]["rows_dropped"]["long_prompt"] == 1
    assert facts["rows"] == 4 - facts["audit"]["rows_dropped"]["cut_completion"] > 0
    assert "stage orpo: dropped 1 of 5 rows whose prompt alone fills max_length=256 tokens" in caplog.text
    assert all(math.isfinite(e["grad_norm"]) for e in facts["log_history"] if "grad_norm" in e)
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "final").values())


def test_diverged_training_is_an_error_not_an_artefact(tiny_model, tmp_path):
    """A learning rate of 1e30 makes the weights overflow within a few steps; transformers logs the
    NaN loss as a running mean, so dft checks grad norms and weights, fails naming the stage,
    and writes no artefact."""
    from dft import DftError

    with pytest.raises(DftError, match=r"^stage sft: training (loss is nan|diverged)"):
        _train("sft", tiny_model, tmp_path, steps=6, extra={"learning_rate": 1e30})
    assert not (tmp_path / "final").exists()


# --------------------------------------------------------------------------- what each stage trains on

def _build(kind, tiny_model, tmp_path, rows, **stage):
    from dft.stages import build_trainer

    cfg = compose(["model=tiny", "data=tiny", f"strategy={kind}", "peft=lora"])
    sc = cfg.strategy[kind]
    for k, v in stage.items():
        if k.startswith("trainer."):
            sc.trainer[k[len("trainer."):]] = v
        else:
            sc[k] = v
    return build_trainer(kind=kind, stage_cfg=sc, rows=rows, start_path=tiny_model, model_cfg=cfg.model,
                         peft_cfg=cfg.peft, work_dir=tmp_path, device="cpu", report_to="none", seed=0)


def _segments_without_end(trainer, end_id=2):
    """Rows of TRL's packed SFT dataset whose labels hold no <|im_end|> (a cut answer), counted directly."""
    n = 0
    for labels, lens in zip(trainer.train_dataset["labels"], trainer.train_dataset["seq_lengths"]):
        start = 0
        for m in lens:
            n += end_id not in labels[start:start + m]
            start += m
    return n


LONG_ANSWER = " ".join(["Yield stress rises with strain rate."] * 30)   # ~210 tokens, over max_length 128
SHORT = {"id": "ok", "messages": [{"role": "user", "content": "Is steel strong?"}, {"role": "assistant", "content": "Yes."}]}
CUT = {"id": "cut", "messages": [{"role": "user", "content": "Explain."}, {"role": "assistant", "content": LONG_ANSWER}]}


def test_packed_sft_never_trains_a_cut_answer_silently(tiny_model, tmp_path, caplog):
    """With packing, TRL skips its truncate-and-drop step: a row whose answer does not fit is packed cut,
    without its <|im_end|>. dft's default drops it (counted, warned); ``keep`` trains it (counted, warned);
    ``error`` stops naming the row. The counts are checked against TRL's own packed dataset."""
    import logging

    from dft import DftError

    with caplog.at_level(logging.WARNING, logger="dft.stages"):
        trainer, _, audit = _build("sft", tiny_model, tmp_path / "a", [SHORT, CUT, SHORT | {"id": "ok2"}])
    assert audit["rows_given"] == 3 and audit["rows"] == 2 and audit["truncation"] == "drop"
    assert audit["rows_dropped"] == {"long_prompt": 0, "cut_completion": 1, "cut_prompt": 0}
    assert audit["rows_missing_end_token"] == 0 and _segments_without_end(trainer) == 0
    assert "stage sft: dropped 1 of 3 rows whose completion does not fit in max_length=128 tokens" in caplog.text
    assert audit["supervised_tokens"] == 8  # 2 rows x ("Yes", ".", <|im_end|>, "\n")
    assert audit["tokens_per_row"] == {"min": 38, "median": 38.0, "max": 38}
    assert audit["packing_efficiency"] == round(76 / 128, 4)

    with caplog.at_level(logging.WARNING, logger="dft.stages"):
        trainer, _, audit = _build("sft", tiny_model, tmp_path / "b", [SHORT, CUT], truncation="keep")
    assert ("stage sft: 1 of 2 rows train on a cut completion (1 lose their end token) at max_length=128 "
            "(strategy.sft.truncation=keep)") in caplog.text
    assert audit["rows"] == 2 and audit["rows_truncated"] == {"prompt": 0, "completion": 1, "end_token": 1}
    assert audit["rows_missing_end_token"] == 1 and _segments_without_end(trainer) == 1  # the fault, measured
    assert audit["tokens_per_row"]["max"] == 128

    with pytest.raises(DftError, match=r"^stage sft: row 'cut' is \d+ tokens, over max_length=128: its answer and "
                                       r"its end token would be cut; raise strategy.sft.trainer.max_length"):
        _build("sft", tiny_model, tmp_path / "c", [SHORT, CUT], truncation="error")


def test_dpo_pairs_whose_answer_would_be_cut_are_dropped(tiny_model, tmp_path):
    """DPO's collator cuts prompt+answer at max_length: the answer loses its <|im_end|>. dft drops the pair
    from the trainer's own tokenized dataset by default, or keeps it counted."""
    pair = {"id": "p", "prompt": "Is steel strong?", "chosen": "Yes.", "rejected": "No."}
    long = {"id": "long", "prompt": "Explain.", "chosen": LONG_ANSWER, "rejected": "No."}
    trainer, _, audit = _build("dpo", tiny_model, tmp_path / "a", [pair, long], **{"trainer.max_length": 128})
    assert len(trainer.train_dataset) == 1 and audit["rows"] == 1
    assert audit["rows_dropped"]["cut_completion"] == 1 and audit["rows_missing_end_token"] == 0
    assert audit["supervised_tokens"] == 8 and audit["first_example"]["chosen"]["input_ids"][-2:] == [2, 198]
    trainer, _, audit = _build("dpo", tiny_model, tmp_path / "b", [pair, long], truncation="keep",
                               **{"trainer.max_length": 128})
    assert len(trainer.train_dataset) == 2
    assert audit["rows_truncated"] == {"prompt": 0, "completion": 1, "end_token": 1}
    assert audit["rows_missing_end_token"] == 1  # the long chosen, cut by the collator at 128
    from dft import DftError

    with pytest.raises(DftError, match=r"^stage dpo: row 'long' is \d+ tokens, over max_length=128: its answer and "
                                       r"its end token would be cut"):
        _build("dpo", tiny_model, tmp_path / "c", [pair, long], truncation="error", **{"trainer.max_length": 128})


def test_orpo_nll_is_over_the_chosen_answer_unless_set_otherwise(tiny_model, tmp_path):
    """ORPO's NLL term: TRL averages it over prompt + answer (every non-pad token); the ORPO paper's
    L_SFT, and dft's default, is the answer only. Checked against a hand computation on one batch."""
    import torch.nn.functional as F

    pair = {"id": "p", "prompt": "Is steel strong?", "chosen": "Yes.", "rejected": "No."}
    for nll_over in ("completion", "prompt_and_completion"):
        trainer, _, audit = _build("orpo", tiny_model, tmp_path / nll_over, [pair], nll_over=nll_over)
        batch = trainer.data_collator([trainer.train_dataset[0]])
        model = trainer.model.eval()
        with torch.no_grad():
            nll = trainer.concatenated_forward(model, batch)[4]
            ids = batch["chosen_input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
        target = ids[0, 1:]
        per_token = F.cross_entropy(logits, target, reduction="none")
        n_prompt = batch["chosen_labels"][0].tolist().count(-100)
        expected = per_token[n_prompt - 1:].mean() if nll_over == "completion" else per_token.mean()
        assert audit["nll_over"] == nll_over
        assert torch.allclose(nll, expected, atol=1e-5), (nll_over, float(nll), float(expected))
        assert n_prompt == 34 and per_token.shape[0] == 37  # 34 prompt tokens, 4 answer tokens


def test_dpo_label_smoothing_without_effect_is_refused(tiny_model, tmp_path):
    """TRL 1.x's sigmoid DPO loss ignores label_smoothing (the conservative-DPO form is gone): refused,
    in a run and in the dry run (which builds every TRL config); loss types that read it pass."""
    from dft import DftError
    from dft.stages import build_trl_config, check_trainer_semantics

    cfg = compose(["model=tiny", "strategy=dpo"])
    kw = dict(output_dir=str(tmp_path), device="cpu", peft_cfg=cfg.peft, model_cfg=cfg.model, report_to="none", seed=0)
    msg = (r"^strategy.dpo.trainer.label_smoothing=0.1 has no effect with loss_type \['sigmoid'\] \(TRL reads it only "
           r"for robust, exo_pair, aot, aot_unpaired\)")
    with pytest.raises(DftError, match=msg):
        build_trl_config("dpo", {"label_smoothing": 0.1}, **kw)
    assert build_trl_config("dpo", {"label_smoothing": 0.1, "loss_type": ["robust"]}, **kw).label_smoothing == 0.1
    check_trainer_semantics("dpo", {"label_smoothing": 0.0})
    from conftest import run_train

    p = run_train(["model=tiny", "data=tiny", "strategy=dpo", "eval=none", "merge=none", "logger=none",
                   "dry_run=true", "+strategy.dpo.trainer.label_smoothing=0.1"], tmp_path, check=False)
    assert p.returncode != 0 and "strategy.dpo.trainer.label_smoothing=0.1 has no effect" in p.stdout + p.stderr


def test_stage_settings_are_checked(tiny_model, tmp_path):
    from dft import DftError
    from dft.stages import check_stage_settings

    cfg = compose(["strategy=sft_orpo"])
    check_stage_settings("orpo", cfg.strategy.orpo)
    cfg.strategy.sft.truncation = "cut"
    with pytest.raises(DftError, match=r"^strategy.sft.truncation='cut' is not one of drop, keep, error$"):
        check_stage_settings("sft", cfg.strategy.sft)
    cfg.strategy.sft.truncation = "drop"
    cfg.strategy.sft.nll_over = "prompt_and_completion"
    with pytest.raises(DftError, match=r"^strategy.sft.nll_over='prompt_and_completion' applies to orpo only"):
        check_stage_settings("sft", cfg.strategy.sft)


def test_cpt_document_cut_by_a_truncating_pack_follows_the_policy(tiny_model, tmp_path):
    """``packing_strategy: bfd`` truncates a document longer than a block (bfd_split, the default, splits
    it): the document loses its tail and its <|endoftext|>. Dropped by default, counted under ``keep``."""
    docs = [{"id": "short", "text": "Steel is strong."}, {"id": "long", "text": LONG_ANSWER}]
    _, _, audit = _build("cpt", tiny_model, tmp_path / "a", docs, **{"trainer.packing_strategy": "bfd"})
    assert audit["rows"] == 1 and audit["rows_dropped"]["cut_completion"] == 1
    assert audit["first_example"]["input_ids"] == [16949, 299, 314, 1837, 30, 0]
    _, _, audit = _build("cpt", tiny_model, tmp_path / "b", docs, truncation="keep", **{"trainer.packing_strategy": "bfd"})
    assert audit["rows"] == 2 and audit["rows_truncated"] == {"prompt": 0, "completion": 1, "end_token": 1}
    assert audit["rows_missing_end_token"] == 1  # measured: one <|endoftext|> in the packed data for two documents
    _, _, audit = _build("cpt", tiny_model, tmp_path / "c", docs)  # bfd_split: nothing cut, the long one split
    n_long = audit["tokens_per_row"]["max"]
    assert audit["tokens_per_row"]["min"] == 6 and n_long > 128
    # 2 blocks: the long document's first 128 tokens, then its rest with the short one beside it
    assert audit["rows"] == 2 and audit["sequences"] == 2 and audit["rows_missing_end_token"] == 0
    assert audit["supervised_tokens"] == 6 + n_long  # every token of a CPT document is a label
    assert audit["packing_efficiency"] == round((6 + n_long) / 256, 4)


def test_orpo_keep_policy_cuts_the_answer_at_max_length(tiny_model, tmp_path):
    pair = {"id": "p", "prompt": "Is steel strong?", "chosen": "Yes.", "rejected": "No."}
    long = {"id": "long", "prompt": "Explain.", "chosen": LONG_ANSWER, "rejected": "No."}
    trainer, _, audit = _build("orpo", tiny_model, tmp_path, [pair, long], truncation="keep",
                               **{"trainer.max_length": 128})
    assert len(trainer.train_dataset) == 2 and audit["rows_truncated"]["end_token"] == 1
    assert max(len(x) for x in trainer.train_dataset["chosen_input_ids"]) == 128
    assert audit["rows_missing_end_token"] == 1
