"""Supervised fine-tuning (SFT) on chat-formatted Q&A, loss on the assistant turn only.

Each conversation becomes a conversational *prompt-completion* example: ``prompt`` is every
turn before the last, ``completion`` the final assistant turn. TRL renders both with the model's
chat template and, for prompt-completion data, computes the loss on the completion tokens only
(``completion_only_loss``), which includes the end-of-turn token the template emits. The
family's system-message policy (:func:`dft.families.apply_system_policy`) is applied first.
"""

from __future__ import annotations

from dft.families import to_prompt_completion


def trainer_classes():
    """``(trl.SFTConfig, trl.SFTTrainer)``."""
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


def build_dataset(rows: list[dict], tokenizer, model_cfg):
    """``{"messages"}`` rows -> conversational prompt-completion ``datasets.Dataset``."""
    from dft.stages import rows_as_dataset

    return rows_as_dataset([to_prompt_completion(r["messages"], model_cfg) for r in rows])
