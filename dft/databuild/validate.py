"""Turn a generator's raw reply into validated items: lenient in finding the JSON, strict in its schema.

Lenient: the first JSON object (or array) anywhere in the reply is used -- after code fences, chatter
before or after it, and trailing commas. Strict: the object must have exactly the keys the prompt asked
for, with the right types; each item must be non-empty; an answer must not copy its question; a wrong
answer must differ from the right one. Every failure is a :class:`Reject` with a reason from
:data:`REASONS` and a human-readable detail.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from dft.databuild.documents import normalise_for_hash

REASONS = {
    "generator_error": "the call failed after its retries (HTTP error, timeout, connection)",
    "truncated": "no complete JSON in the reply and generation stopped at max_new_tokens",
    "no_json": "no parsable JSON object in the reply",
    "schema": "JSON with the wrong keys or types",
    "empty": "an empty question, answer, fact, summary or list",
    "answer_copies_question": "the answer repeats the question verbatim",
    "rejected_equals_chosen": "the wrong answer is the same as the correct one",
    "duplicate_question": "the same (normalised) question was already generated",
    "eval_overlap": "overlaps evaluation material (benchmark question or eval document)",
}


@dataclass
class Reject:
    reason: str
    detail: str = ""
    item: Any = None


@dataclass
class Parsed:
    items: list = field(default_factory=list)
    rejects: list = field(default_factory=list)


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def extract_json(text: str) -> Optional[Any]:
    """The first JSON object or array in ``text`` (dict/list), or None."""
    if not text:
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    for cand in candidates:
        for variant in (cand, _TRAILING_COMMA.sub(r"\1", cand)):
            for m in re.finditer(r"[{\[]", variant):
                try:
                    obj, _ = dec.raw_decode(variant, m.start())
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, (dict, list)):
                    return obj
    return None


def _words(s: str) -> str:
    return normalise_for_hash(s)


def copies(answer: str, question: str) -> bool:
    """The answer is copied from the question (case, punctuation and spacing ignored).

    Copied: the same words; a passage of four or more words lifted from the question and nothing else
    (a one-word answer that happens to occur in the question, "silk" to "silk or steel?", is fine); or the
    whole question repeated with fewer than three words added.
    """
    a, q = _words(answer), _words(question)
    if not a or not q:
        return False
    na, nq = len(a.split()), len(q.split())
    if a == q:
        return True
    if na >= 4 and f" {a} " in f" {q} ":
        return True
    return f" {q} " in f" {a} " and na - nq < 3


def _no_json(completion) -> Reject:
    head = (completion.text or "").strip().replace("\n", " ")[:80]
    if completion.finish_reason == "length":
        return Reject("truncated", f"stopped at max_new_tokens without a complete JSON object: {head!r}")
    return Reject("no_json", f"no JSON object in the reply: {head!r}")


def _object(completion, key: str, list_ok: bool) -> tuple[Any, Optional[Reject]]:
    obj = extract_json(completion.text)
    if obj is None:
        return None, _no_json(completion)
    if isinstance(obj, list):
        if list_ok:
            return obj, None
        return None, Reject("schema", f"expected an object with key '{key}', got a list")
    keys = sorted(obj)
    if keys != [key]:
        return None, Reject("schema", f"expected exactly the key '{key}', got {keys}", obj)
    return obj[key], None


def parse_qa(completion) -> Parsed:
    """``{"pairs": [{"question": str, "answer": str}, ...]}`` (a bare list of pairs is accepted)."""
    out = Parsed()
    pairs, rej = _object(completion, "pairs", list_ok=True)
    if rej:
        out.rejects.append(rej)
        return out
    if not isinstance(pairs, list):
        out.rejects.append(Reject("schema", f"'pairs' must be a list, got {type(pairs).__name__}", pairs))
        return out
    if not pairs:
        out.rejects.append(Reject("empty", "no pairs"))
    for item in pairs:
        if not isinstance(item, dict) or sorted(item) != ["answer", "question"]:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            out.rejects.append(Reject("schema", f"a pair must have exactly 'question' and 'answer', got {got}", item))
            continue
        q, a = item["question"], item["answer"]
        if not isinstance(q, str) or not isinstance(a, str):
            out.rejects.append(Reject("schema", "question and answer must be strings", item))
        elif not q.strip() or not a.strip():
            out.rejects.append(Reject("empty", "empty question or answer", item))
        elif copies(a, q):
            out.rejects.append(Reject("answer_copies_question", "the answer repeats the question", item))
        else:
            out.items.append({"question": q.strip(), "answer": a.strip()})
    return out


def parse_facts(completion) -> Parsed:
    """``{"facts": [str, ...]}`` (a bare list of strings is accepted)."""
    out = Parsed()
    facts, rej = _object(completion, "facts", list_ok=True)
    if rej:
        out.rejects.append(rej)
        return out
    if not isinstance(facts, list):
        out.rejects.append(Reject("schema", f"'facts' must be a list, got {type(facts).__name__}", facts))
        return out
    if not facts:
        out.rejects.append(Reject("empty", "no facts"))
    seen = set()
    for f in facts:
        if not isinstance(f, str):
            out.rejects.append(Reject("schema", f"a fact must be a string, got {type(f).__name__}", f))
        elif not f.strip():
            out.rejects.append(Reject("empty", "empty fact", f))
        elif _words(f) in seen:
            continue  # a repeated fact adds nothing; not a generator failure worth a reject
        else:
            seen.add(_words(f))
            out.items.append(f.strip())
    return out


def parse_summary(completion) -> Parsed:
    """``{"summary": str}``."""
    out = Parsed()
    summary, rej = _object(completion, "summary", list_ok=False)
    if rej:
        out.rejects.append(rej)
    elif not isinstance(summary, str):
        out.rejects.append(Reject("schema", f"'summary' must be a string, got {type(summary).__name__}", summary))
    elif not summary.strip():
        out.rejects.append(Reject("empty", "empty summary"))
    else:
        out.items.append(summary.strip())
    return out


def parse_wrong_answer(completion, question: str, answer: str) -> Parsed:
    """``{"wrong_answer": str}``, different from ``answer`` and not a copy of ``question``."""
    out = Parsed()
    wrong, rej = _object(completion, "wrong_answer", list_ok=False)
    if rej:
        out.rejects.append(rej)
    elif not isinstance(wrong, str):
        out.rejects.append(Reject("schema", f"'wrong_answer' must be a string, got {type(wrong).__name__}", wrong))
    elif not wrong.strip():
        out.rejects.append(Reject("empty", "empty wrong answer"))
    elif _words(wrong) == _words(answer):
        out.rejects.append(Reject("rejected_equals_chosen", "the wrong answer equals the correct answer", wrong))
    elif copies(wrong, question):
        out.rejects.append(Reject("answer_copies_question", "the wrong answer repeats the question", wrong))
    else:
        out.items.append(wrong.strip())
    return out


PARSERS = {"qa": parse_qa, "facts": parse_facts, "summary": parse_summary}
