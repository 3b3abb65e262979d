"""Dry-run plans: what each cell would train, what the stage cache already holds, what the rest costs.

``python -m dft.train -m grid=paper_all dry_run=true`` composes every cell of the grid. Each cell
(:meth:`dft.pipeline.Cell.print_plan` -> :func:`make_plan`) checks its data, builds every stage's
TRL config and the mergekit config, computes the lineage key of every stage, merge and
evaluation exactly as the training path does (:func:`chain_lineages`, tested against the keys a
real run records), and writes ``<sweep dir>/.plan/<cell>.json``. Nothing trains and no weights are
loaded (model *configs* are read; the embedded model is converted once if it never was; hub models
are looked up in the local cache only, never downloaded). After the sweep, :class:`PlanCallback`
(``hydra.callbacks.dft_plan`` in ``conf/train.yaml``) prints one table for the grid: every cell,
the distinct stages (deduplicated by lineage key) the grid needs, those already cached, and the
GPU-hours of the rest. ``python -m dft.plan runs/<experiment>`` prints the table again.

Cost model (every number it uses is in the plan JSON; the assumptions are ``plan.*`` keys)::

    GPU-hours = k * N * tokens / (plan.gpu_peak_tflops * 1e12 * plan.mfu) / 3600

* ``N`` = ``model.params_b`` * 1e9 (counted from the local ``config.json`` if params_b is 0).
* ``k`` = FLOPs per parameter and token: 2 (forward) + 2 (backward through the activations)
  + 2 (weight gradients: full fine-tuning only; LoRA's adapters, <1 % of N, are neglected)
  + 2 with gradient checkpointing (the forward again; on by default on GPUs, dft.stages)
  + 2 for DPO (the reference model's forward every step; ORPO has no reference). So full 6,
  LoRA 4, LoRA + checkpointing 6, LoRA + checkpointing + DPO 8. Attention's length-dependent
  FLOPs (12 * layers * d_model * L per token: ~8 % of 6N for a 7B model at L = 2048) are
  neglected, well inside the uncertainty of the MFU.
* ``tokens`` = steps * B * T. B = per_device_train_batch_size * gradient_accumulation_steps *
  launcher.tasks_per_node (data-parallel processes). T = max_length for packed stages (full
  blocks), else the mean row length in tokens (characters / ``plan.chars_per_token``, no
  tokenizer is loaded; plus 5 chat-template tokens per turn) capped at max_length; a DPO/ORPO
  row is two sequences (chosen, rejected).
  steps = max_steps, or when max_steps <= 0 the count ``transformers.Trainer`` derives from the
  epochs (``set_initial_training_values``): ceil(num_train_epochs * ceil(batches / accumulation))
  with batches = ceil(examples / (per_device_train_batch_size * processes)) per process, and
  examples = rows (unpacked) or data tokens / max_length (packed). The upper bound
  steps * B * max_length is recorded as ``tokens_max``.
* Values the YAML leaves out are TRL's defaults, read from the TRL config object that was built.
* Not in the estimate: evaluation (generation is memory-bound, not FLOP-bound), merging (seconds
  of I/O), model loading and saving.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf

from dft.config import plain

try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    _Callback = object  # type: ignore[misc,assignment]

#: folder of the sweep directory that holds one plan JSON per cell
PLAN_DIR = ".plan"
#: file (in PLAN_DIR) the callback writes the grid's aggregate to
GRID_FILE = "_grid.json"
FORMULA = "GPU-h = k*N*tokens / (peak*MFU) / 3600; k = 2 fwd + 2 bwd + 2 weight grads (full only) + 2 (grad ckpt) + 2 (DPO reference)"


# ------------------------------------------------------------------------------- lineage keys
# One definition of every key, in dft.graph (the run uses the same functions: tests/test_grid.py
# checks a plan's keys against the keys training records). Re-exported here for callers of dft.plan.
from dft.graph import (  # noqa: E402,F401
    EVAL_VERSION,
    MODEL_LINEAGE_KEYS,
    cell_steps,
    chain_lineages,
    eval_key,
    evaluates,
    merge_lineage,
    model_identity,
    node_id,
    start_key,
    start_lineage,
)


# ------------------------------------------------------------------------------- weights
@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Look up hub models in the local cache only (a dry run never downloads weights)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def locate_weights(model_cfg: Any, cache_dir: str, which: str = "model") -> tuple[Optional[Path], Optional[str]]:
    """``(path, None)`` where the weights are on this machine, else ``(None, why)``; never downloads."""
    from dft import DftError
    from dft.modeling import resolve_model_path

    with _offline():
        try:
            return resolve_model_path(model_cfg, cache_dir, which=which), None
        except DftError as e:
            return None, str(e)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (then a model missing from the cache cannot be fetched)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def missing_weights(cfg: Any) -> list[str]:
    """The weights a cell needs that it cannot get on this machine: hub ids, or ``model.path=<dir>``.

    A model is missing when its ``model.path``/``model.partner_path`` holds no model, or when it
    is not in the local Hugging Face cache and the hub is offline (``HF_HUB_OFFLINE=1``); with
    the hub reachable the cell downloads it when it starts, so it is not missing. The embedded
    and ``tiny*`` models are always available (converted or built on demand). Looks up only,
    never downloads (``python -m dft.train`` checks every cell of a sweep with it before starting
    any; a dry run lists them and exits non-zero).
    """
    from dft.families import tiny_family

    m = cfg.model
    checks = [("model", m.path, m.hub_id)]
    if cfg.merge.method != "none" and (m.partner_path or m.partner):
        checks.append(("partner", m.partner_path, m.partner))
    out: list[str] = []
    for which, path, hub in checks:
        if which == "model" and path is None and (m.embedded or tiny_family(hub) is not None):
            continue
        found, _ = locate_weights(m, cfg.paths.cache, which=which)
        if found is None and (path is not None or hub_offline()):
            where = f"{'model.path' if which == 'model' else 'model.partner_path'}={path}" if path else str(hub)
            if where not in out:
                out.append(where)
    return out


def demo_budgets(cfg: Any) -> list[str]:
    """``["<stage> max_steps=<n>", ...]``: the stages of a hub-model cell that train with the CPU demo
    step budget of ``conf/stage/<stage>.yaml`` (minutes on 2 CPU cores, meaningless for a 7-8B model).

    A stage counts when its ``max_steps`` is still that file's value; the paper grids
    (``conf/grid/recipe/paper.yaml``: epochs, ``max_steps: -1``) and any ``max_steps`` override do
    not. The embedded and ``tiny*`` models are what those budgets are for. The dry-run plan and
    the start banner print the result (issue 22: 8B cells planned 7.97e-05 GPU-hours silently).
    """
    import yaml

    from dft import ROOT
    from dft.families import tiny_family

    if cfg.model.embedded or tiny_family(cfg.model.hub_id) is not None:
        return []
    out = []
    for stage in cfg.strategy.chain:
        f = ROOT / "conf" / "stage" / f"{stage}.yaml"
        demo = ((yaml.safe_load(f.read_text()) or {}).get("trainer") or {}).get("max_steps") if f.exists() else None
        steps = (cfg.strategy[stage].trainer or {}).get("max_steps")
        if demo and demo > 0 and steps == demo:
            out.append(f"{stage} max_steps={steps}")
    return out


def demo_budget_warning(stages: list[str], model: str) -> str:
    """The one line the plan and the start banner print for :func:`demo_budgets`."""
    return (f"CPU demo budget on hub model {model}: {', '.join(stages)} (conf/stage/*.yaml, minutes on 2 CPU "
            "cores); for the paper's budgets use grid=paper_<family>, or set strategy.<stage>.trainer.max_steps=-1 "
            "and num_train_epochs")


def _provisional_identity(model_cfg: Any, which: str = "model") -> dict:
    """Identity of weights that are not here: the same fields as model_identity, weights unknown."""
    if which == "partner":
        return {"hub_id": model_cfg.partner, "path": model_cfg.partner_path, "embedded": False, "weights": None}
    return {"hub_id": model_cfg.hub_id, "path": model_cfg.path, "embedded": model_cfg.embedded, "weights": None}


def _param_count(cfg: Any, start_path: Optional[Path]) -> Optional[float]:
    if cfg.model.params_b:
        return float(cfg.model.params_b) * 1e9
    if start_path is not None:
        try:
            from transformers import AutoConfig

            from dft.memory import count_parameters

            return float(count_parameters(AutoConfig.from_pretrained(start_path))["total"])
        except Exception:  # noqa: BLE001 - an unknown architecture: no estimate
            return None
    return None


# ------------------------------------------------------------------------------- cost
#: chat-template tokens around one turn (ChatML "<|im_start|>role\n ... <|im_end|>\n" and the Llama 3.1
#: header + <|eot_id|> are both 5; Mistral's [INST] ... [/INST] fewer)
TEMPLATE_TOKENS_PER_TURN = 5


def _row_lengths(stage: str, row: dict, cpt: float) -> list[float]:
    """Estimated tokens of the sequences one row becomes (characters / chars-per-token + template)."""
    if stage == "cpt":
        return [len(row.get("text", "")) / cpt]
    if stage == "sft":
        msgs = row.get("messages", [])
        return [sum(len(m.get("content") or "") for m in msgs) / cpt + TEMPLATE_TOKENS_PER_TURN * len(msgs)]
    p = len(row.get("prompt", "") or "")
    t = 2 * TEMPLATE_TOKENS_PER_TURN  # the prompt's turn and the response's
    return [(p + len(row.get("chosen", "") or "")) / cpt + t, (p + len(row.get("rejected", "") or "")) / cpt + t]


def epoch_steps(examples: int, per_device: int, accumulation: int, world: int, epochs: float) -> int:
    """Optimizer steps of an epoch-based run, counted as ``transformers.Trainer`` counts them.

    Each of the ``world`` data-parallel processes iterates ``ceil(examples / (per_device * world))``
    batches per epoch (the sampler pads the last round); an epoch is ``ceil(batches / accumulation)``
    updates (a partial accumulation still steps); the run is ``ceil(epochs * updates)``
    (``Trainer.set_initial_training_values``, transformers 5; ``tests/test_budgets.py`` checks it
    against that method). Raises nothing; every argument is at least 1 in a valid config.
    """
    batches = math.ceil(examples / (per_device * world))
    updates = max(math.ceil(batches / accumulation), 1)
    return math.ceil(epochs * updates)


def estimate_stage(stage: str, args: Any, rows: list[dict], cfg: Any, n_params: Optional[float]) -> dict:
    """Steps, tokens and GPU-hours of one stage (see the module docstring for the formula).

    ``args`` is the TRL config object built from the YAML (so TRL's defaults apply to what the
    YAML leaves out).
    """
    pc = cfg.plan
    world = max(1, int(cfg.launcher.tasks_per_node or 1))
    batch = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world
    L = int(getattr(args, "max_length", None) or cfg.model.max_length)
    packed = stage in ("cpt", "sft") and bool(getattr(args, "packing", False))
    seqs = [min(L, n) for r in rows for n in _row_lengths(stage, r, float(pc.chars_per_token))]
    per_row = 2 if stage in ("dpo", "orpo") else 1
    data_tokens = sum(n for r in rows for n in _row_lengths(stage, r, float(pc.chars_per_token)))
    if packed:
        examples = max(1, math.ceil(data_tokens / L))
        seq_tokens = float(L)
    else:
        examples = len(rows)
        seq_tokens = (sum(seqs) / len(seqs)) if seqs else 0.0
    steps = int(args.max_steps) if args.max_steps and args.max_steps > 0 else \
        epoch_steps(examples, int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps), world,
                    float(args.num_train_epochs))
    tokens = steps * batch * per_row * seq_tokens
    full = cfg.peft.method == "full"
    trainer = plain(cfg.strategy[stage].trainer) or {}
    from dft.memory import checkpointing_setting

    gc = checkpointing_setting(trainer)
    if gc is None:
        gc = cfg.peft.gradient_checkpointing
    if gc is None:
        gc = True  # dft.stages.hardware_overrides: on by default on CUDA
    k = 4 + (2 if full else 0) + (2 if gc else 0) + (2 if stage == "dpo" else 0)
    flops = k * n_params * tokens if n_params else None
    peak = float(pc.gpu_peak_tflops) * 1e12 * float(pc.mfu)
    return {"steps": steps, "batch": batch, "max_length": L, "packed": packed, "rows": len(rows),
            "data_tokens": round(data_tokens), "seq_tokens": round(seq_tokens, 1), "tokens": round(tokens),
            "tokens_max": steps * batch * per_row * L, "k": k, "gradient_checkpointing": bool(gc),
            "params": n_params, "flops": flops, "gpu_hours": (flops / peak / 3600) if flops else None}


# ------------------------------------------------------------------------------- the cell's plan
def make_plan(cell: Any) -> dict:
    """Validate a cell's configs and return its plan (see the module docstring); trains nothing."""
    from dft.config import STAGE_SPLIT, validate
    from dft.runs import read_json
    from dft.stages import build_trl_config

    cfg = cell.cfg
    validate(cfg)
    rows = cell.check_inputs()
    missing = []
    start_path, why = locate_weights(cfg.model, cfg.paths.cache)
    if start_path is None:
        missing.append(f"start: {why}")
        start_id = _provisional_identity(cfg.model)
    else:
        start_id = model_identity(cfg.model, start_path)
    start_k = start_key(start_id)
    merging = cfg.merge.method != "none"
    partner_path, partner_key = None, start_k
    if merging:
        partner_path, why = locate_weights(cfg.model, cfg.paths.cache, which="partner")
        if partner_path is None:
            missing.append(f"partner: {why}")
            pid = _provisional_identity(cfg.model, "partner")
        else:
            pid = model_identity(cfg.model, partner_path) if partner_path != start_path else start_id
        partner_key = start_key(pid)
    provisional = bool(missing)
    n_params = _param_count(cfg, start_path)
    cache = cell.cache

    def cached(key: str) -> Optional[bool]:
        return None if provisional else cache.is_complete(key)

    # the cell's nodes of the sweep's graph: dft.graph.cell_steps, the construction Cell.run executes
    steps = cell_steps(cfg, cell.cell, start_id, partner_key if merging else None, cell.data_identity,
                       lambda k: eval_key(cell, k))
    nodes: list[dict] = []
    stages, merges, evals = [], [], []
    mergekit_ok = None
    for step in steps:
        n = step.node
        entry = {"id": n.id, "kind": n.kind, "key": n.key, "name": n.name, "parents": list(n.parents),
                 "gpu_hours": 0.0}
        if n.kind in ("eval_start", "eval"):
            done = None if provisional else read_json(cache.root / "_eval" / n.key / "metrics.json") is not None
            evals.append({"artefact": n.name[len("eval("):-1], "key": n.key, "cached": done})
            entry["cached"] = done
        elif n.kind == "stage":
            stage = step.stage
            sc = cfg.strategy[stage]
            args = build_trl_config(stage, plain(sc.trainer), output_dir=str(cell.run_dir / "dry"), device=cell.device,
                                    peft_cfg=cfg.peft, model_cfg=cfg.model, report_to="none", seed=cfg.seed,
                                    stage_cfg=sc)
            use = rows[STAGE_SPLIT[stage]]
            use = use[: sc.max_samples] if sc.max_samples else use
            stages.append({"artefact": n.name, "kind": stage, "key": n.key, "cached": cached(n.key),
                           "trl_config": type(args).__name__, **estimate_stage(stage, args, use, cfg, n_params)})
            entry.update(gpu_hours=stages[-1]["gpu_hours"], cached=cached(n.key))
        elif n.kind == "merge":
            from dft.merging import build_merge_config

            final = cache.entry(n.parents[0].split("/", 1)[1]) / "final"
            partner_ref = str(partner_path) if partner_path else str(cfg.model.partner or cfg.model.hub_id)
            build_merge_config(cfg.merge, str(final), partner_ref)  # raises DftError naming the problem
            if mergekit_ok is None and start_path is not None and partner_path is not None and partner_path != start_path:
                from dft.merging import check_compatible

                check_compatible(str(start_path), str(partner_path))  # configs only
            mergekit_ok = True
            merges.append({"artefact": n.name, "key": n.key, "cached": cached(n.key), "method": cfg.merge.method,
                           "parents": [n.name[: -len(f"+{cfg.merge.method}")],
                                       "start" if partner_key == start_k else "partner"]})
            entry["cached"] = cached(n.key)
        else:  # summary
            done = read_json(cell.run_dir / "summary.json")
            entry["cached"] = bool(done and done.get("status") == "finished")
        nodes.append(entry)
    gh = [s["gpu_hours"] for s in stages]
    known = all(g is not None for g in gh)
    return {
        "version": 1, "experiment": cfg.experiment, "cell": cell.cell, "run_dir": str(cell.run_dir),
        "written_at": time.time(), "model": cfg.model.name, "family": cfg.model.family, "start": cfg.model.start,
        "strategy": cfg.strategy.name, "chain": list(cfg.strategy.chain), "merge": cfg.merge.method,
        "merge_at": cfg.merge.at, "peft": cfg.peft.method, "data": cfg.data.name, "eval": cfg.eval.name,
        "device": cell.device,
        "weights": {"start": str(start_path) if start_path else None,
                    "partner": str(partner_path) if partner_path else None, "missing": missing},
        "keys_provisional": provisional, "start_key": start_k, "nodes": nodes,
        "gpus_per_cell": max(1, int(cfg.launcher.gpus_per_node or 0), int(cfg.launcher.tasks_per_node or 1)),
        "cannot_run": missing_weights(cfg) if provisional else [],
        "demo_budget": demo_budgets(cfg),
        "rows": {k: len(v) for k, v in rows.items()},
        "stages": stages, "merges": merges, "evals": [e for e in evals if e],
        "mergekit_config": "valid" if mergekit_ok else None,
        "power": power_plan({b: len(v) for b, v in cell.benchmarks.items()}, getattr(cell, "benchmark_sizes", None)),
        "assumptions": {"gpu_peak_tflops": float(cfg.plan.gpu_peak_tflops), "mfu": float(cfg.plan.mfu),
                        "chars_per_token": float(cfg.plan.chars_per_token),
                        "world_size": max(1, int(cfg.launcher.tasks_per_node or 1)), "formula": FORMULA},
        "gpu_hours": {"chain": sum(gh) if known else None,
                      "to_train": sum(s["gpu_hours"] for s in stages if not s["cached"]) if known else None},
    }


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra: a single run
        return False


def dry_run(cell: Any) -> Path:
    """What ``dry_run=true`` does in a cell (:meth:`Cell.print_plan`): plan, write, print.

    A config error (a TRL key, a mergekit parameter, a missing data split) in a single run ends it
    with the usual one-line error. In a multirun the cell records the error in its plan file and
    the sweep goes on, so :class:`PlanCallback` lists every broken cell at once and then exits
    with status 2.
    """
    import logging

    from dft import DftError

    try:
        plan = make_plan(cell)
    except DftError as e:
        if not _in_multirun():
            raise
        path = write_plan({"version": 1, "experiment": cell.cfg.experiment, "cell": cell.cell,
                           "written_at": time.time(), "error": str(e)}, cell.run_dir)
        print(f"error: dry run of {cell.cell}: {e}", file=sys.stderr, flush=True)
        return path
    path = write_plan(plan, cell.run_dir)
    print(format_cell(plan), flush=True)
    logging.getLogger("dft").info("dry run: every TRL config builds; plan written to %s", path)
    if plan["cannot_run"] and not _in_multirun():
        raise DftError(f"this cell cannot run on this machine: no weights for {', '.join(plan['cannot_run'])} "
                       "(the plan above is provisional)")
    return path


def write_plan(plan: dict, run_dir: Path) -> Path:
    """``<sweep dir>/.plan/<cell>.json`` (the sweep dir is the run dir's parent, run or multirun)."""
    from dft.runs import write_json

    path = Path(run_dir).parent / PLAN_DIR / f"{plan['cell']}.json"
    write_json(path, plan)
    return path


# ------------------------------------------------------------------------------- printing
def _gh(v: Optional[float]) -> str:
    if v is None:
        return "?"
    if v == 0:
        return "0"
    return f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


def _yn(v: Optional[bool]) -> str:
    return "?" if v is None else ("yes" if v else "no")


def power_plan(sizes: dict[str, int], full_sizes: Optional[dict[str, int]] = None) -> Optional[dict]:
    """The smallest accuracy difference a paired test detects, per benchmark, before any compute.

    ``sizes``: items per benchmark as configured (``eval.max_items`` applied); ``full_sizes``: the
    benchmark files' item counts (``eval=full``). Uses :func:`dft.stats.min_detectable_difference`
    (80 % power, alpha 0.05, two-sided) with the assumed discordance
    :data:`dft.stats.DEFAULT_DISCORDANCE` (no two artefacts are evaluated yet, so none is
    measured). Returns ``{"power", "alpha", "discordance", "benchmarks": {b: {"n", "mdd", "n_full",
    "mdd_full"}}}`` (differences as fractions), or None without benchmarks.
    """
    from dft.stats import ALPHA, DEFAULT_DISCORDANCE, min_detectable_difference

    if not sizes:
        return None
    full_sizes = full_sizes or sizes
    return {"power": 0.8, "alpha": ALPHA, "discordance": DEFAULT_DISCORDANCE,
            "benchmarks": {b: {"n": n, "mdd": min_detectable_difference(n), "n_full": full_sizes.get(b, n),
                               "mdd_full": min_detectable_difference(full_sizes.get(b, n))} for b, n in sizes.items()}}


def format_power(power: Optional[dict]) -> Optional[str]:
    """One line from :func:`power_plan`: ``power: ... mascqa 30 points (20 items) ...``."""
    if not power:
        return None

    def pts(v):
        return "-" if v is None else f"{100 * v:.0f}" if v >= 0.1 else f"{100 * v:.1f}"

    bs = power["benchmarks"]
    now = ", ".join(f"{b} {pts(x['mdd'])} ({x['n']} items)" for b, x in bs.items())
    line = (f"power: a paired test (80 % power, alpha {power['alpha']:g}, assuming {100 * power['discordance']:.0f} % of "
            f"items answered differently) detects accuracy differences of at least {now} points")
    if any(x["n_full"] != x["n"] for x in bs.values()):
        line += "; with every item (eval=full): " + ", ".join(f"{b} {pts(x['mdd_full'])} ({x['n_full']})" for b, x in bs.items())
    return line + "; recipes closer than that are not separable"


#: the missing-weights reasons this process has printed in full (a grid of 48 hub cells says each once)
_SAID_MISSING: set[str] = set()


def _missing_once(message: str) -> str:
    """``message`` the first time this process formats it; later a short form naming the model.

    ``message`` is one entry of a plan's ``weights.missing`` (``"start: cannot load 'org/name': ..."``);
    the short form is ``"start: no weights for 'org/name' (why: above)"``.
    """
    if message not in _SAID_MISSING:
        _SAID_MISSING.add(message)
        return message
    which, _, rest = message.partition(": ")
    m = re.search(r"'([^']+)'", rest)
    return f"{which}: no weights for {m.group(0) if m else rest[:60]} (why: above)"


def format_cell(plan: dict) -> str:
    """The plan of one cell as text (printed by the dry run)."""
    a = plan["assumptions"]
    lines = [f"dry run {plan['experiment']}/{plan['cell']}: model={plan['model']} ({plan['start']}) "
             f"chain={' -> '.join(plan['chain']) or 'none'} merge={plan['merge']} peft={plan['peft']}",
             f"  weights: {plan['weights']['start'] or 'NOT HERE'}"
             + (f"; partner {plan['weights']['partner']}" if plan['weights']['partner'] not in (None, plan['weights']['start']) else "")]
    for m in plan["weights"]["missing"]:
        lines.append(f"  ! {_missing_once(m)} (keys are provisional, cache status unknown)")
    if plan.get("demo_budget"):
        lines.append(f"  ! {demo_budget_warning(plan['demo_budget'], plan['model'])}")
    head = f"  {'artefact':<22} {'key':<16} {'cached':>6} {'steps':>7} {'batch':>5} {'tokens':>12} {'k':>2} {'GPU-h':>9}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for s in plan["stages"]:
        lines.append(f"  {s['artefact']:<22} {s['key']:<16} {_yn(s['cached']):>6} {s['steps']:>7} {s['batch']:>5} "
                     f"{s['tokens']:>12,} {s['k']:>2} {_gh(s['gpu_hours']):>9}")
    for m in plan["merges"]:
        lines.append(f"  {m['artefact']:<22} {m['key']:<16} {_yn(m['cached']):>6}  (mergekit {m['method']}, config valid)")
    ev = plan["evals"]
    lines.append(f"  evaluations: {len(ev)} ({sum(1 for e in ev if e['cached'])} cached); every TRL config builds "
                 f"({', '.join(sorted({s['trl_config'] for s in plan['stages']})) or 'no stage'})")
    lines.append(f"  GPU-hours to train: {_gh(plan['gpu_hours']['to_train'])} (whole chain {_gh(plan['gpu_hours']['chain'])}); "
                 f"peak {a['gpu_peak_tflops']:g} TFLOP/s x MFU {a['mfu']:g}, {a['world_size']} GPU(s) per stage")
    pw = format_power(plan.get("power"))
    if pw:
        lines.append("  " + pw)
    return "\n".join(lines)


def load_plans(sweep_dir: Path) -> list[dict]:
    """Every cell plan under ``<sweep_dir>/.plan/`` (sorted by cell)."""
    from dft.runs import read_json

    plans = [read_json(p) for p in sorted((Path(sweep_dir) / PLAN_DIR).glob("*.json")) if p.name != GRID_FILE]
    return sorted((p for p in plans if isinstance(p, dict) and ("stages" in p or "error" in p)), key=lambda p: p["cell"])


def _split(plans: list[dict]) -> tuple[list[dict], list[dict]]:
    """(valid plans, plans that record a config error)."""
    return [p for p in plans if "error" not in p], [p for p in plans if "error" in p]


def summarise(plans: list[dict]) -> dict:
    """The grid's aggregate: distinct stages/merges/evaluations by key, cached ones, GPU-hours."""
    plans, errors = _split(plans)
    stages: dict[str, dict] = {}
    for p in plans:
        for s in p["stages"]:
            d = stages.setdefault(s["key"], {"key": s["key"], "artefact": s["artefact"], "model": p["model"],
                                             "kind": s["kind"], "tokens": s["tokens"], "gpu_hours": s["gpu_hours"],
                                             "cached": s["cached"], "cells": 0})
            d["cells"] += 1
            if s["cached"]:
                d["cached"] = True
    merges = {m["key"]: m for p in plans for m in p["merges"]}
    evals = {e["key"]: e for p in plans for e in p["evals"]}
    gh = [s["gpu_hours"] for s in stages.values()]
    known = all(g is not None for g in gh)
    return {
        "cells": len(plans) + len(errors),
        "stage_runs_per_cell": sum(len(p["stages"]) for p in plans),
        "distinct_stages": len(stages),
        "cached_stages": sum(1 for s in stages.values() if s["cached"]),
        "stages_to_train": sum(1 for s in stages.values() if not s["cached"]),
        "distinct_merges": len(merges), "merges_to_run": sum(1 for m in merges.values() if not m["cached"]),
        "distinct_evals": len(evals), "evals_to_run": sum(1 for e in evals.values() if not e["cached"]),
        "gpu_hours_to_train": sum(s["gpu_hours"] for s in stages.values() if not s["cached"]) if known else None,
        "gpu_hours_all": sum(gh) if known else None,
        "provisional_cells": sum(1 for p in plans if p.get("keys_provisional")),
        "errors": {p["cell"]: p["error"] for p in errors},
        "assumptions": plans[0]["assumptions"] if plans else None,
        "stages": sorted(stages.values(), key=lambda s: (s["model"], s["artefact"], s["key"])),
    }


def format_grid(summary: dict, plans: list[dict], where: str = "") -> str:
    """The grid's table: one row per cell, one per distinct stage, and the totals."""
    plans, _ = _split(plans)
    out = [f"\ndry-run plan{(' of ' + where) if where else ''}: {summary['cells']} cells"]
    head = f"{'model':<26} {'start':<8} {'chain':<20} {'merge':<8} {'stages new/cached':>17} {'GPU-h new':>10}"
    out += [head, "-" * len(head)]
    for p in plans:
        new = sum(1 for s in p["stages"] if not s["cached"])
        counts = f"{new}/{len(p['stages']) - new}"
        chain = "->".join(p["chain"]) or "none"
        out.append(f"{p['model']:<26} {p['start']:<8} {chain:<20} {p['merge']:<8} "
                   f"{counts:>17} {_gh(p['gpu_hours']['to_train']):>10}")
    out.append("")
    head = f"{'distinct stage':<22} {'model':<26} {'key':<16} {'cells':>5} {'cached':>6} {'tokens':>12} {'GPU-h':>9}"
    out += [head, "-" * len(head)]
    for s in summary["stages"]:
        out.append(f"{s['artefact']:<22} {s['model']:<26} {s['key']:<16} {s['cells']:>5} {_yn(s['cached']):>6} "
                   f"{s['tokens']:>12,} {_gh(s['gpu_hours']):>9}")
    a = summary["assumptions"] or {}
    out += ["",
            f"distinct stages: {summary['distinct_stages']} ({summary['stages_to_train']} to train, "
            f"{summary['cached_stages']} cached); a grid without the stage cache would train {summary['stage_runs_per_cell']}",
            f"merges: {summary['distinct_merges']} distinct ({summary['merges_to_run']} to run); evaluations: "
            f"{summary['distinct_evals']} distinct ({summary['evals_to_run']} to run)",
            f"GPU-hours to train: {_gh(summary['gpu_hours_to_train'])} (all distinct stages {_gh(summary['gpu_hours_all'])}); "
            f"peak {a.get('gpu_peak_tflops', '?')} TFLOP/s x MFU {a.get('mfu', '?')} (plan.gpu_peak_tflops, plan.mfu); "
            "training only (evaluation, merging and I/O not included)",
            f"  {FORMULA}"]
    for cell, err in summary["errors"].items():
        out.append(f"! error in cell {cell}: {err}")
    demo = [p["cell"] for p in plans if p.get("demo_budget")]
    if demo:
        out.append(f"! {len(demo)} cell(s) train a hub model with the CPU demo budgets of conf/stage/*.yaml "
                   "(see each cell's plan above; grid=paper_<family> carries the paper's budgets)")
    if summary["provisional_cells"]:
        out.append(f"! {summary['provisional_cells']} cell(s) have no weights on this machine: their keys are "
                   "provisional and their cache status unknown ('?')")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- the two layouts
def grid_costs(plans: list[dict]) -> Optional[dict]:
    """The graph launcher's and the cell array's cost (:func:`dft.graph.layout_costs`) of the
    plans' graph; None when a stage's GPU-hours are unknown or no plan has nodes (an old plan)."""
    from dft.graph import Graph, layout_costs

    plans, _ = _split(plans)
    if not plans or any("nodes" not in p for p in plans):
        return None
    graph = Graph.from_plans(plans)
    if any(n.gpu_hours is None for n in graph.nodes.values()):
        return None
    a = plans[0]["assumptions"]
    gpus = max(int(p.get("gpus_per_cell") or 1) for p in plans)
    return layout_costs(graph, world=int(a.get("world_size") or 1), gpus=gpus)


def format_layouts(costs: Optional[dict]) -> str:
    """:func:`dft.graph.format_costs`, or a line saying why there is no comparison."""
    from dft.graph import format_costs

    if costs is None:
        return "SLURM layouts: not compared (a stage's GPU-hours are unknown: model.params_b unset and no config)\n"
    return format_costs(costs) + "\n"


# ------------------------------------------------------------------------------- Hydra callback
class PlanCallback(_Callback):  # type: ignore[misc,valid-type]
    """``hydra.callbacks.dft_plan``: after a ``dry_run=true`` multirun, print the grid's plan.

    At the start of a dry multirun it removes the sweep's old plan files, so the table shows
    exactly this sweep's cells; each cell writes its own (in this process or in a SLURM job); at
    the end this reads them, prints the table and writes ``.plan/_grid.json``. Runs without
    ``dry_run`` are untouched.
    """

    @staticmethod
    def _sweep_dir(config: Any) -> Optional[Path]:
        if not OmegaConf.select(config, "dry_run", default=False):
            return None
        try:
            return Path(str(config.hydra.sweep.dir))
        except Exception:  # noqa: BLE001 - an unresolvable sweep dir: no table
            return None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        sweep = self._sweep_dir(config)
        if sweep is None:
            return
        for p in (sweep / PLAN_DIR).glob("*.json"):
            p.unlink(missing_ok=True)
        launcher = OmegaConf.select(config, "launcher.name", default="local")
        if launcher not in ("local", "slurm"):  # the graph launcher (slurm) plans here itself
            print(f"warning: dry_run=true with launcher={launcher} submits one job per cell to plan it; "
                  "a dry run trains nothing and needs no GPU: launcher=local plans the grid here", file=sys.stderr)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = self._sweep_dir(config)
        if sweep is None:
            return
        from dft.runs import write_json

        plans = load_plans(sweep)
        summary = summarise(plans)
        summary["layouts"] = grid_costs(plans)
        write_json(sweep / PLAN_DIR / GRID_FILE, summary)
        print(format_grid(summary, plans, str(sweep)) + format_layouts(summary["layouts"]), flush=True)
        blocked = [p for p in plans if p.get("cannot_run")]
        models = sorted({m for p in blocked for m in p["cannot_run"]})
        if summary["errors"] or blocked:
            why = []
            if summary["errors"]:
                why.append(f"{len(summary['errors'])} cell(s) of the grid have invalid configs (listed above)")
            if blocked:
                why.append(f"{len(blocked)} of {summary['cells']} cell(s) cannot run on this machine: no weights for "
                           f"{', '.join(models)}" + (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if hub_offline() else ""))
            print("error: " + "; ".join(why), file=sys.stderr, flush=True)
            sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dft.plan runs/<experiment>``: the grid table from the cells' plan files."""
    ap = argparse.ArgumentParser(prog="python -m dft.plan", description=main.__doc__)
    ap.add_argument("sweep", help="sweep directory (runs/<experiment>) that holds .plan/")
    ns = ap.parse_args(argv)
    plans = load_plans(Path(ns.sweep))
    if not plans:
        print(f"error: no plans under {Path(ns.sweep) / PLAN_DIR} (run: python -m dft.train -m ... dry_run=true)",
              file=sys.stderr)
        return 2
    summary = summarise(plans)
    print(format_grid(summary, plans, ns.sweep) + format_layouts(grid_costs(plans)))
    blocked = sorted({m for p in plans for m in p.get("cannot_run") or []})
    if blocked:
        print(f"error: cells of this plan cannot run where it was made: no weights for {', '.join(blocked)}",
              file=sys.stderr)
    return 2 if summary["errors"] or blocked else 0


if __name__ == "__main__":
    sys.exit(main())
