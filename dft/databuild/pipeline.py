"""``build(cfg)``: a folder of papers -> a dft domain (CPT text, SFT messages, DPO/ORPO preference).

Phases (one tqdm bar each):

1. read, clean and de-duplicate documents; set evaluation material aside (:mod:`.documents`, :mod:`.guard`);
2. chunk by tokens of the target tokenizer, drop duplicate and eval-overlapping chunks, hold out a slice
   for perplexity (:mod:`.chunking`);
3. ask the generator, per training chunk, for Q&A pairs, facts and a summary (prompts ``conf/databuild/prompts``);
4. ask it, per valid question, for a scientifically wrong answer;
5. write ``<out>/<name>/{text,heldout_text,messages,preference,notes,rejects}.jsonl``, ``build_report.json``
   and ``conf/data/<name>.yaml``.

Every row carries ``provenance`` (source file, doc and chunk id, generator id, prompt version); the
loaders in :mod:`dft.data` ignore it. Rows that fail validation go to ``rejects.jsonl`` with a reason.
Generation is deterministic given the cache: rows come out in chunk order however replies arrive.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from dft import ROOT, DftError
from dft.databuild import validate as V
from dft.databuild.chunking import Chunk, chunk_documents, load_tokenizer, select_heldout
from dft.databuild.documents import load_documents, normalise_for_hash, sha256
from dft.databuild.generators import make_generator
from dft.databuild.guard import EvalGuard

log = logging.getLogger(__name__)

MARKER = "# Written by `python -m dft.data build`"
TASKS = ("qa", "facts", "summary")
#: Chunks per generation round: bounds the requests held in memory (rows are the same for any value).
WINDOW = 256


def render(template: str, **values: Any) -> str:
    """Replace ``{name}`` for the known names only; JSON braces in the template stay as written."""
    import re

    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def prompt_sha(prompts: Any) -> str:
    fields = ("system", "qa", "facts", "summary", "wrong_answer", "n_questions", "n_facts", "sft_system")
    return sha256(json.dumps({f: prompts[f] for f in fields}, sort_keys=True))[:12]


def _chat(prompts: Any, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": prompts.system}] if prompts.system else []
    return msgs + [{"role": "user", "content": user}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _config_path(p: Path) -> str:
    """How a split is named in the data config: relative to the repository root when inside it (the loader
    resolves relative paths against the root), else absolute."""
    p = p.resolve()
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:
        return str(p)


class Build:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.progress = bool(cfg.progress)
        self.source = Path(cfg.source).expanduser().resolve()
        self.out_dir = Path(cfg.out).expanduser().resolve() / cfg.name
        self.conf_dir = Path(cfg.data_conf_dir).expanduser().resolve() if cfg.data_conf_dir else ROOT / "conf" / "data"
        self.rejects: list[dict] = []
        self.reject_counts: Counter = Counter()
        self.reject_by_task: dict[str, Counter] = {}
        self.report: dict[str, Any] = {}
        #: generator.fallback=extractive: chunks it served, pairs and wrong answers it made
        self.fallback: Counter = Counter()

    # ------------------------------------------------------------------ bookkeeping
    def reject(self, stage: str, task: str, reason: str, detail: str = "", *, source: str = "", chunk_id: str = "",
               item: Any = None, output: Optional[str] = None, generator: Optional[str] = None) -> None:
        self.reject_counts[reason] += 1
        self.reject_by_task.setdefault(task, Counter())[reason] += 1
        row = {"stage": stage, "task": task, "reason": reason, "detail": detail, "source": source, "chunk_id": chunk_id}
        if generator:
            row["generator"] = generator
            row["prompt_version"] = self.cfg.prompts.version
        if item is not None:
            row["item"] = item
        if output is not None:
            row["output"] = output[:2000]
        self.rejects.append(row)

    def _prov(self, c: Chunk, **extra: Any) -> dict:
        return {"source": c.source, "doc_id": c.doc_id, "chunk_id": c.chunk_id, **extra}

    # ------------------------------------------------------------------ phases
    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        if not self.source.is_dir():
            raise DftError(f"source={cfg.source}: not a folder")
        self._check_conf_target()

        guard = EvalGuard(cfg.eval_guard)
        guard.load_benchmarks(self.conf_dir)

        # 1. documents
        docs, skips, counts = load_documents(self.source, cfg, guard, self.progress)
        for s in skips:
            self.reject("document", "read", s.reason, s.detail, source=s.source)
        eval_docs = [d for d in docs if d.is_eval]
        docs = [d for d in docs if not d.is_eval]
        for d in eval_docs:
            guard.add_text(d.text)
        if not docs:
            raise DftError(f"source={cfg.source}: no usable {', '.join(cfg.formats)} document "
                           f"({counts['files']} files; skipped: {dict(Counter(s.reason for s in skips)) or 'none'}; "
                           f"eval material: {len(eval_docs)})")
        log.info("%d documents (%d eval documents set aside, %d skipped)", len(docs), len(eval_docs), len(skips))

        # 2. chunks
        tokenizer, tok_desc = load_tokenizer(cfg.chunk.tokenizer, cfg.cache_dir)
        chunks_all = chunk_documents(docs, tokenizer, cfg.chunk)
        chunks: list[Chunk] = []
        seen: dict[str, str] = {}
        n_dup = n_overlap = 0
        for c in chunks_all:
            h = sha256(normalise_for_hash(c.text))
            if h in seen:
                n_dup += 1
                self.reject("chunk", "chunk", "duplicate_chunk", f"same text as {seen[h]}", source=c.source, chunk_id=c.chunk_id)
                continue
            seen[h] = c.chunk_id
            hit = guard.overlap(c.text) if guard.active else None
            if hit:
                n_overlap += 1
                self.reject("chunk", "chunk", "eval_overlap", hit, source=c.source, chunk_id=c.chunk_id)
                continue
            chunks.append(c)
        select_heldout(chunks, cfg.heldout_fraction, cfg.seed)
        train_chunks = [c for c in chunks if not c.heldout]
        held_chunks = [c for c in chunks if c.heldout]
        gen_chunks = train_chunks if cfg.max_chunks is None else train_chunks[: cfg.max_chunks]
        log.info("%d chunks (%d held out, %d duplicates, %d eval overlaps); generating from %d",
                 len(chunks), len(held_chunks), n_dup, n_overlap, len(gen_chunks))

        # 3.+4. Q&A pairs, facts and summaries per chunk, then a wrong answer per valid question; in windows
        # of chunks so that memory stays bounded on thousands of papers (rows do not depend on the window).
        from tqdm.auto import tqdm

        gen = make_generator(cfg.generator, cfg.cache_dir, cfg.call_cache)
        notes: list[dict] = []
        messages: list[dict] = []
        preference: list[dict] = []
        seen_q: set[str] = set()
        bar_a = tqdm(total=len(TASKS) * len(gen_chunks), desc="generate qa/facts/summary", unit="call",
                     disable=not self.progress)
        bar_b = tqdm(total=0, desc="generate wrong answers", unit="call", disable=not self.progress)
        try:
            for w in range(0, len(gen_chunks), WINDOW):
                pairs = self._distil(gen, gen_chunks[w : w + WINDOW], guard, seen_q, notes, bar_a)
                self._wrong_answers(gen, pairs, guard, messages, preference, bar_b)
        finally:
            bar_a.close()
            bar_b.close()
            gen.close()

        # 5. write
        text_rows = [{"id": c.chunk_id, "text": c.text, "provenance": self._prov(c, n_tokens=c.n_tokens, generator=None,
                                                                                  prompt_version=None, task="chunk")}
                     for c in train_chunks]
        for n in notes:
            if ("summaries" if n["kind"] == "summary" else "facts") in cfg.text_include:
                text_rows.append(n)
        held_rows = [{"id": c.chunk_id, "text": c.text, "provenance": self._prov(c, n_tokens=c.n_tokens, generator=None,
                                                                                  prompt_version=None, task="chunk")}
                     for c in held_chunks]
        splits = {"text": text_rows, "heldout_text": held_rows, "messages": messages, "preference": preference}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, Optional[str]] = {}
        for split, rows in splits.items():
            path = self.out_dir / f"{split}.jsonl"
            if rows:
                _write_jsonl(path, rows)
                files[split] = _config_path(path)
            else:  # a split with no rows is null in the data config; never leave a stale file behind
                path.unlink(missing_ok=True)
                files[split] = None
        _write_jsonl(self.out_dir / "notes.jsonl", notes)
        _write_jsonl(self.out_dir / "rejects.jsonl", self.rejects)
        conf_file = self._write_data_config(files, gen.id, tok_desc)

        rows_count = {k: len(v) for k, v in splits.items()} | {"notes": len(notes)}
        self.report = {
            "name": cfg.name,
            "source": str(self.source),
            "out": str(self.out_dir),
            "data_config": str(conf_file),
            "files": files,
            "tokenizer": tok_desc,
            "generator": {"id": gen.id, "kind": gen.kind, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                              for k, v in gen.stats.items()}},
            "prompts": {"version": cfg.prompts.version, "sha256": prompt_sha(cfg.prompts)},
            "documents": {"files": counts["files"], "jsonl_items": counts["items"], "used": len(docs),
                          "eval_set_aside": len(eval_docs), "skipped": dict(Counter(s.reason for s in skips))},
            "chunks": {"total": len(chunks_all), "used": len(chunks), "train": len(train_chunks),
                       "heldout": len(held_chunks), "duplicates": n_dup, "eval_overlap": n_overlap,
                       "generated_from": len(gen_chunks)},
            "tokens": {"text": sum(c.n_tokens for c in train_chunks), "heldout_text": sum(c.n_tokens for c in held_chunks)},
            "rows": rows_count,
            "rejects": dict(sorted(self.reject_counts.items())),
            "rejects_by_task": {t: dict(sorted(c.items())) for t, c in sorted(self.reject_by_task.items())},
            "fallback": {"kind": cfg.generator.fallback, "chunks": self.fallback["chunks"],
                         "pairs": self.fallback["pairs"], "wrong_answers": self.fallback["wrong_answers"]},
            "reject_examples": self._examples(),
            "eval_guard": {"benchmark_questions": guard.n_benchmark_questions, "benchmarks": guard.sources,
                           "eval_documents": len(eval_docs),
                           "removed": {"chunks": n_overlap, "rows": sum(c.get("eval_overlap", 0)
                                                                         for t, c in self.reject_by_task.items() if t != "chunk")}},
            "elapsed_s": round(time.time() - t0, 1),
        }
        _write_text(self.out_dir / "build_report.json", json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")
        return self.report

    def _examples(self) -> dict[str, str]:
        """``{"<task>/<reason>": the first rejected reply (or item), shortened}``, for the printed report."""
        out: dict[str, str] = {}
        for r in self.rejects:
            key = f"{r['task']}/{r['reason']}"
            if key not in out:
                what = r.get("output") if r.get("output") is not None else (r.get("detail") or r.get("item") or "")
                out[key] = " ".join(str(what).split())[:100]
        return out

    # ------------------------------------------------------------------ generation
    def _distil(self, gen, chunks: list[Chunk], guard: EvalGuard, seen_q: set, notes: list, bar) -> list:
        """Q&A pairs (returned as (chunk, index, pair)), facts and summaries (appended to ``notes``)."""
        p = self.cfg.prompts
        templates = {"qa": p.qa, "facts": p.facts, "summary": p.summary}
        requests, owners = [], []
        for c in chunks:
            for task in TASKS:
                user = render(templates[task], chunk=c.text, n_questions=p.n_questions, n_facts=p.n_facts)
                requests.append(_chat(p, user))
                owners.append((c, task))
        replies = gen.run(requests, bar=bar)
        pairs: list[tuple[Chunk, int, dict]] = []
        prov_gen = {"generator": gen.id, "prompt_version": p.version}
        for (c, task), reply in zip(owners, replies):
            kw = dict(source=c.source, chunk_id=c.chunk_id, generator=gen.id)
            if reply.error:
                self.reject("generate", task, "generator_error", reply.error, **kw)
                continue
            parsed = V.PARSERS[task](reply)
            for r in parsed.rejects:
                self.reject("generate", task, r.reason, r.detail, item=r.item, output=reply.text, **kw)
            for j, item in enumerate(parsed.items):
                if task == "qa":
                    nq = normalise_for_hash(item["question"])
                    hit = guard.question_overlap(item["question"], item["answer"]) if guard.active else None
                    if hit:
                        self.reject("generate", task, "eval_overlap", hit, item=item, **kw)
                    elif nq in seen_q:
                        self.reject("generate", task, "duplicate_question", "asked before", item=item, **kw)
                    else:
                        seen_q.add(nq)
                        pairs.append((c, j, item))
                    continue
                hit = guard.overlap(item) if guard.active else None
                if hit:
                    self.reject("generate", task, "eval_overlap", hit, item=item, **kw)
                    continue
                rid = f"{c.chunk_id}:summary" if task == "summary" else f"{c.chunk_id}:fact{j}"
                notes.append({"id": rid, "text": item, "kind": task,
                              "provenance": self._prov(c, task=task, **prov_gen, cache_key=reply.key)})
        if self.cfg.generator.fallback == "extractive":
            from dft.databuild.extractive import extract_pairs

            served = {c.chunk_id for c, _, _ in pairs}
            for c in chunks:
                if c.chunk_id in served:
                    continue
                made = 0
                for j, item in enumerate(extract_pairs(c.text, p.n_questions)):
                    nq = normalise_for_hash(item["question"])
                    if guard.active and guard.question_overlap(item["question"], item["answer"]):
                        continue
                    if nq in seen_q:
                        continue
                    seen_q.add(nq)
                    pairs.append((c, f"x{j}", {**item, "extractive": True}))
                    made += 1
                self.fallback["chunks"] += 1
                self.fallback["pairs"] += made
        return pairs

    def _wrong_answers(self, gen, pairs: list, guard: EvalGuard, messages: list, preference: list, bar) -> None:
        """An SFT row per pair; a preference row per pair whose wrong answer passes validation."""
        if not pairs:
            return
        p = self.cfg.prompts
        prov_gen = {"generator": gen.id, "prompt_version": p.version}
        requests = [_chat(p, render(p.wrong_answer, question=it["question"], answer=it["answer"])) for _, _, it in pairs]
        bar.total += len(requests)
        bar.refresh()
        replies = gen.run(requests, bar=bar)
        from dft.databuild.extractive import ID as EXTRACTIVE, wrong_answer

        answers = [it["answer"] for _, _, it in pairs]
        extractive = self.cfg.generator.fallback == "extractive"
        for i, ((c, j, it), reply) in enumerate(zip(pairs, replies)):
            rid = f"{c.chunk_id}:qa{j}"
            turns = ([{"role": "system", "content": p.sft_system}] if p.sft_system else []) + [
                {"role": "user", "content": it["question"]}, {"role": "assistant", "content": it["answer"]}]
            qa_gen = {**prov_gen, "generator": EXTRACTIVE} if it.get("extractive") else prov_gen
            messages.append({"id": rid, "messages": turns, "provenance": self._prov(c, task="qa", **qa_gen)})
            kw = dict(source=c.source, chunk_id=c.chunk_id, generator=gen.id)
            parsed = None
            if reply.error:
                self.reject("generate", "wrong_answer", "generator_error", reply.error, item=it, **kw)
            else:
                parsed = V.parse_wrong_answer(reply, it["question"], it["answer"])
                for r in parsed.rejects:
                    self.reject("generate", "wrong_answer", r.reason, r.detail, item={**it, "wrong_answer": r.item},
                                output=reply.text, **kw)
            if (parsed is None or not parsed.items) and extractive:
                # another question's answer: on topic, fluent, and wrong for this question
                wrong = wrong_answer(it["answer"], answers[i + 1:] + answers[:i])
                if wrong is not None and not (guard.active and guard.overlap(wrong)):
                    self.fallback["wrong_answers"] += 1
                    preference.append({"id": rid, "prompt": it["question"], "chosen": it["answer"], "rejected": wrong,
                                       "provenance": self._prov(c, task="wrong_answer",
                                                                **{**prov_gen, "generator": EXTRACTIVE})})
                continue
            if parsed is None:
                continue
            if parsed.items:
                wrong = parsed.items[0]
                hit = guard.overlap(wrong) if guard.active else None
                if hit:
                    self.reject("generate", "wrong_answer", "eval_overlap", hit, item=wrong, **kw)
                    continue
                preference.append({"id": rid, "prompt": it["question"], "chosen": it["answer"], "rejected": wrong,
                                   "provenance": self._prov(c, task="wrong_answer", **prov_gen)})

    # ------------------------------------------------------------------ data config
    def _conf_file(self) -> Path:
        return self.conf_dir / f"{self.cfg.name}.yaml"

    def _check_conf_target(self) -> None:
        f = self._conf_file()
        if f.exists() and not self.cfg.force and not f.read_text(encoding="utf-8").startswith(MARKER):
            raise DftError(f"{f} exists and was not written by this tool: pick another name=, or force=true to overwrite it")

    def _write_data_config(self, files: dict, gen_id: str, tok_desc: str) -> Path:
        from omegaconf import OmegaConf

        from dft.config import DataConfig

        node = OmegaConf.structured(DataConfig(name=self.cfg.name, eval={}, **files))
        body = OmegaConf.to_yaml(node)
        header = (
            f"{MARKER} (rebuild with the same command; rows are cached).\n"
            f"# source: {self.source}\n"
            f"# generator: {gen_id}, prompts {self.cfg.prompts.version}; tokenizer: {tok_desc}\n"
            f"# report: {_config_path(self.out_dir / 'build_report.json')}. A split without rows is null.\n"
            "# eval: {<benchmark>: <MCQ file>} lists this domain's benchmarks; eval=quick/full score all of them\n"
            "# (eval.benchmarks defaults to these keys), so with none the cells report held-out perplexity only.\n"
        )
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        f = self._conf_file()
        _write_text(f, header + body)
        return f


def build(cfg: Any) -> dict:
    """Run a build from a composed ``conf/databuild/build.yaml``; return the report."""
    from dft.databuild.config import validate

    validate(cfg)
    return Build(cfg).run()


def format_report(r: dict) -> str:
    """The report as a few readable lines (printed at the end of a build)."""
    g, d, c = r["generator"], r["documents"], r["chunks"]
    lines = [
        f"domain {r['name']}: {r['out']}",
        f"  documents  {d['used']} used of {d['files']} files ({d['jsonl_items']} JSONL items); "
        f"eval set aside {d['eval_set_aside']}; skipped {d['skipped'] or 'none'}",
        f"  chunks     {c['used']} ({c['train']} train, {c['heldout']} held out); duplicates {c['duplicates']}, "
        f"eval overlaps {c['eval_overlap']}; generated from {c['generated_from']}",
        f"  tokens     text {r['tokens']['text']:,}, heldout_text {r['tokens']['heldout_text']:,}",
        "  rows       " + ", ".join(f"{k} {v}" for k, v in r["rows"].items()),
        f"  generator  {g['id']}: {g['calls']} calls, {g['cache_hits']} cache hits, {g['errors']} errors, "
        f"{g['retries']} retries, {g['seconds']} s",
        "  rejects    " + (", ".join(f"{k} {v}" for k, v in r["rejects"].items()) or "none")
        + f"  (details: {Path(r['out']) / 'rejects.jsonl'})",
    ]
    for task, counts in r.get("rejects_by_task", {}).items():  # what was rejected and why, with an example
        for reason, n in counts.items():
            ex = r.get("reject_examples", {}).get(f"{task}/{reason}")
            lines.append(f"    {task}: {n} x {reason} ({V.REASONS.get(reason, reason)})" + (f", e.g. {ex!r}" if ex else ""))
    fb = r.get("fallback") or {}
    if fb.get("chunks") or fb.get("wrong_answers"):
        lines.append(f"  fallback   the generator gave no valid Q&A for {fb['chunks']} chunk(s): {fb['pairs']} Q&A pairs "
                     f"were taken from the text itself (definitions, sentence completions) and {fb['wrong_answers']} "
                     "wrong answers are other questions' answers (generator.fallback=none keeps only generated rows)")
    lines += [
        f"  eval guard {r['eval_guard']['benchmark_questions']} benchmark questions, "
        f"{r['eval_guard']['eval_documents']} eval documents; removed {r['eval_guard']['removed']}",
        f"  config     {r['data_config']}  ->  python -m dft.train data={r['name']}",
    ]
    return "\n".join(lines)
