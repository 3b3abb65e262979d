"""Find, read, clean and de-duplicate the documents of a source folder.

Formats: PDF (pypdf text extraction), Markdown (``.md``, ``.markdown``, ``.mmd`` -- Nougat's output),
plain text (``.txt``) and JSONL (one document per line, text in ``jsonl_text_field``). Files are visited
in sorted order of their path relative to the source folder, so ids and the choice of which duplicate
survives are deterministic.

Nothing is dropped silently: every file or item that does not become a document is returned as a
:class:`Skip` with a reason, and the build writes it to ``rejects.jsonl``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

SUFFIXES = {
    "pdf": (".pdf",),
    "md": (".md", ".markdown", ".mmd"),
    "txt": (".txt",),
    "jsonl": (".jsonl",),
}


@dataclass
class Document:
    doc_id: str  #: ``<slug of the relative path>-<8 hex of the normalised text>`` (+ ``:<item>`` for JSONL)
    source: str  #: path relative to the source folder (``file.jsonl#L3`` for a JSONL item)
    fmt: str
    text: str  #: cleaned text
    is_eval: bool = False  #: evaluation material: guarded against, never trained on
    meta: dict = field(default_factory=dict)


@dataclass
class Skip:
    source: str
    reason: str  #: ``unreadable`` | ``empty`` | ``too_short`` | ``duplicate_exact`` | ``duplicate_normalised`` | ``bad_item``
    detail: str = ""


# --------------------------------------------------------------------------------------------- finding
def find_files(source: Path, formats: Iterable[str]) -> list[tuple[Path, str]]:
    """(path, format) of every file under ``source`` (recursive, sorted, hidden files and folders skipped)."""
    by_suffix = {s: fmt for fmt in formats for s in SUFFIXES[fmt]}
    out = []
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        fmt = by_suffix.get(p.suffix.lower())
        if fmt:
            out.append((p, fmt))
    return out


def matches_any(rel: str, globs: Iterable[str]) -> bool:
    """``rel`` (posix, relative to the source) matches one of ``globs`` (``**`` crosses folders)."""
    for g in globs:
        if fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(Path(rel).name, g):
            return True
        if g.endswith("/**") and (rel + "/").startswith(g[:-2]):
            return True
    return False


# --------------------------------------------------------------------------------------------- reading
def read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    if reader.is_encrypted:
        reader.decrypt("")  # many papers are "encrypted" with an empty user password
    pages = [(page.extract_text() or "") for page in reader.pages]
    # A page break is not a paragraph break: join pages with a newline so that join_lines can mend
    # sentences that continue on the next page.
    return "\n".join(pages)


_MD_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)
_MD_COMMENT = re.compile(r"<!--.*?-->", re.S)
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\((?:[^()]|\([^)]*\))*\)")
_MD_HEADING = re.compile(r"^#{1,6}\s+", re.M)
_MD_EMPHASIS = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")


def markdown_to_text(md: str) -> str:
    """Markdown -> plain text: front matter, comments and image targets removed, links -> their text,
    heading marks and bold markers dropped. Tables, lists and LaTeX math are kept as written."""
    md = _MD_FRONT_MATTER.sub("", md)
    md = _MD_COMMENT.sub("", md)
    md = _MD_IMAGE.sub(lambda m: m.group(1), md)
    md = _MD_LINK.sub(lambda m: m.group(1), md)
    md = _MD_HEADING.sub("", md)
    md = _MD_EMPHASIS.sub(lambda m: m.group(2), md)
    return md


def read_text_file(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------------------------- cleaning
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\ufeff]")
_HYPHEN_BREAK = re.compile(r"(\w)[-\u00ad]\n(?=[a-z])")
_PAGE_NUMBER_LINE = re.compile(r"^[ \t]*(?:page[ \t]+)?\d{1,4}(?:[ \t]*(?:/|of)[ \t]*\d{1,4})?[ \t]*(?:\n|\Z)", re.I | re.M)
_REFERENCES = re.compile(
    r"^\s*(?:\d+\.?\s*|[IVX]+\.\s*)?(?:references|bibliography|literature cited|works cited)\s*:?\s*$", re.I | re.M
)


def clean_text(text: str, fmt: str, cfg: Any) -> str:
    """Normalise one document's text (see :class:`dft.databuild.config.CleanConfig`).

    Order matters: hyphenation and the references heading are found on the raw lines, before
    ``join_lines`` turns a paragraph's line breaks into spaces.
    """
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text).replace("\t", " ")
    if cfg.fix_hyphenation:
        text = _HYPHEN_BREAK.sub(r"\1", text)
    text = _PAGE_NUMBER_LINE.sub("", text)
    if cfg.drop_references:
        # Only a heading in the second half counts: a table of contents may list "References" early.
        last = None
        for m in _REFERENCES.finditer(text):
            last = m
        if last is not None and last.start() > len(text) // 2:
            text = text[: last.start()]
    lines = [re.sub(r" {2,}", " ", ln).strip() for ln in text.split("\n")]
    paragraphs, cur = [], []
    for ln in lines:
        if ln:
            cur.append(ln)
        elif cur:
            paragraphs.append(cur)
            cur = []
    if cur:
        paragraphs.append(cur)
    if not cfg.join_lines:
        return "\n\n".join("\n".join(p) for p in paragraphs).strip()
    if fmt != "md":
        return "\n\n".join(" ".join(p) for p in paragraphs).strip()
    return "\n\n".join(_join_markdown(p) for p in paragraphs).strip()


_MD_BLOCK_LINE = re.compile(r"^(?:[-*+>|]\s|\d+[.)]\s|\||```|\$\$|    )")


def _join_markdown(lines: list[str]) -> str:
    """Soft-wrapped Markdown lines are one line (a single newline is a space in Markdown); list items,
    table rows, quotes and code or math blocks keep their line breaks."""
    if any(ln.startswith(("```", "$$")) for ln in lines):
        return "\n".join(lines)
    out: list[str] = []
    for ln in lines:
        if out and not _MD_BLOCK_LINE.match(ln) and not _MD_BLOCK_LINE.match(out[-1]):
            out[-1] += " " + ln
        else:
            out.append(ln)
    return "\n".join(out)


def normalise_for_hash(text: str) -> str:
    """Case, punctuation and whitespace folded: two copies of a paper from different PDF tools collide."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"\w+", text))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return (s[:max_len].rstrip("_") or "doc")


# --------------------------------------------------------------------------------------------- the pass
def load_documents(source: Path, cfg: Any, guard: Any, progress: bool = True) -> tuple[list[Document], list[Skip], dict]:
    """Read every document under ``source``; return (documents, skips, counts).

    Documents matched by ``guard`` (eval globs, eval-marked JSONL items) come back with ``is_eval=True``
    and are not de-duplicated against training documents (the guard removes overlaps later).
    """
    from tqdm.auto import tqdm

    files = find_files(source, cfg.formats)
    counts = {"files": len(files), "items": 0}
    raw: list[tuple[str, str, str, Optional[str], bool]] = []  # (source, fmt, text, item id, is_eval)
    skips: list[Skip] = []
    for path, fmt in tqdm(files, desc="read documents", unit="file", disable=not progress):
        rel = path.relative_to(source).as_posix()
        is_eval = guard.excludes_file(rel)
        try:
            if fmt == "pdf":
                raw.append((rel, fmt, read_pdf(path), None, is_eval))
            elif fmt == "md":
                raw.append((rel, fmt, markdown_to_text(read_text_file(path)), None, is_eval))
            elif fmt == "txt":
                raw.append((rel, fmt, read_text_file(path), None, is_eval))
            else:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    for line_no, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        src = f"{rel}#L{line_no}"
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            skips.append(Skip(src, "bad_item", f"invalid JSON: {e.msg}"))
                            continue
                        text = obj.get(cfg.jsonl_text_field) if isinstance(obj, dict) else None
                        if not isinstance(text, str):
                            skips.append(Skip(src, "bad_item", f"no string field '{cfg.jsonl_text_field}'"))
                            continue
                        counts["items"] += 1
                        item_id = obj.get("id")
                        raw.append((src, fmt, text, None if item_id is None else str(item_id),
                                    is_eval or guard.marks_item(obj)))
        except Exception as e:  # noqa: BLE001 - a broken file is reported, the build goes on
            skips.append(Skip(rel, "unreadable", f"{type(e).__name__}: {e}"[:300]))

    docs: list[Document] = []
    seen_exact: dict[str, str] = {}
    seen_norm: dict[str, str] = {}
    for src, fmt, text, item_id, is_eval in raw:
        cleaned = clean_text(text, fmt, cfg.clean)
        if not cleaned:
            skips.append(Skip(src, "empty", "no text extracted (a scanned PDF needs OCR first)" if fmt == "pdf" else "no text"))
            continue
        norm = normalise_for_hash(cleaned)
        h_norm = sha256(norm)
        base = slug(src.split("#")[0].rsplit(".", 1)[0])
        doc_id = f"{base}-{h_norm[:8]}" + (f":{slug(item_id, 24)}" if item_id else "")
        if is_eval:
            docs.append(Document(doc_id, src, fmt, cleaned, is_eval=True))
            continue
        if len(cleaned) < cfg.clean.min_chars:
            skips.append(Skip(src, "too_short", f"{len(cleaned)} characters after cleaning < clean.min_chars={cfg.clean.min_chars}"))
            continue
        h_exact = sha256(cleaned)
        if h_exact in seen_exact:
            skips.append(Skip(src, "duplicate_exact", f"same text as {seen_exact[h_exact]}"))
            continue
        if h_norm in seen_norm:
            skips.append(Skip(src, "duplicate_normalised", f"same text (ignoring case, punctuation, spacing) as {seen_norm[h_norm]}"))
            continue
        seen_exact[h_exact], seen_norm[h_norm] = src, src
        docs.append(Document(doc_id, src, fmt, cleaned))
    # Two different files can still give one doc_id (same stem, same text in different folders): suffix them.
    used: dict[str, int] = {}
    for d in docs:
        n = used.get(d.doc_id, 0)
        used[d.doc_id] = n + 1
        if n:
            d.doc_id = f"{d.doc_id}~{n}"
    return docs, skips, counts
