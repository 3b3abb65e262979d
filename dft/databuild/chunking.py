"""Split documents into chunks measured in tokens of the target model's tokenizer.

A chunk ends at the last paragraph break in the second half of its token window, else at the last
sentence end there, else at the window's end (a hard cut). Chunk text is sliced from the document with
the tokenizer's character offsets, so no text is altered by a decode round trip. A tail shorter than
``min_tokens`` is merged into the chunk before it (that chunk may then exceed ``tokens`` by less than
``min_tokens``).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Optional

_PARAGRAPH_END = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s)")


@dataclass
class Chunk:
    chunk_id: str  #: ``<doc_id>:c<index, 4 digits>``
    doc_id: str
    source: str
    index: int
    text: str
    n_tokens: int
    heldout: bool = False


def load_tokenizer(spec: str, cache_dir: str):
    """The chunking tokenizer: ``spec`` is a ``conf/model`` option (the embedded model converts once into
    ``cache_dir``), a local HF folder, or a hub id. Returns (tokenizer, description)."""
    from transformers import AutoTokenizer

    from dft.databuild.models import load_model_option

    model_cfg = load_model_option(spec)
    if model_cfg is not None:
        if model_cfg.path:
            where = model_cfg.path
        elif model_cfg.embedded:
            from dft.modeling import ensure_embedded_model

            where = str(ensure_embedded_model(cache_dir))
        else:  # tokenizer files only, not the weights
            where = model_cfg.hub_id
        return AutoTokenizer.from_pretrained(where), f"{spec} ({where})"
    return AutoTokenizer.from_pretrained(spec), spec


def _boundaries(text: str) -> tuple[list[int], list[int]]:
    # A paragraph break right after a heading (short, no closing punctuation) is not a place to cut:
    # the heading belongs to the text below it.
    paras, prev = [], 0
    for m in _PARAGRAPH_END.finditer(text):
        para = text[prev : m.start()].strip()
        if len(para) >= 80 or para[-1:] in ".!?:;)\"'":
            paras.append(m.start())
        prev = m.end()
    sents = [m.end() for m in _SENTENCE_END.finditer(text)]
    return paras, sents


def chunk_text(text: str, offsets: list[tuple[int, int]], tokens: int, overlap: int, min_tokens: int) -> list[tuple[int, int, int]]:
    """(start char, end char, n tokens) of each chunk of ``text`` whose token offsets are ``offsets``."""
    n = len(offsets)
    if n == 0:
        return []
    if n <= tokens + min_tokens:
        return [(offsets[0][0], offsets[-1][1], n)]
    starts = [a for a, _ in offsets]
    ends = [e for _, e in offsets]
    paras, sents = _boundaries(text)
    out = []
    start = 0
    while start < n:
        end = min(start + tokens, n)
        if n - end < min_tokens:  # merge a short tail into this chunk
            end = n
        if end < n:
            lo_char, hi_char = ends[start + tokens // 2 - 1], ends[end - 1]
            for cands in (paras, sents):
                i = bisect.bisect_right(cands, hi_char) - 1
                if i >= 0 and cands[i] >= lo_char:
                    # every token that starts before the boundary (BPE puts the space before a word in the
                    # next token; a word-level tokenizer keeps it at the end of this one)
                    cut = min(bisect.bisect_left(starts, cands[i]), end)
                    if cut > start + tokens // 2 - 1:
                        end = cut
                        break
        out.append((offsets[start][0], offsets[end - 1][1], end - start))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    return out


def chunk_documents(docs: list, tokenizer: Any, cfg: Any) -> list[Chunk]:
    """Chunks of every document, in document order."""
    chunks: list[Chunk] = []
    for d in docs:
        enc = tokenizer(d.text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        for i, (a, b, k) in enumerate(chunk_text(d.text, offsets, cfg.tokens, cfg.overlap, cfg.min_tokens)):
            piece = d.text[a:b].strip()
            if piece:
                chunks.append(Chunk(f"{d.doc_id}:c{i:04d}", d.doc_id, d.source, i, piece, k))
    return chunks


def select_heldout(chunks: list[Chunk], fraction: float, seed: int) -> None:
    """Mark a deterministic ``fraction`` of ``chunks`` as held out (at least one when there are two or more).

    Chunks are ranked by sha256(seed, chunk id), so the choice does not depend on file order and adding
    documents moves few existing chunks in or out.
    """
    if fraction <= 0 or len(chunks) < 2:
        return
    k = max(1, round(fraction * len(chunks)))
    ranked = sorted(chunks, key=lambda c: hashlib.sha256(f"{seed}:{c.chunk_id}".encode()).hexdigest())
    for c in ranked[:k]:
        c.heldout = True


def limit(chunks: list[Chunk], n: Optional[int]) -> list[Chunk]:
    return chunks if n is None else chunks[:n]
