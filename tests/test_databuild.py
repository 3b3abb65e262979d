"""``python -m dft.data build``: a folder of papers -> text / messages / preference splits (offline, CPU).

The happy path is proven against a stub OpenAI-compatible endpoint on 127.0.0.1 (``http.server`` in a
thread) whose replies are deterministic functions of the request; the embedded 135M model is run once with
a tiny budget (it mostly produces unparsable JSON, which must be counted, not hidden).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dft import ROOT, DftError

PY = sys.executable
KEY_ENV, KEY = "DFT_TEST_STUB_KEY", "sk-test-stub"

# ----------------------------------------------------------------------------- a small corpus
PDF_PARAGRAPHS = [
    "Spider dragline silk combines high tensile strength with large extensibility, which gives it a toughness "
    "greater than that of Kevlar. The fibre is spun from a concentrated aqueous protein dope stored in the major "
    "ampullate gland of the spider.",
    "The major ampullate spidroins MaSp1 and MaSp2 contain poly-alanine blocks that fold into beta-sheet "
    "nanocrystals. These nanocrystals cross-link an amorphous matrix of glycine-rich helices and act as stiff "
    "reinforcing fillers. FLAKY",
]
MARKDOWN = """---
title: processing
---
# Silk processing

Reeling speed controls the alignment of the protein chains: faster [forced reeling](https://example.org) gives
stiffer but more brittle fibres. **Post-spin drawing** in water improves the molecular orientation further.

## Humidity

Supercontraction is the shrinkage of dragline silk by up to half of its length when it is wetted, because
water disrupts the hydrogen bonds of the amorphous regions. MALFORMED
"""
TEXT = (
    "Silk fibroin from the silkworm Bombyx mori is a biocompatible protein that can be regenerated from cocoons "
    "and processed into films, sponges and hydrogels. Its degradation rate depends on the beta-sheet content, "
    "which can be tuned by methanol or water annealing. COPYCAT\n"
)
EVAL_SENTENCE = ("the toughness of capture spiral silk is dominated by the extensibility of the flagelliform "
                 "protein and not by its modulus")
BENCH_QUESTION = "Which protein family makes up the dragline silk fibres of orb-weaving spiders?"


def _write_pdf(path: Path, title: str, paragraphs: list[str]) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    styles = getSampleStyleSheet()
    story = [Paragraph(title, styles["Title"])]
    for p in paragraphs:
        story += [Paragraph(p, styles["BodyText"]), Spacer(1, 12)]
    SimpleDocTemplate(str(path), pagesize=A4).build(story)


def _write_blank_pdf(path: Path) -> None:
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path))
    c.showPage()
    c.save()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A PDF, a Markdown and a text file, plus: a normalised duplicate, a blank PDF, JSONL items (one marked
    as eval material), an eval document excluded by glob and a training file that copies a sentence of it."""
    src = tmp_path_factory.mktemp("papers")
    _write_pdf(src / "silk_paper.pdf", "Hierarchical structure of dragline silk", PDF_PARAGRAPHS)
    (src / "processing.md").write_text(MARKDOWN)
    (src / "fibroin.txt").write_text(TEXT)
    (src / "fibroin_copy.txt").write_text("  " + TEXT.upper().replace(" ", "  "))  # same words: a duplicate
    _write_blank_pdf(src / "scan.pdf")  # no text layer
    (src / "items.jsonl").write_text(
        json.dumps({"id": "n1", "text": "Wetting a silk fibre plasticises its amorphous regions SAMEWRONG and "
                                        "lowers its modulus by an order of magnitude, a behaviour used in "
                                        "water-responsive actuators. EVALQ"}) + "\n"
        + json.dumps({"id": "e1", "split": "test", "text": "An evaluation item: " + EVAL_SENTENCE + "."}) + "\n"
    )
    (src / "eval").mkdir()
    (src / "eval" / "exam.md").write_text("# Exam passage\n\nIt is known that " + EVAL_SENTENCE + ".\n")
    (src / "leak.txt").write_text("A review repeats the exam: " + EVAL_SENTENCE + ". It adds nothing else of note "
                                  "about the silk of the garden spider.\n")
    return src


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    p.write_text(json.dumps({"id": "b1", "question": BENCH_QUESTION,
                             "options": ["spidroins", "keratins", "collagens", "elastins"], "answer": "A"}) + "\n")
    return p


# ----------------------------------------------------------------------------- the stub endpoint
def _passage(user: str) -> str:
    m = re.search(r'"""\n(.*)\n"""', user, re.S)
    return m.group(1) if m else user


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if len(s.split()) >= 4]


def stub_reply(body: dict) -> str:
    """The stub model: a deterministic reply per request, with special cases keyed on marker words."""
    user = body["messages"][-1]["content"]
    if "scientifically wrong answer" in user:
        question = re.search(r"Question: (.*)\nCorrect answer: ", user).group(1)
        answer = user.split("Correct answer: ", 1)[1].strip()
        if "SAMEWRONG" in answer:
            return json.dumps({"wrong_answer": answer})
        return json.dumps({"wrong_answer": "No: the opposite holds, since " + answer[0].lower() + answer[1:]
                           + f" [{len(question)}]"})
    text = _passage(user)
    tag = hashlib.sha256(text.encode()).hexdigest()[:6]
    if "MALFORMED" in text:
        return "I am sorry, but as a language model I would rather describe the passage in prose."
    sents = _sentences(text) or [text]
    if "question-answer pairs" in user:
        pairs = [{"question": f"What is reported in passage {tag} about its first claim?", "answer": sents[0]}]
        if "COPYCAT" in text:
            q = f"Why does passage {tag} mention annealing of fibroin films?"
            pairs.append({"question": q, "answer": q})
        if "EVALQ" in text:
            pairs.append({"question": BENCH_QUESTION, "answer": "Spidroins, the major ampullate proteins."})
        # chatter and a code fence around the JSON: extraction must be lenient
        return "Here are the pairs:\n```json\n" + json.dumps({"pairs": pairs}) + "\n```\nHope this helps!"
    if "key scientific facts" in user:
        return '{"facts": [' + ", ".join(json.dumps(s) for s in sents[:3]) + ",]}"  # trailing comma
    if "Summarise" in user:
        return json.dumps({"summary": f"Passage {tag}: " + sents[0]})
    return "unknown task"


class Stub:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.posts = 0  # every POST, including the failed ones
        self.ok = 0
        self.status: list[int] = []
        self.seen_flaky: set[str] = set()
        self.delay = 0.0
        self.slow_once: set[str] = set()


def _handler(stub: Stub):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep the test output clean
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            with stub.lock:
                stub.status.append(code)
                stub.ok += code == 200

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            with stub.lock:
                stub.posts += 1
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "no such route"}})
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._send(401, {"error": {"message": "bad key"}})
            body = json.loads(raw)
            user = body["messages"][-1]["content"]
            h = hashlib.sha256(raw).hexdigest()
            if "FLAKY" in user and h not in stub.seen_flaky:  # a transient failure, once per request
                stub.seen_flaky.add(h)
                return self._send(503, {"error": {"message": "overloaded"}})
            if "SLOWONCE" in user and h not in stub.slow_once:
                stub.slow_once.add(h)
                time.sleep(1.5)
            if "BADREQUEST" in user:
                return self._send(400, {"error": {"message": "context length exceeded"}})
            if stub.delay:
                time.sleep(stub.delay)
            text = stub_reply(body)
            self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(text) // 4}})

    return H


@pytest.fixture(scope="module")
def stub():
    s = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    s.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield s
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


# ----------------------------------------------------------------------------- helpers
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dft.databuild.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "databuild"), version_base="1.3"):
        return hydra_compose("build", overrides=overrides)


def base_overrides(src: Path, tmp: Path, name: str, cache: Path, **kw) -> list[str]:
    o = {
        "source": str(src), "name": name, "out": str(tmp / "out"), "data_conf_dir": str(tmp / "conf"),
        "call_cache": str(cache), "progress": "false", "chunk.tokens": "64", "chunk.min_tokens": "8",
        "clean.min_chars": "50", "eval_guard.exclude": "[eval/**]",
    }
    o.update({k: str(v) for k, v in kw.items()})
    return [f"{k}={v}" for k, v in o.items()]


def stub_overrides(stub: Stub, **kw) -> dict:
    return {"generator": "openai", "generator.base_url": stub.url, "generator.model": "stub-1",
            "generator.api_key_env": KEY_ENV, "generator.backoff_s": "0.01", "generator.max_workers": "4",
            "generator.timeout_s": "10", "heldout_fraction": "0.0", **kw}


def data_cfg(conf_file: Path):
    from dft.config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(conf_file))


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- unit tests (fast)
def test_extract_json_is_lenient_and_schema_strict():
    from dft.databuild.generators import Completion
    from dft.databuild.validate import extract_json, parse_qa, parse_wrong_answer

    assert extract_json('Sure!\n```json\n{"a": [1, 2,],}\n```') == {"a": [1, 2]}
    assert extract_json('noise {broken json} then {"pairs": []} tail') == {"pairs": []}
    assert extract_json("no json at all") is None
    ok = parse_qa(Completion('{"pairs": [{"question": "Why is silk tough?", "answer": "Beta-sheet nanocrystals '
                             'reinforce an extensible matrix."}, {"question": "Q2?", "answer": "Q2"}, '
                             '{"question": "What?", "answer": "x", "score": 3}, {"question": "", "answer": "a"}]}'))
    assert [p["question"] for p in ok.items] == ["Why is silk tough?"]
    assert sorted(r.reason for r in ok.rejects) == ["answer_copies_question", "empty", "schema"]
    assert parse_qa(Completion('{"qa": []}')).rejects[0].reason == "schema"
    assert parse_qa(Completion('{"pairs": [{"question": "a', "length")).rejects[0].reason == "truncated"
    assert parse_qa(Completion("prose only", "stop")).rejects[0].reason == "no_json"
    same = parse_wrong_answer(Completion('{"wrong_answer": "Beta sheets."}'), "Why?", "beta-sheets")
    assert same.rejects[0].reason == "rejected_equals_chosen"
    # a one-word answer that occurs in the question is not a copy
    assert parse_qa(Completion('[{"question": "Is silk or steel tougher per weight?", "answer": "Silk"}]')).items


def test_clean_chunk_and_render():
    from dft.databuild.chunking import chunk_text
    from dft.databuild.config import CleanConfig
    from dft.databuild.documents import clean_text
    from dft.databuild.pipeline import render

    raw = "A tough fib-\nre is spun.\n12\nIt is strong.\n\nSecond para.\n" + "filler line\n" * 20 + "References\n[1] X."
    text = clean_text(raw, "pdf", CleanConfig(min_chars=0))
    assert text.startswith("A tough fibre is spun. It is strong.\n\nSecond para.")
    assert "12" not in text and "[1] X." not in text
    assert render('Q {question} {"pairs": [{"question": "..."}]} {unknown}', question="why?") == \
        'Q why? {"pairs": [{"question": "..."}]} {unknown}'
    # chunks end at a sentence boundary, cover the text in order, and respect the token budget
    s = "One two three four five. " * 20
    offsets = [(m.start(), m.end()) for m in re.finditer(r"\S+\s*", s)]  # one "token" per word
    spans = chunk_text(s, offsets, tokens=12, overlap=0, min_tokens=3)
    assert all(s[a:b].rstrip().endswith(".") for a, b, _ in spans)
    assert all(n <= 12 + 3 for _, _, n in spans) and sum(n for _, _, n in spans) == len(offsets)


def test_openai_generator_retries_timeouts_errors_and_cache(stub, api_key, tmp_path):
    from dft.databuild.config import GeneratorConfig
    from dft.databuild.generators import CallCache, OpenAIGenerator

    stub.reset()
    cfg = OmegaConf.structured(GeneratorConfig(kind="openai", base_url=stub.url, model="stub-1", api_key_env=KEY_ENV,
                                               backoff_s=0.01, timeout_s=0.5, max_retries=3, max_workers=2))
    gen = OpenAIGenerator(cfg, CallCache(tmp_path / "cache"))
    msgs = [[{"role": "user", "content": f"Summarise FLAKY\n\"\"\"\nSilk is tough. It is a protein fibre {i}.\n\"\"\""}]
            for i in range(2)]
    msgs.append([{"role": "user", "content": "Summarise SLOWONCE\n\"\"\"\nSilk is light and strong indeed.\n\"\"\""}])
    msgs.append([{"role": "user", "content": "BADREQUEST"}])
    out = gen.run(msgs, progress=False)
    assert [c.error is None for c in out] == [True, True, True, False]
    assert "HTTP 400" in out[3].error
    assert json.loads(out[0].text)["summary"].endswith("protein fibre 0.")
    assert stub.status.count(503) == 2 and gen.stats["retries"] >= 3  # two 503s and one timeout, all retried
    assert gen.stats["calls"] == 4 and gen.stats["errors"] == 1
    # a second run: the three good replies come from the cache; the failed one is asked again
    posts = stub.posts
    gen2 = OpenAIGenerator(cfg, CallCache(tmp_path / "cache"))
    again = gen2.run(msgs, progress=False)
    assert [c.cached for c in again] == [True, True, True, False] and stub.posts == posts + 1
    assert [c.text for c in again[:3]] == [c.text for c in out[:3]]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # a bad key fails the build at once instead of producing a reject per request
    os.environ[KEY_ENV] = "wrong"
    with pytest.raises(DftError, match="HTTP 401"):
        OpenAIGenerator(cfg, CallCache(tmp_path / "cache2")).run(msgs[:1], progress=False)


# ----------------------------------------------------------------------------- builds against the stub
def test_build_with_stub_endpoint(corpus, bench_file, stub, api_key, tmp_path, monkeypatch):
    from dft.data import load_split
    from dft.databuild import build

    stub.reset()
    ov = base_overrides(corpus, tmp_path, "silk", tmp_path / "cache",
                        **stub_overrides(stub), **{"eval_guard.benchmarks": f"[{bench_file}]"})
    report = build(compose(ov))
    out = tmp_path / "out" / "silk"
    conf = tmp_path / "conf" / "silk.yaml"
    assert conf.read_text().startswith("# Written by `python -m dft.data build`")
    dc = data_cfg(conf)
    text, messages, preference = (load_split(dc, s) for s in ("text", "messages", "preference"))
    assert dc.heldout_text is None and dc.eval == {}

    # documents: PDF + Markdown + text + one JSONL item; the rest set aside or skipped, each with its reason
    d = report["documents"]
    assert d["used"] == 5 and d["eval_set_aside"] == 2  # silk_paper, processing, fibroin, n1, leak / exam, e1
    assert d["skipped"] == {"duplicate_normalised": 1, "empty": 1}
    sources = {r["provenance"]["source"] for r in read_jsonl(out / "text.jsonl")}
    assert {"silk_paper.pdf", "processing.md", "fibroin.txt", "items.jsonl#L1"} <= sources
    assert "leak.txt" not in sources  # it copies a 13-gram of the eval document
    assert not any(EVAL_SENTENCE[:40] in r["text"] for r in text)
    assert report["chunks"]["eval_overlap"] >= 1
    assert any("Kevlar" in r["text"] for r in text) and any("Supercontraction" in r["text"] for r in text)
    assert report["rows"]["text"] == len(text) == report["chunks"]["train"]

    # generated rows, with provenance
    assert messages and preference and len(preference) < len(messages)
    for r in read_jsonl(out / "messages.jsonl") + read_jsonl(out / "preference.jsonl"):
        p = r["provenance"]
        assert p["source"] and p["chunk_id"] and p["generator"].startswith("openai:stub-1@127.0.0.1") \
            and p["prompt_version"] == "v1"
    assert all(m["messages"][-1]["role"] == "assistant" for m in messages)
    assert all(p["chosen"] != p["rejected"] for p in preference)
    assert not any(BENCH_QUESTION in m["messages"][0]["content"] for m in messages)
    notes = read_jsonl(out / "notes.jsonl")
    assert {n["kind"] for n in notes} == {"facts", "summary"}

    # rejects: counted per reason, written with their reason, never silently dropped
    rejects = read_jsonl(out / "rejects.jsonl")
    assert report["rejects"] == dict(sorted({r: sum(x["reason"] == r for x in rejects) for r in {x["reason"] for x in rejects}}.items()))
    for reason in ("no_json", "answer_copies_question", "rejected_equals_chosen", "eval_overlap", "empty",
                   "duplicate_normalised"):
        assert report["rejects"].get(reason), (reason, report["rejects"])
    malformed = [r for r in rejects if r["reason"] == "no_json"]
    assert malformed and all(r["source"] == "processing.md" and "output" in r for r in malformed)
    assert report["eval_guard"]["removed"]["rows"] >= 1 and report["eval_guard"]["benchmark_questions"] == 1

    # the transient 503s were retried; every request was answered
    g = report["generator"]
    assert stub.status.count(503) >= 1 and g["retries"] >= 1 and g["errors"] == 0
    assert g["calls"] == g["requests"] == stub.ok and g["cache_hits"] == 0
    saved = json.loads((out / "build_report.json").read_text())
    assert saved["rows"] == report["rows"] and saved["rejects"] == report["rejects"]

    # a second build makes no calls: every reply is a cache hit, and the rows are the same (also when the
    # chunks are generated from in windows of 2 instead of 256)
    before = {s: (out / f"{s}.jsonl").read_bytes() for s in ("text", "messages", "preference")}
    posts = stub.posts
    monkeypatch.setattr("dft.databuild.pipeline.WINDOW", 2)
    again = build(compose(ov))
    assert stub.posts == posts and again["generator"]["calls"] == 0
    assert again["generator"]["cache_hits"] == g["requests"]
    assert before == {s: (out / f"{s}.jsonl").read_bytes() for s in ("text", "messages", "preference")}


def test_refuses_to_overwrite_a_data_config_it_did_not_write(corpus, tmp_path):
    from dft.databuild import build

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("name: mine\ntext: x.jsonl\n")
    with pytest.raises(DftError, match="not written by this tool"):
        build(compose(base_overrides(corpus, tmp_path, "mine", tmp_path / "cache")))
    with pytest.raises(Exception, match="generator.kind|not one of"):
        build(compose(base_overrides(corpus, tmp_path, "x", tmp_path / "cache", **{"generator.kind": "magic"})))


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "dft.data", "build", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_interrupted_build_resumes_to_the_same_rows(corpus, stub, tmp_path):
    """Kill the CLI after a few replies; the rerun pays only for the rest and writes the same rows as a
    build that was never interrupted."""
    stub.reset()
    stub.delay = 0.2
    env = {**os.environ, KEY_ENV: KEY, "HF_HUB_OFFLINE": "1"}
    args = lambda d: base_overrides(corpus, d, "silk", d / "cache", **stub_overrides(stub, **{"generator.max_workers": "1"}))
    a = tmp_path / "a"
    proc = _cli(args(a), env)
    deadline = time.time() + 240
    while stub.ok < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert stub.ok >= 3, "the build never reached the endpoint"
    assert not (a / "out" / "silk" / "messages.jsonl").exists()  # killed before writing
    paid = len(list((a / "cache").rglob("*.json")))  # replies that reached the disk before the kill
    assert paid >= 2
    stub.delay = 0.0
    proc = _cli(args(a), env)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    resumed = json.loads((a / "out" / "silk" / "build_report.json").read_text())
    assert resumed["generator"]["cache_hits"] == paid

    b = tmp_path / "b"  # the same build, never interrupted, with its own cache
    proc = _cli(args(b), env)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    full = json.loads((b / "out" / "silk" / "build_report.json").read_text())
    assert resumed["generator"]["calls"] + resumed["generator"]["cache_hits"] == full["generator"]["calls"]
    assert resumed["generator"]["calls"] < full["generator"]["calls"]
    for split in ("text", "messages", "preference", "rejects"):
        assert (a / "out" / "silk" / f"{split}.jsonl").read_bytes() == (b / "out" / "silk" / f"{split}.jsonl").read_bytes(), split
    assert "python -m dft.train data=silk" in log


# ----------------------------------------------------------------------------- the embedded model
def test_build_with_the_embedded_model(corpus, tmp_path):
    """Offline end to end with the default generator. The 135M model rarely writes valid JSON with 6 new
    tokens: whatever it writes must show up as rows or as counted rejects."""
    from dft.data import load_split
    from dft.databuild import build

    ov = base_overrides(corpus, tmp_path, "silk_local", tmp_path / "cache", **{
        "generator.max_new_tokens": 6, "max_chunks": 1, "heldout_fraction": 0.2})
    report = build(compose(ov))
    dc = data_cfg(tmp_path / "conf" / "silk_local.yaml")
    text, held = load_split(dc, "text"), load_split(dc, "heldout_text")
    assert len(text) == report["rows"]["text"] == report["chunks"]["train"] >= 3
    assert len(held) == report["chunks"]["heldout"] >= 1
    assert not {r["id"] for r in text} & {r["id"] for r in held}
    assert report["tokens"]["text"] > 0 and report["tokens"]["heldout_text"] > 0
    g = report["generator"]
    assert g["id"].startswith("local:smollm2_135m:") and g["calls"] >= 3 and g["errors"] == 0
    gen_rejects = sum(n for t, c in report["rejects_by_task"].items() if t in ("qa", "facts", "summary") for n in c.values())
    # every one of the 3 replies is accounted for: as rows or as rejects
    assert gen_rejects + report["rows"]["notes"] + report["rows"]["messages"] >= 3
    rejects = read_jsonl(tmp_path / "out" / "silk_local" / "rejects.jsonl")
    assert len(rejects) == sum(report["rejects"].values())
    for split in ("messages", "preference"):
        if report["rows"][split]:
            assert len(load_split(dc, split)) == report["rows"][split]
        else:
            assert dc[split] is None


# ----------------------------------------------------------------------------- the built domain trains
@pytest.mark.skipif(not (ROOT / "dft" / "train.py").exists(), reason="dft.train is not there yet")
@pytest.mark.skipif(not (ROOT / "conf" / "launcher" / "local.yaml").exists(),
                    reason="conf/launcher/local.yaml (the default of conf/train.yaml) is not there yet")
def test_train_accepts_a_built_domain(corpus, stub, api_key, tmp_path):
    """``python -m dft.train data=<built>`` uses the domain at once: 2 SFT steps on the tiny model."""
    from dft.databuild import build

    stub.reset()
    confroot = tmp_path / "confroot"
    ov = base_overrides(corpus, tmp_path, "silk_built", tmp_path / "cache", **stub_overrides(stub),
                        data_conf_dir=confroot / "data")
    report = build(compose(ov))
    assert report["rows"]["messages"] > 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [PY, "-m", "dft.train", "data=silk_built", "strategy=sft", "model=tiny", "merge=none", "eval=none",
         "logger=none", "strategy.sft.trainer.max_steps=2", f"paths.runs={tmp_path / 'runs'}",
         f"hydra.searchpath=[file://{confroot}]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = list((tmp_path / "runs").rglob("summary.json"))
    assert summaries, proc.stderr[-2000:]
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "finished" and summary["chain"] == ["sft"]


# ----------------------------------------------------------------------------- issue 22: the offline path yields rows
class _NoJsonGenerator:
    """What the embedded 135M model does with a small budget: prose that stops at max_new_tokens, no JSON."""

    kind, id = "local", "local:nojson"

    def __init__(self):
        from dft.databuild.generators import Completion

        self._c = Completion
        self.stats = {"requests": 0, "calls": 0, "cache_hits": 0, "errors": 0, "retries": 0, "seconds": 0.0}

    def run(self, requests, bar=None, **kw):
        self.stats["calls"] += len(requests)
        return [self._c("Sure! Here are the questions about the", "length", key=f"k{i}") for i in range(len(requests))]

    def close(self):
        pass


def _check_offline_build(report, confroot, out, name):
    from dft.data import load_split
    from dft.databuild.pipeline import format_report

    assert report["rows"]["notes"] == 0 and report["fallback"]["chunks"] == 2  # nothing generated was usable
    dc = data_cfg(confroot / "data" / f"{name}.yaml")
    msgs, prefs = load_split(dc, "messages"), load_split(dc, "preference")
    assert len(msgs) == report["rows"]["messages"] == report["fallback"]["pairs"] >= 2
    assert len(prefs) == report["fallback"]["wrong_answers"] == len(msgs)
    for m in msgs:
        q, a = m["messages"][-2]["content"], m["messages"][-1]["content"]
        assert (q.startswith("What ") or q.startswith("Complete this statement: ")) and a.endswith((".", "!", "?"))
    for r in read_jsonl(out / name / "preference.jsonl"):
        assert r["rejected"] != r["chosen"] and r["provenance"]["generator"] == "extractive:v1"
    text = format_report(report)
    assert "    qa: 2 x truncated (no complete JSON in the reply and generation stopped at max_new_tokens), e.g. " in text
    assert (f"fallback   the generator gave no valid Q&A for 2 chunk(s): {len(msgs)} Q&A pairs were taken from the "
            "text itself") in text


def test_build_without_usable_replies_falls_back_says_why_and_its_yaml_trains_as_suggested(corpus, tmp_path,
                                                                                          monkeypatch):
    """Every reply rejected (as the embedded model's are): the printed report says which and why, the
    extractive fallback takes Q&A and wrong answers from the text itself (said plainly), and
    ``python -m dft.train data=<name>``, the command the build suggests, runs with the default strategy
    and eval (eval.benchmarks follows data.eval, which is empty for a new domain)."""
    from dft.databuild import build
    from dft.databuild import pipeline as P

    monkeypatch.setattr(P, "make_generator", lambda *a, **k: _NoJsonGenerator())
    confroot = tmp_path / "confroot"
    ov = base_overrides(corpus, tmp_path, "silk_offline", tmp_path / "cache", data_conf_dir=confroot / "data",
                        **{"max_chunks": 2, "heldout_fraction": 0.2})
    _check_offline_build(build(compose(ov)), confroot, tmp_path / "out", "silk_offline")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [PY, "-m", "dft.train", "data=silk_offline", "model=tiny", "merge=none", "logger=none",
         "strategy.cpt.trainer.max_steps=1", "strategy.sft.trainer.max_steps=1", "strategy.dpo.trainer.max_steps=1",
         f"paths.runs={tmp_path / 'runs'}", f"hydra.searchpath=[file://{confroot}]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(next((tmp_path / "runs").rglob("summary.json")).read_text())
    assert summary["chain"] == ["cpt", "sft", "dpo"] and summary["status"] == "finished"
    # no benchmarks in data.eval: perplexity only (with its interval)
    assert sorted(summary["artefacts"][0]["metrics"]) == ["ppl", "ppl_ci_high", "ppl_ci_low", "ppl_stderr"]


@pytest.mark.slow
def test_embedded_build_yields_usable_rows(corpus, tmp_path):
    """The same with the real embedded model (6 new tokens: no JSON fits). 96 s on a loaded 2-core machine."""
    from dft.databuild import build

    confroot = tmp_path / "confroot"
    ov = base_overrides(corpus, tmp_path, "silk_offline", tmp_path / "cache", data_conf_dir=confroot / "data",
                        **{"generator.max_new_tokens": 6, "max_chunks": 2, "heldout_fraction": 0.2})
    _check_offline_build(build(compose(ov)), confroot, tmp_path / "out", "silk_offline")


def test_extract_pairs_definitions_then_completions():
    from dft.databuild.extractive import extract_pairs, wrong_answer

    text = ("Fibroin is a structural protein that forms the core of silk fibres spun by silkworms. "
            "The fibres were annealed at 120 degrees for two hours before testing their modulus. Short one.")
    assert extract_pairs(text, 3) == [
        {"question": "What is fibroin?",
         "answer": "Fibroin is a structural protein that forms the core of silk fibres spun by silkworms."},
        {"question": 'Complete this statement: "The fibres were annealed at 120 degrees ..."',
         "answer": "The fibres were annealed at 120 degrees for two hours before testing their modulus."}]
    assert wrong_answer("a.", ["a.", "b."]) == "b." and wrong_answer("a.", ["a."]) is None
