"""Per-family tokenizer rules: pad token, end-of-turn tokens, chat template, system-message policy.

One place decides how a conversation becomes tokens for a model family, and every stage
(SFT, DPO/ORPO) and the evaluation use it, so training and evaluation render identically.
"""

from __future__ import annotations

from typing import Any

from dft import DftError


def prepare_tokenizer(tok, model_cfg: Any):
    """Apply ``model_cfg`` to a freshly loaded tokenizer and return it.

    * ``chat_template`` from the config replaces the tokenizer's (base models ship none);
    * the pad token is ``model_cfg.pad_token``; it must exist in the vocabulary (adding a token
      would change the vocab size and break merging) and must differ from every end token
      (pad == EOS masks EOS out of the labels and the model never learns to stop);
    * ``padding_side`` is right for training; generation code pads left itself.

    Raises:
        DftError: pad token missing from the vocabulary, or equal to an end token.
    """
    if model_cfg.chat_template:
        tok.chat_template = model_cfg.chat_template
    ends = set(model_cfg.eos_tokens) | ({tok.eos_token} if tok.eos_token else set())
    pad = model_cfg.pad_token
    if pad is not None:
        pid = tok.convert_tokens_to_ids(pad)
        if pid is None or (tok.unk_token_id is not None and pid == tok.unk_token_id and pad != tok.unk_token):
            raise DftError(f"model.pad_token={pad!r} is not in the vocabulary of {model_cfg.name}")
        tok.pad_token = pad
    if tok.pad_token is None:
        raise DftError(f"model {model_cfg.name} has no pad token: set model.pad_token to an unused token of its vocabulary")
    if tok.pad_token in ends:
        raise DftError(
            f"model.pad_token={tok.pad_token!r} equals an end token of {model_cfg.name} ({sorted(ends)}); "
            "pick a distinct unused token"
        )
    tok.padding_side = "right"
    return tok


def apply_system_policy(messages: list[dict], model_cfg: Any) -> list[dict]:
    """Return ``messages`` rendered per the family's system-message policy.

    ``native``: unchanged. ``merge_into_user`` (Mistral, whose templates have no system turn):
    the system text is prepended to the first user turn, separated by a blank line, so it is
    never dropped silently.
    """
    if model_cfg.system_policy == "native" or not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {"role": "user", "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}] + rest
