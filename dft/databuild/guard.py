"""Evaluation-contamination guard: evaluation material never reaches a training split.

Evaluation material is (1) documents whose path matches ``eval_guard.exclude``, (2) JSONL items whose
``eval_guard.item_field`` is one of ``item_values`` and (3) the questions of MCQ benchmarks
(``eval_guard.benchmarks`` files and the ``eval`` files of ``eval_guard.domains``).

Checks, on words normalised like :func:`dft.data.normalize_question` (lower case, no punctuation):

* a chunk or a generated row that shares a word ``ngram`` (13 by default, as in GPT-3's contamination
  study) with eval material is removed;
* a benchmark question shorter than ``ngram`` words but at least ``min_question_words`` long is removed
  wherever it occurs whole; a generated question equal to any benchmark question is removed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from dft import ROOT, DftError
from dft.databuild.documents import matches_any

log = logging.getLogger(__name__)


def _norm(text: str) -> str:
    from dft.data import normalize_question

    return normalize_question(text)


class EvalGuard:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.n = int(cfg.ngram)
        self.ngrams: set[int] = set()
        self.short: dict[int, set[str]] = {}  # word count -> normalised questions of that length
        self.questions: set[str] = set()  # every normalised benchmark question
        self.sources: list[str] = []
        self.n_benchmark_questions = 0

    # ---- what counts as eval material
    def excludes_file(self, rel: str) -> bool:
        return matches_any(rel, self.cfg.exclude)

    def marks_item(self, obj: dict) -> bool:
        value = obj.get(self.cfg.item_field)
        return isinstance(value, str) and value.strip().lower() in {v.lower() for v in self.cfg.item_values}

    # ---- collecting it
    def _grams(self, words: list[str]) -> Iterable[int]:
        for i in range(len(words) - self.n + 1):
            yield hash(" ".join(words[i : i + self.n]))

    def add_text(self, text: str) -> None:
        self.ngrams.update(self._grams(_norm(text).split()))

    def add_question(self, question: str) -> None:
        q = _norm(question)
        if not q:
            return
        self.questions.add(q)
        words = q.split()
        if len(words) >= self.n:
            self.ngrams.update(self._grams(words))
        elif len(words) >= self.cfg.min_question_words:
            self.short.setdefault(len(words), set()).add(q)

    def load_benchmarks(self, data_conf_dir: Path) -> None:
        """Read ``eval_guard.benchmarks`` files and the benchmarks of ``eval_guard.domains``."""
        from dft.data import read_rows, resolve_path

        files: list[tuple[str, Path]] = []
        for b in self.cfg.benchmarks:
            p = resolve_path(b)
            if p is None:
                raise DftError(f"eval_guard.benchmarks: {b} does not exist (relative paths: repository root, then cwd)")
            files.append((str(b), p))
        for dom in self.cfg.domains:
            conf = data_conf_dir / f"{dom}.yaml"
            if not conf.exists():
                conf = ROOT / "conf" / "data" / f"{dom}.yaml"
            if not conf.exists():
                raise DftError(f"eval_guard.domains: no data config {dom!r} (conf/data/{dom}.yaml)")
            from omegaconf import OmegaConf

            node = OmegaConf.load(conf)
            for bench, f in (node.get("eval") or {}).items():
                p = resolve_path(str(f))
                if p is None:
                    raise DftError(f"eval_guard.domains: {dom}.eval.{bench}={f} does not exist")
                files.append((f"{dom}.{bench}", p))
        for label, p in files:
            rows = read_rows(p, "mcq", skip_bad_rows=True)
            for r in rows:
                self.add_question(r["question"])
            self.n_benchmark_questions += len(rows)
            self.sources.append(label)

    @property
    def active(self) -> bool:
        return bool(self.ngrams or self.short or self.questions)

    # ---- checking
    def overlap(self, text: str) -> Optional[str]:
        """A short description of the eval material ``text`` overlaps, or None."""
        words = _norm(text).split()
        for i in range(len(words) - self.n + 1):
            if hash(" ".join(words[i : i + self.n])) in self.ngrams:
                return f"shares the {self.n}-gram {' '.join(words[i:i + self.n])!r} with eval material"
        for k, qs in self.short.items():
            for i in range(len(words) - k + 1):
                s = " ".join(words[i : i + k])
                if s in qs:
                    return f"contains the benchmark question {s!r}"
        return None

    def question_overlap(self, question: str, *others: str) -> Optional[str]:
        if _norm(question) in self.questions:
            return "equals a benchmark question"
        for t in (question,) + others:
            hit = self.overlap(t)
            if hit:
                return hit
        return None
