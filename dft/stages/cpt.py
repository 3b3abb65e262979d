"""Continued pretraining (CPT): causal LM loss on raw domain text, packed.

Glue over ``trl.SFTTrainer`` with a language-modelling dataset. dft tokenizes the documents itself
(:func:`build_dataset`): the tokenizer's own special tokens (one BOS for Llama 3.1 and Mistral, none
for SmolLM) and then the family's **document-end** token (:data:`dft.families.DOC_END_TOKENS`:
``<|end_of_text|>``, ``</s>``, ``<|endoftext|>``), never an instruct tokenizer's turn-end EOS, which
TRL would append. TRL then packs the ids into ``max_length`` blocks with best-fit decreasing. dft's
default ``packing_strategy: bfd_split`` splits a document longer than a block into several
sequences instead of truncating it, so no corpus token is dropped; packed sequences carry
restarting ``position_ids``, from which transformers builds a block-diagonal causal mask, so
no document attends across a boundary (tested in ``tests/test_stages.py``).
"""

from __future__ import annotations


def trainer_classes():
    """``(trl.SFTConfig, trl.SFTTrainer)``."""
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


def build_dataset(rows: list[dict], tokenizer, model_cfg):
    """``{"text"}`` rows -> ``datasets.Dataset`` with one column ``input_ids``: each document's ids
    (``tokenizer(text)``, special tokens included) followed by the family's document-end token
    (not repeated when the text already ends with it).

    Raises:
        DftError: the family's document-end token is not in the vocabulary.
    """
    from dft.families import doc_end_token
    from dft.stages import rows_as_dataset

    _, end_id = doc_end_token(tokenizer, model_cfg)
    encoded = tokenizer([r["text"] for r in rows])["input_ids"]
    return rows_as_dataset([{"input_ids": list(ids) + ([] if ids and ids[-1] == end_id else [end_id])}
                            for ids in encoded])
