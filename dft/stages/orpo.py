"""Odds-ratio preference optimisation (ORPO; Hong et al. 2024, arXiv 2403.07691).

Glue over ``trl.experimental.orpo`` (moved there in TRL 1.0). Same data as DPO; ORPO needs no
reference model: its loss is the SFT NLL on ``chosen`` plus ``beta`` times the log odds-ratio
term.
"""

from __future__ import annotations

from dft.stages.dpo import build_dataset  # noqa: F401  (same conversational preference data)


def trainer_classes():
    """``(ORPOConfig, ORPOTrainer)`` from ``trl.experimental.orpo``."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer
