"""What a stage trains on: the truncation policy and the audit of the data TRL hands the trainer.

Two passes, both recorded in the stage's facts (``train.<artefact>.audit`` in the cache manifest and
``summary.json``):

* **Before and right after the trainer is built** (:func:`apply_policy`): rows whose prompt alone fills
  ``max_length`` are dropped (nothing left to train on), and rows whose completion would be cut follow
  ``strategy.<stage>.truncation`` (``drop`` by default: counted and warned; ``keep``: counted and warned;
  ``error``). SFT lengths come from the chat template exactly as ``trl.SFTTrainer`` tokenizes
  (``apply_chat_template(tokenize=True)``), because packing hides TRL's own truncation; DPO and ORPO
  lengths come from the trainer's own tokenized dataset.
* **After the policy** (:func:`audit_trainer_data`): the trainer's dataset and its collator's output for
  the first example are read back: sequences, supervised tokens (``labels != -100``), tokens per row,
  packing efficiency, rows whose supervised tokens lack the family's end token, and the first example's
  exact ids and loss mask.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any, Optional

from dft import DftError

log = logging.getLogger(__name__)


def new_audit(kind: str, rows_given: int, policy: str, max_length: Optional[int]) -> dict:
    """An empty audit record (counters at zero) for a stage about to be prepared."""
    return {
        "rows_given": rows_given,
        "truncation": policy,
        "max_length": max_length,
        "rows_dropped": {"long_prompt": 0, "cut_completion": 0, "cut_prompt": 0},
        "rows_truncated": {"prompt": 0, "completion": 0, "end_token": 0},
    }


def chat_ids(tok, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
    """Ids of ``messages`` through the tokenizer's chat template, the call TRL makes (no BOS added)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def end_length(prompt_len: int, completion: list[int], end_id: int) -> int:
    """Tokens needed to keep the completion's last ``end_id`` (prompt included); 0 when it has none."""
    for j in range(len(completion) - 1, -1, -1):
        if completion[j] == end_id:
            return prompt_len + j + 1
    return 0


def sft_lengths(dataset, tok, end_id: int) -> list[tuple[int, int, int]]:
    """``(prompt, total, end)`` token counts of every prompt-completion row, tokenized as TRL does."""
    out = []
    for prompt, completion in zip(dataset["prompt"], dataset["completion"]):
        p = chat_ids(tok, prompt, add_generation_prompt=True)
        full = chat_ids(tok, prompt + completion)
        n = 0
        while n < min(len(p), len(full)) and p[n] == full[n]:  # TRL's common_prefix_length
            n += 1
        out.append((n, len(full), end_length(n, full[n:], end_id)))
    return out


def apply_policy(kind: str, policy: str, lengths: list[tuple[int, int, int]], ids: list[str],
                 max_length: Optional[int], audit: dict, *, cut_part: str = "completion") -> list[int]:
    """Indices of the rows to keep under ``policy``; counts go into ``audit``.

    ``lengths[i] = (prompt, total, end)`` tokens (``end``: tokens needed to keep the end token, 0 if the row
    has none). A row with ``total > max_length`` is cut: in its ``cut_part`` (``completion`` when the trainer
    keeps the start, ``prompt`` with ``truncation_mode: keep_end``). ``drop`` removes it
    (``rows_dropped.cut_<part>``), ``keep`` keeps it (``rows_truncated.<part>``, and ``rows_truncated.end_token``
    when the end token is lost), ``error`` raises.

    Raises:
        DftError: ``policy == 'error'`` and a row would be cut (names the row id and the settings to change).
    """
    if not max_length:
        return list(range(len(lengths)))
    keep: list[int] = []
    for i, (_, total, end) in enumerate(lengths):
        if total <= max_length:
            keep.append(i)
            continue
        end_lost = cut_part == "completion" and (end == 0 or end > max_length)
        if policy == "error":
            what = "answer and its end token" if end_lost else ("prompt's start" if cut_part == "prompt" else "answer")
            raise DftError(
                f"stage {kind}: row {ids[i]!r} is {total} tokens, over max_length={max_length}: its {what} would be cut; "
                f"raise strategy.{kind}.trainer.max_length or set strategy.{kind}.truncation=drop (or keep)"
            )
        if policy == "drop":
            audit["rows_dropped"][f"cut_{cut_part}"] += 1
            continue
        audit["rows_truncated"][cut_part] += 1
        audit["rows_truncated"]["end_token"] += int(end_lost)
        keep.append(i)
    n_cut = len(lengths) - len(keep) if policy == "drop" else audit["rows_truncated"][cut_part]
    if n_cut:
        if policy == "drop":
            log.warning("stage %s: dropped %d of %d rows whose %s does not fit in max_length=%d tokens "
                        "(strategy.%s.truncation=drop); raise strategy.%s.trainer.max_length to keep them",
                        kind, n_cut, len(lengths), cut_part, max_length, kind, kind)
        else:
            log.warning("stage %s: %d of %d rows train on a cut %s (%d lose their end token) at max_length=%d "
                        "(strategy.%s.truncation=keep)", kind, n_cut, len(lengths), cut_part,
                        audit["rows_truncated"]["end_token"], max_length, kind)
    return keep


def _spread(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": float(statistics.median(values)), "max": max(values)}


def _row(ids, mask) -> dict:
    return {"input_ids": [int(i) for i in ids], "loss_mask": [int(m) for m in mask]}


def audit_trainer_data(kind: str, trainer, tok, end: tuple[str, int], audit: dict, *,
                       nll_over: Optional[str] = None) -> dict:
    """Fill ``audit`` from the trainer's own dataset and collator (what the model is fed); return it.

    Adds ``rows`` (trained examples), ``sequences`` (dataset rows: packed blocks for packed SFT/CPT),
    ``supervised_tokens`` (``labels != -100``; for pairs, chosen + rejected completion tokens after
    truncation), ``tokens_per_row`` (min / median / max tokens of one example as trained; CPT: of one
    document as tokenized, before packing splits it; pairs: of each side),
    ``packing_efficiency`` (tokens / (blocks x max_length); null when not packed), ``end_token``,
    ``rows_missing_end_token`` (examples whose supervised tokens hold no end token: cut answers; for CPT,
    documents minus document-end tokens) and ``first_example`` (the collator's output for the first
    dataset row: ``input_ids``, ``loss_mask``, the decoded ``text``; chosen and rejected for pairs).

    Raises:
        DftError: a row misses its end token while ``truncation`` is ``drop`` or ``error`` (dft's length
            plan and TRL's tokenization disagree: nothing may train on a cut answer silently).
    """
    ds = trainer.train_dataset
    max_length = audit["max_length"]
    token, end_id = end
    audit["end_token"] = {"token": token, "id": end_id}
    first = trainer.data_collator([ds[0]])
    if kind in ("cpt", "sft"):
        cols = ds.column_names
        all_ids, all_labels = ds["input_ids"], ds["labels"]
        seqs = ds["seq_lengths"] if "seq_lengths" in cols else [[len(x)] for x in all_ids]
        supervised, per_row, missing, ends = 0, [], 0, 0
        for ids, labels, lens in zip(all_ids, all_labels, seqs):
            supervised += sum(1 for t in labels if t != -100)
            ends += sum(1 for t in ids if t == end_id)
            start = 0
            for n in lens:
                per_row.append(int(n))
                if kind == "sft" and end_id not in labels[start:start + n]:
                    missing += 1
                start += n
        packed = "seq_lengths" in cols
        n_tokens = sum(len(x) for x in all_ids)
        audit.update(
            rows=audit.get("rows", len(per_row)), sequences=len(ds), supervised_tokens=supervised,
            tokens_per_row=audit.pop("_doc_lengths", None) or _spread(per_row),
            packing_efficiency=round(n_tokens / (len(ds) * max_length), 4) if packed and max_length else None,
        )
        if kind == "cpt":  # every document ends with the document-end token unless a non-splitting pack cut it
            missing = max(audit["rows"] - ends, 0)
        audit["rows_missing_end_token"] = missing
        ids0 = first["input_ids"][0].tolist()
        mask0 = (first["labels"][0] != -100).long().tolist()
        audit["first_example"] = {**_row(ids0, mask0), "text": tok.decode(ids0)}
    else:
        audit.update(rows=len(ds), sequences=len(ds), packing_efficiency=None)
        supervised, per_row, missing = 0, [], 0
        if kind == "dpo":
            keep_end = audit.get("truncation_mode") == "keep_end"  # the collator cuts the prompt's start instead
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]):
                room = max(max_length - len(p), 0) if max_length else None
                for comp in (c, r):
                    if keep_end:
                        kept = comp[-max_length:] if max_length else comp
                        n = min(len(p) + len(comp), max_length) if max_length else len(p) + len(comp)
                    else:
                        kept = comp[:room] if room is not None else comp
                        n = len(p) + len(kept)
                    supervised += len(kept)
                    per_row.append(n)
                    missing += int(end_id not in kept)
            att, comp = first["attention_mask"], first["completion_mask"]
            sides = {"chosen": 0, "rejected": 1}
            fe = {}
            for side, j in sides.items():
                n = int(att[j].sum())
                ids0 = first["input_ids"][j][:n].tolist()
                fe[side] = {**_row(ids0, comp[j][:n].tolist()), "text": tok.decode(ids0)}
        else:  # orpo: labels hold -100 over the prompt
            for side in ("chosen", "rejected"):
                for ids, labels in zip(ds[f"{side}_input_ids"], ds[f"{side}_labels"]):
                    sup = [t for t in labels if t != -100]
                    supervised += len(sup)
                    per_row.append(len(ids))
                    missing += int(end_id not in sup)
            fe = {}
            for side in ("chosen", "rejected"):
                n = int(first[f"{side}_attention_mask"][0].sum())
                ids0 = first[f"{side}_input_ids"][0][:n].tolist()
                mask0 = (first[f"{side}_labels"][0][:n] != -100).long().tolist()
                fe[side] = {**_row(ids0, mask0), "text": tok.decode(ids0)}
            fe["nll_mask"] = [1] * len(fe["chosen"]["input_ids"]) if nll_over == "prompt_and_completion" \
                else fe["chosen"]["loss_mask"]
            audit["nll_over"] = nll_over
        audit.update(supervised_tokens=supervised, tokens_per_row=_spread(per_row), rows_missing_end_token=missing,
                     first_example=fe)
    if audit["rows_missing_end_token"] and audit["truncation"] != "keep":
        raise DftError(f"stage {kind}: {audit['rows_missing_end_token']} trained examples have no {token!r} "
                       f"among their supervised tokens although strategy.{kind}.truncation={audit['truncation']}")
    return audit
