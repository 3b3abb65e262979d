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

import warnings

from omegaconf import OmegaConf

from dft import DftError
from dft.faults import fault_point

# TRL 1.16's generation/reference helpers (trl/models/utils.py) read transformers 5's deprecated
# `model.is_gradient_checkpointing`: one FutureWarning per DPO/ORPO stage that is not ours to fix
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

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
                     model_cfg: Any, report_to: str, seed: int, stage_cfg: Any = None):
    """Build the TRL config object for a stage from its YAML ``trainer`` dict.

    The YAML keys are TRL field names passed through unchanged, so TRL's dataclass rejects an
    unknown key. dft only adds: ``output_dir``, ``report_to``, ``seed``, ``max_length`` (the
    model's, unless set) and the hardware settings of :func:`hardware_overrides`. Settings TRL
    accepts but ignores are refused (:func:`check_trainer_semantics`); with ``stage_cfg`` dft's own
    stage settings are checked too (:func:`check_stage_settings`). The dry run builds every stage's
    config through here, so it refuses the same things a run does.

    Raises:
        DftError: naming ``strategy.<stage>.trainer.<key>`` when TRL rejects a key or ignores it.
    """
    config_cls, _ = stage_module(kind).trainer_classes()
    if stage_cfg is not None:
        check_stage_settings(kind, stage_cfg)
    check_trainer_semantics(kind, trainer_kwargs)
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
    if kind == "orpo":
        # ORPOTrainer's preference collator needs the prompt/chosen/rejected columns: TRL sets this
        # itself with a warning when it is left True (the transformers default)
        kwargs.setdefault("remove_unused_columns", False)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DftError(f"strategy.{kind}.trainer: {config_cls.__name__} rejected the config: {e}") from None


#: ``strategy.<stage>.truncation``: what happens to a row whose completion (or, for CPT without a
#: splitting packing strategy, whose document) does not fit in ``max_length``: ``drop`` it (counted and
#: warned), ``keep`` it cut (counted and warned: the model trains on a cut answer that may lack its end
#: token), or stop with an ``error`` naming the row.
TRUNCATION_POLICIES = ("drop", "keep", "error")
#: ``strategy.orpo.nll_over``: the tokens of ORPO's NLL term. ``completion``: the chosen response only,
#: as the ORPO paper's L_SFT (Hong et al. 2024, arXiv 2403.07691, eq. 1-2: the conditional NLL of the
#: response given the prompt) and as dft's SFT; ``prompt_and_completion``: TRL's ``ORPOTrainer`` (prompt
#: tokens included).
NLL_OVER = ("completion", "prompt_and_completion")
#: DPO loss types whose formula reads ``label_smoothing`` in TRL 1.x (``DPOTrainer.dpo_loss``).
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


def check_stage_settings(kind: str, stage_cfg: Any) -> None:
    """Check dft's own stage settings (``truncation``, ``nll_over``).

    Raises:
        DftError: ``strategy.<stage>.truncation='cut' is not one of drop, keep, error`` (or ``nll_over``).
    """
    trunc = getattr(stage_cfg, "truncation", None) or "drop"
    if trunc not in TRUNCATION_POLICIES:
        raise DftError(f"strategy.{kind}.truncation={trunc!r} is not one of {', '.join(TRUNCATION_POLICIES)}")
    nll = getattr(stage_cfg, "nll_over", None) or "completion"
    if nll not in NLL_OVER:
        raise DftError(f"strategy.{kind}.nll_over={nll!r} is not one of {', '.join(NLL_OVER)}")
    if kind != "orpo" and nll != "completion":
        raise DftError(f"strategy.{kind}.nll_over={nll!r} applies to orpo only (dft's {kind} loss is fixed)")


def check_trainer_semantics(kind: str, trainer_kwargs: dict) -> None:
    """Refuse TRL settings that are accepted but change nothing.

    * DPO ``label_smoothing`` != 0 with only loss types that never read it: TRL 1.x's ``sigmoid`` loss is
      ``-logsigmoid(beta * delta)`` whatever the smoothing (the conservative-DPO form of TRL 0.x is
      gone); only :data:`LABEL_SMOOTHING_LOSSES` use it.

    Raises:
        DftError: ``strategy.dpo.trainer.label_smoothing=0.1 has no effect with loss_type ['sigmoid'] ...``.
    """
    if kind == "dpo":
        smoothing = trainer_kwargs.get("label_smoothing") or 0.0
        loss_types = trainer_kwargs.get("loss_type") or ["sigmoid"]
        loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
        if smoothing and not any(t in LABEL_SMOOTHING_LOSSES for t in loss_types):
            raise DftError(
                f"strategy.dpo.trainer.label_smoothing={smoothing} has no effect with loss_type {loss_types} "
                f"(TRL reads it only for {', '.join(LABEL_SMOOTHING_LOSSES)}): set it to 0 or choose one of those "
                "loss types"
            )


def last_checkpoint(output_dir: Path) -> str | None:
    """Newest ``checkpoint-<step>`` folder that holds a complete trainer state, or None."""
    if not output_dir.is_dir():
        return None
    cks = sorted(
        (p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return str(cks[-1]) if cks else None


def drop_prompts_filling_max_length(dataset, tokenizer, max_length: int | None, kind: str, *, return_kept: bool = False):
    """Drop prompt-completion / preference rows whose prompt alone fills ``max_length`` tokens
    (the prompt rendered by the chat template with the generation prompt that opens the assistant
    turn, as the trainer tokenizes it).

    TRL truncates such a row to its prompt: an SFT row then has no loss token, and a DPO/ORPO
    pair has empty completions, whose mean log-probability is 0/0. ORPO (``trl.experimental``)
    turns that into NaN gradients that poison every weight (LoRA included) while
    ``logging_nan_inf_filter`` logs the loss as 0. Returns ``(dataset, n_dropped)``; the count is
    logged and recorded in the stage's facts. Rows without a ``prompt`` column pass unchanged. With
    ``return_kept``, the indices of the kept rows come third.
    """
    if not max_length or "prompt" not in dataset.column_names:
        return (dataset, 0, list(range(len(dataset)))) if return_kept else (dataset, 0)
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
    return (dataset, dropped, keep) if return_kept else (dataset, dropped)


def prepare_dataset(kind: str, mod, rows: list[dict], tok, model_cfg: Any, args, stage_cfg: Any):
    """The stage's dataset before the trainer is built, with the rows the policy removes already removed.

    Returns ``(dataset, audit, (end_token, end_id))``: the audit record of :func:`dft.stages.audit.new_audit`
    with the counts so far; the end token is the family's document end for CPT, its turn end otherwise.
    Chat stages drop rows whose prompt fills ``max_length`` (:func:`drop_prompts_filling_max_length`); SFT
    applies ``strategy.sft.truncation`` to lengths tokenized as TRL does; CPT applies it to documents
    longer than ``max_length`` unless the packing strategy splits them (``bfd_split``, ``wrapped``).
    """
    from dft.families import doc_end_token, turn_end_token
    from dft.stages import audit as au

    policy = getattr(stage_cfg, "truncation", None) or "drop"
    max_length = getattr(args, "max_length", None)
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    audit = au.new_audit(kind, len(rows), policy, max_length)
    audit["truncation_mode"] = getattr(args, "truncation_mode", "keep_start")
    end = doc_end_token(tok, model_cfg) if kind == "cpt" else turn_end_token(tok, model_cfg)
    dataset = mod.build_dataset(rows, tok, model_cfg)
    packing = bool(getattr(args, "packing", False))
    cut_part = "prompt" if audit["truncation_mode"] == "keep_end" and not packing else "completion"
    if kind == "cpt":
        lengths = [len(x) for x in dataset["input_ids"]]
        if not (packing and getattr(args, "packing_strategy", None) in ("bfd_split", "wrapped")):
            plan = [(0, n, n) for n in lengths]
            keep = au.apply_policy(kind, policy, plan, ids, max_length, audit, cut_part=cut_part)
            if not keep:
                raise DftError(f"stage cpt: no document fits max_length={max_length} (strategy.cpt.truncation={policy})")
            if len(keep) < len(dataset):
                dataset = dataset.select(keep)
                lengths = [lengths[i] for i in keep]
        audit["_doc_lengths"] = au._spread(lengths)  # documents as tokenized, before packing splits them
        audit["rows"] = len(dataset)
        return dataset, audit, end
    keep_idx = list(range(len(dataset)))
    dataset, dropped, kept = drop_prompts_filling_max_length(dataset, tok, max_length, kind, return_kept=True)
    audit["rows_dropped"]["long_prompt"] = dropped
    ids = [ids[i] for i in kept]
    if kind == "sft":
        plan = au.sft_lengths(dataset, tok, end[1])
        keep_idx = au.apply_policy(kind, policy, plan, ids, max_length, audit, cut_part=cut_part)
        if len(keep_idx) < len(dataset):
            dataset = dataset.select(keep_idx)
        audit["rows"] = len(dataset)
    if len(dataset) == 0:
        raise DftError(f"stage {kind}: no row fits max_length={max_length} (strategy.{kind}.truncation={policy}); "
                       f"raise strategy.{kind}.trainer.max_length")
    audit["_ids"] = [ids[i] for i in keep_idx] if kind == "sft" else ids
    return dataset, audit, end


def finish_audit(kind: str, trainer, tok, stage_cfg: Any, audit: dict, end) -> dict:
    """After the trainer is built: apply the truncation policy to DPO/ORPO pairs as the trainer tokenized
    them (replacing ``trainer.train_dataset`` by the kept rows), set ORPO's NLL scope, then audit the
    trainer's data (:func:`dft.stages.audit.audit_trainer_data`). Returns the audit record.

    Raises:
        DftError: under ``truncation: error`` a pair would be cut, or no pair is left.
    """
    from dft.stages import audit as au

    ids = audit.pop("_ids", None) or [str(i) for i in range(len(trainer.train_dataset))]
    max_length = audit["max_length"]
    nll_over = None
    if kind in ("dpo", "orpo"):
        ds = trainer.train_dataset
        if len(ds) != len(ids):  # TRL dropped rows itself: ids no longer line up
            ids = [str(i) for i in range(len(ds))]
        if kind == "dpo":
            plan = []
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]):
                e = [au.end_length(len(p), seq, end[1]) for seq in (c, r)]
                plan.append((len(p), len(p) + max(len(c), len(r)), 0 if 0 in e else max(e)))
            part = "prompt" if audit["truncation_mode"] == "keep_end" else "completion"
        else:
            plan = []
            for c, r, cl, rl in zip(ds["chosen_input_ids"], ds["rejected_input_ids"], ds["chosen_labels"],
                                    ds["rejected_labels"]):
                p = sum(1 for t in cl if t == -100)
                e = [au.end_length(0, seq, end[1]) for seq in (c, r)]
                plan.append((p, max(len(c), len(r)), 0 if 0 in e else max(e)))
            part = "completion"
        keep = au.apply_policy(kind, audit["truncation"], plan, ids, max_length, audit, cut_part=part)
        if len(keep) < len(ds):
            if not keep:
                raise DftError(f"stage {kind}: no pair fits max_length={max_length}; raise strategy.{kind}.trainer.max_length")
            ds = ds.select(keep)
        if kind == "orpo" and max_length:  # ``keep``: ORPO's own truncation, the response cut at max_length
            def cut(ex):
                return {k: ex[k][:max_length] for k in ex if k.endswith(("_input_ids", "_attention_mask", "_labels"))
                        and not k.startswith("prompt")}
            if any(plan[i][1] > max_length for i in keep):
                ds = ds.map(cut)
        trainer.train_dataset = ds
        audit["rows"] = len(ds)
    if kind == "orpo":
        nll_over = getattr(stage_cfg, "nll_over", None) or "completion"
        trainer.nll_over = nll_over
    return au.audit_trainer_data(kind, trainer, tok, end, audit, nll_over=nll_over)


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


def build_trainer(*, kind: str, stage_cfg: Any, rows: list[dict], start_path: Path, model_cfg: Any, peft_cfg: Any,
                  work_dir: Path, device: str, report_to: str, seed: int):
    """The TRL trainer of one stage, ready to train, with the rows its policies keep and its audit.

    Tokenizer and model from ``start_path``, TRL config (:func:`build_trl_config`), dataset
    (:func:`prepare_dataset`), PEFT config (tied-embedding targets refused,
    :func:`dft.modeling.check_peft_targets`), then the post-tokenization policy and the audit of what
    the trainer holds (:func:`finish_audit`). Returns ``(trainer, tokenizer, audit)``.
    """
    from dft.modeling import check_peft_targets, load_model, load_tokenizer, peft_config

    mod = stage_module(kind)
    tok = load_tokenizer(start_path, model_cfg)
    trainer_kwargs = OmegaConf.to_container(stage_cfg.trainer, resolve=True) if not isinstance(stage_cfg.trainer, dict) else dict(stage_cfg.trainer)
    args = build_trl_config(kind, trainer_kwargs, output_dir=str(work_dir), device=device, peft_cfg=peft_cfg,
                            model_cfg=model_cfg, report_to=report_to, seed=seed, stage_cfg=stage_cfg)
    dataset, audit, end = prepare_dataset(kind, mod, rows, tok, model_cfg, args, stage_cfg)
    model = load_model(start_path, model_cfg, device=device, peft_cfg=peft_cfg, for_training=True)
    model.config.pad_token_id = tok.pad_token_id
    _, trainer_cls = mod.trainer_classes()
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=dataset, processing_class=tok)
    pc = peft_config(peft_cfg, model_cfg)
    if pc is not None:
        check_peft_targets(model, pc)
        kwargs["peft_config"] = pc
    trainer = trainer_cls(**kwargs)
    audit = finish_audit(kind, trainer, tok, stage_cfg, audit, end)
    return trainer, tok, audit


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
    ``log_history`` (TRL's list of logged dicts), ``audit`` (what the trainer was fed:
    :func:`dft.stages.audit.audit_trainer_data`) and ``probe`` (the saved folder's logits against the
    trained model's: :func:`check_saved_model`).
    """
    import torch
    from transformers import set_seed

    from dft.modeling import count_parameters, save_merged

    set_seed(seed)
    trainer, tok, audit = build_trainer(kind=kind, stage_cfg=stage_cfg, rows=rows, start_path=start_path,
                                        model_cfg=model_cfg, peft_cfg=peft_cfg, work_dir=work_dir, device=device,
                                        report_to=report_to, seed=seed)
    model, dropped = trainer.model, audit["rows_dropped"]["long_prompt"]
    trainable, total = count_parameters(trainer.model)
    log.info("stage %s: %d rows, %s trainable / %s parameters (%.2f%%), device %s", kind, audit["rows"],
             f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1), device)
    t0 = time.time()
    resume, loss = run_or_restore(trainer, work_dir, kind)
    runtime = time.time() - t0
    check_finite(trainer, kind)
    probe = None
    if save:
        tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_merged(trainer.model, start_path, model_cfg, tmp, tok)
        probe = check_saved_model(trainer, tmp, model_cfg, tok, start_path=start_path, peft_cfg=peft_cfg)
        fault_point("final_save")
        os.replace(tmp, out_dir)
    facts = {
        "train_loss": loss,
        "runtime_s": runtime,
        "steps": int(trainer.state.global_step),
        "rows": audit["rows"],  # examples trained on (the packed blocks are audit["sequences"])
        "rows_dropped_long_prompt": dropped,
        "audit": audit,
        "probe": probe,
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from": Path(resume).name if resume else None,
        "log_history": trainer.state.log_history,
    }
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return facts


#: The fixed probe of :func:`check_saved_model`: a short domain sentence, tokenized with the special tokens.
PROBE_TEXT = "The yield stress of a ductile material is"


def probe_ids(tok) -> "torch.Tensor":
    """``[1, n]`` ids of :data:`PROBE_TEXT` (tokenizer's special tokens included): the fixed probe input."""
    import torch

    return torch.tensor([tok(PROBE_TEXT)["input_ids"]])


def probe_tolerance(dtype) -> float:
    """Allowed ``max |logit difference| / max(1, max |logit|)`` between a trained model and its saved
    folder: 1e-4 when the trained model runs in fp32 (the folder is compared in fp32 on CPU); 1e-1 when
    it runs in bf16/fp16, whose forward differs from fp32 by about 2^-8 relative per operation (a loose
    bound, chosen without a GPU measurement: it catches a wrong head or a lost adapter, not a small drift)."""
    import torch

    return 1e-4 if dtype == torch.float32 else 1e-1


def check_saved_model(trainer, saved_dir: Path, model_cfg: Any, tok, *, start_path: Path, peft_cfg: Any) -> dict:
    """Check that the folder just saved is the trained model: its logits on a fixed probe
    (:func:`probe_ids`) equal the in-memory model's within :func:`probe_tolerance`.

    The reference is ``trainer.model`` itself (full fine-tuning and LoRA: adapters active, unmerged).
    For QLoRA the trained model runs on a 4-bit base while the artefact is the adapter merged into the
    unquantised base (by design, DESIGN.md §6), so the reference is the trained adapter applied,
    unmerged, to the unquantised base; the 4-bit model's own distance is recorded as ``qlora_gap``.
    The saved folder is loaded on CPU in fp32. Skipped (recorded) when the model is sharded across ranks
    (DeepSpeed / FSDP), where a forward on one rank alone would hang.

    Returns ``{"max_abs_diff", "max_abs_logit", "tolerance", "probe_tokens", "reference"}``.

    Raises:
        DftError: the saved folder's logits differ beyond the tolerance (e.g. a LoRA adapter on the tied
            ``embed_tokens``, whose merge also moves ``lm_head``).
    """
    import torch
    from peft import PeftModel

    from dft.modeling import load_model

    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return {"skipped": "model sharded across ranks"}
    ids = probe_ids(tok)
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model

    def logits_of(m) -> torch.Tensor:
        was_training = m.training
        m.eval()
        dev = next(m.parameters()).device
        with torch.no_grad():
            out = m(input_ids=ids.to(dev), use_cache=False).logits[0].float().cpu()
        m.train(was_training)
        return out

    ref_name, gap = "trained model", None
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if isinstance(model, PeftModel) and getattr(peft_cfg, "method", None) == "qlora":
        try:
            trained = logits_of(model)
        except Exception as e:  # noqa: BLE001 - bitsandbytes' CPU inference kernel needs block-aligned shapes
            log.warning("qlora: the 4-bit model's probe logits could not be computed (%s: %s)", type(e).__name__, e)
            trained = None
        adapter = saved_dir / "adapter"
        base = load_model(start_path, model_cfg, device="cpu", dtype="float32")
        ref_model = PeftModel.from_pretrained(base, adapter)
        ref = logits_of(ref_model)
        del ref_model, base
        gap = float((trained - ref).abs().max()) if trained is not None else None
        ref_name, dtype = "trained adapter on the unquantised base", torch.float32
    else:
        ref = logits_of(model)
    saved = load_model(saved_dir, model_cfg, device="cpu", dtype="float32")
    got = logits_of(saved)
    del saved
    diff = float((got - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    tol = probe_tolerance(dtype)
    out = {"max_abs_diff": diff, "max_abs_logit": float(ref.abs().max()), "tolerance": tol * scale,
           "probe_tokens": int(ids.shape[1]), "reference": ref_name}
    if ref_name != "trained model":
        out["qlora_gap"] = gap  # max |logit diff| of the 4-bit trained model to the reference (null: not computable)
    if not diff <= tol * scale:
        raise DftError(f"the saved model at {saved_dir} is not the trained model: its logits on the probe differ by "
                       f"{diff:.3g} (tolerance {tol * scale:.3g}); check peft.target_modules (a LoRA on tied "
                       "embeddings changes lm_head when merged)")
    log.info("saved model matches the trained model on the probe (max |diff| %.2g <= %.2g)", diff, tol * scale)
    return out


def rows_as_dataset(rows: list[dict]):
    """``datasets.Dataset`` from a list of dicts (kept in memory; no cache files written)."""
    from datasets import Dataset

    return Dataset.from_list(rows)


def dump_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
