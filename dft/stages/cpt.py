"""Continued pretraining (CPT): causal LM loss on raw domain text, packed.

Glue over ``trl.SFTTrainer`` with a language-modelling dataset (``{"text"}``): TRL tokenizes,
appends EOS, and packs documents into ``max_length`` blocks with best-fit decreasing. dft's
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
    """``{"text"}`` rows -> ``datasets.Dataset`` with one column ``text``."""
    from dft.stages import rows_as_dataset

    return rows_as_dataset([{"text": r["text"]} for r in rows])
