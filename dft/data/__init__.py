"""Load and validate a domain's data: the four training/perplexity splits and its MCQ benchmarks.

A domain (``conf/data/<name>.yaml``, schema :class:`dft.config.DataConfig`) names one file per split; a split
the domain lacks is ``null``. Files are JSONL, CSV or Parquet (chosen by extension). Every row is checked and
normalised to the shapes in ``docs/CONTRACTS.md``:

==============================  ==========================================================================
split                           row after loading
==============================  ==========================================================================
``text``, ``heldout_text``      ``{"id", "text"}``
``messages``                    ``{"id", "messages": [{"role", "content"}, ...]}`` (last turn: assistant)
``preference``                  ``{"id", "prompt", "chosen", "rejected"}``
benchmark (``data.eval.<n>``)   ``{"id", "question", "options": [...], "answer": "A".., "category"}``
==============================  ==========================================================================

Accepted input spellings (so that a user's own files load without conversion):

* ``id`` may be missing or empty: it becomes ``<file stem>:<line>``.
* ``messages`` may be a list of turns or, in CSV, a JSON string; without ``messages``, TRL's
  ``prompt`` + ``completion`` columns (and an optional ``system``) make a two- or three-turn conversation.
* benchmark ``options`` may be a list, a JSON string, or columns ``A``..``E`` / ``choice0``.. / ``option_a``..;
  ``answer`` a letter (``B``, ``(b)``), a 0-based integer index (MMLU's CSVs), or the text of an option.
  ``category`` defaults to ``"all"``.

A bad row raises ``DataError("<file>:<line>: <what is wrong> (field '<name>')")``; ``<line>`` is the physical
line in JSONL and CSV files (the header is line 1) and the 1-based row number in Parquet files. With
``data.skip_bad_rows=true`` bad rows are skipped instead, and one warning per file gives the counts by reason.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from dft import ROOT, DftError

log = logging.getLogger(__name__)

SPLITS = ("text", "heldout_text", "messages", "preference")
ROLES = ("system", "user", "assistant")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SUFFIXES = (".jsonl", ".csv", ".parquet")
DEFAULT_CATEGORY = "all"

__all__ = [
    "DataError", "SPLITS", "load_split", "load_benchmark", "require_split", "read_rows", "resolve_path",
    "normalize_question",
]


class DataError(DftError):
    """A data file or row that cannot be used; the message names the file, line and field."""


class _RowError(Exception):
    """One bad row: ``what`` is specific (``answer 'F' is not ...``); ``reason`` groups it in the skip count."""

    def __init__(self, what: str, field: str | None = None, reason: str | None = None):
        self.what, self.field = what, field
        self.reason = reason or what
        suffix = f" (field '{field}')" if field else ""
        self.message = what + suffix
        self.reason_message = self.reason + suffix
        super().__init__(self.message)


# --------------------------------------------------------------------------------------------- public API
def normalize_question(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: the key of the train/eval overlap check.

    >>> normalize_question("  What is   Young's modulus?\\n(A) stress/strain")
    'what is youngs modulus a stressstrain'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def resolve_path(path: str | Path) -> Path | None:
    """An absolute path as is; a relative one against the repository root, then the cwd; None if not found."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in (ROOT, Path.cwd()):
        if (base / p).exists():
            return (base / p).resolve()
    return None


def require_split(data_cfg: Any, split: str, stage: str) -> Path:
    """Check (cheaply, before any model loads) that the domain has ``split`` for ``stage``; return its path.

    Raises:
        DataError: ``stage 'sft' needs data.messages, but domain 'x' has none (set data.messages=<file>)``,
            or ``stage 'sft' needs data.messages, but data.messages='m.jsonl' does not exist (looked in ...)``.
    """
    _check_split_name(split)
    value = getattr(data_cfg, split, None)
    if not value:
        raise DataError(
            f"stage '{stage}' needs data.{split}, but domain '{_domain(data_cfg)}' has none (set data.{split}=<file>)"
        )
    return _existing(value, f"data.{split}", f"stage '{stage}' needs data.{split}, but ")


def load_split(data_cfg: Any, split: str, model_cfg: Any = None) -> list[dict]:
    """Rows of ``data.<split>`` (``text``, ``heldout_text``, ``messages`` or ``preference``), validated.

    With ``model_cfg``, conversations are also checked against the family's chat-template rules
    (:func:`dft.families.conversation_problem`, e.g. Mistral's strict user/assistant alternation), so a
    row the template would refuse fails here with its file and line (or is skipped with
    ``data.skip_bad_rows``), not after the model loaded.
    """
    _check_split_name(split)
    value = getattr(data_cfg, split, None)
    if not value:
        raise DataError(f"domain '{_domain(data_cfg)}' has no data.{split} (set data.{split}=<file>)")
    path = _existing(value, f"data.{split}")
    kind = "text" if split == "heldout_text" else split
    check = None
    if model_cfg is not None and kind == "messages":
        from dft.families import conversation_problem

        def check(row: dict) -> None:
            problem = conversation_problem(row["messages"], model_cfg)
            if problem:
                raise _RowError(problem, "messages", f"breaks the {model_cfg.family} chat template")
    return read_rows(path, kind, skip_bad_rows=bool(getattr(data_cfg, "skip_bad_rows", False)), check=check)


def load_benchmark(data_cfg: Any, name: str) -> list[dict]:
    """Rows of the MCQ benchmark ``data.eval.<name>``, validated."""
    benchmarks = getattr(data_cfg, "eval", None) or {}
    if name not in benchmarks or not benchmarks[name]:
        have = ", ".join(sorted(k for k in benchmarks if benchmarks[k])) or "none"
        raise DataError(f"domain '{_domain(data_cfg)}' has no benchmark data.eval.{name} (it has: {have})")
    path = _existing(benchmarks[name], f"data.eval.{name}")
    return read_rows(path, "mcq", skip_bad_rows=bool(getattr(data_cfg, "skip_bad_rows", False)))


def read_rows(path: str | Path, kind: str, *, skip_bad_rows: bool = False, check=None) -> list[dict]:
    """Read one file and validate every row as ``kind`` (``text``, ``messages``, ``preference`` or ``mcq``).

    ``check(row)``, if given, runs on every normalised row and raises ``_RowError`` for a bad one.

    Raises:
        DataError: the first bad row (``<file>:<line>: <what> (field '<name>')``) unless ``skip_bad_rows``;
            a file with no usable row at all.
    """
    if kind not in _NORMALIZERS:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {', '.join(_NORMALIZERS)}")
    path = Path(path)
    normalize = _NORMALIZERS[kind]
    out: list[dict] = []
    first_line: dict[str, int] = {}
    skipped: Counter = Counter()
    total = 0
    for line, raw in _iter_raw(path):
        total += 1
        try:
            if isinstance(raw, _RowError):
                raise raw
            row = normalize(raw, f"{path.stem}:{line}")
            if check is not None:
                check(row)
            if row["id"] in first_line:
                raise _RowError(
                    f"duplicate id '{row['id']}' (first on line {first_line[row['id']]})", "id", "duplicate id"
                )
        except _RowError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}:{line}: {e.message}") from None
            skipped[e.reason_message] += 1
            continue
        first_line[row["id"]] = line
        out.append(row)
    if skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items(), key=lambda t: (-t[1], t[0])))
        log.warning("%s: skipped %d of %d rows (%s)", path, sum(skipped.values()), total, reasons)
    if not out:
        raise DataError(f"{path}: no rows" if total == 0 else f"{path}: no valid rows ({total} skipped)")
    return out


# --------------------------------------------------------------------------------------------- files
def _domain(data_cfg: Any) -> str:
    return getattr(data_cfg, "name", None) or "?"


def _check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _existing(value: Any, key: str, prefix: str = "") -> Path:
    path = resolve_path(str(value))
    if path is None:
        p = Path(str(value)).expanduser()
        where = str(p) if p.is_absolute() else f"{ROOT / p} and {Path.cwd() / p}"
        raise DataError(f"{prefix}{key}='{value}' does not exist (looked in {where})")
    if path.is_dir() or path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{prefix}{key}='{value}' is not a {', '.join(SUFFIXES)} file")
    return path


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, dict) per row; a row that cannot even be parsed comes as (line, _RowError)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text.strip())
                except json.JSONDecodeError as e:
                    yield line, _RowError(f"invalid JSON ({e.msg}, column {e.colno})", reason="invalid JSON")
                    continue
                yield line, obj if isinstance(obj, dict) else _RowError(
                    f"expected a JSON object, got {type(obj).__name__}", reason="not a JSON object"
                )
    elif suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            start = 2  # the header is line 1
            for rec in reader:
                line, start = start, reader.line_num + 1
                if rec.get(None):
                    yield line, _RowError("more cells than header columns", reason="more cells than header columns")
                    continue
                if all(v in (None, "") for v in rec.values()):
                    continue
                # An empty cell is a missing value; a short row's missing cells are None.
                yield line, {k: v for k, v in rec.items() if v not in (None, "")}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a broken file)
            raise DataError(f"{path}: cannot read Parquet file: {e}") from None
        for line, rec in enumerate(table.to_pylist(), 1):
            yield line, {k: v for k, v in rec.items() if v is not None}
    else:  # pragma: no cover  (_existing checks the suffix)
        raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(SUFFIXES)})")


# --------------------------------------------------------------------------------------------- rows
def _id(raw: dict, default: str) -> str:
    value = raw.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, (dict, list)):
        raise _RowError(f"expected a string or number, got {type(value).__name__}", "id", "bad id")
    return str(value)


def _string(raw: dict, field: str) -> str:
    if field not in raw:
        raise _RowError("missing field", field)
    value = raw[field]
    if not isinstance(value, str):
        raise _RowError(f"expected a string, got {type(value).__name__}", field, "not a string")
    if not value.strip():
        raise _RowError("empty value", field)
    return value


def _maybe_json(value: Any, field: str) -> Any:
    """CSV cells hold lists as JSON strings."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise _RowError(f"invalid JSON: {e.msg}", field, "invalid JSON") from None
    return value


def _text_row(raw: dict, default_id: str) -> dict:
    return {"id": _id(raw, default_id), "text": _string(raw, "text")}


def _messages_row(raw: dict, default_id: str) -> dict:
    if "messages" in raw:
        turns = _maybe_json(raw["messages"], "messages")
    elif "prompt" in raw or "completion" in raw:  # TRL's prompt-completion format
        turns = [{"role": "user", "content": _string(raw, "prompt")},
                 {"role": "assistant", "content": _string(raw, "completion")}]
        if raw.get("system") is not None:
            turns.insert(0, {"role": "system", "content": _string(raw, "system")})
    else:
        raise _RowError("missing field", "messages")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise _RowError("expected a list of {role, content} turns", "messages", "not a list of turns")
    if not turns:
        raise _RowError("no turns", "messages")
    out = []
    for i, t in enumerate(turns, 1):
        role, content = t.get("role"), t.get("content")
        if role not in ROLES:
            raise _RowError(f"bad role {role!r} in turn {i} (expected one of {', '.join(ROLES)})", "messages",
                            "bad role")
        if not isinstance(content, str) or not content.strip():
            raise _RowError(f"empty content in turn {i}", "messages", "empty content")
        if role == "system" and i != 1:
            raise _RowError(f"system turn {i} is not the first turn", "messages", "misplaced system turn")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise _RowError(f"no final assistant turn (the last turn is '{out[-1]['role']}')", "messages",
                        "no final assistant turn")
    if not any(t["role"] == "user" for t in out):
        raise _RowError("no user turn", "messages")
    return {"id": _id(raw, default_id), "messages": out}


def _preference_row(raw: dict, default_id: str) -> dict:
    row = {"id": _id(raw, default_id)}
    for field in ("prompt", "chosen", "rejected"):
        row[field] = _string(raw, field)
    if row["chosen"].strip() == row["rejected"].strip():
        raise _RowError("chosen and rejected are identical", "rejected", "chosen == rejected")
    return row


_OPTION_COLUMNS = [
    [c for c in LETTERS[:10]],
    [f"choice{i}" for i in range(10)],
    [f"option{i}" for i in range(10)],
    [f"option_{c.lower()}" for c in LETTERS[:10]],
]


def _options(raw: dict) -> list:
    if "options" in raw:
        options = _maybe_json(raw["options"], "options")
    else:
        for cols in _OPTION_COLUMNS:
            if cols[0] in raw:
                options = [raw[c] for c in cols if c in raw]
                break
        else:
            raise _RowError("missing field", "options")
    if not isinstance(options, list):
        raise _RowError(f"expected a list, got {type(options).__name__}", "options", "not a list")
    if len(options) < 2:
        raise _RowError(f"needs at least 2 options, got {len(options)}", "options", "fewer than 2 options")
    if len(options) > len(LETTERS):
        raise _RowError(f"more than {len(LETTERS)} options", "options", "too many options")
    for i, o in enumerate(options):
        if isinstance(o, (int, float)) and not isinstance(o, bool):
            options[i] = o = str(o)
        if not isinstance(o, str) or not o.strip():
            raise _RowError(f"empty option {LETTERS[i]}", "options", "empty option")
    return options


def _answer(raw: dict, options: list[str]) -> str:
    if "answer" not in raw:
        raise _RowError("missing field", "answer")
    value = raw["answer"]
    span = f"A-{LETTERS[len(options) - 1]}"
    if isinstance(value, bool) or value is None:
        raise _RowError(f"expected a letter, got {value!r}", "answer", "bad answer")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)  # a 0-based index, as in MMLU's CSVs
        if not 0 <= idx < len(options):
            raise _RowError(f"answer index {idx} is not among the options 0-{len(options) - 1}", "answer",
                            "answer not among the options")
        return LETTERS[idx]
    if not isinstance(value, str):
        raise _RowError(f"expected a letter, got {type(value).__name__}", "answer", "bad answer")
    if not value.strip():
        raise _RowError("empty value", "answer")
    m = re.fullmatch(r"\s*\(?([A-Za-z])[).]?\s*", value)
    if m:
        letter = m.group(1).upper()
        if LETTERS.index(letter) >= len(options):
            raise _RowError(f"answer '{letter}' is not among the options {span}", "answer",
                            "answer not among the options")
        return letter
    matches = [i for i, o in enumerate(options) if o.strip() == value.strip()]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise _RowError(f"answer {value!r} is neither a letter {span} nor one option's text", "answer",
                    "answer not among the options")


def _mcq_row(raw: dict, default_id: str) -> dict:
    question = _string(raw, "question")
    options = _options(raw)
    answer = _answer(raw, options)
    category = raw.get("category", DEFAULT_CATEGORY)
    if isinstance(category, (int, float)) and not isinstance(category, bool):
        category = str(category)
    if not isinstance(category, str):
        raise _RowError(f"expected a string, got {type(category).__name__}", "category", "not a string")
    return {"id": _id(raw, default_id), "question": question, "options": options, "answer": answer,
            "category": category.strip() or DEFAULT_CATEGORY}


_NORMALIZERS = {"text": _text_row, "messages": _messages_row, "preference": _preference_row, "mcq": _mcq_row}
