"""Q&A pairs and wrong answers taken from the text itself (``generator.fallback: extractive``).

For a chunk whose generator replies gave no valid Q&A pair (the embedded 135M model rarely writes
the JSON asked for), :func:`extract_pairs` makes pairs from the chunk's own sentences: a definition
("Fibroin is a protein that ...") becomes "What is fibroin?" with the sentence as its answer; any
other sentence of 8-60 words becomes a completion question (its first half, then "...") with the
whole sentence as the answer. :func:`wrong_answer` gives a pair without a valid generated wrong
answer the answer of another question as the rejected one: fluent, on topic, and wrong for this
question. Nothing here is generated; rows made this way carry ``generator: extractive:v1`` in
their provenance and the build report counts them.
"""

from __future__ import annotations

import re
from typing import Optional

ID = "extractive:v1"
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_DEF = re.compile(r"^(?:The |A |An )?(?P<term>[A-Za-z][\w\-]*(?: [\w\-]+){0,3}) (?P<verb>is|are) (?P<rest>.{15,})$")


def sentences(text: str, min_words: int = 8, max_words: int = 60) -> list[str]:
    """The chunk's sentences of ``min_words``-``max_words`` words that end in . ! or ?."""
    out = []
    for s in _SENT.split(" ".join(text.split())):
        s = s.strip()
        if s[-1:] in ".!?" and min_words <= len(s.split()) <= max_words:
            out.append(s)
    return out


def extract_pairs(text: str, n: int) -> list[dict]:
    """Up to ``n`` ``{"question", "answer"}`` pairs from ``text``: definitions first, then completions."""
    defs, others = [], []
    for s in sentences(text):
        m = _DEF.match(s)
        if m and not m["term"].lower().startswith(("this", "it", "there", "that", "these", "which")):
            term = m["term"] if m["term"][:2].isupper() else m["term"][0].lower() + m["term"][1:]
            defs.append({"question": f"What {m['verb']} {term}?", "answer": s})
        else:
            words = s.split()
            k = max(4, len(words) // 2)
            others.append({"question": f"Complete this statement: \"{' '.join(words[:k])} ...\"", "answer": s})
    return (defs + others)[: max(0, n)]


def wrong_answer(answer: str, others: list[str]) -> Optional[str]:
    """The first answer in ``others`` that is not ``answer`` (the rejected side of a preference pair), or None."""
    for o in others:
        if o.strip() != answer.strip():
            return o
    return None
