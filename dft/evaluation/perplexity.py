"""Held-out domain perplexity (token-weighted).

``ppl = exp( sum_t NLL_t / N )`` in nats per token over every predicted token of the held-out
documents, each document tokenized on its own with EOS appended, concatenated and cut into
non-overlapping blocks of ``block`` tokens (the first token of each block is context only).
Perplexities are comparable between artefacts of one tokenizer (one model family) only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()
def perplexity(model, tokenizer, docs: list[str], *, block: int = 512, max_tokens: Optional[int] = None,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``docs``.

    Returns ``{"ppl", "nll_per_token" (nats), "n_tokens" (predicted tokens), "n_docs"}``.

    Raises:
        ValueError: ``docs`` holds no token.
    """
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    n_docs = 0
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
        n_docs += 1
        if max_tokens is not None and len(stream) >= max_tokens + 1:
            stream = stream[: max_tokens + 1]
            break
    if len(stream) < 2:
        raise ValueError("perplexity: the held-out text has no tokens")
    blocks = [stream[i: i + block] for i in range(0, len(stream) - 1, block)]
    blocks = [b for b in blocks if len(b) >= 2]
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_n = 0.0, 0
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
            total_nll += float(nll[m].sum())
            total_n += int(m.sum())
        del logits
    mean = total_nll / total_n
    return {"ppl": math.exp(mean), "nll_per_token": mean, "n_tokens": total_n, "n_docs": n_docs}
