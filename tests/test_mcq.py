"""MCQ evaluation: letter extraction, log-likelihood scoring, perplexity, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from dft.evaluation.mcq import extract_letter, format_question, render_prompt

OPTS = ["austenite", "ferrite", "cementite", "martensite"]


@pytest.mark.parametrize("output,expected", [
    (" B", "B"),
    ("B", "B"),
    (" (B)", "B"),
    (" B)", "B"),
    (" B.", "B"),
    (" **B**", "B"),
    (" The answer is B.", "B"),
    ("\nAnswer: (D) martensite", "D"),
    (" C. cementite, because it is an iron carbide", "C"),
    (" cementite", "C"),                      # an option's text instead of its letter
    (" Martensite forms on quenching", "D"),
    (" A or B", None),                         # two letters: ambiguous, scored wrong
    (" (A) austenite and (C) cementite", None),
    (" A material that is hard", None),        # the article, not an answer
    (" I am not sure", None),
    (" E", None),                              # not among the 4 options
    ("", None),
])
def test_extract_letter(output, expected):
    assert extract_letter(output, OPTS) == expected


def test_format_question_lists_options_once():
    item = {"question": "Which phase is an iron carbide?", "options": OPTS}
    assert format_question(item) == "Which phase is an iron carbide?\n(A) austenite\n(B) ferrite\n(C) cementite\n(D) martensite"
    inline = {"question": "Pick one (A) x (B) y", "options": ["x", "y"]}
    assert format_question(inline) == "Pick one (A) x (B) y"


def test_prompt_follows_the_paper(tiny_model):
    from dft.modeling import load_tokenizer

    cfg = compose(["model=tiny"])
    tok = load_tokenizer(tiny_model, cfg.model)
    text = render_prompt({"question": "Q?", "options": ["a", "b"]}, tok, cfg.model)
    assert text.endswith("<|im_start|>user\nYou respond with one word or letter. Select the correct answer to this "
                         "question: Q?\n(A) a\n(B) b<|im_end|>\n<|im_start|>assistant\nThe correct answer is:")


def _rigged(tiny_model, letter):
    """The tiny model with the logit of ``" <letter>"`` raised by 100 at every position."""
    from dft.modeling import load_model, load_tokenizer

    cfg = compose(["model=tiny"])
    tok = load_tokenizer(tiny_model, cfg.model)
    tok.padding_side = "left"
    model = load_model(tiny_model, cfg.model)
    tid = tok(" " + letter, add_special_tokens=False)["input_ids"][0]

    def hook(_mod, _inp, out):
        out = out.clone()
        out[..., tid] += 100.0
        return out

    model.lm_head.register_forward_hook(hook)
    return cfg, tok, model


def test_loglik_and_greedy_pick_the_certain_option(tiny_model):
    from dft.evaluation.mcq import evaluate_mcq
    from dft.modeling import generation_eos_ids

    cfg, tok, model = _rigged(tiny_model, "C")
    items = [{"id": str(i), "question": f"Question {i} about steel?", "options": OPTS,
              "answer": "C" if i % 2 == 0 else "A", "category": "phase" if i < 3 else "other"} for i in range(6)]
    rec = evaluate_mcq(model, tok, cfg.model, items, eos_ids=generation_eos_ids(tok, cfg.model), batch_size=4,
                       max_new_tokens=3, progress=False)
    assert [r["pred_ll"] for r in rec["items"]] == ["C"] * 6
    assert [r["pred"] for r in rec["items"]] == ["C"] * 6
    assert rec["acc_ll"] == pytest.approx(0.5) and rec["acc"] == pytest.approx(0.5)
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(2, 3, method="wilson")
    se = math.sqrt((2 / 3) * (1 / 3) / 2)  # sem of [1, 1, 0], ddof=1
    assert rec["by_category"]["phase"] == {
        "n": 3, "acc": pytest.approx(2 / 3), "acc_stderr": pytest.approx(se), "acc_ci_low": pytest.approx(lo),
        "acc_ci_high": pytest.approx(hi), "acc_ll": pytest.approx(2 / 3), "acc_ll_stderr": pytest.approx(se),
        "acc_ll_ci_low": pytest.approx(lo), "acc_ll_ci_high": pytest.approx(hi)}
    lo6, hi6 = proportion_confint(3, 6, method="wilson")
    assert (rec["n"], rec["acc_ll_ci_low"], rec["acc_ll_ci_high"]) == (6, pytest.approx(lo6), pytest.approx(hi6))
    assert [r["id"] for r in rec["items"]] == [str(i) for i in range(6)]  # item order kept despite length sorting


def test_perplexity_is_exp_of_mean_token_nll(tiny_model):
    from dft.evaluation.perplexity import perplexity
    from dft.modeling import load_model, load_tokenizer

    cfg = compose(["model=tiny"])
    tok = load_tokenizer(tiny_model, cfg.model)
    model = load_model(tiny_model, cfg.model)
    docs = ["Bone is a composite of collagen and hydroxyapatite.", "Steel is iron with carbon."]
    r = perplexity(model, tok, docs, block=8, batch_size=3, progress=False)
    # reference: one pass per block, mean NLL over all predicted tokens
    stream = []
    for d in docs:  # SmolLM2 has no BOS: the tokenizer adds no special token to raw text
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    nll, n = 0.0, 0
    block_nll = []
    with torch.no_grad():
        for i in range(0, len(stream) - 1, 8):
            b = torch.tensor(stream[i:i + 8])[None]
            if b.shape[1] < 2:
                continue
            lp = torch.log_softmax(model(input_ids=b).logits[0, :-1].float(), -1)
            block_nll.append(-float(lp.gather(-1, b[0, 1:, None]).sum()))
            nll += block_nll[-1]
            n += b.shape[1] - 1
    assert r["n_tokens"] == n and r["n_docs"] == 2
    assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # per-block sums kept for the bootstrap over blocks; the interval holds the estimate
    assert r["n_blocks"] == len(block_nll) == len(r["blocks"]["tokens"]) and sum(r["blocks"]["tokens"]) == n
    assert r["blocks"]["nll"] == pytest.approx(block_nll, rel=1e-4)
    assert r["ci_low"] < r["ppl"] < r["ci_high"] and r["stderr"] > 0


def test_embedded_model_quick_eval_is_deterministic_and_above_zero(embedded_model):
    """The real SmolLM2-135M-Instruct: accuracy in [0, 1], identical on a second run (greedy)."""
    from dft.data import load_benchmark
    from dft.evaluation.mcq import evaluate_mcq
    from dft.modeling import generation_eos_ids, load_model, load_tokenizer

    cfg = compose(["data=tiny"])
    tok = load_tokenizer(embedded_model, cfg.model)
    tok.padding_side = "left"
    model = load_model(embedded_model, cfg.model)
    items = load_benchmark(cfg.data, "anatomy_mcq")[:8]
    a = evaluate_mcq(model, tok, cfg.model, items, eos_ids=generation_eos_ids(tok, cfg.model), batch_size=8, progress=False)
    b = evaluate_mcq(model, tok, cfg.model, items, eos_ids=generation_eos_ids(tok, cfg.model), batch_size=8, progress=False)
    assert 0.0 <= a["acc"] <= 1.0 and 0.0 <= a["acc_ll"] <= 1.0
    assert a["items"] == b["items"]
    assert any(r["pred"] is not None for r in a["items"]), [r["output"] for r in a["items"]]


def test_loglik_only_path_scores_the_last_position(tiny_model):
    """generate=False: one forward pass keeping only the last position's logits."""
    from dft.evaluation.mcq import evaluate_mcq
    from dft.modeling import generation_eos_ids

    cfg, tok, model = _rigged(tiny_model, "B")
    items = [{"id": str(i), "question": f"Q{i}?", "options": OPTS, "answer": "B" if i else "D", "category": "x"}
             for i in range(3)]
    rec = evaluate_mcq(model, tok, cfg.model, items, eos_ids=generation_eos_ids(tok, cfg.model), generate=False,
                       progress=False)
    assert [r["pred_ll"] for r in rec["items"]] == ["B", "B", "B"]
    assert rec["acc_ll"] == pytest.approx(2 / 3) and rec["acc"] is None


def test_common_prefix_length_leaves_a_token_per_row():
    from dft.evaluation.mcq import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8, 9], [7, 8, 9]]) == 2  # never the whole of a prompt
    assert common_prefix_length([[5, 6]]) == 1
    assert common_prefix_length([[1, 2], [3, 4]]) == 0
    assert common_prefix_length([]) == 0


@pytest.mark.parametrize("family,config", [("llama3", "tiny_llama3"), ("mistral", "tiny_mistral"), ("smollm2", "tiny")])
def test_shared_prefix_cache_matches_whole_prompt_forward(family, config, cache_dir):
    """The prompts' shared prefix, encoded once and copied into a padded batch, gives each row the
    last-position logits of its own unpadded prompt; evaluate_mcq's records are the same with and
    without it (generations included), on each paper family's template and architecture."""
    from dft.evaluation.mcq import PrefixCache, _pad_batch, common_prefix_length, evaluate_mcq
    from dft.families import ensure_tiny_model
    from dft.modeling import generation_eos_ids, load_model, load_tokenizer

    path = ensure_tiny_model(cache_dir, family)
    cfg = compose([f"model={config}"])
    tok = load_tokenizer(path, cfg.model)
    tok.padding_side = "left"
    model = load_model(path, cfg.model)
    items = [{"id": str(i), "question": "Which phase forms on quenching?" + " Consider the carbon content." * i,
              "options": OPTS[: 2 + i % 3], "answer": "A", "category": "x"} for i in range(5)]
    enc = [tok(render_prompt(it, tok, cfg.model), add_special_tokens=False)["input_ids"] for it in items]
    p = common_prefix_length(enc)
    instruction = tok("You respond with one word or letter.", add_special_tokens=False)["input_ids"]
    assert p >= len(instruction)  # at least the template header and the paper's instruction
    shared = PrefixCache(model, enc[0][:p])
    batch = _pad_batch([e[p:] for e in enc], enc[0][:p], tok.pad_token_id, "cpu")
    assert batch["position_ids"][:, -1].tolist() == [len(e) - 1 for e in enc]
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"][:, p:], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"][:, p:], logits_to_keep=1,
                    **{shared.kwarg: shared.for_batch(len(enc))}).logits[:, -1]
        ref = torch.stack([model(input_ids=torch.tensor([e])).logits[0, -1] for e in enc])
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    eos = generation_eos_ids(tok, cfg.model)
    a = evaluate_mcq(model, tok, cfg.model, items, eos_ids=eos, batch_size=3, max_new_tokens=4, progress=False)
    b = evaluate_mcq(model, tok, cfg.model, items, eos_ids=eos, batch_size=3, max_new_tokens=4, progress=False,
                     prefix_cache=False)
    assert a["items"] == b["items"]
    assert any(r["output"] for r in a["items"])  # something was generated to compare
    total = sum(len(e) for e in enc)
    assert a["tokens"]["prompt"] == b["tokens"]["prompt"] == total
    assert (a["tokens"]["shared_prefix"], b["tokens"]["shared_prefix"]) == (p, 0)
    # without the cache every prompt token is forwarded (plus padding); with it the prefix once
    assert b["tokens"]["prefilled"] == total + b["tokens"]["padding"]
    assert a["tokens"]["prefilled"] == total - (len(enc) - 1) * p + a["tokens"]["padding"]
