"""dft.merging on tiny random Llama models: mergekit's output checked against hand-written formulas."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dft import ROOT, DftError
from dft.config import MergeConfig
from dft.merging import kinship, layer_t, lerp, merge_models, slerp, synergy

VOCAB, HIDDEN, LAYERS = 128, 32, 4
ATTN = [0, 0.5, 0.3, 0.7, 1]
MLP = [1, 0.5, 0.7, 0.3, 0]
MERGE_CONF = ROOT / "conf" / "merge"
#: In the fine-tuned model this tensor is a scaled copy of the partner's (cosine > 0.9995).
PARALLEL = "model.layers.1.mlp.up_proj.weight"


# ----------------------------------------------------------------------------- fixtures
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + [f"w{i}" for i in range(VOCAB - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _llama_config(vocab=VOCAB, tied=True):
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _save_llama(path: Path, seed: int, parallel_to: dict | None = None) -> Path:
    """A random tied-embedding Llama (as SmolLM) with every tensor random, norms included."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_llama_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))
            if parallel_to is not None and name in parallel_to:  # nearly parallel: mergekit's lerp branch
                p.copy_(parallel_to[name] * 1.5 + torch.randn(p.shape, generator=gen) * 1e-5)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    partner = _save_llama(root / "partner", seed=0)
    p = load_file(str(partner / "model.safetensors"))
    ft = _save_llama(root / "ft", seed=1, parallel_to={PARALLEL: p[PARALLEL]})
    return partner, ft


def _tensors(path: Path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def _conf(name: str) -> MergeConfig:
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(MergeConfig), OmegaConf.load(MERGE_CONF / f"{name}.yaml"))
    return node


@pytest.fixture(scope="module")
def slerp_merged(pair, tmp_path_factory):
    partner, ft = pair
    out = tmp_path_factory.mktemp("merged") / "slerp"
    info = merge_models(_conf("slerp"), str(ft), str(partner), str(out))
    return out, info


# ----------------------------------------------------------------------------- pure formulas
def test_slerp_formula_on_unit_vectors():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(1 / 3, v0, v1), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert torch.equal(slerp(0.0, v0, v1), v0) and torch.equal(slerp(1.0, v0, v1), v1)
    # nearly parallel: linear fallback
    v = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(slerp(0.25, v, 2 * v), lerp(0.25, v, 2 * v))
    torch.testing.assert_close(lerp(0.25, v, 2 * v), 1.25 * v)


def test_layer_t_matches_mergekit_exactly():
    from mergekit.config import evaluate_setting

    assert [layer_t(ATTN, i, 5) for i in range(5)] == ATTN  # one anchor per layer
    assert layer_t([0, 1], 0, 30) == 0 and layer_t([0, 1], 29, 30) == 1 and layer_t(0.5, 3, 4) == 0.5
    for n in (1, 2, 4, 5, 7, 30, 32):
        for sched in (ATTN, MLP, [0, 1], [0.2, 0.9, 0.1]):
            for i in range(n):
                x = i / (n - 1) if n > 1 else 1
                assert layer_t(sched, i, n) == evaluate_setting("", sched, x, validate=float)
    with pytest.raises(ValueError):
        layer_t(ATTN, 4, 4)


def test_synergy_exact():
    assert synergy(0.5, 0.75, 0.875) == {
        "p1": 0.5,
        "p2": 0.75,
        "expected": 0.625,
        "merged_score": 0.875,
        "deviation": 0.25,
        "improvement": 0.125,
        "diversity": 0.25,
    }
    s = synergy(0.75, 0.25, 0.375)
    assert s["deviation"] == -0.125 and s["improvement"] == -0.375 and s["diversity"] == 0.5


# ----------------------------------------------------------------------------- kinship
def _save_sharded(path: Path, tensors: dict) -> Path:
    """Two shards + index, as save_pretrained writes large models."""
    path.mkdir(parents=True)
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(path / fname))
    wm = {k: f for f, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


def test_kinship(tmp_path, monkeypatch):
    import dft.merging.analysis as analysis

    monkeypatch.setattr(analysis, "_CHUNK", 7)  # many chunks: exercises the streaming combination
    gen = torch.Generator().manual_seed(0)
    shapes = {"w1": (5, 6), "w2": (17,), "w3": (3, 4, 2)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    d = {k: torch.randn(s, generator=gen) * 0.1 + 0.03 for k, s in shapes.items()}
    e = {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}
    b = _save_sharded(tmp_path / "base", base)
    plus = _save_sharded(tmp_path / "plus", {k: base[k] + d[k] for k in shapes})
    plus2 = _save_sharded(tmp_path / "plus2", {k: base[k] + 2 * d[k] for k in shapes})
    minus = _save_sharded(tmp_path / "minus", {k: base[k] - d[k] for k in shapes})
    other = _save_sharded(tmp_path / "other", {k: base[k] + e[k] for k in shapes})

    same = kinship(b, plus, plus2)
    assert same["pearson"] == pytest.approx(1, abs=1e-6) and same["cosine"] == pytest.approx(1, abs=1e-6)
    opp = kinship(b, plus, minus)
    assert opp["pearson"] == pytest.approx(-1, abs=1e-6) and opp["cosine"] == pytest.approx(-1, abs=1e-6)
    assert kinship(b, plus, plus)["euclidean"] == 0

    # against numpy on the flattened deltas (as stored: float32 tensors, differences in float64)
    got = kinship(b, plus, other)
    def flat(model_dir):
        return np.concatenate([load_file(str(_where(model_dir, k)))[k].double().numpy().ravel() for k in sorted(shapes)])

    da, db = flat(plus) - flat(b), flat(other) - flat(b)
    assert got["pearson"] == pytest.approx(np.corrcoef(da, db)[0, 1], abs=1e-12)
    assert got["cosine"] == pytest.approx(da @ db / np.linalg.norm(da) / np.linalg.norm(db), abs=1e-12)
    assert got["euclidean"] == pytest.approx(np.linalg.norm(da - db), abs=1e-12)

    zero = kinship(b, b, plus)  # a zero delta: correlation undefined
    assert math.isnan(zero["pearson"]) and math.isnan(zero["cosine"])


def _where(model_dir: Path, key: str) -> Path:
    wm = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    return model_dir / wm[key]


def test_kinship_refuses_different_tensor_sets(tmp_path):
    b = _save_sharded(tmp_path / "b", {"w1": torch.ones(3), "w2": torch.ones(2)})
    x = _save_sharded(tmp_path / "x", {"w1": torch.ones(3), "w9": torch.ones(2)})
    with pytest.raises(DftError, match="hold different tensors"):
        kinship(b, b, x)


# ----------------------------------------------------------------------------- mergekit merges
def _expected_t(name: str) -> float:
    if ".layers." in name:
        idx = int(name.split(".layers.")[1].split(".")[0])
        if "self_attn" in name:
            return layer_t(ATTN, idx, LAYERS)
        if "mlp" in name:
            return layer_t(MLP, idx, LAYERS)
    return 0.5  # the unfiltered rest: norms, embeddings


def test_slerp_schedule_matches_hand_computed(pair, slerp_merged):
    partner, ft = pair
    out, info = slerp_merged
    assert info["method"] == "slerp" and not info["skipped"] and info["seconds"] > 0
    p, f, m = _tensors(partner), _tensors(ft), _tensors(out)
    assert set(m) == set(p)
    seen = set()
    for name, merged in m.items():
        t = _expected_t(name)
        seen.add(round(t, 6))
        torch.testing.assert_close(merged, slerp(t, p[name], f[name]), msg=f"{name} (t={t})")
    # the 4-layer model samples the 5-point schedules between anchors: interpolated t values occur
    assert {0.0, 1.0, 0.5} <= seen and round(layer_t(ATTN, 1, LAYERS), 6) in seen
    # anchors at t=0 / t=1 are exact copies (first layer's attention, last layer's attention)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m[name], p[name])
    name = "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(m[name], f[name])
    # the nearly parallel pair: mergekit's linear fallback, at an interpolated t
    t = layer_t(MLP, 1, LAYERS)
    assert 0 < t < 1
    torch.testing.assert_close(m[PARALLEL], lerp(t, p[PARALLEL], f[PARALLEL]))


@pytest.mark.parametrize("t", [0, 1])
def test_t_endpoints_are_exact(pair, tmp_path, t):
    partner, ft = pair
    out = tmp_path / f"t{t}"
    merge_models({"method": "slerp", "params": {"t": t}}, str(ft), str(partner), str(out))
    want = _tensors(partner if t == 0 else ft)
    got = _tensors(out)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_mismatched_vocab_is_refused_before_reading_tensors(pair, tmp_path, monkeypatch):
    import mergekit.merge

    partner, _ = pair
    bad = tmp_path / "bad"
    _llama_config(vocab=130).save_pretrained(bad)  # a config and no weights at all
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda *a, **k: pytest.fail("run_merge called"))
    out = tmp_path / "out"
    with pytest.raises(DftError) as err:
        merge_models(_conf("slerp"), str(bad), str(partner), str(out))
    assert str(err.value) == (
        f"cannot merge {bad} (vocab_size=130) with {partner} (vocab_size=128): vocabulary sizes differ"
    )
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_merged_dir_reloads_generates_and_keeps_tied_embeddings(pair, slerp_merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partner, ft = pair
    out, info = slerp_merged
    doc = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert doc["merge_method"] == "slerp" and doc["base_model"] == str(partner.resolve())
    assert [m["model"] for m in doc["models"]] == [str(partner.resolve()), str(ft.resolve())]
    assert doc["parameters"]["t"][0] == {"filter": "self_attn", "value": ATTN}
    assert (out / "mergekit.yaml").read_text() == info["config_yaml"]
    assert not list(out.parent.glob("slerp.tmp-*"))

    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    merged = _tensors(out)
    assert "lm_head.weight" not in merged  # tied: stored once, as in SmolLM
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.vocab_size == VOCAB
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])
    ids = tok("w1 w2 w3", return_tensors="pt")
    assert ids["input_ids"].tolist() == [[5, 6, 7]]
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, 6)


def test_complete_merge_is_skipped_and_a_different_one_refused(pair, slerp_merged, monkeypatch):
    import mergekit.merge

    partner, ft = pair
    out, _ = slerp_merged
    monkeypatch.setattr(mergekit.merge, "run_merge", lambda *a, **k: pytest.fail("run_merge called"))
    again = merge_models(_conf("slerp"), str(ft), str(partner), str(out))
    assert again["skipped"]
    with pytest.raises(DftError, match="already holds a different merge"):
        merge_models(_conf("slerp_const"), str(ft), str(partner), str(out))
    with pytest.raises(DftError, match="invalid mergekit options"):
        merge_models(_conf("slerp"), str(ft), str(partner), str(out) + "2", options={"out_shard_size": "big"})


def test_every_merge_yaml_builds_a_mergekit_config(pair):
    from dft.merging import build_merge_config

    partner, ft = pair
    names = sorted(p.stem for p in MERGE_CONF.glob("*.yaml"))
    assert {"none", "slerp", "slerp_linear", "slerp_const", "linear", "task_arithmetic", "ties", "dare_ties"} <= set(names)
    for name in names:
        cfg = _conf(name)
        if cfg.method == "none":
            with pytest.raises(DftError, match="nothing to merge"):
                build_merge_config(cfg, str(ft), str(partner))
            continue
        mk = build_merge_config(cfg, str(ft), str(partner))
        assert mk.merge_method == cfg.method and mk.base_model.model.path == str(partner.resolve())
    with pytest.raises(DftError, match=r"merge.params has tt, which mergekit's 'slerp' does not take \(it takes t\)"):
        build_merge_config({"method": "slerp", "params": {"tt": 0.5}}, str(ft), str(partner))


def test_task_vector_methods(pair, tmp_path):
    partner, ft = pair
    p, f = _tensors(partner), _tensors(ft)
    results = {}
    for name in ("linear", "task_arithmetic", "ties", "dare_ties"):
        state = torch.random.get_rng_state()
        merge_models(_conf(name), str(ft), str(partner), str(tmp_path / name))
        assert torch.equal(torch.random.get_rng_state(), state)  # mergekit's seeding does not leak
        results[name] = _tensors(tmp_path / name)
    for k in p:
        torch.testing.assert_close(results["linear"][k], (p[k] + f[k]) / 2)
        torch.testing.assert_close(results["task_arithmetic"][k], p[k] + 0.7 * (f[k] - p[k]))
        for name in ("ties", "dare_ties"):  # a sparsified delta: each entry is kept or dropped
            kept = results[name][k] - p[k]
            delta = f[k] - p[k]
            nz = kept != 0
            assert 0.3 < nz.float().mean() < 0.7, (name, k)
            assert torch.all(torch.sign(kept[nz]) == torch.sign(delta[nz])), (name, k)
        # TIES with one donor (normalised by its weight) keeps the surviving entries unscaled
        kept = results["ties"][k] != p[k]
        torch.testing.assert_close(results["ties"][k][kept], f[k][kept])


def _all_tensors(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_sharded_inputs_give_equal_output_in_shards_no_larger_than_theirs(pair, slerp_merged, tmp_path):
    """The same SLERP from inputs saved in small shards (as dft saves the 135M model's artefacts at
    ``model.max_shard_size``): identical tensors, and output shards no larger than the inputs'
    largest file, so mergekit never holds a whole output model in memory."""
    from transformers import AutoModelForCausalLM

    sharded = {}
    for name, src in zip(("partner", "ft"), pair):
        sharded[name] = tmp_path / name
        AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded[name], max_shard_size="20KB")
        _tokenizer().save_pretrained(sharded[name])
    largest = max(f.stat().st_size for d in sharded.values() for f in d.glob("*.safetensors"))
    assert len(list(sharded["ft"].glob("*.safetensors"))) > 5 and largest < 100_000
    out = tmp_path / "merged"
    merge_models(_conf("slerp"), str(sharded["ft"]), str(sharded["partner"]), str(out))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 5 and (out / "model.safetensors.index.json").exists()
    # a shard is flushed before a tensor would push it past the limit (the file adds a JSON header)
    assert max(f.stat().st_size for f in shards) <= largest + 4096
    want, got = _tensors(slerp_merged[0]), _all_tensors(out)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


_ALLOCATOR_PROBE = r"""
import json
import torch
from dft.merging.backend import large_blocks_returned_to_os, malloc_stats

mapped = lambda: malloc_stats()["mapped"]  # bytes in blocks that have their own mmap
n = 24 << 20
warm = torch.empty(30 << 20, dtype=torch.uint8)  # mapped, and freeing it raises glibc's threshold to 30 MiB
del warm
with large_blocks_returned_to_os():
    before = mapped()
    block = torch.empty(n, dtype=torch.uint8)
    inside = mapped() - before
    del block
before = mapped()
block = torch.empty(n, dtype=torch.uint8)
after = mapped() - before
print(json.dumps({"inside": inside, "after": after, "n": n}))
"""


def test_merge_allocator_setting_maps_large_blocks_and_restores_glibc_ceiling():
    """In a fresh process (a heap with no 24 MiB hole to reuse), after glibc raised its threshold
    to 30 MiB: inside the setting a 24 MiB block gets its own mapping instead of coming from the
    heap; afterwards the threshold is glibc's dynamic ceiling (32 MiB), so it comes from the heap."""
    import subprocess
    import sys

    from dft.merging.backend import malloc_stats

    if malloc_stats() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["inside"] >= r["n"] and r["after"] == 0, r


def _as_bf16(src: Path, dest: Path) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dest)
    _tokenizer().save_pretrained(dest)
    return dest


def test_out_dtype_defaults_to_the_models_own_and_is_recorded(pair, tmp_path):
    """merge.dtype is the computation, merge.out_dtype the saved weights: a bf16 pair merged in
    float32 is saved bf16 (half the bytes of fp32), recorded in mergekit.yaml and the info."""
    import yaml

    from dft.merging.backend import weights_dtype

    partner, ft = pair
    p16, f16 = _as_bf16(partner, tmp_path / "p16"), _as_bf16(ft, tmp_path / "f16")
    assert (weights_dtype(str(p16)), weights_dtype(str(partner))) == ("bfloat16", "float32")
    cfg = {"method": "slerp", "params": {"t": 0.5}, "dtype": "float32"}
    info = merge_models(cfg, str(f16), str(p16), str(tmp_path / "m16"))
    assert (info["dtype"], info["out_dtype"]) == ("float32", "bfloat16")
    doc = yaml.safe_load((tmp_path / "m16" / "mergekit.yaml").read_text())
    assert (doc["dtype"], doc["out_dtype"]) == ("float32", "bfloat16")
    got = _tensors(tmp_path / "m16")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    # the fp32 pair stays fp32 by default; an explicit out_dtype wins
    info32 = merge_models(cfg, str(ft), str(partner), str(tmp_path / "m32"))
    assert info32["out_dtype"] == "float32" and {t.dtype for t in _tensors(tmp_path / "m32").values()} == {torch.float32}
    info_b = merge_models({**cfg, "out_dtype": "bfloat16"}, str(ft), str(partner), str(tmp_path / "mb"))
    assert info_b["out_dtype"] == "bfloat16"
    size32 = (tmp_path / "m32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "mb" / "model.safetensors").stat().st_size
    assert size16 < 0.52 * size32  # half the tensor bytes, plus the same JSON header
    # a mixed pair (bf16 + fp32) is saved float32: nothing of the fp32 model is rounded
    assert merge_models(cfg, str(ft), str(p16), str(tmp_path / "mix"))["out_dtype"] == "float32"
