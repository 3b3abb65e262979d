"""Perplexity's token stream per family (the BOS dft/families.py promises) and paired comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dft.evaluation.compare import cell_comparisons, comparison_pairs
from dft.evaluation.perplexity import token_stream

DOCS = ["Steel yields.", "Bone is tough."]


def _tok(cache_dir, family: str, instruct: bool = True):
    from transformers import AutoTokenizer

    from dft.modeling import ensure_embedded_model
    from dft.tokenizers_offline import llama3_tokenizer_dir, mistral_v3_tokenizer_dir

    folder = {"llama3": lambda: llama3_tokenizer_dir(cache_dir, instruct=instruct),
              "mistral": lambda: mistral_v3_tokenizer_dir(cache_dir),
              "smollm2": lambda: ensure_embedded_model(cache_dir)}[family]()
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family,instruct,expected", [
    # <|begin_of_text|> Steel yields . <|eot_id|>  <|begin_of_text|> Bone is tough . <|eot_id|>
    ("llama3", True, [128000, 66048, 36508, 13, 128009, 128000, 63429, 374, 11292, 13, 128009]),
    ("llama3", False, [128000, 66048, 36508, 13, 128001, 128000, 63429, 374, 11292, 13, 128001]),
    # <s> ... </s> per document
    ("mistral", True, [1, 16642, 19702, 29491, 2, 1, 1133, 1306, 1117, 11110, 29491, 2]),
    # SmolLM2: no BOS; <|im_end|> (its EOS) after each document
    ("smollm2", True, [16949, 299, 11783, 30, 2, 48455, 314, 9228, 30, 2]),
])
def test_token_stream_has_one_bos_per_document_where_the_family_has_one(cache_dir, family, instruct, expected):
    stream, n_docs = token_stream(_tok(cache_dir, family, instruct), DOCS)
    assert stream == expected and n_docs == 2
    stream, n_docs = token_stream(_tok(cache_dir, family, instruct), DOCS, max_tokens=5)
    assert stream == expected[:6] and n_docs == 2


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_cell_comparisons_from_eval_files(tmp_path):
    arts = [{"name": "start", "kind": "start", "stages": [], "parents": []},
            {"name": "cpt", "kind": "stage", "stages": ["cpt"], "parents": []},
            {"name": "cpt_sft", "kind": "stage", "stages": ["cpt", "sft"], "parents": []},
            {"name": "cpt_sft+ties", "kind": "merge", "stages": ["cpt", "sft"], "parents": ["cpt_sft", "start"]}]
    # eval.stages=false: cpt was not evaluated, so cpt_sft is compared with start
    assert comparison_pairs(arts, {"start", "cpt_sft", "cpt_sft+ties"}) == [
        {"kind": "stage_vs_parent", "a": "cpt_sft", "b": ["start"]},
        {"kind": "merge_vs_parent", "a": "cpt_sft+ties", "b": ["cpt_sft"]},
        {"kind": "merge_vs_parent", "a": "cpt_sft+ties", "b": ["start"]},
        {"kind": "merge_vs_mean_of_parents", "a": "cpt_sft+ties", "b": ["cpt_sft", "start"]}]
    correct = {"start": [0] * 20, "cpt_sft": [1] * 12 + [0] * 8, "cpt_sft+ties": [1] * 12 + [0] * 8}
    for name, c in correct.items():  # the merge's items equal its parent's
        items = [{"id": f"q{i}", "correct": bool(v), "correct_ll": bool(v)} for i, v in enumerate(c)]
        _write(tmp_path / name / "mcq.json", {"items": items[::-1] if name == "start" else items})  # order-free
        _write(tmp_path / name / "perplexity.json", {"blocks": {"nll": [10.0, 20.0, 30.0], "tokens": [10, 10, 10]}})
    recs = cell_comparisons(tmp_path, [a for a in arts if a["name"] != "cpt"], ["mcq"], n_resamples=2000)
    by = {(r["a"], r["b"], r["metric"]): r for r in recs}
    assert len(recs) == 4 * 3  # 4 pairs x (acc, acc_ll, ppl)
    up = by[("cpt_sft", "start", "mcq/acc")]
    assert (up["diff"], up["n10"], up["n01"], up["test"], up["n"]) == (0.6, 12, 0, "mcnemar_exact", 20)
    assert up["p"] == pytest.approx(2 * 0.5 ** 12) and up["ci_low"] > 0.3
    same = by[("cpt_sft+ties", "cpt_sft", "mcq/acc_ll")]
    assert (same["diff"], same["ci_low"], same["ci_high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    mean = by[("cpt_sft+ties", "mean(cpt_sft,start)", "mcq/acc")]
    assert mean["diff"] == pytest.approx(0.3) and mean["test"] == "paired_bootstrap" and mean["b_parts"] == ["cpt_sft", "start"]
    assert mean["p"] < 0.01
    ppl = by[("cpt_sft", "start", "ppl")]
    assert (ppl["diff"], ppl["p"], ppl["n"], ppl["a_value"]) == (0.0, 1.0, 3, pytest.approx(np.exp(2.0)))


def test_cell_summary_carries_comparisons_intervals_and_synergy_p(tmp_path):
    """Cell.summary (what summary.json and the W&B run summary get) from eval files, no model."""
    from conftest import compose
    from dft.pipeline import Artefact, Cell
    from dft.stats import accuracy_stats

    cfg = compose(["model=tiny", "data=tiny", "strategy=cpt", "merge=slerp", "logger=none", "eval.benchmarks=[mascqa]",
                   "eval.perplexity=false", f"paths.stages={tmp_path / '_stages'}"])
    cell = Cell(cfg, tmp_path / "cell", "c")
    correct = {"start": [1] * 4 + [0] * 16, "cpt": [1] * 14 + [0] * 6, "cpt+slerp": [1] * 14 + [0] * 6}
    arts = {}
    for kind, name in (("start", "start"), ("stage", "cpt"), ("merge", "cpt+slerp")):
        st = accuracy_stats(correct[name])
        metrics = {"mascqa/n": 20, **{f"mascqa/acc{k}": st[k.lstrip("_") or "acc"] for k in ("", "_stderr", "_ci_low", "_ci_high")}}
        items = [{"id": i, "correct": bool(v), "correct_ll": None} for i, v in enumerate(correct[name])]
        _write(cell.run_dir / "eval" / name / "mascqa.json", {"items": items})
        arts[name] = Artefact(name=name, kind=kind, path=tmp_path, key=name, stages=["cpt"] if name != "start" else [],
                              merge="slerp" if kind == "merge" else None,
                              parents=["cpt", "start"] if kind == "merge" else [], metrics=metrics)
    cell.artefacts = list(arts.values())
    s = cell.summary([arts["cpt+slerp"]], arts["start"])
    assert s["metrics"]["eval/start/mascqa/acc_ci_low"] == pytest.approx(accuracy_stats(correct["start"])["ci_low"])
    assert {f"eval/cpt/mascqa/acc{k}" for k in ("", "_stderr", "_ci_low", "_ci_high")} <= set(s["metrics"])
    by = {(c["kind"], c["a"], c["b"]): c for c in s["comparisons"]}
    up = by[("stage_vs_parent", "cpt", "start")]
    assert (up["metric"], up["diff"], up["n10"], up["n01"], up["test"]) == ("mascqa/acc", 0.5, 10, 0, "mcnemar_exact")
    assert up["p"] == pytest.approx(0.001953125)  # 10 discordant pairs, all one way
    same = by[("merge_vs_parent", "cpt+slerp", "cpt")]
    assert (same["diff"], same["p"]) == (0.0, 1.0)
    (syn,) = s["synergy"]  # acc_ll is off: one metric
    mean = by[("merge_vs_mean_of_parents", "cpt+slerp", "mean(cpt,start)")]
    assert syn["deviation"] == pytest.approx(0.25) == pytest.approx(mean["diff"])
    assert (syn["ci_low"], syn["ci_high"], syn["p"]) == (mean["ci_low"], mean["ci_high"], mean["p"])
    assert not any(k.endswith(("_ci_low", "_ci_high", "_stderr", "/n")) for k in {r["metric"] for r in s["synergy"]})


@pytest.mark.parametrize("family,instruct,end_id", [
    ("llama3", True, 128001),   # <|end_of_text|>, not the instruct tokenizer's EOS <|eot_id|> (128009)
    ("mistral", True, 2),       # </s>
    ("smollm2", True, 0),       # <|endoftext|>, not the instruct tokenizer's EOS <|im_end|> (2)
])
def test_documents_end_with_the_family_document_end_token_as_in_cpt(cache_dir, family, instruct, end_id):
    """Perplexity's documents end as CPT's do (dft.families.doc_end_token), whatever the tokenizer's EOS."""
    from types import SimpleNamespace

    from dft.families import doc_end_token

    tok = _tok(cache_dir, family, instruct)
    token, i = doc_end_token(tok, SimpleNamespace(family=family, name=family, eos_tokens=[]))
    assert i == end_id
    stream, _ = token_stream(tok, DOCS, end_id=i)
    plain, _ = token_stream(tok, DOCS)
    ends = [k for k, t in enumerate(plain) if t == tok.eos_token_id]
    assert len(ends) == 2 and [stream[k] for k in ends] == [end_id, end_id]
    assert [t for k, t in enumerate(stream) if k not in ends] == [t for k, t in enumerate(plain) if k not in ends]
