"""The paper's three model families, exact: real tokenizers, templates, pads, stops, label masks.

Real tokenizers only, no hub: Llama 3.1 from Meta's tiktoken file in ``llama-models``, Mistral
v0.3 from the v3 SentencePiece model in ``mistral-common`` (both via dft.tokenizers_offline),
SmolLM2 from the embedded model. Llama and Mistral renderings are checked token for token
against the vendors' own encoders (``llama_models.llama3.chat_format.ChatFormat``,
``mistral_common``'s ``MistralTokenizer``). Tiny random-weight models (dft.families.ensure_tiny_model)
carry each family's architecture traits. ``cache_dir`` (tests/conftest.py) is ``$DFT_CACHE``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dft import DftError
from dft.config import ModelConfig
from dft.families import (
    CHAT_TEMPLATES,
    LLAMA3_1_TEMPLATE,
    apply_system_policy,
    encode_chat,
    encode_rendered,
    ensure_tiny_model,
    prepare_tokenizer,
    render_chat,
    stop_token_ids,
    to_prompt_completion,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL_CONF = ROOT / "conf" / "model"

SYSTEM = "You are a materials scientist."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the yield strength of mild steel?"},
    {"role": "assistant", "content": "About 250 MPa."},
]
MULTI = CHAT + [
    {"role": "user", "content": "And of aluminium 6061-T6?"},
    {"role": "assistant", "content": "Roughly 275 MPa.\nIt depends on temper."},
]


def model_cfg(name: str):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(MODEL_CONF / f"{name}.yaml"))


_LOADED: dict = {}


def real_tokenizer(cache_dir: Path, family: str, *, instruct: bool = True):
    """Llama 3.1 / Mistral v0.3 tokenizers, loaded once per module (~3 s each for Llama's 128k vocab).

    Shared between tests: prepare_tokenizer sets the same pad and template for every config of
    these two families, so the mutation is idempotent.
    """
    from transformers import AutoTokenizer

    from dft.tokenizers_offline import llama3_tokenizer_dir, mistral_v3_tokenizer_dir

    key = (family, instruct)
    if key not in _LOADED:
        folder = llama3_tokenizer_dir(cache_dir, instruct=instruct) if family == "llama3" else mistral_v3_tokenizer_dir(cache_dir)
        _LOADED[key] = AutoTokenizer.from_pretrained(folder)
    return _LOADED[key]


@pytest.fixture(scope="module")
def llama_tok(cache_dir):
    return prepare_tokenizer(real_tokenizer(cache_dir, "llama3"), model_cfg("llama3_1_8b_instruct"))


@pytest.fixture(scope="module")
def mistral_tok(cache_dir):
    return prepare_tokenizer(real_tokenizer(cache_dir, "mistral"), model_cfg("mistral_7b_v0_3_instruct"))


@pytest.fixture(scope="module")
def smol_dir(cache_dir) -> Path:
    from dft.modeling import ensure_embedded_model

    return ensure_embedded_model(cache_dir)


def _family_tokenizer(cfg, cache_dir, smol_dir):
    """The real tokenizer a config's model ships (SmolLM 1.7B shares SmolLM2's vocabulary)."""
    from transformers import AutoTokenizer

    if cfg.family == "llama3":
        return real_tokenizer(cache_dir, "llama3", instruct=cfg.start == "instruct")
    if cfg.family == "mistral":
        return real_tokenizer(cache_dir, "mistral")
    tok = AutoTokenizer.from_pretrained(smol_dir)
    if cfg.family == "smollm" and cfg.start == "base":
        tok.eos_token = "<|endoftext|>"  # SmolLM-1.7B (base) ends documents with <|endoftext|>
    return tok


# --------------------------------------------------------------------------- configs


MODEL_NAMES = sorted(p.stem for p in MODEL_CONF.glob("*.yaml"))
PAPER = [
    # option, hub id, start, merge partner (the family's instruct model)
    ("llama3_1_8b", "meta-llama/Llama-3.1-8B", "base", "meta-llama/Llama-3.1-8B-Instruct"),
    ("llama3_1_8b_instruct", "meta-llama/Llama-3.1-8B-Instruct", "instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("mistral_7b_v0_3", "mistralai/Mistral-7B-v0.3", "base", "mistralai/Mistral-7B-Instruct-v0.3"),
    ("mistral_7b_v0_3_instruct", "mistralai/Mistral-7B-Instruct-v0.3", "instruct", "mistralai/Mistral-7B-Instruct-v0.3"),
    ("smollm_1_7b", "HuggingFaceTB/SmolLM-1.7B", "base", "HuggingFaceTB/SmolLM-1.7B-Instruct"),
    ("smollm_1_7b_instruct", "HuggingFaceTB/SmolLM-1.7B-Instruct", "instruct", "HuggingFaceTB/SmolLM-1.7B-Instruct"),
]


def compose_model(option: str):
    """``model=<option>`` composed by Hydra (aliases use a defaults list) and typed by the schema."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(overrides=[f"+model={option}"])
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model)


@pytest.mark.parametrize("name,hub_id,start,partner", PAPER)
def test_paper_model_configs(name, hub_id, start, partner):
    cfg = compose_model(name)
    assert (cfg.name, cfg.hub_id, cfg.start, cfg.partner) == (name, hub_id, start, partner)
    assert cfg.pad_token not in cfg.eos_tokens
    assert cfg.chat_template in CHAT_TEMPLATES
    assert cfg.params_b > 1 and cfg.max_length == 2048


@pytest.mark.parametrize(
    "alias,target",
    [("llama", "llama3_1_8b_instruct"), ("mistral", "mistral_7b_v0_3_instruct"), ("smol", "smollm_1_7b_instruct")],
)
def test_aliases_pick_the_instruct_start(alias, target):
    assert OmegaConf.to_container(compose_model(alias)) == OmegaConf.to_container(compose_model(target))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_config_on_its_real_tokenizer(name, cache_dir, smol_dir):
    """Pad exists and differs from every stop token; every stop token exists; template renders."""
    cfg = compose_model(name)
    tok = prepare_tokenizer(_family_tokenizer(cfg, cache_dir, smol_dir), cfg)
    stops = stop_token_ids(tok, cfg)
    assert tok.pad_token == cfg.pad_token and tok.pad_token_id not in stops
    assert len(stops) >= len(cfg.eos_tokens)
    ids = encode_chat(tok, CHAT, cfg)
    assert ids[-1] in stops or tok.decode(ids[-2:]).endswith("<|im_end|>\n")


def test_pad_equal_to_an_end_token_is_rejected(smol_dir):
    from transformers import AutoTokenizer

    cfg = model_cfg("smollm_1_7b_instruct")
    cfg.pad_token = "<|im_end|>"  # what SmolLM-1.7B-Instruct ships
    with pytest.raises(DftError, match="equals an end token"):
        prepare_tokenizer(AutoTokenizer.from_pretrained(smol_dir), cfg)
    cfg.pad_token = "<|not_a_token|>"
    with pytest.raises(DftError, match="not in the vocabulary"):
        prepare_tokenizer(AutoTokenizer.from_pretrained(smol_dir), cfg)


def test_unknown_chat_template_name_fails():
    cfg = model_cfg("tiny")
    cfg.chat_template = "llama31"
    with pytest.raises(DftError, match="neither a known template"):
        prepare_tokenizer(object(), cfg)


# --------------------------------------------------------------------------- Llama 3.1


def test_llama3_special_tokens_and_text_match_meta(llama_tok):
    from llama_models.llama3.tokenizer import Tokenizer

    meta = Tokenizer.get_instance()
    assert len(llama_tok) == 128256
    for name, i in {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_245|>": 128255,
    }.items():
        assert llama_tok.convert_tokens_to_ids(name) == i == meta.special_tokens[name]
    for text in ["Yield strength: 250 MPa (±5 %), 1234567 cycles.\n\n  indented\tline", "naïve café — 東京 ok"]:
        assert llama_tok(text)["input_ids"] == meta.encode(text, bos=True, eos=False)
    assert llama_tok.pad_token_id == 128004 and llama_tok.bos_token_id == 128000


def _meta_dialog(messages, *, generation_prompt: bool) -> list[int]:
    """Meta's reference encoding: llama_models' ChatFormat with the 3.1 template's system header."""
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer.get_instance())
    system = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    rest = messages
    if messages[0]["role"] == "system":
        system, rest = system + messages[0]["content"], messages[1:]
    raw = [RawMessage(role="system", content=system)] + [
        RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn) for m in rest
    ]
    if generation_prompt:
        return fmt.encode_dialog_prompt(raw).tokens
    ids = [fmt.tokenizer.special_tokens["<|begin_of_text|>"]]
    for m in raw:
        ids += fmt.encode_message(m, None)[0]
    return ids


@pytest.mark.parametrize("messages", [CHAT, MULTI, CHAT[1:]], ids=["system", "multi_turn", "no_system"])
def test_llama3_template_matches_meta_chat_format(llama_tok, messages):
    cfg = model_cfg("llama3_1_8b_instruct")
    ids = encode_chat(llama_tok, messages, cfg)
    assert ids == _meta_dialog(messages, generation_prompt=False)
    prompt = encode_chat(llama_tok, messages[:-1], cfg, add_generation_prompt=True)
    assert prompt == _meta_dialog(messages[:-1], generation_prompt=True)
    # boundaries: one BOS, system header, each turn closed by <|eot_id|>, prompt ends in the header
    assert ids[:4] == [128000, 128006, llama_tok.convert_tokens_to_ids("system"), 128007]
    assert ids.count(128000) == 1 and ids[-1] == 128009
    assert ids.count(128009) == len(messages) + (messages[0]["role"] != "system")
    assert llama_tok.decode(prompt[-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    # rendering text then tokenizing it must not add a second BOS
    text = render_chat(llama_tok, messages, cfg)
    assert encode_rendered(llama_tok, text) == ids
    assert llama_tok(text)["input_ids"][:2] == [128000, 128000]  # the pitfall encode_rendered avoids


def test_llama3_rendering_is_deterministic(llama_tok):
    cfg = model_cfg("llama3_1_8b")
    assert "strftime_now" not in LLAMA3_1_TEMPLATE
    text = render_chat(llama_tok, CHAT, cfg)
    assert text == render_chat(llama_tok, CHAT, cfg)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the yield strength of mild steel?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "About 250 MPa.<|eot_id|>"
    )


def test_llama3_stop_tokens(cache_dir):
    for start, eos in (("llama3_1_8b", "<|end_of_text|>"), ("llama3_1_8b_instruct", "<|eot_id|>")):
        tok = real_tokenizer(cache_dir, "llama3", instruct=start.endswith("instruct"))
        assert tok.eos_token == eos  # as shipped on the hub
        tok = prepare_tokenizer(tok, model_cfg(start))
        assert stop_token_ids(tok, model_cfg(start)) == [128009, 128008, 128001]


# --------------------------------------------------------------------------- Mistral v0.3


def _mistral_reference(messages) -> list[int]:
    """mistral-common's own encoding of the same request (the v3 tokenizer file dft builds from)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from dft.tokenizers_offline import mistral_v3_tokenizer_file

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    mt = MistralTokenizer.from_file(str(mistral_v3_tokenizer_file()), mode=mode)
    req = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mt.encode_chat_completion(req).tokens


@pytest.mark.parametrize("messages", [CHAT, MULTI, CHAT[1:]], ids=["system", "multi_turn", "no_system"])
def test_mistral_template_matches_mistral_common(mistral_tok, messages):
    cfg = model_cfg("mistral_7b_v0_3_instruct")
    ids = encode_chat(mistral_tok, messages, cfg)
    assert ids == _mistral_reference(messages)
    prompt = encode_chat(mistral_tok, messages[:-1], cfg, add_generation_prompt=True)
    assert prompt == _mistral_reference(messages[:-1])
    inst, end_inst = mistral_tok.convert_tokens_to_ids(["[INST]", "[/INST]"])
    assert (inst, end_inst, mistral_tok.eos_token_id, len(mistral_tok)) == (3, 4, 2, 32768)
    assert ids[:2] == [1, inst] and ids.count(1) == 1  # <s> once
    assert ids[-1] == 2 and prompt[-1] == end_inst and ids[: len(prompt)] == prompt
    assert encode_rendered(mistral_tok, render_chat(mistral_tok, messages, cfg)) == ids
    if messages[0]["role"] == "system":  # the system text is kept, in the last user turn
        assert SYSTEM in mistral_tok.decode(ids)


def test_mistral_system_turn_needs_the_merge_policy(mistral_tok):
    """Mistral's template drops a system message unless the conversation ends on a user turn."""
    raw = mistral_tok.apply_chat_template(CHAT, tokenize=False)
    assert SYSTEM not in raw  # silently dropped by the template itself ...
    assert SYSTEM in mistral_tok.apply_chat_template(CHAT[:-1], tokenize=False)  # ... but kept in the prompt
    cfg = model_cfg("mistral_7b_v0_3")
    merged = apply_system_policy(MULTI, cfg)
    assert [m["role"] for m in merged] == ["user", "assistant", "user", "assistant"]
    assert merged[2]["content"] == f"{SYSTEM}\n\n{MULTI[3]['content']}" and merged[0] == MULTI[1]
    assert apply_system_policy(MULTI, model_cfg("llama3_1_8b")) == MULTI


# --------------------------------------------------------------------------- SmolLM (ChatML)


def test_smollm_chatml_boundaries(smol_dir):
    from transformers import AutoTokenizer

    for name in ("smollm_1_7b", "smollm_1_7b_instruct", "tiny"):
        cfg = model_cfg(name)
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(smol_dir), cfg)
        ids = encode_chat(tok, CHAT, cfg)
        start, end, nl = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) + [tok("\n")["input_ids"][0]]
        assert (start, end) == (1, 2)
        assert ids[0] == start and ids.count(start) == 3  # no BOS; one <|im_start|> per turn
        assert ids[-2:] == [end, nl] and ids.count(end) == 3
        assert encode_rendered(tok, render_chat(tok, CHAT, cfg)) == ids
        assert render_chat(tok, CHAT, cfg) == (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
            "What is the yield strength of mild steel?<|im_end|>\n<|im_start|>assistant\nAbout 250 MPa.<|im_end|>\n"
        )
        assert tok.pad_token_id not in stop_token_ids(tok, cfg)
    assert tok.pad_token_id == 0 and stop_token_ids(tok, cfg) == [2]  # tiny: SmolLM2 rules
    cfg = model_cfg("smollm_1_7b")
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(smol_dir), cfg)
    assert tok.pad_token_id == 16 and stop_token_ids(tok, cfg)[:2] == [2, 0]


# --------------------------------------------------------------------------- SFT label masks (TRL)

FAMILIES = [
    # family, model config, text the labels must decode to (assistant text + its end token)
    ("llama3", "tiny_llama3", "Roughly 275 MPa.\nIt depends on temper.<|eot_id|>"),
    ("mistral", "tiny_mistral", "Roughly 275 MPa.\nIt depends on temper.</s>"),
    # ChatML: the template's newline after <|im_end|> belongs to the completion too
    ("smollm2", "tiny", "Roughly 275 MPa.\nIt depends on temper.<|im_end|>\n"),
]


@pytest.mark.parametrize("family,config,expected", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_sft_labels_are_the_assistant_turn_and_its_end_token(family, config, expected, cache_dir, tmp_path):
    """TRL's own SFT tokenisation of a conversational prompt-completion example."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = model_cfg(config)
    path = ensure_tiny_model(cache_dir, family)
    tok = real_tokenizer(cache_dir, family) if family in ("llama3", "mistral") else AutoTokenizer.from_pretrained(path)
    tok = prepare_tokenizer(tok, cfg)
    example = to_prompt_completion(MULTI, cfg)
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, max_steps=1, max_length=512)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        processing_class=tok,
        train_dataset=Dataset.from_list([example]),
        args=args,
    )
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    assert ids == encode_chat(tok, MULTI, cfg)  # TRL tokenises exactly as dft does
    n = sum(label != -100 for label in labels)
    assert labels[:-n] == [-100] * (len(ids) - n) and labels[-n:] == ids[-n:]  # one contiguous tail
    assert tok.decode(ids[-n:]) == expected
    assert tok.pad_token_id not in ids[-n:]


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", ["llama3", "mistral", "smollm2", "smollm"])
def test_tiny_model_traits_generate_and_reload(family, cache_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(cache_dir, family)
    assert ensure_tiny_model(cache_dir, family) == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (64, 2, len(tok))
    if family == "llama3":
        assert type(model).__name__ == "LlamaForCausalLM" and c.vocab_size == 128256
        assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 8.0
        assert not c.tie_word_embeddings
    elif family == "mistral":
        assert type(model).__name__ == "MistralForCausalLM" and c.vocab_size == 32768
        assert not c.tie_word_embeddings and c.sliding_window is None
    else:
        assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    cfg_name = {"llama3": "tiny_llama3", "mistral": "tiny_mistral", "smollm2": "tiny", "smollm": "smollm_1_7b"}[family]
    cfg = model_cfg(cfg_name)
    tok = prepare_tokenizer(tok, cfg)
    prompt = torch.tensor([encode_chat(tok, CHAT[:-1], cfg, add_generation_prompt=True)])
    with torch.no_grad():
        logits = model(prompt).logits
        out = model.generate(
            prompt, max_new_tokens=4, do_sample=False, eos_token_id=stop_token_ids(tok, cfg), pad_token_id=tok.pad_token_id
        )
    assert out.shape[1] <= prompt.shape[1] + 4 and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(prompt).logits, logits)
    assert again.config.to_dict()["rope_parameters"] == c.to_dict()["rope_parameters"]


# --------------------------------------------------------------------------- unreachable weights


def test_unreachable_weights_one_line_message(monkeypatch, tmp_path):
    from dft.modeling import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_cfg("llama3_1_8b")
    cfg.hub_id = "dft-tests/not-a-cached-model"
    with pytest.raises(DftError) as err:
        resolve_model_path(cfg, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "dft-tests/not-a-cached-model" in msg
    assert "models--dft-tests--not-a-cached-model" in msg  # the local cache path tried
    assert "model.path=" in msg


# --------------------------------------------------------------------------- template rules at row load

BROKEN = [{"role": "user", "content": "Define stress."}, {"role": "user", "content": "And strain?"},
          {"role": "assistant", "content": "Force per area; relative deformation."}]


def test_mistral_role_alternation_is_checked_when_rows_load(mistral_tok, tmp_path, caplog):
    """``user, user, assistant`` passes generic row validation but Mistral's template raises a jinja
    TemplateError (after the model loaded, naming no row). dft checks the family's rule at load: the error
    names the file and line; ``data.skip_bad_rows`` skips the row like any other bad one; other families
    accept it."""
    import json
    import logging

    from jinja2.exceptions import TemplateError

    from dft.data import DataError, load_split
    from dft.families import conversation_problem

    with pytest.raises(TemplateError, match="roles must alternate"):
        render_chat(mistral_tok, BROKEN, model_cfg("mistral_7b_v0_3_instruct"))
    good = {"id": "g", "messages": CHAT}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "messages": BROKEN}) + "\n")
    data = OmegaConf.create({"name": "t", "messages": str(path), "skip_bad_rows": False})
    mistral = model_cfg("mistral_7b_v0_3_instruct")
    with pytest.raises(DataError, match=rf"^{path}:2: roles must alternate user/assistant for family 'mistral' "
                                        r"\(turn 2 is 'user', expected 'assistant'; roles: user, user, assistant\) "
                                        r"\(field 'messages'\)$"):
        load_split(data, "messages", mistral)
    assert len(load_split(data, "messages", model_cfg("llama3_1_8b_instruct"))) == 2
    assert len(load_split(data, "messages")) == 2
    data.skip_bad_rows = True
    with caplog.at_level(logging.WARNING, logger="dft.data"):
        rows = load_split(data, "messages", mistral)
    assert [r["id"] for r in rows] == ["g"]
    assert "skipped 1 of 2 rows (breaks the mistral chat template (field 'messages'): 1)" in caplog.text
    # the rule and the template agree: the system turn folded into the user turn is fine
    assert conversation_problem(CHAT, mistral) is None and conversation_problem(MULTI, mistral) is None
    render_chat(mistral_tok, MULTI, mistral)
