"""Typed schema of ``python -m dft.data build`` (``conf/databuild/build.yaml``); no torch import here.

Registered in Hydra's ConfigStore under names prefixed ``databuild_`` so that they never collide with the
training app's schema. An unknown key or a wrong type fails at compose time with the full key
(``Key 'chunk.tokenz' not in 'ChunkConfig'``); allowed values are checked in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

GENERATOR_KINDS = ("local", "openai")
FORMATS = ("pdf", "md", "txt", "jsonl")
TEXT_SOURCES = ("chunks", "summaries", "facts")


@dataclass
class GeneratorConfig:
    """Who writes the Q&A pairs, facts, summaries and wrong answers.

    ``local``: a Hugging Face causal LM run in-process (greedy, batched); ``model`` names a ``conf/model``
    option (its pad/end tokens and chat template are reused), ``path`` overrides where its weights are.
    ``openai``: any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint; ``model`` is the
    endpoint's model name and the key is read from the environment variable ``api_key_env``.
    """

    kind: str = "local"
    model: str = "smollm2_135m"
    path: Optional[str] = None  #: local: HF folder that overrides the model option's weights
    device: str = "auto"  #: local: ``auto`` | ``cpu`` | ``cuda``
    batch_size: int = 8  #: local: prompts per ``generate`` call
    max_new_tokens: int = 512
    temperature: Optional[float] = 0.0  #: local generation is always greedy; null: not sent to the endpoint
    base_url: Optional[str] = None  #: openai: e.g. ``https://api.openai.com/v1``
    api_key_env: Optional[str] = "OPENAI_API_KEY"  #: openai: env var holding the key (null: no key)
    max_tokens_field: str = "max_tokens"  #: openai: ``max_tokens`` or ``max_completion_tokens``
    json_mode: bool = False  #: openai: send ``response_format: {type: json_object}``
    max_workers: int = 8  #: openai: concurrent requests
    timeout_s: float = 120.0  #: openai: per request
    max_retries: int = 6  #: openai: retries on 408/409/429/5xx, connection errors and timeouts
    backoff_s: float = 1.0  #: openai: first wait; doubles per retry (``Retry-After`` wins when given)
    backoff_max_s: float = 60.0
    extra: Dict[str, Any] = field(default_factory=dict)  #: openai: extra request-body fields (top_p, seed ...)
    #: ``extractive``: for a chunk whose replies give no valid Q&A pair, take pairs from the text itself
    #: (definitions "X is ...", else sentence completions), and for a pair without a valid wrong answer use
    #: another question's answer as the rejected one (dft.databuild.extractive; rows say so in provenance);
    #: ``none``: only what the generator wrote
    fallback: str = "none"


@dataclass
class PromptsConfig:
    """A versioned prompt set. Placeholders: ``{chunk}``, ``{n_questions}``, ``{n_facts}``, ``{question}``,
    ``{answer}``; any other brace (e.g. a JSON example) is left alone."""

    version: str = MISSING
    system: str = ""  #: system turn of every generator request ("" = none)
    qa: str = MISSING  #: -> ``{"pairs": [{"question", "answer"}, ...]}``
    facts: str = MISSING  #: -> ``{"facts": [str, ...]}``
    summary: str = MISSING  #: -> ``{"summary": str}``
    wrong_answer: str = MISSING  #: -> ``{"wrong_answer": str}``
    n_questions: int = 3
    n_facts: int = 5
    sft_system: Optional[str] = None  #: system turn of the SFT rows (null = none)


@dataclass
class ChunkConfig:
    tokens: int = 512  #: target chunk length in tokens of ``tokenizer``
    overlap: int = 0  #: tokens shared by consecutive chunks (0 keeps held-out chunks disjoint from training)
    min_tokens: int = 32  #: a shorter tail is merged into the previous chunk; a shorter document is skipped
    tokenizer: str = "smollm2_135m"  #: a ``conf/model`` option, or a path / hub id of a HF tokenizer


@dataclass
class CleanConfig:
    fix_hyphenation: bool = True  #: ``exam-\nple`` -> ``example`` (PDF line breaks)
    join_lines: bool = True  #: single newlines inside a paragraph become spaces (PDF, text)
    drop_references: bool = True  #: cut a trailing "References"/"Bibliography" section
    min_chars: int = 200  #: documents shorter than this after cleaning are skipped (reported)


@dataclass
class EvalGuardConfig:
    """Evaluation material that must never reach a training split."""

    exclude: List[str] = field(default_factory=list)  #: globs (relative to ``source``) of eval documents
    item_field: str = "split"  #: JSONL items whose ``item_field`` is in ``item_values`` are eval material
    item_values: List[str] = field(default_factory=lambda: ["eval", "test", "validation"])
    benchmarks: List[str] = field(default_factory=list)  #: MCQ files (JSONL/CSV/Parquet) to guard against
    domains: List[str] = field(default_factory=list)  #: ``conf/data`` options whose ``eval`` files to guard against
    ngram: int = 13  #: a chunk or generated row sharing a word n-gram with eval material is removed
    min_question_words: int = 6  #: shorter benchmark questions are matched only exactly (too generic otherwise)


@dataclass
class BuildConfig:
    name: str = MISSING  #: domain name: ``<out>/<name>/`` and ``conf/data/<name>.yaml``
    source: str = MISSING  #: folder of documents (searched recursively)
    out: str = "data"
    data_conf_dir: Optional[str] = None  #: where ``<name>.yaml`` goes; null = the repository's ``conf/data``
    cache_dir: str = MISSING  #: converted models (shared with ``dft.train``'s ``paths.cache``)
    call_cache: str = MISSING  #: generator responses, keyed by sha256(prompt, model id, parameters)
    formats: List[str] = field(default_factory=lambda: list(FORMATS))
    jsonl_text_field: str = "text"
    heldout_fraction: float = 0.05  #: of the chunks, for perplexity (at least one when there are two or more)
    text_include: List[str] = field(default_factory=lambda: ["chunks"])  #: + ``summaries``, ``facts``
    max_chunks: Optional[int] = None  #: generate from the first N training chunks only (null = all)
    seed: int = 1234
    force: bool = False  #: overwrite a ``conf/data/<name>.yaml`` that this tool did not write
    progress: bool = True  #: tqdm bars (stderr)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    eval_guard: EvalGuardConfig = field(default_factory=EvalGuardConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="databuild_schema", node=BuildConfig)
    cs.store(group="generator", name="databuild_generator_schema", node=GeneratorConfig)
    cs.store(group="prompts", name="databuild_prompts_schema", node=PromptsConfig)


def validate(cfg: Any) -> None:
    """Check what the schema cannot type; raise :class:`dft.DftError` naming the key."""
    from omegaconf import OmegaConf

    from dft import DftError

    for key in ("name", "source"):
        if OmegaConf.is_missing(cfg, key):
            raise DftError(f"{key}= is required (e.g. python -m dft.data build source=papers/ name=silk)")

    def choice(key: str, value: Any, allowed) -> None:
        if value not in allowed:
            raise DftError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")

    choice("generator.kind", cfg.generator.kind, GENERATOR_KINDS)
    choice("generator.device", cfg.generator.device, ("auto", "cpu", "cuda"))
    choice("generator.fallback", cfg.generator.fallback, ("none", "extractive"))
    for i, f in enumerate(cfg.formats):
        choice(f"formats[{i}]", f, FORMATS)
    for i, t in enumerate(cfg.text_include):
        choice(f"text_include[{i}]", t, TEXT_SOURCES)
    if "chunks" not in cfg.text_include:
        raise DftError("text_include must contain 'chunks' (the CPT split is the documents' text)")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise DftError(f"heldout_fraction={cfg.heldout_fraction} must be in [0, 1)")
    if cfg.chunk.tokens < 16:
        raise DftError(f"chunk.tokens={cfg.chunk.tokens} is too small (>= 16)")
    if not 0 <= cfg.chunk.overlap < cfg.chunk.tokens // 2:
        raise DftError(f"chunk.overlap={cfg.chunk.overlap} must be in [0, chunk.tokens/2)")
    if cfg.generator.kind == "openai" and not cfg.generator.base_url:
        raise DftError("generator=openai needs generator.base_url (e.g. https://api.openai.com/v1)")
    if cfg.generator.max_new_tokens < 1 or cfg.generator.batch_size < 1 or cfg.generator.max_workers < 1:
        raise DftError("generator.max_new_tokens, batch_size and max_workers must be >= 1")
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", cfg.name):
        raise DftError(f"name={cfg.name!r}: use letters, digits, '_', '-', '.' (it becomes a folder and a config option)")
