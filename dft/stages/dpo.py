"""Direct preference optimisation (DPO; Rafailov et al. 2023, arXiv 2305.18290) via ``trl.DPOTrainer``.

Pairs become conversational preference examples (``prompt`` = a user turn, ``chosen`` /
``rejected`` = one assistant turn each) rendered by the model's chat template. With LoRA, the
frozen base (adapters disabled) is the reference model, so no second copy is loaded.
"""

from __future__ import annotations

from dft.families import apply_system_policy


def trainer_classes():
    """``(trl.DPOConfig, trl.DPOTrainer)``."""
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


def to_preference(row: dict, model_cfg) -> dict:
    """``{prompt, chosen, rejected}`` strings -> conversational preference example."""
    prompt = apply_system_policy([{"role": "user", "content": row["prompt"]}], model_cfg)
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def build_dataset(rows: list[dict], tokenizer, model_cfg):
    """Preference rows -> conversational ``datasets.Dataset`` (prompt, chosen, rejected)."""
    from dft.stages import rows_as_dataset

    return rows_as_dataset([to_preference(r, model_cfg) for r in rows])
