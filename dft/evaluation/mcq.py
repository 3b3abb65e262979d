"""Multiple-choice evaluation with the paper's protocol, plus log-likelihood scoring.

Protocol (Lu, Luu & Buehler 2024, arXiv 2409.03444, §"Benchmarks"): the user turn is
``"You respond with one word or letter. Select the correct answer to this question: {question}"``
rendered with the model's chat template; the assistant turn is pre-filled with
``"The correct answer is:"``; the continuation is decoded greedily and the answer letter is
extracted and compared by exact match (``acc``).

Small models often ramble, so each item is also scored by log-likelihood: the option letter
whose token (``" A"``, ``" B"`` ...) is most probable right after the pre-filled prefix is the
prediction (``acc_ll``), as in lm-evaluation-harness' MMLU letter scoring.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional

import torch

from dft.families import apply_system_policy

PROMPT = "You respond with one word or letter. Select the correct answer to this question: {question}"
ASSISTANT_PREFIX = "The correct answer is:"
LETTERS = "ABCDEFGH"
MIN_PREFIX = 4  # a shorter shared prefix is not worth a cache copy per batch

_STRIP = re.compile(r"[*_`]")
_EXPLICIT = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?([A-H])\b(?![a-z])", re.I)
_TOKEN = re.compile(r"^\(?([A-H])(?:\)|\.|:|,)?$")


def format_question(item: dict) -> str:
    """Question text with its options as ``(A) ...`` lines, unless the text already lists them."""
    q = item["question"].strip()
    if "(A)" in q and "(B)" in q:
        return q
    opts = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(item["options"]))
    return f"{q}\n{opts}"


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s.]", " ", s.lower())).strip()


def extract_letter(output: str, options: list[str]) -> Optional[str]:
    """The answer letter in a model's output, or None when there is none or it is ambiguous.

    Accepts ``B``, ``(B)``, ``B)``, ``B.``, ``**B**``, ``The answer is B.``, and the text of
    exactly one option instead of its letter. Two different letters (``A or B``) are ambiguous
    and give None (scored wrong). A bare ``A`` followed by a lowercase word is the article, not
    an answer.

    Args:
        output: the generated continuation (after the pre-filled prefix).
        options: the item's option texts; letters beyond ``len(options)`` are never returned.
    """
    allowed = LETTERS[: len(options)]
    text = _STRIP.sub("", output).strip()
    explicit = {m.upper() for m in _EXPLICIT.findall(text) if m.upper() in allowed}
    if len(explicit) == 1:
        return explicit.pop()
    if len(explicit) > 1:
        return None
    words = re.split(r"[\s,;]+", text)
    found: list[str] = []
    for i, w in enumerate(words):
        m = _TOKEN.match(w)
        if not m or m.group(1) not in allowed:
            continue
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w == "A" and nxt[:1].islower() and nxt not in ("or", "and", "nor", "vs", "versus"):
            continue  # the article "A material ..."
        found.append(m.group(1))
    if len(set(found)) == 1:
        return found[0]
    if len(set(found)) > 1:
        return None
    norm_out = _norm(text)
    hits = [LETTERS[i] for i, o in enumerate(options) if _norm(str(o)) and _norm(str(o)) in norm_out]
    return hits[0] if len(hits) == 1 else None


def render_prompt(item: dict, tokenizer, model_cfg: Any) -> str:
    """The full prompt string: chat template + generation prompt + the pre-filled prefix."""
    msgs = apply_system_policy([{"role": "user", "content": PROMPT.format(question=format_question(item))}], model_cfg)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text + ASSISTANT_PREFIX


def _pad_batch(rests: list[list[int]], prefix: list[int], pad_id: int, device) -> dict:
    """``prefix + pads + rest`` rows (padding between the shared prefix and each row's own tokens).

    With an empty ``prefix`` this is ordinary left padding. Position ids count attended tokens
    only (``cumsum(mask) - 1``, as ``generate`` derives them), so each row sees the positions it
    would have unpadded. Shapes: ``input_ids``, ``attention_mask`` and ``position_ids`` are
    ``[batch, len(prefix) + max(len(rest))]``.
    """
    width = max(len(r) for r in rests)
    n, p = len(rests), len(prefix)
    ids = torch.full((n, p + width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, p + width), dtype=torch.long)
    if p:
        ids[:, :p] = torch.tensor(prefix)
        mask[:, :p] = 1
    for i, r in enumerate(rests):
        ids[i, p + width - len(r):] = torch.tensor(r)
        mask[i, p + width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every sequence, at most ``min(len) - 1``.

    Every MCQ prompt starts with the same chat-template header, system prompt and instruction
    (40 tokens of SmolLM2's ~124-token mean prompt); it is encoded once per benchmark instead of
    once per item. One token of each sequence is always left outside the prefix, so every row
    has a position to predict from.
    """
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


def _cache_kwarg(model) -> str:
    """The keyword under which this transformers version takes a KV cache (``cache`` from 5.2x, else
    ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixCache:
    """The KV cache of one token prefix, encoded once and copied out per batch.

    Args:
        model: a causal LM whose forward takes a transformers ``Cache``.
        prefix: token ids, ``[p]``; encoded as a ``[1, p]`` batch at positions ``0 .. p-1``.
    """

    def __init__(self, model, prefix: list[int]):
        self.kwarg = _cache_kwarg(model)
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values

    def for_batch(self, n: int):
        """A fresh cache holding the prefix ``n`` times (generation appends to it in place)."""
        c = copy.deepcopy(self.cache)
        c.batch_repeat_interleave(n)
        return c


def letter_token_ids(tokenizer, n: int) -> list[int]:
    """Token id of ``" A"``, ``" B"`` ... (the letter as it follows ``"is:"``), one per option.

    Raises:
        ValueError: a letter encodes to several tokens (the fast path needs one each).
    """
    ids = []
    for L in LETTERS[:n]:
        enc = tokenizer(" " + L, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"' {L}' is {len(enc)} tokens for this tokenizer")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def evaluate_mcq(model, tokenizer, model_cfg: Any, items: list[dict], *, eos_ids: list[int],
                 generate: bool = True, loglik: bool = True, max_new_tokens: int = 8,
                 batch_size: int = 16, prefix_cache: bool = True, progress: bool = True) -> dict:
    """Score MCQ ``items`` ({id, question, options, answer, category}); return the eval record.

    Returns ``{"n", "acc", "acc_ll", "acc_stderr", "acc_ci_low", "acc_ci_high", "acc_ll_stderr",
    "acc_ll_ci_low", "acc_ll_ci_high", "by_category": {cat: {the same keys}}, "items": [...],
    "tokens"}`` (:func:`summarize`); accuracies are fractions in [0, 1] (None when that scoring
    is off). ``tokens``
    counts the prefill work: ``prompt`` (all prompts' tokens), ``shared_prefix`` (encoded once),
    ``prefilled`` (positions forwarded, the prefix once + every padded batch row), ``padding``. Greedy decoding: the
    same model gives the same numbers on every run.

    Cost: the forward passes cover each prompt's tokens once, minus the prefix all prompts share
    (``prefix_cache``: encoded once, its KV cache copied into every batch), plus up to
    ``max_new_tokens`` decode steps per batch. Items are batched by token length, so padding is a
    few tokens per row. ``prefix_cache=False`` encodes every prompt whole (same predictions up to
    float rounding; tests/test_mcq.py compares the two).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    encoded = [tokenizer(render_prompt(it, tokenizer, model_cfg), add_special_tokens=False)["input_ids"]
               for it in items]
    # batches of equal token length waste no compute on padding; results keep item order
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    p = common_prefix_length(encoded) if prefix_cache else 0
    shared = PrefixCache(model, encoded[0][:p]) if p >= MIN_PREFIX else None
    p = p if shared is not None else 0
    records: list[Optional[dict]] = [None] * len(items)
    tokens = {"prompt": sum(len(e) for e in encoded), "shared_prefix": p, "prefilled": p, "padding": 0}
    for start in tqdm(range(0, len(order), batch_size), desc="mcq", disable=not progress, leave=False):
        idx = order[start: start + batch_size]
        chunk = [items[i] for i in idx]
        enc = _pad_batch([encoded[i][p:] for i in idx], encoded[idx[0]][:p], tokenizer.pad_token_id, device)
        tokens["prefilled"] += enc["input_ids"][:, p:].numel()
        tokens["padding"] += int((enc["attention_mask"][:, p:] == 0).sum())
        cache = {shared.kwarg: shared.for_batch(len(idx))} if shared is not None else {}
        outs = [""] * len(chunk)
        preds_ll: list[Optional[str]] = [None] * len(chunk)
        first_logits = None
        if generate:
            # the logits of the first generated position are the log-likelihood scores too:
            # one forward pass serves both protocols
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True, **cache)
            outs = tokenizer.batch_decode(gen.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            first_logits = gen.logits[0]
        if loglik:
            if first_logits is None:
                # only the last position's logits are needed (bench/mcq_bench.py: ~1.25x faster)
                first_logits = model(input_ids=enc["input_ids"][:, p:], attention_mask=enc["attention_mask"],
                                     position_ids=enc["position_ids"][:, p:], logits_to_keep=1,
                                     **cache).logits[:, -1, :]
            logp = torch.log_softmax(first_logits.float(), dim=-1)
            for i, it in enumerate(chunk):
                ids = letter_token_ids(tokenizer, len(it["options"]))
                preds_ll[i] = LETTERS[int(torch.argmax(logp[i, ids]))]
        for i, it in enumerate(chunk):
            pred = extract_letter(outs[i], it["options"]) if generate else None
            records[idx[i]] = {
                "id": it["id"], "category": it.get("category"), "answer": it["answer"],
                "pred": pred, "pred_ll": preds_ll[i],
                "correct": bool(pred == it["answer"]) if generate else None,
                "correct_ll": bool(preds_ll[i] == it["answer"]) if loglik else None,
                "output": outs[i],
            }
    return {**summarize(records, generate=generate, loglik=loglik), "tokens": tokens}


def summarize(records: list[dict], *, generate: bool = True, loglik: bool = True) -> dict:
    """Overall and per-category accuracy of per-item ``records``, each with its uncertainty.

    For ``acc`` (greedy) and ``acc_ll`` (log-likelihood), overall and per category:
    the accuracy (a fraction), ``<acc>_stderr`` (standard error of the mean of the 0/1 outcomes,
    ``ddof=1``, as lm-evaluation-harness' ``acc_stderr``) and ``<acc>_ci_low`` /
    ``<acc>_ci_high`` (95 % Wilson interval), from :func:`dft.stats.accuracy_stats`; all None
    when that scoring is off (and the stderr for a single item). ``n`` counts the items.
    """
    from dft.stats import accuracy_stats

    def block(rs) -> dict:
        out: dict = {"n": len(rs)}
        for key, name, on in (("correct", "acc", generate), ("correct_ll", "acc_ll", loglik)):
            st = accuracy_stats([r[key] for r in rs]) if on and rs else {}
            out[name] = st.get("acc")
            for k in ("stderr", "ci_low", "ci_high"):
                out[f"{name}_{k}"] = st.get(k)
        return out

    cats: dict[str, list[dict]] = {}
    for r in records:
        cats.setdefault(str(r["category"]), []).append(r)
    return {**block(records), "by_category": {c: block(rs) for c, rs in sorted(cats.items())}, "items": records}
