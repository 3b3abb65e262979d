"""Build the shipped materials-science domain (``data/materials/``) and its tiny cut (``data/tiny/``).

    python -m dft.data.prepare --shared ../shared/data --out data/materials

Reads the source copies described by the ``PROVENANCE.md`` files under ``--shared`` and writes:

* ``text.jsonl`` / ``heldout_text.jsonl`` -- OpenStax sections for CPT and for perplexity. About 5% of the
  sections of each book (never an introduction, appendix or preface) are held out; the exercises and glossary
  entries of a held-out section are also kept out of ``messages.jsonl``, so SFT does not leak them.
* ``messages.jsonl`` -- OpenStax exercises with worked answers and glossary definitions as one user/assistant turn.
* ``preference.jsonl`` -- the LAMM Graph-PRefLexOR pairs (flagged rows dropped), pairs from a training split of
  the Anatomy & Physiology MCQs and pairs of recorded LLM responses (one right, one wrong) from a training split
  of MaScQA.
* ``eval_mascqa.jsonl``, ``eval_mmlu_stem.jsonl``, ``eval_anatomy_mcq.jsonl`` -- letter-answer MCQs, without the
  items used for training, ordered so that every prefix is a category-stratified sample (``eval=quick`` takes the
  first N).
* ``manifest.json`` -- row counts, sha256 of every file, the seed and the measured length ratio of the LAMM pairs.

Everything is deterministic: every random choice uses ``random.Random(f"{SEED}:<purpose>")``, so rerunning
gives byte-identical files. Training items whose (normalised) question equals or contains an eval question are
dropped, so no eval item is trained on.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import hashlib
import json
import random
import re
import shutil
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from dft.data import normalize_question

SEED = 1234
HELDOUT_FRACTION = 0.05  # of each book's sections, for perplexity
ANATOMY_TRAIN_FRACTION = 0.40  # of the A&P MCQs (per chapter) used for preference pairs
MASCQA_TRAIN_FRACTION = 0.25  # of MaScQA's letter-answer items (per topic) used for preference pairs
MIN_OVERLAP_WORDS = 8  # an eval question this long or longer must not appear inside any training prompt

BOOKS = ("chemistry_2e", "university_physics_v1", "anatomy_physiology_2e")
MMLU_SUBJECTS = (
    "college_chemistry", "high_school_chemistry", "college_physics", "high_school_physics", "conceptual_physics",
    "college_biology", "high_school_biology", "anatomy", "electrical_engineering",
)
# MaScQA's columns: full chain-of-thought response -> the answer letter recorded for it.
MASCQA_RESPONSES = {"gpt35_cot": "GPT3.5-COT", "gpt4_cot": "GPT4-COT", "llama3_8b": "LLAMA3-8B"}
LETTERS = "ABCDE"

# Items that cannot be answered from their text alone: figures, drawings, videos and web pages.
FIGURE_RE = re.compile(
    r"\b(figures?|fig\.|as shown|shown (below|above|here|in)|(following|this|the|given) (graph|diagram|image|photo|"
    r"photograph|picture|illustration|drawing|plot)|sketch|draw (a|an|the)|this (site|link|video|animation|website|"
    r"simulation)|visit this|watch this)\b",
    re.IGNORECASE,
)
# Sections that are not subject matter (or too short to be a fair perplexity document) are never held out.
NOT_HELDOUT_TITLES = {"Introduction", "Preface"}
MIN_HELDOUT_CHARS = 3000


# --------------------------------------------------------------------------------------------- helpers
def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def rng(purpose: str) -> random.Random:
    return random.Random(f"{SEED}:{purpose}")  # str seeds are hashed with sha512: stable across runs


def module_of(item_id: str) -> str:
    """``openstax-chemistry_2e-m68664-q0`` -> ``openstax-chemistry_2e-m68664`` (the corpus section id)."""
    return item_id.rsplit("-q", 1)[0]


def render_mcq(question: str, options: list[str]) -> str:
    return question + "".join(f"\n({LETTERS[k]}) {o}" for k, o in enumerate(options))


def stratified_split(rows: list[dict], key: str, fraction: float, purpose: str) -> tuple[list[dict], list[dict]]:
    """Pick ``round(fraction * n)`` rows of every ``key`` group for training; return (train, rest) in input order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row[key]].append(i)
    r = rng(purpose)
    chosen: set[int] = set()
    for name in sorted(groups):
        idx = groups[name]
        chosen.update(r.sample(idx, round(fraction * len(idx))))
    return [x for i, x in enumerate(rows) if i in chosen], [x for i, x in enumerate(rows) if i not in chosen]


def stratified_order(rows: list[dict], key: str, purpose: str) -> list[dict]:
    """Shuffle so that every prefix holds each category in (nearly) its overall proportion.

    Each category is shuffled, then its j-th item gets the position ``(j + u) / n_cat`` with one random offset
    ``u`` per category; sorting by position interleaves the categories evenly (systematic sampling).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    r = rng(purpose)
    keyed = []
    for name in sorted(groups):
        items = groups[name][:]
        r.shuffle(items)
        u = r.random()
        keyed += [((j + u) / len(items), r.random(), item) for j, item in enumerate(items)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [item for _, _, item in keyed]


def shuffled(rows: list[dict], purpose: str) -> list[dict]:
    rows = rows[:]
    rng(purpose).shuffle(rows)
    return rows


class EvalIndex:
    """Normalised eval items, to find training prompts that equal or contain one of them.

    A prompt is contaminated when it equals an eval question, contains a specific one (``MIN_OVERLAP_WORDS`` or
    more words: a stem like "Which of the following statements is true?" alone identifies nothing), or contains
    a whole eval item, question plus lettered options (that is how MCQ prompts are rendered for training).
    """

    def __init__(self, items: list[dict]):
        self.exact = {normalize_question(r["question"]) for r in items}
        stems = {q for q in self.exact if len(q.split()) >= MIN_OVERLAP_WORDS}
        full = {normalize_question(render_mcq(r["question"], r["options"])) for r in items}
        self.long = sorted(stems | full)

    def contaminated(self, prompts: list[str]) -> set[int]:
        """Indices of ``prompts`` that equal an eval question or contain a long one (on word boundaries)."""
        norms = [normalize_question(p) for p in prompts]
        hits = {i for i, p in enumerate(norms) if p in self.exact}
        starts, pieces, pos = [], [], 0
        for p in norms:
            starts.append(pos)
            pieces.append(f" {p} ")
            pos += len(p) + 3  # the two spaces and the newline separator
        haystack = "\n".join(pieces)
        for q in self.long:
            needle, at = f" {q} ", 0
            while (at := haystack.find(needle, at)) >= 0:
                hits.add(bisect.bisect_right(starts, at) - 1)
                at += 1
        return hits


# --------------------------------------------------------------------------------------------- sources
def openstax_sections(shared: Path) -> tuple[list[dict], list[dict], set[str]]:
    """(text rows, held-out rows, held-out section ids)."""
    text, heldout, held_ids = [], [], set()
    for book in BOOKS:
        rows = read_jsonl(shared / "openstax" / "corpus" / f"{book}.jsonl")
        candidates = [
            r["id"] for r in rows
            if r["chapter"] and r["section_title"] not in NOT_HELDOUT_TITLES and len(r["text"]) >= MIN_HELDOUT_CHARS
        ]
        held = set(rng(f"heldout:{book}").sample(candidates, max(1, round(HELDOUT_FRACTION * len(rows)))))
        held_ids |= held
        for r in rows:
            title = f"{r['chapter']} - {r['section_title']}" if r["chapter"] else r["section_title"]
            row = {"id": r["id"], "text": f"{title}\n\n{r['text'].strip()}", "source": f"openstax/{book}"}
            (heldout if r["id"] in held else text).append(row)
    return text, heldout, held_ids


def openstax_messages(shared: Path, held_ids: set[str]) -> tuple[list[dict], Counter]:
    rows, dropped, seen = [], Counter(), set()
    for book in BOOKS:
        for r in read_jsonl(shared / "openstax" / "qa" / f"{book}_exercises.jsonl"):
            q, a = r["question"].strip(), r["answer"].strip()
            if r["type"] == "interactive-exercise":
                dropped["interactive exercise (needs a web page)"] += 1
            elif module_of(r["id"]) in held_ids:
                dropped["from a held-out section"] += 1
            elif r["type"] != "glossary" and FIGURE_RE.search(f"{q}\n{a}"):
                dropped["figure/video dependent"] += 1
            elif not re.search(r"\w", a):
                dropped["answer without content"] += 1
            elif (q, a) in seen:
                dropped["duplicate"] += 1
            else:
                seen.add((q, a))
                rows.append({
                    "id": r["id"],
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "source": f"openstax/{book}/{r['type']}",
                })
    return rows, dropped


def anatomy_mcqs(shared: Path) -> tuple[list[dict], int]:
    """A&P review MCQs as benchmark rows (the options are cut from the question, where they are also rendered)."""
    out, figure = [], 0
    for r in read_jsonl(shared / "openstax" / "qa" / "anatomy_physiology_2e_mcq.jsonl"):
        stem = r["question"].split("\n(A) ")[0].strip()
        assert render_mcq(stem, r["options"]) == r["question"].strip(), r["id"]
        if FIGURE_RE.search(r["question"]):
            figure += 1
            continue
        out.append({"id": r["id"], "question": stem, "options": r["options"], "answer": r["answer"],
                    "category": r["chapter"]})
    return out, figure


def parse_inline_options(text: str) -> tuple[str, list[str]] | None:
    """``'Stem  (A) x (B) y (C) z (D) w'`` -> ``('Stem', ['x', 'y', 'z', 'w'])``; uses the last ``(A)`` run."""
    parts = re.split(r"\(([A-E])\)", text)
    letters = parts[1::2]
    starts = [i for i, x in enumerate(letters) if x == "A"]
    if not starts:
        return None
    s = starts[-1]
    run = letters[s:]
    if run != list(LETTERS[: len(run)]) or len(run) < 2:
        return None
    stem = "".join(p if k % 2 == 0 else f"({p})" for k, p in enumerate(parts[: 2 * s + 1])).strip()
    stem = re.sub(r"\s*Options:\s*$", "", stem)  # MATCH questions say "Options: (A) ..."
    options = [parts[2 * (s + k) + 2].strip() for k in range(len(run))]
    if not stem or any(not o for o in options):
        return None
    return stem, options


def mascqa_items(shared: Path) -> tuple[list[dict], dict[str, dict], Counter]:
    """Letter-answer MaScQA questions as benchmark rows (+ the source rows by id, + what was left out)."""
    out, src, skipped = [], {}, Counter()
    for r in read_jsonl(shared / "mascqa" / "mascqa.jsonl"):
        if r["id"] in src:
            skipped["duplicate id"] += 1
            continue
        src[r["id"]] = r
        if r["question_type"] == "NUM":
            skipped["numeric answer (NUM)"] += 1
            continue
        if not re.fullmatch(r"[A-E]", r["answer"]):
            skipped[f"not a single-letter answer ({r['question_type']})"] += 1
            continue
        parsed = parse_inline_options(r["question"])
        if parsed is None or LETTERS.index(r["answer"]) >= len(parsed[1]):
            skipped["options not parseable"] += 1
            continue
        stem, options = parsed
        out.append({"id": r["id"], "question": stem, "options": options, "answer": r["answer"],
                    "category": r["topic"]})
    return out, src, skipped


def mmlu_items(shared: Path) -> list[dict]:
    out = []
    for subject in MMLU_SUBJECTS:
        with open(shared / "mmlu_stem" / "test" / f"{subject}_test.csv", encoding="utf-8", newline="") as f:
            for i, r in enumerate(csv.DictReader(f)):
                out.append({
                    "id": f"mmlu-{subject}-{i}",
                    "question": r["question"].strip(),
                    "options": [r[f"choice{k}"].strip() for k in range(4)],
                    "answer": LETTERS[int(r["answer"])],
                    "category": subject,
                })
    return out


def lamm_pairs(shared: Path) -> tuple[list[dict], dict]:
    rows = read_jsonl(shared / "graph_preflexor" / "dpo_pairs_77.jsonl")
    kept = [(i, r) for i, r in enumerate(rows) if not r["flag_teacher_refusal_artifact"]]
    pairs = [{"id": f"lamm-{i}", "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
              "source": f"lamm_graph_preflexor/{r['source']}"} for i, r in kept]
    lc = [len(p["chosen"]) for p in pairs]
    lr = [len(p["rejected"]) for p in pairs]
    stats = {
        "rows": len(rows), "flagged_dropped": len(rows) - len(kept), "kept": len(pairs),
        "mean_chosen_chars": round(statistics.mean(lc)), "mean_rejected_chars": round(statistics.mean(lr)),
        "ratio_of_means": round(statistics.mean(lc) / statistics.mean(lr), 2),
        "median_pair_ratio": round(statistics.median(c / r for c, r in zip(lc, lr)), 2),
        "mean_pair_ratio": round(statistics.mean(c / r for c, r in zip(lc, lr)), 2),
        "chosen_longer_fraction": round(sum(c > r for c, r in zip(lc, lr)) / len(pairs), 3),
    }
    return pairs, stats


def anatomy_pairs(train: list[dict]) -> list[dict]:
    """Correct option vs one wrong option (chosen at random), the options rendered into the prompt."""
    r = rng("anatomy_pairs")
    out = []
    for item in train:
        a = LETTERS.index(item["answer"])
        w = r.choice([k for k in range(len(item["options"])) if k != a])
        prompt = render_mcq(item["question"], item["options"])
        out.append({"id": f"{item['id']}:pair", "prompt": prompt,
                    "chosen": f"({LETTERS[a]}) {item['options'][a]}",
                    "rejected": f"({LETTERS[w]}) {item['options'][w]}",
                    "source": "openstax/anatomy_physiology_2e/mcq"})
    return out


def mascqa_pairs(shared: Path, train: list[dict], src: dict[str, dict]) -> list[dict]:
    """Every (right, wrong) pair of the recorded chain-of-thought responses to a training question.

    A response is right when its recorded answer is the key's letter and wrong only when it is another single
    letter: an answer like ``0.7`` for option ``(C) 0.70`` is not a clear mistake, so it is not used.
    """
    responses = {}
    for r in read_jsonl(shared / "mascqa" / "mascqa_llm_responses.jsonl"):
        responses.setdefault(r["id"], r)
    out = []
    for item in train:
        r = responses[item["id"]]
        right, wrong = [], []
        for col, ans_col in MASCQA_RESPONSES.items():
            text, ans = (r["model_responses"].get(col) or "").strip(), r["model_answers"].get(ans_col)
            if not text:
                continue
            if ans == item["answer"]:
                right.append((col, text))
            elif ans is not None and re.fullmatch(r"[A-E]", ans):
                wrong.append((col, text))
        for c_col, c_text in right:
            for w_col, w_text in wrong:
                if c_text != w_text:
                    out.append({"id": f"{item['id']}:{c_col}>{w_col}", "prompt": src[item["id"]]["question"].strip(),
                                "chosen": c_text, "rejected": w_text, "source": "mascqa/llm_responses"})
    return out


# --------------------------------------------------------------------------------------------- tiny domain
def cut_text(text: str, limit: int = 1200) -> str:
    """The first paragraphs of ``text``, up to ``limit`` characters."""
    out = ""
    for para in text.split("\n"):
        if out and len(out) + len(para) + 1 > limit:
            break
        out = f"{out}\n{para}" if out else para
    return out[:limit]


def build_tiny(m: dict[str, list[dict]], out: Path) -> dict[str, int]:
    """A few dozen short, real rows of every split, for fast tests (``conf/data/tiny.yaml``).

    The materials files are already shuffled (eval files: stratified), so their first rows are a fair sample.
    """

    def size(row: dict) -> int:
        if "messages" in row:
            return sum(len(t["content"]) for t in row["messages"])
        return len(row["prompt"]) + len(row["chosen"]) + len(row["rejected"])

    # Short pairs keep a CPU test fast: 30 MCQ pairs and the 10 shortest MaScQA response pairs. The LAMM pairs
    # (chosen ~8k characters) are left out on purpose.
    mcq_pairs = [r for r in m["preference"] if r["source"].startswith("openstax/")][:30]
    mascqa_pairs = sorted((r for r in m["preference"] if r["source"].startswith("mascqa/")),
                          key=lambda r: (size(r), r["id"]))[:10]
    tiny = {
        "text": [{**r, "text": cut_text(r["text"])} for r in m["text"][:40]],
        "heldout_text": [{**r, "text": cut_text(r["text"])} for r in m["heldout_text"][:10]],
        "messages": [r for r in m["messages"] if size(r) < 600][:40],
        "preference": shuffled(mcq_pairs + mascqa_pairs, "tiny_preference"),
        # all three benchmarks, so that eval=quick / eval=full validate with data=tiny
        **{name: m[name][:20] for name in ("eval_mascqa", "eval_mmlu_stem", "eval_anatomy_mcq")},
    }
    for name, rows in tiny.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {k: len(v) for k, v in tiny.items()}


# --------------------------------------------------------------------------------------------- main
def build(shared: Path, out: Path, tiny_out: Path | None) -> dict:
    text, heldout, held_ids = openstax_sections(shared)
    messages, msg_dropped = openstax_messages(shared, held_ids)

    anatomy, anatomy_figure = anatomy_mcqs(shared)
    anatomy_train, anatomy_eval = stratified_split(anatomy, "category", ANATOMY_TRAIN_FRACTION, "anatomy_split")
    mascqa, mascqa_src, mascqa_skipped = mascqa_items(shared)
    mascqa_train, mascqa_eval = stratified_split(mascqa, "category", MASCQA_TRAIN_FRACTION, "mascqa_split")
    mmlu = mmlu_items(shared)

    lamm, lamm_stats = lamm_pairs(shared)
    preference = lamm + anatomy_pairs(anatomy_train) + mascqa_pairs(shared, mascqa_train, mascqa_src)

    # No eval question may be trained on: drop training rows whose prompt is, or contains, an eval question.
    index = EvalIndex(anatomy_eval + mascqa_eval + mmlu)
    bad_msg = index.contaminated([r["messages"][0]["content"] for r in messages])
    bad_pref = index.contaminated([r["prompt"] for r in preference])
    messages = [r for i, r in enumerate(messages) if i not in bad_msg]
    preference = [r for i, r in enumerate(preference) if i not in bad_pref]
    msg_dropped["overlaps an eval question"] += len(bad_msg)

    files = {
        "text": shuffled(text, "text"),
        "heldout_text": heldout,
        "messages": shuffled(messages, "messages"),
        "preference": shuffled(preference, "preference"),
        "eval_mascqa": stratified_order(mascqa_eval, "category", "order:mascqa"),
        "eval_mmlu_stem": stratified_order(mmlu, "category", "order:mmlu_stem"),
        "eval_anatomy_mcq": stratified_order(anatomy_eval, "category", "order:anatomy_mcq"),
    }
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)

    # The provenance notes travel with the data, verbatim.
    for src in ("openstax", "mascqa", "mmlu_stem", "graph_preflexor"):
        (out / "provenance").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / src / "PROVENANCE.md", out / "provenance" / f"{src}.md")

    pref_sources = Counter(r["source"].split("/")[0] for r in files["preference"])
    manifest = {
        "seed": SEED,
        "rows": {name: len(rows) for name, rows in files.items()},
        "bytes": {name: (out / f"{name}.jsonl").stat().st_size for name in files},
        "sha256": {name: hashlib.sha256((out / f"{name}.jsonl").read_bytes()).hexdigest() for name in files},
        "text_sources": dict(sorted(Counter(r["source"] for r in text).items())),
        "heldout_ids": sorted(held_ids),
        "messages_sources": dict(sorted(Counter(r["source"] for r in files["messages"]).items())),
        "messages_dropped": dict(sorted(msg_dropped.items())),
        "preference_sources": dict(sorted(pref_sources.items())),
        "preference_dropped_overlap": len(bad_pref),
        "anatomy_mcq": {"items": len(anatomy) + anatomy_figure, "figure_dropped": anatomy_figure,
                        "train": len(anatomy_train), "eval": len(anatomy_eval)},
        "mascqa": {"letter_items": len(mascqa), "train": len(mascqa_train), "eval": len(mascqa_eval),
                   "left_out": dict(sorted(mascqa_skipped.items())),
                   "train_items_with_pairs": len({r["id"].split(":")[0] for r in files["preference"]
                                                  if r["source"].startswith("mascqa")})},
        "lamm": lamm_stats,
    }
    if tiny_out is not None:
        manifest["tiny"] = build_tiny(files, tiny_out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dft.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=Path("../shared/data"), help="folder with the source copies")
    p.add_argument("--out", type=Path, default=Path("data/materials"), help="output folder")
    p.add_argument("--tiny-out", type=Path, default=None,
                   help="where the tiny test domain goes (default: <out>/../tiny; 'none' to skip)")
    args = p.parse_args(argv)
    tiny = args.tiny_out if args.tiny_out is not None else args.out.parent / "tiny"
    if str(tiny) == "none":
        tiny = None
    m = build(args.shared, args.out, tiny)
    width = max(map(len, m["rows"]))
    for name, n in m["rows"].items():
        print(f"{name:<{width}}  {n:>6} rows  {m['bytes'][name] / 1e6:6.2f} MB")
    s = m["lamm"]
    print(f"LAMM pairs: kept {s['kept']} of {s['rows']} ({s['flagged_dropped']} flagged rows dropped); "
          f"chosen/rejected length: ratio of means {s['ratio_of_means']}x "
          f"({s['mean_chosen_chars']} vs {s['mean_rejected_chars']} chars), median per-pair ratio "
          f"{s['median_pair_ratio']}x, chosen longer in {s['chosen_longer_fraction']:.0%} of pairs")
    print(f"preference sources: {m['preference_sources']}; messages dropped: {m['messages_dropped']}")
    if "tiny" in m:
        print(f"tiny domain -> {tiny}: {m['tiny']}")


if __name__ == "__main__":
    main()
