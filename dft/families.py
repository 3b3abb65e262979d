"""Per-family tokenizer rules: pad token, end-of-turn tokens, chat template, system-message policy.

One place decides how a conversation becomes tokens for a model family, and every stage
(SFT, DPO/ORPO) and the evaluation use it, so training and evaluation render identically.

The paper's three families (arXiv 2409.03444) and the embedded default:

* ``llama3`` (Llama 3.1 8B, base and Instruct): Llama 3.1 Instruct template; turns end with
  ``<|eot_id|>``, tool calls with ``<|eom_id|>``, base documents with ``<|end_of_text|>`` (all three
  stop generation); pad ``<|finetune_right_pad_id|>`` (128004, Meta's own pad); the template
  writes ``<|begin_of_text|>``.
* ``mistral`` (Mistral 7B v0.3, base and Instruct): Mistral v0.3 Instruct template; ``</s>`` ends
  turns; pad ``<unk>`` (id 0; the byte-fallback vocabulary never emits it); the template writes
  ``<s>``; no system turn (``system_policy: merge_into_user``).
* ``smollm`` (SmolLM 1.7B, base and Instruct): plain ChatML; ``<|im_end|>`` ends turns and
  ``<|endoftext|>`` documents (the base model's EOS); pad ``<empty_output>`` (id 16, an unused
  special token); no BOS.
* ``smollm2`` (the embedded SmolLM2-135M-Instruct): its shipped ChatML; ``<|im_end|>``; pad
  ``<|endoftext|>`` (its EOS is ``<|im_end|>``); no BOS.

CPT documents end with the family's document-end token (:data:`DOC_END_TOKENS`): ``<|end_of_text|>``
(llama3), ``</s>`` (mistral), ``<|endoftext|>`` (smollm, smollm2), whatever the tokenizer's ``eos_token``
(an instruct tokenizer's is the turn end). Assistant turns end with :data:`TURN_END_TOKENS`.

Rules, each the answer to a known failure (DESIGN.md §6):

* **Pad differs from every end token.** Collators that mask ``labels == pad_token_id`` would
  otherwise mask the end-of-turn token and the model never learns to stop. The pad must already
  exist in the vocabulary: adding a token changes the vocab size and breaks merging.
* **Stop tokens.** Generation stops on every end token of the family (:func:`stop_token_ids`),
  not only the tokenizer's ``eos_token``: Llama 3.1 ends a turn with ``<|eot_id|>``, a tool call
  with ``<|eom_id|>`` and a base-model document with ``<|end_of_text|>``.
* **Same template for base and instruct.** Base models ship no chat template (or a different
  one); the config sets the family's instruct template on both, so a base-started and an
  instruct-started run render identically and their merge is well defined.
* **Deterministic rendering.** Templates are pinned here, not read from whatever hub revision is
  cached. The Llama 3.1 template's date is the fixed string ``26 Jul 2024`` (the default of the
  released 3.1 template; Llama 3.2's template reads the wall clock with ``strftime_now``, which
  would make the training data depend on the day it was rendered).
* **System policy.** Mistral v0.3 has no system turn: its template silently *drops* a system
  message unless the conversation ends on a user turn (always true in generation, never in
  training), so the prompt alone and prompt + answer rendered different prefixes. With
  ``system_policy: merge_into_user`` dft folds the system text into the last user turn first,
  exactly as ``mistral-common`` encodes a system prompt.
* **No doubled BOS.** The Llama and Mistral templates write the BOS themselves, and their
  tokenizers also prepend one when called with ``add_special_tokens=True``. Text rendered by a
  template must be tokenized with ``add_special_tokens=False`` (:func:`encode_rendered`), or through
  ``apply_chat_template(tokenize=True)`` (:func:`encode_chat`, TRL's own path). Raw text (CPT,
  perplexity) is tokenized normally and gets exactly one BOS.

``chat_template`` in a model config is either the name of a template below (``llama3_1``,
``mistral_v0_3``, ``chatml``) or literal Jinja text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from dft import DftError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- chat templates

#: Llama 3.1 Instruct (``meta-llama/Llama-3.1-8B-Instruct``, ``tokenizer_config.json``), with its
#: fixed default date. Tool calling is kept as released; dft does not train it.
LLAMA3_1_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
            {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

#: Mistral 7B Instruct v0.3 (``mistralai/Mistral-7B-Instruct-v0.3``, ``tokenizer_config.json``).
#: A system message is used only when the conversation ends on a user turn; dft's
#: ``merge_into_user`` policy removes it before the template sees it (see module docstring).
MISTRAL_V0_3_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

#: Plain ChatML as shipped by SmolLM 1.7B Instruct (``<|im_start|>role\\n...<|im_end|>\\n``, no
#: BOS, no default system message). SmolLM2 ships a variant that adds a default system turn; the
#: embedded SmolLM2 model keeps its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {
    "llama3_1": LLAMA3_1_TEMPLATE,
    "mistral_v0_3": MISTRAL_V0_3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}


def resolve_chat_template(value: Optional[str]) -> Optional[str]:
    """``model.chat_template`` -> Jinja text: a name from :data:`CHAT_TEMPLATES`, or the text itself."""
    if value is None:
        return None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise DftError(
        f"model.chat_template={value!r} is neither a known template ({', '.join(sorted(CHAT_TEMPLATES))}) nor Jinja text"
    )


# --------------------------------------------------------------------------- tokenizer rules


def _token_id(tok, token: str, vocab: Optional[dict] = None) -> Optional[int]:
    """Id of ``token`` in ``tok``'s vocabulary, or None when it is not there (no unk fallback)."""
    vocab_id = (vocab if vocab is not None else tok.get_vocab()).get(token)
    if vocab_id is None:
        added = {t.content: i for i, t in tok.added_tokens_decoder.items()}
        vocab_id = added.get(token)
    return vocab_id


def end_tokens(tok, model_cfg: Any) -> list[str]:
    """Every token that ends a turn or a document for this model: the config's ``eos_tokens``
    then the tokenizer's own ``eos_token`` (deduplicated, in that order)."""
    out: list[str] = []
    for t in list(model_cfg.eos_tokens) + [tok.eos_token]:
        if t is not None and t not in out:
            out.append(t)
    return out


def prepare_tokenizer(tok, model_cfg: Any):
    """Apply ``model_cfg`` to a freshly loaded tokenizer and return it.

    * ``chat_template`` from the config (a name, see :data:`CHAT_TEMPLATES`, or Jinja text)
      replaces the tokenizer's: base models ship none, and pinning it keeps rendering
      deterministic and identical for base and instruct;
    * every ``eos_tokens`` entry must exist in the vocabulary (they are the stop tokens);
    * the pad token is ``model_cfg.pad_token``; it must exist in the vocabulary (adding a token
      would change the vocab size and break merging) and must differ from every end token
      (pad == EOS masks EOS out of the labels and the model never learns to stop);
    * ``padding_side`` is right for training; generation code pads left itself.

    The tokenizer's ``eos_token`` is left as shipped (base: the document end, instruct: the
    turn end); :func:`stop_token_ids` gives the full stop set.

    Raises:
        DftError: pad or end token missing from the vocabulary, or pad equal to an end token.
    """
    template = resolve_chat_template(model_cfg.chat_template)
    if template:
        tok.chat_template = template
    vocab = tok.get_vocab()  # ~0.1 s for Llama's 128k entries: build it once
    for t in model_cfg.eos_tokens:
        if _token_id(tok, t, vocab) is None:
            raise DftError(f"model.eos_tokens lists {t!r}, which is not in the vocabulary of {model_cfg.name}")
    ends = end_tokens(tok, model_cfg)
    pad = model_cfg.pad_token
    if pad is not None:
        if _token_id(tok, pad, vocab) is None:
            raise DftError(f"model.pad_token={pad!r} is not in the vocabulary of {model_cfg.name}")
        tok.pad_token = pad
    if tok.pad_token is None:
        raise DftError(f"model {model_cfg.name} has no pad token: set model.pad_token to an unused token of its vocabulary")
    end_ids = {_token_id(tok, t, vocab) for t in ends}
    if tok.pad_token in ends or tok.pad_token_id in end_ids:
        raise DftError(
            f"model.pad_token={tok.pad_token!r} equals an end token of {model_cfg.name} ({ends}); "
            "pick a distinct unused token"
        )
    tok.padding_side = "right"
    return tok


def stop_token_ids(tok, model_cfg: Any) -> list[int]:
    """Token ids generation must stop on: every end token of the family (see :func:`end_tokens`)."""
    ids: list[int] = []
    vocab = tok.get_vocab()
    for t in end_tokens(tok, model_cfg):
        i = _token_id(tok, t, vocab)
        if i is not None and i not in ids:
            ids.append(i)
    return ids


#: The token that ends a training document (CPT) per family: the base model's document end, never
#: the instruct tokenizer's turn end (an instruct tokenizer's ``eos_token`` is ``<|im_end|>`` /
#: ``<|eot_id|>``, which CPT would otherwise teach as a document separator).
DOC_END_TOKENS = {"llama3": "<|end_of_text|>", "mistral": "</s>", "smollm": "<|endoftext|>", "smollm2": "<|endoftext|>"}
#: The token the chat template writes at the end of every assistant turn, per family.
TURN_END_TOKENS = {"llama3": "<|eot_id|>", "mistral": "</s>", "smollm": "<|im_end|>", "smollm2": "<|im_end|>"}
#: Families whose chat template requires strictly alternating ``user``/``assistant`` turns after the
#: optional system message (Mistral v0.3's raises a jinja ``TemplateError`` otherwise).
ALTERNATING_FAMILIES = ("mistral",)


def _family_token(table: dict, tok, model_cfg: Any, what: str) -> tuple[str, int]:
    token = table.get(model_cfg.family)
    if token is None:  # a family dft does not know: the first configured end token, else the tokenizer's EOS
        token = (list(model_cfg.eos_tokens) or [tok.eos_token])[0]
    i = _token_id(tok, token)
    if i is None:
        raise DftError(f"the {what} token {token!r} of family {model_cfg.family!r} is not in the vocabulary of {model_cfg.name}")
    return token, i


def doc_end_token(tok, model_cfg: Any) -> tuple[str, int]:
    """``(token, id)`` that CPT appends to every document (:data:`DOC_END_TOKENS`; for an unknown family
    the first of ``model.eos_tokens``).

    Raises:
        DftError: the token is not in the vocabulary.
    """
    return _family_token(DOC_END_TOKENS, tok, model_cfg, "document-end")


def turn_end_token(tok, model_cfg: Any) -> tuple[str, int]:
    """``(token, id)`` the chat template ends an assistant turn with (:data:`TURN_END_TOKENS`).

    Raises:
        DftError: the token is not in the vocabulary.
    """
    return _family_token(TURN_END_TOKENS, tok, model_cfg, "turn-end")


def conversation_problem(messages: list[dict], model_cfg: Any) -> Optional[str]:
    """Why the family's chat template would refuse ``messages`` (after the system policy), or None.

    Mistral v0.3 (:data:`ALTERNATING_FAMILIES`): after an optional system message the roles must
    alternate ``user, assistant, user, ...``, the same test its template makes before raising.
    """
    if model_cfg.family not in ALTERNATING_FAMILIES:
        return None
    turns = [m for m in apply_system_policy(messages, model_cfg) if m["role"] != "system"]
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            roles = ", ".join(t["role"] for t in turns)
            return (f"roles must alternate user/assistant for family {model_cfg.family!r} "
                    f"(turn {i + 1} is '{m['role']}', expected '{want}'; roles: {roles})")
    return None


def apply_system_policy(messages: list[dict], model_cfg: Any) -> list[dict]:
    """Return ``messages`` rendered per the family's system-message policy.

    ``native``: unchanged. ``merge_into_user`` (Mistral, whose templates have no system turn):
    the system text is prepended to the **last** user turn, separated by a blank line, exactly
    where ``mistral-common`` puts a system prompt (``InstructTokenizerV3``), so it is never
    dropped silently. A conversation without a user turn becomes a user turn with the system text.
    """
    if model_cfg.system_policy == "native" or not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    for i in range(len(rest) - 1, -1, -1):
        if rest[i]["role"] == "user":
            rest[i] = {**rest[i], "content": f"{system}\n\n{rest[i]['content']}"}
            return rest
    return [{"role": "user", "content": system}] + rest


def to_prompt_completion(messages: list[dict], model_cfg: Any) -> dict:
    """A conversation as TRL's conversational prompt-completion example.

    The system policy is applied to the whole conversation first, then it is split before the
    last assistant turn: ``{"prompt": [...], "completion": [last assistant turn]}``. TRL's
    ``SFTTrainer`` renders both with the chat template and trains on the completion only
    (``completion_only_loss``), i.e. the assistant text plus its end-of-turn token.

    Raises:
        DftError: the last turn is not the assistant's.
    """
    msgs = apply_system_policy(messages, model_cfg)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DftError("an SFT conversation must end with an assistant turn")
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def render_chat(tok, messages: list[dict], model_cfg: Any, *, add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` after the system policy (deterministic).

    Tokenize the result with :func:`encode_rendered`, never with ``tok(text)``, which would add a
    second BOS for Llama and Mistral.
    """
    if not tok.chat_template:
        raise DftError(f"model {model_cfg.name} has no chat template: set model.chat_template")
    return tok.apply_chat_template(
        apply_system_policy(messages, model_cfg), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_rendered(tok, text: str) -> list[int]:
    """Token ids of text a chat template produced: no special tokens added (the template wrote the BOS)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_chat(tok, messages: list[dict], model_cfg: Any, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the chat template, as TRL tokenizes them.

    Raises:
        DftError: the ids start with two BOS tokens (a template/tokenizer mismatch).
    """
    if not tok.chat_template:
        raise DftError(f"model {model_cfg.name} has no chat template: set model.chat_template")
    out = tok.apply_chat_template(
        apply_system_policy(messages, model_cfg),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
    )
    ids = list(out["input_ids"])
    check_single_bos(tok, ids)
    return ids


def check_single_bos(tok, ids: list[int]) -> None:
    """Raise when ``ids`` starts with the BOS token twice."""
    bos = tok.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        raise DftError(f"doubled BOS ({tok.bos_token!r}) at the start of a tokenized sequence")


# --------------------------------------------------------------------------- real architectures

#: The configs of the paper's models as published on the hub (``config.json``), enough to build
#: a random-weight model of the same shape (``bench/gpu_lora_bench.py``) and to estimate memory
#: without downloading anything. Parameter counts: 8 030 261 248 / 7 248 023 552 / 1 711 376 384.
REAL_ARCH: dict[str, dict[str, Any]] = {
    "llama3_1_8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    ),
    "mistral_7b_v0_3": dict(
        model_type="mistral",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "smollm_1_7b": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def hf_config(arch: dict[str, Any], **overrides):
    """A transformers config object from a :data:`REAL_ARCH`-style dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    kw = {**arch, **overrides}
    model_type = kw.pop("model_type")
    rope_scaling = kw.pop("rope_scaling", None)
    rope_theta = kw.pop("rope_theta", None)
    cfg = AutoConfig.for_model(model_type, **kw)
    # transformers 5 keeps RoPE settings in ``rope_parameters`` (it reads the hub's
    # ``rope_scaling``/``rope_theta`` keys into it when loading a config.json).
    params = {"rope_type": "default"}
    if rope_scaling:
        params.update(rope_scaling)
    if rope_theta is not None:
        params["rope_theta"] = rope_theta
    cfg.rope_parameters = params
    return cfg


# --------------------------------------------------------------------------- tiny models

_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers")
#: Tiny random-weight models with each family's real tokenizer and architecture traits
#: (hidden 64, 2 layers, head_dim 16): fast CPU tests and grids that exercise the real
#: tokenization paths. Values: the config traits kept from the real model.
TINY_SPECS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct traits: Llama architecture, tied embeddings, GQA 3:1 (here 2:1).
    "smollm2": dict(
        model_type="llama", vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # SmolLM 1.7B traits: Llama architecture, tied embeddings, full multi-head attention.
    "smollm": dict(
        model_type="llama", vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=16,
    ),
    # Llama 3.1 8B traits: 128256 vocab, untied, GQA 4:1, llama3 RoPE scaling.
    "llama3": dict(
        {k: v for k, v in REAL_ARCH["llama3_1_8b"].items() if k not in _SIZES},
        num_attention_heads=4, num_key_value_heads=1, pad_token_id=128004,
    ),
    # Mistral 7B v0.3 traits: MistralForCausalLM, 32768 vocab, untied, GQA 4:1, no sliding window.
    "mistral": dict(
        {k: v for k, v in REAL_ARCH["mistral_7b_v0_3"].items() if k not in _SIZES},
        num_attention_heads=4, num_key_value_heads=1, pad_token_id=0,
    ),
}
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16)
TINY_SEED = 0
#: ``model.hub_id`` values that name a tiny model (``dft.modeling.resolve_model_path`` builds it).
TINY_HUB_IDS = {f"dft/tiny-{f}": f for f in TINY_SPECS}
_TINY_RECIPE = "1"


def tiny_family(hub_id: Optional[str]) -> Optional[str]:
    """The tiny family ``hub_id`` names (``dft/tiny-llama3`` -> ``llama3``), else None."""
    return TINY_HUB_IDS.get(hub_id or "")


def _tiny_tokenizer(family: str, cache_dir: Path):
    from transformers import AutoTokenizer

    from dft import tokenizers_offline
    from dft.embedded import ensure_embedded_model

    if family in ("smollm2", "smollm"):
        tok = AutoTokenizer.from_pretrained(ensure_embedded_model(cache_dir))
        if family == "smollm":  # SmolLM 1.7B Instruct: same vocabulary, plain ChatML, <|im_end|> ends turns
            tok.chat_template = CHATML_TEMPLATE
        return tok
    if family == "llama3":
        tok = tokenizers_offline.load_llama3_tokenizer(cache_dir, instruct=True)
        tok.chat_template = LLAMA3_1_TEMPLATE
        return tok
    if family == "mistral":
        tok = tokenizers_offline.load_mistral_v3_tokenizer(cache_dir)
        tok.chat_template = MISTRAL_V0_3_TEMPLATE
        return tok
    raise DftError(f"no tiny model for family {family!r}; known: {', '.join(TINY_SPECS)}")


def tiny_config(family: str):
    """The transformers config of the tiny ``family`` model (random weights come from :data:`TINY_SEED`)."""
    if family not in TINY_SPECS:
        raise DftError(f"no tiny model for family {family!r}; known: {', '.join(TINY_SPECS)}")
    return hf_config(TINY_SPECS[family], **TINY_DIMS)


def ensure_tiny_model(cache_dir: str | os.PathLike, family: str = "smollm2") -> Path:
    """Build (once) a tiny random-weight model of ``family`` with its real tokenizer; return its folder.

    Hidden size 64, 2 layers, fixed seed, fp32 safetensors, plus the family's real tokenizer
    (SmolLM2's from the embedded model, Llama 3.1's and Mistral v0.3's from
    :mod:`dft.tokenizers_offline`) with its chat template, and a ``generation_config.json``
    that stops on every end token. Cached under ``<cache_dir>/models/tiny-<family>-<hash>``;
    written atomically under a file lock (concurrent cells build it once). ~1-5 s after the
    embedded model / offline tokenizer exist.
    """
    import json

    from dft.locks import file_lock

    if family not in TINY_SPECS:
        raise DftError(f"no tiny model for family {family!r}; known: {', '.join(TINY_SPECS)}")
    key = hashlib.sha256(
        json.dumps([_TINY_RECIPE, TINY_SEED, TINY_SPECS[family], TINY_DIMS], sort_keys=True).encode()
    ).hexdigest()[:12]
    out = Path(cache_dir).expanduser() / "models" / f"tiny-{family}-{key}"
    if (out / "config.json").exists():
        return out
    with file_lock(out.with_suffix(".lock")):
        if (out / "config.json").exists():
            return out
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        cfg = tiny_config(family)  # a transformers config: built only to write the model (not to find it)
        tok = _tiny_tokenizer(family, Path(cache_dir).expanduser())
        if len(tok) != cfg.vocab_size:
            raise DftError(f"tiny {family}: tokenizer has {len(tok)} tokens, config {cfg.vocab_size}")
        eos = cfg.eos_token_id
        cfg.architectures = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.generation_config = GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id
        )
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
        log.info("tiny %s model written to %s", family, out)
    return out
