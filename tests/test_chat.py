"""Open-ended assessment: config composition, reproducible transcripts, the LLM judge.

The generation tests run the embedded SmolLM2-135M (converted once into $DFT_CACHE or
~/.cache/dft) with a few new tokens per turn. The judge tests talk to a stub OpenAI-compatible
server on 127.0.0.1 started by the test: no network.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from dft import ROOT, DftError
from dft.evaluation import chat, judge
from dft.evaluation.judge import CRITERIA, judge_transcripts, score_table

CHAT_YAML = ROOT / "conf" / "eval" / "chat.yaml"


# --------------------------------------------------------------------------- config


def test_chat_yaml_sets_only_chat_and_every_known_key():
    doc = yaml.safe_load(CHAT_YAML.read_text())
    assert list(doc) == ["chat"], "eval/chat.yaml must set only `chat` to combine with an MCQ eval"
    assert chat.resolve_chat_config(doc["chat"]) == doc["chat"] == chat.DEFAULTS  # no drift, no missing key
    s = doc["chat"]["sampling"]
    assert (s["top_k"], s["top_p"], s["repetition_penalty"], s["max_new_tokens"]) == (512, 0.9, 1.1, 1024)
    assert 0.1 <= s["temperature"] <= 0.2
    names = [sc["name"] for sc in chat.load_scenarios(chat.validate_chat_config(doc["chat"]))]
    assert names == ["collagen_leaves", "image_prompt"]
    # every scenario file shipped is valid, not only the default ones
    every = [p.stem for p in (ROOT / "conf" / "chat").glob("*.yaml")]
    chat.load_scenarios(chat.resolve_chat_config({"scenarios": every}))


def test_chat_yaml_composes_with_mcq_eval_by_multiselect(tmp_path):
    """``eval=[quick,chat]`` merges both files into one EvalConfig (typed by the schema)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dft.config import register_configs

    (tmp_path / "eval").mkdir()
    shutil.copy(ROOT / "conf" / "eval" / "quick.yaml", tmp_path / "eval" / "quick.yaml")
    shutil.copy(CHAT_YAML, tmp_path / "eval" / "chat.yaml")
    (tmp_path / "main.yaml").write_text("defaults:\n  - train_schema\n  - eval: quick\n  - _self_\n")
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
            cfg = compose("main", overrides=["eval=[quick,chat]", "eval.chat.judge.backend=openai"])
            assert cfg.eval.name == "quick" and cfg.eval.max_items == 20  # the MCQ part is intact
            assert cfg.eval.chat.sampling.top_k == 512 and cfg.eval.chat.judge.backend == "openai"
            assert chat.resolve_chat_config(cfg.eval.chat)["judge"]["backend"] == "openai"
            assert compose("main").eval.chat is None  # without `chat` nothing changes
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"sampling": {"temprature": 0.1}}, "eval.chat.sampling.temprature"),
        ({"scenarios": ["nope"]}, "no file"),
        ({"scenarios": [{"name": "x", "turns": []}]}, "turns"),
        ({"scenarios": [{"name": "x", "turns": [{"content": "a", "expect": "xml"}]}]}, "expect"),
        ({"judge": {"backend": "gpt"}}, "backend"),
        ({"image": {"pipeline": "/no/such/pipeline"}}, "model_index.json"),
    ],
)
def test_bad_chat_config_is_one_line(bad, msg):
    with pytest.raises(DftError, match=msg):
        chat.validate_chat_config(bad)


def test_openai_judge_without_key_fails_validation(monkeypatch):
    monkeypatch.delenv("DFT_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(DftError, match="DFT_TEST_JUDGE_KEY"):
        chat.validate_chat_config({"judge": {"backend": "openai", "api_key_env": "DFT_TEST_JUDGE_KEY"}})


# --------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def embedded():
    import torch
    from omegaconf import OmegaConf

    from dft.modeling import ensure_embedded_model, load_model, load_tokenizer

    torch.set_num_threads(1)  # shared CPUs: one thread is as fast and fairer to the others
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml")
    path = ensure_embedded_model(os.environ.get("DFT_CACHE", "~/.cache/dft"))
    return load_model(path, model_cfg), load_tokenizer(path, model_cfg), model_cfg, path


TINY = {"sampling": {"max_new_tokens": 6}, "scenarios": [
    {"name": "json_turn", "system": "You are a materials scientist.",
     "turns": ["What is collagen?", {"content": "Summarise it as JSON.", "expect": "json"}]},
    "image_prompt",
]}


def test_scenarios_run_and_transcripts_are_reproducible(embedded, tmp_path, caplog):
    model, tok, model_cfg, _ = embedded
    r1 = chat.run_chat(model, tok, model_cfg, TINY, tmp_path / "a", "start")
    r2 = chat.run_chat(model, tok, model_cfg, TINY, tmp_path / "b", "start")
    a, b = (tmp_path / "a" / "chat.json").read_bytes(), (tmp_path / "b" / "chat.json").read_bytes()
    assert a == b, "same seed, same model: chat.json must be identical"

    doc = json.loads(a)
    assert doc["seed"] == 42 and doc["sampling"]["top_k"] == 512 and doc["sampling"]["max_new_tokens"] == 6
    assert doc["artefact"] == "start" and doc["eos_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert [s["scenario"] for s in doc["scenarios"]] == ["json_turn", "image_prompt"]
    for s in doc["scenarios"]:
        assert [t["turn"] for t in s["turns"]] == [1, 2]
        for t in s["turns"]:
            assert t["assistant"] and 0 < t["n_new_tokens"] <= 6 and t["finish"] in ("eos", "length")
        # the second prompt holds the first answer: the conversation is carried turn to turn
        assert s["turns"][1]["n_prompt_tokens"] > s["turns"][0]["n_prompt_tokens"] + s["turns"][0]["n_new_tokens"]
    json_turn = doc["scenarios"][0]["turns"][1]
    assert json_turn["expect"] == "json" and isinstance(json_turn["json_valid"], bool)
    img = doc["scenarios"][1]
    assert img["image_prompt"] == chat.clean_image_prompt(img["turns"][1]["assistant"]) != ""
    assert img["images"] == [] and "image.pipeline is null" in img["image_notice"]

    # the W&B table: one row per turn
    assert r1["columns"] == ["artefact", "scenario", "turn", "user", "assistant"]
    assert r1["data"] == r2["data"] and len(r1["data"]) == 4
    assert r1["data"][0][:3] == ["start", "json_turn", 1] and r1["data"][0][3] == "What is collagen?"


# --------------------------------------------------------------------------- judge: stub server


def _good(scores=(7, 8, 6, 5)) -> str:
    return json.dumps({c: {"score": s, "justification": f"Because of {c}."} for c, s in zip(CRITERIA, scores)})


class Stub:
    """A scripted OpenAI-compatible server: each POST gets the next (status, content) pair."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = stub.script.pop(0)
                if status == 200:
                    out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                else:
                    out = json.dumps({"error": {"message": content}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def cfg(self, **kw):
        return {"backend": "openai", "url": f"http://127.0.0.1:{self.server.server_port}/v1", "model": "stub-judge",
                "api_key_env": "DFT_TEST_JUDGE_KEY", "max_retries": 2, "backoff_s": 0.01, "http_retries": 2, **kw}


TRANSCRIPT = {"scenario": "collagen_leaves", "system": "You are a materials scientist.",
              "turns": [{"turn": 1, "user": "What is collagen?", "assistant": "A triple-helical protein."}]}


@pytest.fixture(autouse=True)
def _judge_env(monkeypatch):
    monkeypatch.setenv("DFT_TEST_JUDGE_KEY", "sk-test-secret")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_judge_valid_json_is_scored_and_saved(tmp_path):
    with Stub([(200, _good())]) as stub:
        out = judge_transcripts({"artefact": "cpt_sft", "scenarios": [TRANSCRIPT]}, stub.cfg(), out_dir=tmp_path)
    (j,) = out
    assert j["status"] == "ok" and j["scores"] == dict(zip(CRITERIA, (7, 8, 6, 5))) and j["total"] == 26
    assert j["justifications"]["clarity"] == "Because of clarity." and j["attempts"] == 1
    assert (j["judge_model"], j["prompt_version"], j["prompt_sha"]) == ("stub-judge", "v1", judge.prompt_sha("v1"))
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test-secret"
    assert req["body"]["model"] == "stub-judge" and req["body"]["response_format"] == {"type": "json_object"}
    assert "A triple-helical protein." in req["body"]["messages"][1]["content"]
    text = (tmp_path / "judge.json").read_text()
    assert "sk-test-secret" not in text
    doc = json.loads(text)
    assert doc["artefact"] == "cpt_sft" and doc["judge"]["model"] == "stub-judge" and doc["judgements"] == out
    assert doc["summary"]["total"] == 26 and doc["summary"]["n_scored"] == 1


def test_judge_invalid_json_is_reasked_then_failed():
    bad_range = json.loads(_good())
    bad_range["creativity"]["score"] = 11
    script = [(200, "Scores: seven, eight."), (200, json.dumps(bad_range)), (200, '{"clarity": {"score": 5}}')]
    with Stub(script) as stub:
        (j,) = judge_transcripts([TRANSCRIPT], stub.cfg(max_retries=2))
    assert j["status"] == "failed" and "scores" not in j and "total" not in j
    assert j["attempts"] == 3 and len(stub.requests) == 3 and "missing key" in j["reason"]
    assert j["judge_model"] == "stub-judge" and j["prompt_version"] == "v1"
    # each re-ask carries the rejected answer and the reason it was rejected
    second = stub.requests[1]["body"]["messages"]
    assert second[-2] == {"role": "assistant", "content": "Scores: seven, eight."}
    assert "not valid JSON" in second[-1]["content"]
    assert "between 1 and 10, got 11" in stub.requests[2]["body"]["messages"][-1]["content"]


def test_judge_reask_can_recover():
    with Stub([(200, "not json"), (200, "```json\n" + _good((1, 2, 3, 4)) + "\n```")]) as stub:
        (j,) = judge_transcripts([TRANSCRIPT], stub.cfg())
    assert j["status"] == "ok" and j["total"] == 10 and j["attempts"] == 2


def test_judge_retries_429_and_5xx():
    with Stub([(429, "slow down"), (503, "busy"), (200, _good())]) as stub:
        (j,) = judge_transcripts([TRANSCRIPT], stub.cfg())
    assert j["status"] == "ok" and j["attempts"] == 1 and len(stub.requests) == 3


def test_judge_http_errors_become_failed_judgements():
    with Stub([(500, "down")] * 3 + [(401, "bad key")]) as stub:
        j1, j2 = judge_transcripts([TRANSCRIPT, TRANSCRIPT], stub.cfg(http_retries=2))
    assert j1["status"] == "failed" and "HTTP 500" in j1["reason"] and "after 3 tries" in j1["reason"]
    assert j2["status"] == "failed" and "HTTP 401" in j2["reason"] and len(stub.requests) == 4  # 4xx: no retry


def test_judge_missing_key_and_backend_none(monkeypatch, tmp_path):
    monkeypatch.delenv("DFT_TEST_JUDGE_KEY")
    (j,) = judge_transcripts([TRANSCRIPT], {"backend": "openai", "api_key_env": "DFT_TEST_JUDGE_KEY"})
    assert j["status"] == "failed" and "DFT_TEST_JUDGE_KEY" in j["reason"]
    (s,) = judge_transcripts([TRANSCRIPT], {"backend": "none"}, out_dir=tmp_path, artefact="start")
    assert s["status"] == "skipped"
    assert json.loads((tmp_path / "judge.json").read_text())["summary"]["total"] is None


# --------------------------------------------------------------------------- table


def _ok(scenario, scores):
    return {"scenario": scenario, "status": "ok", "scores": dict(zip(CRITERIA, scores)), "total": sum(scores),
            "judge_model": "m", "prompt_version": "v1"}


def test_score_table_totals_and_normalisation_exact():
    rows = score_table({
        "start": [_ok("a", (6, 5, 8, 5)), _ok("b", (7, 6, 9, 4))],   # means 6.5 5.5 8.5 4.5 -> 25
        "cpt_sft+slerp": [_ok("a", (9, 9, 10, 8)), {"scenario": "b", "status": "failed", "reason": "x",
                                                     "judge_model": "m", "prompt_version": "v1"}],  # 36
        "cpt": {"judgements": [{"scenario": "a", "status": "failed", "reason": "x", "judge_model": "m",
                                "prompt_version": "v1"}]},
    })
    by = {r["artefact"]: r for r in rows}
    assert [r["artefact"] for r in rows] == ["start", "cpt_sft+slerp", "cpt"]
    s = by["start"]
    assert (s["depth_of_reasoning"], s["creativity"], s["clarity"], s["quantitative_precision"]) == (6.5, 5.5, 8.5, 4.5)
    assert s["total"] == 25 and s["max_total"] == 40 and s["normalised"] == 25 / 36
    m = by["cpt_sft+slerp"]
    assert m["total"] == 36 and m["normalised"] == 1.0 and (m["n_scored"], m["n_failed"]) == (1, 1)
    c = by["cpt"]
    assert c["total"] is None and c["normalised"] is None and c["n_failed"] == 1  # never a guessed score
    (only_b,) = [r for r in score_table({"start": [_ok("a", (1, 1, 1, 1)), _ok("b", (2, 2, 2, 2))]}, scenario="b")]
    assert only_b["total"] == 8 and only_b["normalised"] == 1.0


def test_local_judge_backend_records_failure_not_a_score(embedded):
    """The embedded 135M model is no judge: with 4 new tokens it cannot answer valid JSON."""
    _, _, _, path = embedded
    (j,) = judge_transcripts([TRANSCRIPT], {"backend": "local", "model": str(path), "max_tokens": 4, "max_retries": 1})
    assert j["status"] == "failed" and j["attempts"] == 2 and j["judge_backend"] == "local"


def test_image_prompts_are_rendered_with_a_local_pipeline(tmp_path, monkeypatch):
    """The rendering glue, with a stand-in ``diffusers`` module (the real one is optional and big)."""
    import sys
    import types

    from PIL import Image

    calls = []

    class FakePipe:
        @classmethod
        def from_pretrained(cls, path, torch_dtype=None):
            calls.append(("load", path))
            return cls()

        def to(self, device):
            return self

        def __call__(self, prompt, num_images_per_prompt, generator, **kw):
            calls.append(("call", prompt, num_images_per_prompt, kw))
            return types.SimpleNamespace(images=[Image.new("RGB", (8, 8))] * num_images_per_prompt)

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(DiffusionPipeline=FakePipe))
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    (pipe_dir / "model_index.json").write_text("{}")
    cfg = chat.validate_chat_config({"image": {"pipeline": str(pipe_dir), "n_images": 2, "num_inference_steps": 3}})
    trs = [{"scenario": "image_prompt", "image_prompt": "silk and leaves", "images": [], "image_notice": None},
           {"scenario": "chatty", "image_prompt": None, "images": [], "image_notice": None}]
    chat._render_images(trs, cfg["image"], 42, tmp_path / "out", "cpu")
    assert trs[0]["images"] == ["chat_images/image_prompt/0.png", "chat_images/image_prompt/1.png"]
    assert all((tmp_path / "out" / p).exists() for p in trs[0]["images"]) and trs[1]["images"] == []
    assert calls == [("load", str(pipe_dir)), ("call", "silk and leaves", 2, {"num_inference_steps": 3, "guidance_scale": 7.5})]
