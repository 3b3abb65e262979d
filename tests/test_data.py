"""dft.data: shipped domains load and validate, no eval item is trained on, bad rows give exact errors."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from dft import ROOT
from dft.config import DataConfig
from dft.data import DataError, load_benchmark, load_split, normalize_question, read_rows, require_split

DOMAINS = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
SHARED = ROOT.parent / "shared" / "data"  # the source copies prepare.py reads (absent outside this workspace)
CONTRACT = {
    "text": {"id", "text"},
    "heldout_text": {"id", "text"},
    "messages": {"id", "messages"},
    "preference": {"id", "prompt", "chosen", "rejected"},
}
MCQ_KEYS = {"id", "question", "options", "answer", "category"}


def domain_cfg(name: str):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml"))


_LOADED: dict[str, dict] = {}


def loaded(name: str) -> dict:
    """Every split and benchmark of a shipped domain, loaded once per test session."""
    if name not in _LOADED:
        cfg = domain_cfg(name)
        out = {s: load_split(cfg, s) for s in CONTRACT if cfg[s] is not None}
        out["eval"] = {b: load_benchmark(cfg, b) for b in cfg.eval}
        _LOADED[name] = out
    return _LOADED[name]


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- shipped data
@pytest.mark.parametrize("name", DOMAINS)
def test_shipped_domain_loads_and_matches_contract(name):
    data = loaded(name)
    assert {"text", "heldout_text", "messages", "preference"} <= set(data), "the shipped domains have every split"
    for split, keys in CONTRACT.items():
        assert data[split] and all(set(r) == keys for r in data[split]), split
    assert all(r["messages"][-1]["role"] == "assistant" for r in data["messages"])
    assert set(data["eval"]) == {"mascqa", "mmlu_stem", "anatomy_mcq"}
    for bench, rows in data["eval"].items():
        assert rows and all(set(r) == MCQ_KEYS for r in rows), bench
        assert all("ABCDE".index(r["answer"]) < len(r["options"]) for r in rows)


def overlaps(train_prompts: list[str], eval_rows: list[dict]) -> list[str]:
    """Ids of eval items whose normalised question equals a training prompt, or appears inside one when it is
    specific (8+ words: "Which of the following statements is true?" alone is not an item), or whose question
    plus lettered options (how MCQ prompts are rendered for training) appears inside one."""
    norm = [normalize_question(t) for t in train_prompts]
    exact, haystack = set(norm), "\n".join(f" {t} " for t in norm)
    hits = []
    for r in eval_rows:
        q = normalize_question(r["question"])
        full = normalize_question(r["question"] + "".join(f" ({'ABCDE'[k]}) {o}" for k, o in enumerate(r["options"])))
        if q in exact or f" {full} " in haystack or (len(q.split()) >= 8 and f" {q} " in haystack):
            hits.append(r["id"])
    return hits


@pytest.mark.parametrize("name", DOMAINS)
def test_no_training_item_in_any_eval_split(name):
    """No eval question is trained on: SFT user turns and preference prompts vs every benchmark."""
    data = loaded(name)
    train = [t["content"] for r in data["messages"] for t in r["messages"] if t["role"] == "user"]
    train += [r["prompt"] for r in data["preference"]]
    eval_rows = [r for rows in data["eval"].values() for r in rows]
    assert overlaps(train, eval_rows) == []
    # Preference pairs made from an MCQ carry its id: none of those ids is an eval id.
    eval_ids = {r["id"] for r in eval_rows}
    assert not {r["id"].split(":")[0] for r in data["preference"]} & eval_ids
    # The check has teeth: an eval item rendered as a training MCQ prompt, or quoted in an exercise, is found.
    a, b = data["eval"]["anatomy_mcq"][0], data["eval"]["mascqa"][0]
    planted = [a["question"] + "".join(f"\n({'ABCDE'[k]}) {o}" for k, o in enumerate(a["options"])),
               f"Exercise 3. {b['question'].upper()}!  Explain."]
    assert overlaps(train + planted, [a, b]) == [a["id"], b["id"]]


@pytest.mark.parametrize("name", DOMAINS)
def test_heldout_text_is_not_in_text(name):
    data = loaded(name)
    assert not {r["id"] for r in data["text"]} & {r["id"] for r in data["heldout_text"]}
    assert not {r["text"] for r in data["text"]} & {r["text"] for r in data["heldout_text"]}


def test_materials_eval_prefixes_are_category_mixed():
    """eval=quick takes the first N items: they must span the categories, not one subject."""
    for bench, rows in loaded("materials")["eval"].items():
        cats = {r["category"] for r in rows}
        first = {r["category"] for r in rows[:60]}
        assert len(first) >= min(len(cats), 9), (bench, len(first), len(cats))


def test_tiny_is_a_cut_of_materials():
    big, tiny = loaded("materials"), loaded("tiny")
    assert len(tiny["text"]) == 40 and len(tiny["messages"]) == 40 and len(tiny["preference"]) == 40
    assert {r["id"] for r in tiny["messages"]} <= {r["id"] for r in big["messages"]}
    assert {r["id"] for r in tiny["preference"]} <= {r["id"] for r in big["preference"]}
    assert {r["id"] for r in tiny["heldout_text"]} <= {r["id"] for r in big["heldout_text"]}
    for bench, rows in tiny["eval"].items():
        assert rows == big["eval"][bench][: len(rows)] and len(rows) == 20


@pytest.mark.skipif(not (SHARED / "openstax").is_dir(), reason="source copies (../shared/data) not present")
def test_prepare_is_deterministic_and_shipped_files_are_current(tmp_path):
    from dft.data.prepare import build

    manifest = build(SHARED, tmp_path / "materials", tmp_path / "tiny")
    shipped = json.loads((ROOT / "data" / "materials" / "manifest.json").read_text())
    assert manifest["sha256"] == shipped["sha256"], "rerun: python -m dft.data.prepare --shared ../shared/data"
    for f in (ROOT / "data" / "tiny").glob("*.jsonl"):
        assert (tmp_path / "tiny" / f.name).read_bytes() == f.read_bytes(), f.name
    assert manifest["lamm"]["flagged_dropped"] == 5 and manifest["lamm"]["ratio_of_means"] > 5


# --------------------------------------------------------------------------------------------- bad rows
GOOD = {
    "text": {"text": "Stress is force per area."},
    "messages": {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
    "preference": {"prompt": "Q?", "chosen": "right", "rejected": "wrong"},
    "mcq": {"question": "Q?", "options": ["a", "b", "c", "d"], "answer": "B", "category": "x"},
}
BAD = [
    ("text", {"id": "t"}, "missing field (field 'text')"),
    ("text", {"text": "   "}, "empty value (field 'text')"),
    ("text", {"text": 3}, "expected a string, got int (field 'text')"),
    ("text", '{"text": "unterminated', "invalid JSON (Unterminated string starting at, column 10)"),
    ("text", "[1, 2]", "expected a JSON object, got list"),
    ("text", {"id": "g", "text": "x"}, "duplicate id 'g' (first on line 1) (field 'id')"),
    ("preference", {"prompt": "Q", "chosen": "same", "rejected": " same "},
     "chosen and rejected are identical (field 'rejected')"),
    ("preference", {"chosen": "a", "rejected": "b"}, "missing field (field 'prompt')"),
    ("preference", {"prompt": "Q", "chosen": "", "rejected": "b"}, "empty value (field 'chosen')"),
    ("mcq", {"question": "Q", "options": ["a", "b", "c", "d"], "answer": "E"},
     "answer 'E' is not among the options A-D (field 'answer')"),
    ("mcq", {"question": "Q", "options": ["a", "b"], "answer": " "}, "empty value (field 'answer')"),
    ("mcq", {"question": "Q", "options": ["a", "b"], "answer": 2},
     "answer index 2 is not among the options 0-1 (field 'answer')"),
    ("mcq", {"question": "Q", "options": ["a"], "answer": "A"}, "needs at least 2 options, got 1 (field 'options')"),
    ("mcq", {"question": "Q", "options": ["a", ""], "answer": "A"}, "empty option B (field 'options')"),
    ("mcq", {"options": ["a", "b"], "answer": "A"}, "missing field (field 'question')"),
    ("messages", {"messages": [{"role": "user", "content": "Q?"}]},
     "no final assistant turn (the last turn is 'user') (field 'messages')"),
    ("messages", {"messages": [{"role": "bot", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
     "bad role 'bot' in turn 1 (expected one of system, user, assistant) (field 'messages')"),
    ("messages", {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": ""}]},
     "empty content in turn 2 (field 'messages')"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                               {"role": "assistant", "content": "A"}]},
     "system turn 2 is not the first turn (field 'messages')"),
    ("messages", {"messages": [{"role": "assistant", "content": "A"}]}, "no user turn (field 'messages')"),
    ("messages", {"messages": "hello"}, "expected a list of {role, content} turns (field 'messages')"),
    ("messages", {"text": "x"}, "missing field (field 'messages')"),
]


@pytest.mark.parametrize("kind,bad,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_row_error_names_file_line_and_field(tmp_path, kind, bad, message):
    path = write(tmp_path / "user.jsonl", [{"id": "g", **GOOD[kind]}, "", bad])  # line 2 is blank: skipped
    with pytest.raises(DataError) as e:
        read_rows(path, kind)
    assert str(e.value) == f"{path}:3: {message}"


def test_skip_bad_rows_counts_by_reason(tmp_path, caplog):
    path = write(tmp_path / "docs.jsonl", [GOOD["text"], {"id": 1}, "not json", {"text": ""}, GOOD["text"], {"x": 2}])
    cfg = SimpleNamespace(name="user", text=str(path), heldout_text=None, messages=None, preference=None, eval={},
                          skip_bad_rows=True)
    with caplog.at_level(logging.WARNING, logger="dft.data"):
        rows = load_split(cfg, "text")
    assert rows == [{"id": "docs:1", "text": GOOD["text"]["text"]}, {"id": "docs:5", "text": GOOD["text"]["text"]}]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 4 of 6 rows (missing field (field 'text'): 2, empty value (field 'text'): 1, invalid JSON: 1)"
    ]
    cfg.skip_bad_rows = False
    with pytest.raises(DataError, match=r"docs\.jsonl:2: missing field \(field 'text'\)$"):
        load_split(cfg, "text")


def test_file_without_valid_rows_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows$"):
        read_rows(write(tmp_path / "empty.jsonl", [""]), "text")
    with pytest.raises(DataError, match=r"bad\.jsonl: no valid rows \(1 skipped\)$"):
        read_rows(write(tmp_path / "bad.jsonl", [{"x": 1}]), "text", skip_bad_rows=True)


# --------------------------------------------------------------------------------------------- user files
def test_csv_files_load(tmp_path):
    mmlu = tmp_path / "exam.csv"  # MMLU's layout: choice columns, 0-based answer index
    mmlu.write_text('question,choice0,choice1,choice2,choice3,answer\n"What is\nE?",a,b,c,d,2\nQ2,a,b,c,d,0\n')
    rows = read_rows(mmlu, "mcq")
    assert rows[0] == {"id": "exam:2", "question": "What is\nE?", "options": ["a", "b", "c", "d"], "answer": "C",
                       "category": "all"}
    assert rows[1]["id"] == "exam:4"  # physical line: the quoted question spans lines 2-3
    chat = tmp_path / "chat.csv"
    turns = json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    with open(chat, "w", newline="") as f:
        csv.writer(f).writerows([["id", "messages"], ["c1", turns]])  # the turns as a JSON string cell
    assert read_rows(chat, "messages") == [{"id": "c1", "messages": json.loads(turns)}]
    pc = tmp_path / "pc.csv"  # TRL's prompt-completion columns
    pc.write_text("prompt,completion,system\nQ,A,Be brief.\nQ2,,\n")
    with pytest.raises(DataError) as e:
        read_rows(pc, "messages")
    assert str(e.value) == f"{pc}:3: missing field (field 'completion')"
    assert read_rows(pc, "messages", skip_bad_rows=True)[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"}]
    lettered = tmp_path / "lettered.csv"
    lettered.write_text("question,A,B,C,answer,category\nQ,x,y,z,(c),bio\n")
    assert read_rows(lettered, "mcq")[0] == {"id": "lettered:2", "question": "Q", "options": ["x", "y", "z"],
                                             "answer": "C", "category": "bio"}


def test_parquet_files_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([
        {"question": "Q1", "options": ["a", "b"], "answer": "b"},
        {"question": "Q2", "options": ["a", "b", "c"], "answer": "a"},
    ]), tmp_path / "bench.parquet")
    rows = read_rows(tmp_path / "bench.parquet", "mcq")
    assert [r["answer"] for r in rows] == ["B", "A"] and rows[1]["id"] == "bench:2"
    pq.write_table(pa.Table.from_pylist([
        {"id": "p1", "prompt": "Q", "chosen": "x", "rejected": "y"},
        {"id": "p2", "prompt": "Q", "chosen": "x", "rejected": "x"},
    ]), tmp_path / "pairs.parquet")
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "pairs.parquet", "preference")
    assert str(e.value) == f"{tmp_path / 'pairs.parquet'}:2: chosen and rejected are identical (field 'rejected')"
    pq.write_table(pa.Table.from_pylist([{"text": "doc one"}, {"text": "doc two"}]), tmp_path / "docs.parquet")
    cfg = DataConfig(name="user", text=str(tmp_path / "docs.parquet"), eval={"b": str(tmp_path / "bench.parquet")})
    assert load_split(cfg, "text")[1] == {"id": "docs:2", "text": "doc two"}
    assert len(load_benchmark(cfg, "b")) == 2


# --------------------------------------------------------------------------------------------- config errors
def test_missing_split_messages_are_exact(tmp_path, monkeypatch):
    cfg = DataConfig(name="x", text="nowhere/docs.jsonl")
    with pytest.raises(DataError) as e:
        require_split(cfg, "messages", "sft")
    assert str(e.value) == "stage 'sft' needs data.messages, but domain 'x' has none (set data.messages=<file>)"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        require_split(cfg, "text", "cpt")
    assert str(e.value) == (
        f"stage 'cpt' needs data.text, but data.text='nowhere/docs.jsonl' does not exist "
        f"(looked in {ROOT / 'nowhere/docs.jsonl'} and {tmp_path / 'nowhere/docs.jsonl'})"
    )
    with pytest.raises(DataError) as e:
        load_split(cfg, "preference")
    assert str(e.value) == "domain 'x' has no data.preference (set data.preference=<file>)"
    with pytest.raises(DataError) as e:
        load_benchmark(domain_cfg("tiny"), "mmlu")
    assert str(e.value) == "domain 'tiny' has no benchmark data.eval.mmlu (it has: anatomy_mcq, mascqa, mmlu_stem)"
    write(tmp_path / "docs.txt", ["x"])
    with pytest.raises(DataError, match=r"data\.text='docs\.txt' is not a \.jsonl, \.csv, \.parquet file$"):
        load_split(DataConfig(name="x", text="docs.txt"), "text")


def test_relative_paths_resolve_against_root_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert require_split(domain_cfg("tiny"), "text", "cpt") == ROOT / "data" / "tiny" / "text.jsonl"
    write(tmp_path / "mine.jsonl", [GOOD["text"]])
    assert require_split(DataConfig(name="u", text="mine.jsonl"), "text", "cpt") == tmp_path / "mine.jsonl"


def test_normalize_question():
    assert normalize_question("  What is   Young’s\nmodulus? (A) σ/ε ") == "what is youngs modulus a σε"
    assert normalize_question("ABC,  d-e") == normalize_question("abc de") == "abc de"
