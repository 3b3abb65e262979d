"""Held-out domain perplexity (token-weighted), with a bootstrap interval over token blocks.

``ppl = exp( sum_t NLL_t / N )`` in nats per token over every predicted token of the held-out
documents. Each document is tokenized on its own the way raw text is tokenized for CPT
(``dft/families.py``, "No doubled BOS"): with the tokenizer's special tokens, so a family whose
tokenizer prepends a BOS (Llama 3.x ``<|begin_of_text|>``, Mistral ``<s>``) gets exactly one BOS
per document and a family without one (SmolLM, SmolLM2) gets none; the family's document-end
token is appended, the one CPT ends its documents with (:func:`dft.families.doc_end_token`:
``<|end_of_text|>``, ``</s>``, ``<|endoftext|>``; not an instruct tokenizer's end-of-turn EOS). The documents are concatenated and cut into non-overlapping blocks of ``block`` tokens
(the first token of each block is context only, so a BOS is never itself predicted at a block
start). Perplexities are comparable between artefacts of one tokenizer (one model family) only.

Uncertainty: the per-block summed NLL and token counts are kept (``blocks``), and the 95 %
interval is a percentile bootstrap over blocks (:func:`dft.stats.bootstrap_perplexity`); two
artefacts of one family see the same blocks, so their difference is bootstrapped paired.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def token_stream(tokenizer, docs: list[str], max_tokens: Optional[int] = None,
                 end_id: Optional[int] = None) -> tuple[list[int], int]:
    """The token ids perplexity is computed on, and the number of documents they come from.

    Each document: ``tokenizer(doc)`` (special tokens added: the family's BOS where its tokenizer
    has one) + ``[end_id]`` (the family's document-end id; default the tokenizer's EOS);
    concatenated; cut to ``max_tokens + 1`` ids (``max_tokens`` predicted).
    """
    from dft.families import check_single_bos

    eos = tokenizer.eos_token_id if end_id is None else end_id
    stream: list[int] = []
    n_docs = 0
    for d in docs:
        ids = tokenizer(d, add_special_tokens=True)["input_ids"]
        check_single_bos(tokenizer, ids)
        stream.extend(ids + ([eos] if eos is not None else []))
        n_docs += 1
        if max_tokens is not None and len(stream) >= max_tokens + 1:
            stream = stream[: max_tokens + 1]
            break
    return stream, n_docs


@torch.no_grad()
def perplexity(model, tokenizer, docs: list[str], *, block: int = 512, max_tokens: Optional[int] = None,
               batch_size: int = 4, progress: bool = True, end_id: Optional[int] = None) -> dict:
    """Perplexity of ``model`` on ``docs``.

    Returns ``{"ppl", "nll_per_token" (nats), "n_tokens" (predicted tokens), "n_docs", "n_blocks",
    "stderr" (the bootstrap replicates' standard deviation), "ci_low", "ci_high" (95 % percentile bootstrap over blocks, :data:`dft.stats.N_RESAMPLES`
    resamples, seed :data:`dft.stats.SEED`), "blocks": {"nll": [summed NLL per block, nats],
    "tokens": [predicted tokens per block]}}``.

    Raises:
        ValueError: ``docs`` holds no token.
    """
    from tqdm.auto import tqdm

    from dft.stats import bootstrap_perplexity

    stream, n_docs = token_stream(tokenizer, docs, max_tokens, end_id)
    if len(stream) < 2:
        raise ValueError("perplexity: the held-out text has no tokens")
    blocks = [stream[i: i + block] for i in range(0, len(stream) - 1, block)]
    blocks = [b for b in blocks if len(b) >= 2]
    device = next(model.parameters()).device
    model.eval()
    block_nll: list[float] = []
    block_n: list[int] = []
    for s in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk = blocks[s: s + batch_size]
        width = max(len(b) for b in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(chunk):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [batch, width, vocab]
        for i in range(len(chunk)):  # one row's log-softmax at a time: [width - 1, vocab] floats, not the batch's
            logp = torch.log_softmax(logits[i, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[i, 1:, None]).squeeze(-1)
            m = mask[i, 1:].bool()
            block_nll.append(float(nll[m].sum()))
            block_n.append(int(m.sum()))
        del logits
    total_nll, total_n = sum(block_nll), sum(block_n)
    mean = total_nll / total_n
    boot = bootstrap_perplexity(block_nll, block_n)
    return {"ppl": math.exp(mean), "nll_per_token": mean, "n_tokens": total_n, "n_docs": n_docs,
            "n_blocks": len(block_n), "stderr": float(boot["distribution"][0].std(ddof=1)), "ci_low": float(boot["ci_low"][0]), "ci_high": float(boot["ci_high"][0]),
            "blocks": {"nll": block_nll, "tokens": block_n}}
