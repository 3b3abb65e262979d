"""Training stages: thin glue over TRL trainers.

Each stage module exposes ``build_dataset(rows, tokenizer, model_cfg) -> datasets.Dataset`` and
``trainer_classes() -> (ConfigClass, TrainerClass)``; :func:`train_stage` does the rest the same
way for all four: TRL config from YAML (TRL rejects unknown keys), hardware precision settings,
resume from the last checkpoint, save a plain HF folder (LoRA merged into an unquantised base).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dft import DftError
from dft.faults import fault_point

log = logging.getLogger(__name__)


def stage_module(kind: str):
    """The module implementing stage ``kind`` (``cpt``, ``sft``, ``dpo``, ``orpo``)."""
    return importlib.import_module(f"dft.stages.{kind}")


def hardware_overrides(trainer_kwargs: dict, device: str, peft_cfg: Any) -> dict:
    """Precision and memory settings the hardware can run, applied unless the YAML sets them.

    Without CUDA, TRL's defaults (bf16, gradient checkpointing) either fail ("doesn't support
    bf16") or run ~13x slower (DESIGN.md §6), so they are turned off and dft says so. On CUDA the
    paper's settings apply: bf16 where supported, gradient checkpointing for full fine-tuning.
    """
    out: dict[str, Any] = {}
    gc = peft_cfg.gradient_checkpointing
    if device == "cpu":
        out.update(bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=bool(gc) if gc is not None else False)
    else:
        import torch

        out.update(bf16=torch.cuda.is_bf16_supported(), fp16=not torch.cuda.is_bf16_supported(),
                   gradient_checkpointing=True if gc is None else bool(gc))
    if "activation_checkpointing" in trainer_kwargs:  # the newer name of the same setting, set by the YAML
        out.pop("gradient_checkpointing", None)
    return {k: v for k, v in out.items() if k not in trainer_kwargs}


#: transformers renamed the trainer's ``gradient_checkpointing*`` to ``activation_checkpointing*``
#: (the old names still work until v6, each with a FutureWarning); dft's YAML may use either.
_RENAMED = (("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def build_trl_config(kind: str, trainer_kwargs: dict, *, output_dir: str, device: str, peft_cfg: Any,
                     model_cfg: Any, report_to: str, seed: int):
    """Build the TRL config object for a stage from its YAML ``trainer`` dict.

    The YAML keys are TRL field names passed through unchanged, so TRL's dataclass rejects an
    unknown key. dft only adds: ``output_dir``, ``report_to``, ``seed``, ``max_length`` (the
    model's, unless set) and the hardware settings of :func:`hardware_overrides`.

    Raises:
        DftError: naming ``strategy.<stage>.trainer.<key>`` when TRL rejects a key.
    """
    config_cls, _ = stage_module(kind).trainer_classes()
    kwargs = dict(trainer_kwargs)
    fields = inspect.signature(config_cls).parameters
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise DftError(
            f"strategy.{kind}.trainer.{unknown[0]} is not a field of {config_cls.__module__}.{config_cls.__name__}"
        )
    kwargs.setdefault("max_length", model_cfg.max_length)
    kwargs.update(hardware_overrides(kwargs, device, peft_cfg))
    for old, new in _RENAMED:
        if new in fields and old in kwargs and kwargs.get(new) is None:
            kwargs[new] = kwargs.pop(old)
    kwargs.update(output_dir=output_dir, report_to=report_to, seed=seed)
    kwargs.setdefault("save_strategy", "steps")
    kwargs.setdefault("dataloader_num_workers", 0)
    kwargs.setdefault("disable_tqdm", False)
    if kind in ("cpt", "sft"):
        kwargs.setdefault("dataset_num_proc", None)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DftError(f"strategy.{kind}.trainer: {config_cls.__name__} rejected the config: {e}") from None


def last_checkpoint(output_dir: Path) -> str | None:
    """Newest ``checkpoint-<step>`` folder that holds a complete trainer state, or None."""
    if not output_dir.is_dir():
        return None
    cks = sorted(
        (p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return str(cks[-1]) if cks else None


def drop_prompts_filling_max_length(dataset, tokenizer, max_length: int | None, kind: str):
    """Drop prompt-completion / preference rows whose prompt alone fills ``max_length`` tokens
    (the prompt rendered by the chat template with the generation prompt that opens the assistant
    turn, as the trainer tokenizes it).

    TRL truncates such a row to its prompt: an SFT row then has no loss token, and a DPO/ORPO
    pair has empty completions, whose mean log-probability is 0/0. ORPO (``trl.experimental``)
    turns that into NaN gradients that poison every weight (LoRA included) while
    ``logging_nan_inf_filter`` logs the loss as 0. Returns ``(dataset, n_dropped)``; the count is
    logged and recorded in the stage's facts. Rows without a ``prompt`` column pass unchanged.
    """
    if not max_length or "prompt" not in dataset.column_names:
        return dataset, 0
    texts = [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
             for prompt in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n < max_length]
    dropped = len(dataset) - len(keep)
    if dropped:
        log.warning("stage %s: dropped %d of %d rows whose prompt alone fills max_length=%d tokens "
                    "(nothing left to train on); raise strategy.%s.trainer.max_length to keep them",
                    kind, dropped, len(dataset), max_length, kind)
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise DftError(f"stage {kind}: every row's prompt fills max_length={max_length}; "
                       f"raise strategy.{kind}.trainer.max_length")
    return dataset, dropped


def check_finite(trainer, kind: str) -> None:
    """Raise if training diverged: a non-finite logged loss or grad norm, or a trainable weight
    that is NaN/inf. (transformers' ``logging_nan_inf_filter`` logs a NaN loss as the running
    mean, so the final ``training_loss`` alone can look fine.)

    Raises:
        DftError: naming the first logged step with a non-finite value, or the first bad weight.
    """
    import torch

    for entry in trainer.state.log_history:
        bad = [k for k in ("loss", "grad_norm") if k in entry and not math.isfinite(float(entry[k]))]
        if bad:
            raise DftError(f"stage {kind}: training diverged ({bad[0]}={entry[bad[0]]} at step {entry.get('step')}); "
                           f"lower strategy.{kind}.trainer.learning_rate or check the data")
    for name, param in trainer.model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise DftError(f"stage {kind}: training diverged (non-finite weights in {name}); "
                           f"lower strategy.{kind}.trainer.learning_rate or check the data")


def run_or_restore(trainer, work_dir: Path, kind: str) -> tuple[str | None, float]:
    """Train (resuming from the newest checkpoint in ``work_dir``), or, when that checkpoint is
    at the last step, load it without training again; SIGTERM/SIGUSR2 during training save a
    checkpoint at the next step boundary and exit (:mod:`dft.stages.resume`).

    Returns ``(checkpoint resumed from or None, mean training loss over the whole run)``.
    """
    from dft.stages import resume as rs

    signals = rs.PreemptionSignals()
    rs.install(trainer, signals)
    ckpt = last_checkpoint(work_dir)
    if rs.finished_checkpoint(ckpt, trainer.args.max_steps):
        rs.restore_finished(trainer, ckpt)
        loss = rs.whole_run_loss(trainer.state.log_history, trainer.state.global_step)
    else:
        if ckpt:
            log.info("stage %s: resuming from %s", kind, ckpt)
            rs.restore_token_count(trainer, ckpt)
        with signals:
            result = trainer.train(resume_from_checkpoint=ckpt)
        signals.hand_over()  # exits here after a preemption signal (the checkpoint is written)
        loss = rs.whole_run_loss(trainer.state.log_history, trainer.state.global_step)
        if loss is None:  # a history without a log at the last step (not written by dft)
            loss = float(result.training_loss)
    if loss is None:
        raise DftError(f"stage {kind}: {ckpt} has no logged loss up to its last step; delete {work_dir} to retrain")
    loss = float(loss)
    if not math.isfinite(loss):
        raise DftError(f"stage {kind}: training loss is {loss} (diverged); lower strategy.{kind}.trainer.learning_rate")
    return ckpt, loss


def train_stage(
    *,
    kind: str,
    stage_cfg: Any,
    rows: list[dict],
    start_path: Path,
    model_cfg: Any,
    peft_cfg: Any,
    work_dir: Path,
    out_dir: Path,
    device: str,
    report_to: str,
    seed: int,
    save: bool = True,
) -> dict:
    """Train one stage from ``start_path`` and save a plain HF model folder at ``out_dir``.

    ``work_dir`` holds TRL checkpoints (resumed from the newest after a preemption); ``out_dir``
    is written atomically (a ``.tmp`` sibling renamed into place); in a multi-process (DDP) job
    every rank trains and only the rank with ``save=True`` writes it. Returns training facts:
    ``train_loss``, ``runtime_s``, ``steps``, ``trainable_params``, ``total_params``,
    ``log_history`` (TRL's list of logged dicts).
    """
    import torch
    from transformers import set_seed

    from dft.modeling import count_parameters, load_model, load_tokenizer, peft_config, save_merged

    set_seed(seed)
    mod = stage_module(kind)
    tok = load_tokenizer(start_path, model_cfg)
    trainer_kwargs = OmegaConf.to_container(stage_cfg.trainer, resolve=True) if not isinstance(stage_cfg.trainer, dict) else dict(stage_cfg.trainer)
    args = build_trl_config(kind, trainer_kwargs, output_dir=str(work_dir), device=device, peft_cfg=peft_cfg,
                            model_cfg=model_cfg, report_to=report_to, seed=seed)
    dataset = mod.build_dataset(rows, tok, model_cfg)
    dataset, dropped = drop_prompts_filling_max_length(dataset, tok, getattr(args, "max_length", None), kind)
    model = load_model(start_path, model_cfg, device=device, peft_cfg=peft_cfg, for_training=True)
    model.config.pad_token_id = tok.pad_token_id
    _, trainer_cls = mod.trainer_classes()
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=dataset, processing_class=tok)
    pc = peft_config(peft_cfg, model_cfg)
    if pc is not None:
        kwargs["peft_config"] = pc
    trainer = trainer_cls(**kwargs)
    trainable, total = count_parameters(trainer.model)
    log.info("stage %s: %d rows, %s trainable / %s parameters (%.2f%%), device %s", kind, len(dataset),
             f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1), device)
    t0 = time.time()
    resume, loss = run_or_restore(trainer, work_dir, kind)
    runtime = time.time() - t0
    check_finite(trainer, kind)
    if save:
        tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_merged(trainer.model, start_path, model_cfg, tmp, tok)
        fault_point("final_save")
        os.replace(tmp, out_dir)
    facts = {
        "train_loss": loss,
        "runtime_s": runtime,
        "steps": int(trainer.state.global_step),
        "rows": len(dataset),
        "rows_dropped_long_prompt": dropped,
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from": Path(resume).name if resume else None,
        "log_history": trainer.state.log_history,
    }
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return facts


def rows_as_dataset(rows: list[dict]):
    """``datasets.Dataset`` from a list of dicts (kept in memory; no cache files written)."""
    from datasets import Dataset

    return Dataset.from_list(rows)


def dump_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
