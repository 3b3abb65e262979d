"""Odds-ratio preference optimisation (ORPO; Hong et al. 2024, arXiv 2403.07691).

Glue over ``trl.experimental.orpo`` (moved there in TRL 1.0). Same data as DPO; ORPO needs no
reference model: its loss is an NLL term on ``chosen`` plus ``beta`` times the log odds-ratio term.
:class:`DftORPOTrainer` fixes two things TRL's trainer does differently from the paper and from dft's
other stages:

* **Tokens.** TRL appends the tokenizer's EOS after the chat template has already ended the turn
  (SmolLM2 ``<|im_end|>\\n<|im_end|>``, base Llama 3.1 ``<|eot_id|><|end_of_text|>``). dft tokenizes the
  rendered prompt + answer exactly as written by the template (one BOS where the template writes one,
  one end-of-turn token), with labels ``-100`` over the prompt; truncation is left to dft's
  ``strategy.orpo.truncation`` policy (:mod:`dft.stages.audit`).
* **NLL scope** (``strategy.orpo.nll_over``): ``completion`` (default) computes the NLL over the
  chosen response only, the paper's L_SFT (eq. 1-2: the NLL of the response given the prompt) and
  dft's SFT; ``prompt_and_completion`` keeps TRL's choice (every non-pad token of prompt + chosen).
  The setting is recorded in the stage's audit (``nll_over``).
"""

from __future__ import annotations

from dft.stages.dpo import build_dataset  # noqa: F401  (same conversational preference data)

_CLASSES = None


def trainer_classes():
    """``(ORPOConfig, DftORPOTrainer)``: TRL's config and dft's subclass of its ``ORPOTrainer``."""
    global _CLASSES
    if _CLASSES is None:
        import warnings

        with warnings.catch_warnings():
            # TRL warns on every import of trl.experimental; dft knows ORPO lives there (README, pinned TRL)
            warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class DftORPOTrainer(ORPOTrainer):
            """``ORPOTrainer`` with the template's own tokens and a selectable NLL scope (module docstring)."""

            nll_over = "completion"

            def tokenize_row(self, feature, model=None) -> dict:
                """Rendered ``prompt`` / ``prompt + chosen`` / ``prompt + rejected`` text -> ids, no token added,
                no truncation; labels are the ids with ``-100`` over the common prompt prefix."""
                tok = self.processing_class
                prompt_ids = tok(feature["prompt"], add_special_tokens=False)["input_ids"]
                out = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
                for side in ("chosen", "rejected"):
                    full = tok(feature["prompt"] + feature[side], add_special_tokens=False)["input_ids"]
                    n = 0
                    while n < min(len(prompt_ids), len(full)) and prompt_ids[n] == full[n]:
                        n += 1
                    out[f"{side}_input_ids"] = full
                    out[f"{side}_attention_mask"] = [1] * len(full)
                    out[f"{side}_labels"] = [-100] * n + full[n:]
                return out

            def concatenated_forward(self, model, batch):
                """TRL's forward; with ``nll_over='completion'`` the NLL term is recomputed over the chosen
                labels (prompt and padding are ``-100``), a mean over the chosen response tokens."""
                import torch.nn.functional as F

                out = super().concatenated_forward(model, batch)
                if self.nll_over == "prompt_and_completion":
                    return out
                chosen_logits = out[2]  # [B, L-1, V]: logits predicting tokens 1..L-1
                labels = batch["chosen_labels"]
                width = chosen_logits.shape[1] + 1
                labels = F.pad(labels, (0, width - labels.shape[1]), value=-100)[:, 1:].to(chosen_logits.device)
                nll = F.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=-100)
                return (*out[:4], nll, *out[5:])

        _CLASSES = (ORPOConfig, DftORPOTrainer)
    return _CLASSES
