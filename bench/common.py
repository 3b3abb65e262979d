"""Helpers shared by the side-by-side benchmarks (``sft_bench``, ``cpt_bench``, ``mcq_bench``).

* :func:`offline_env` / :func:`compose`: the offline environment and the Hydra config of a cell,
  composed exactly as ``dft.train`` and the tests compose it;
* :func:`run_child`: run one measured side in its own process (peak RSS from ``os.wait4``, so it
  is that side's own) and read back the JSON it writes;
* :class:`TrainMeter`: class-level wrappers on TRL's ``SFTTrainer`` that count, from the collated
  batches each training step receives, the useful (non-pad) tokens, the slots (``input_ids``
  elements, pads included) and the loss tokens, time every optimiser step, and record the
  prepared (tokenized, truncated or packed) training set. Wrapping the class, not the
  instance, is what lets the same meter see inside ``dft.stages.train_stage``, which builds its
  trainer itself (and TRL refuses a custom data collator under padding-free packing).

The machine these run on is shared (2 cores, other users): every figure a bench prints is a
median over repeats or steps, and every speed is also given as a ratio to a baseline measured in
the same invocation.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
OUT = ROOT / "bench" / "out"  # gitignored


def offline_env() -> None:
    """No network, no W&B, no tokenizer thread pools competing with torch for the 2 cores."""
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(k, v)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def compose(overrides: list[str] | None = None):
    """``conf/train.yaml`` composed with Hydra's compose API (as ``tests/conftest.compose``)."""
    offline_env()
    import dft.train  # noqa: F401  registers the schema and resolvers
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides or []))


def model_path(cfg) -> Path:
    """HF folder of the configured model (the embedded SmolLM2-135M-Instruct by default)."""
    from dft.modeling import resolve_model_path

    return resolve_model_path(cfg.model, cfg.paths.cache)


def median(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def self_maxrss_mb() -> float:
    """Peak RSS of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- processes
def run_child(argv: list[str], result: Path, log: Path, *, env: Optional[dict] = None) -> dict:
    """Run ``python argv...``; return the JSON it wrote to ``result`` plus wall, CPU and peak RSS.

    Exits with the tail of the child's log when it fails.
    """
    result.unlink(missing_ok=True)
    cmd = [PY, *argv]
    e = dict(os.environ, **(env or {}))
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=e)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 or not result.is_file():
        sys.exit(f"{' '.join(cmd[1:4])} ... failed (rc={rc}); see {log}:\n{log.read_text()[-4000:]}")
    out = json.loads(result.read_text())
    out.update(process_wall_s=wall, process_cpu_s=usage.ru_utime + usage.ru_stime,
               process_peak_rss_mb=usage.ru_maxrss / 1024, log=str(log))
    return out


def write_result(path: str | os.PathLike, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


# ----------------------------------------------------------------------------- training meter
def _batch_counts(inputs: dict) -> tuple[int, int, int]:
    """(useful tokens, slots, loss tokens) of one collated batch as TRL's collator returns it.

    Padded batches carry ``attention_mask`` (1 = real token). Padding-free batches (TRL's
    ``bfd``/``bfd_split`` packing) are one flattened row with ``cu_seq_lens_q`` giving the
    sequence boundaries; anything after its last entry is padding (``pad_to_multiple_of``).
    """
    ids = inputs["input_ids"]
    slots = int(ids.numel())
    if inputs.get("attention_mask") is not None:
        useful = int(inputs["attention_mask"].sum())
    elif inputs.get("cu_seq_lens_q") is not None:
        useful = int(inputs["cu_seq_lens_q"][-1])
    else:
        useful = slots
    labels = inputs.get("labels")
    loss = int((labels != -100).sum()) if labels is not None else useful
    return useful, slots, loss


class TrainMeter:
    """Measure every ``SFTTrainer`` built in this process (see the module docstring).

    ``steps`` holds one dict per optimiser step: ``useful``, ``slots``, ``loss_tokens`` (summed
    over the step's micro-batches), ``seconds`` and ``cpu_s`` (wall and this process's CPU time
    from the end of the previous step, or the start of the first one, to ``on_step_end``: forward,
    backward, optimiser update, fetching the batch, logging; not the checkpoint that transformers
    saves after the last step). ``prepared`` describes the training set after TRL's preparation.
    """

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.prepared: dict = {}
        self.train_s: Optional[float] = None
        self.train_peak_rss_mb: Optional[float] = None
        self._prev: Optional[tuple[float, float]] = None
        self._cur: Optional[dict] = None

    def install(self) -> "TrainMeter":
        from transformers import TrainerCallback
        from trl import SFTTrainer

        meter = self
        orig_step: Callable = SFTTrainer.training_step
        orig_train: Callable = SFTTrainer.train
        orig_prepare: Callable = SFTTrainer._prepare_dataset

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                now, cpu = time.perf_counter(), time.process_time()
                if meter._cur is not None and meter._prev is not None:
                    meter.steps.append({**meter._cur, "seconds": now - meter._prev[0], "cpu_s": cpu - meter._prev[1]})
                meter._cur, meter._prev = None, (now, cpu)

        def training_step(trainer, model, inputs, *a, **k):
            if meter._prev is None:
                meter._prev = (time.perf_counter(), time.process_time())
            useful, slots, loss = _batch_counts(inputs)
            cur = meter._cur or {"useful": 0, "slots": 0, "loss_tokens": 0, "micro_batches": 0}
            cur["useful"] += useful
            cur["slots"] += slots
            cur["loss_tokens"] += loss
            cur["micro_batches"] += 1
            meter._cur = cur
            return orig_step(trainer, model, inputs, *a, **k)

        def train(trainer, *a, **k):
            trainer.add_callback(StepEnd())
            t0 = time.perf_counter()
            out = orig_train(trainer, *a, **k)
            meter.train_s = time.perf_counter() - t0
            meter.train_peak_rss_mb = self_maxrss_mb()
            return out

        def prepare(trainer, dataset, processing_class, args, packing, formatting_func, dataset_name):
            out = orig_prepare(trainer, dataset, processing_class, args, packing, formatting_func, dataset_name)
            if dataset_name == "train":
                lengths = [len(x) for x in out["input_ids"]]
                meter.prepared = {
                    "rows_in": len(dataset), "sequences": len(lengths), "tokens": sum(lengths),
                    "max_len": max(lengths) if lengths else 0, "packing": bool(packing),
                    "packing_strategy": args.packing_strategy if packing else None, "max_length": args.max_length,
                }
            return out

        SFTTrainer.training_step = training_step
        SFTTrainer.train = train
        SFTTrainer._prepare_dataset = prepare
        return self

    def summary(self, skip: int = 1) -> dict:
        """Totals over all steps and steady-state figures over the steps after the first ``skip``.

        ``tok_s`` (the headline) = useful tokens / seconds summed over the steady-state steps;
        ``tok_s_step_median`` = median over those steps of each step's useful tokens / seconds.
        """
        steps = self.steps
        steady = steps[skip:] if len(steps) > skip else steps
        tot = lambda key, ss: sum(s[key] for s in ss)  # noqa: E731
        useful, slots = tot("useful", steps), tot("slots", steps)
        return {
            "steps": len(steps),
            "useful_tokens": useful,
            "slots": slots,
            "loss_tokens": tot("loss_tokens", steps),
            "pad_fraction": 1 - useful / slots if slots else float("nan"),
            "train_s": self.train_s,
            # includes the first step and the checkpoint saved at the end
            "tok_s_whole_train": useful / self.train_s if self.train_s else float("nan"),
            "steady_steps": len(steady),
            "tok_s": tot("useful", steady) / tot("seconds", steady) if steady else float("nan"),
            "tok_s_step_median": median([s["useful"] / s["seconds"] for s in steady]),
            "slots_s": tot("slots", steady) / tot("seconds", steady) if steady else float("nan"),
            # CPU seconds (all threads of this process): less sensitive to other users' load than wall
            # time, though contention still inflates it
            "tok_cpu_s": tot("useful", steady) / tot("cpu_s", steady) if steady else float("nan"),
            "step_s_median": median([s["seconds"] for s in steady]),
            "train_peak_rss_mb": self.train_peak_rss_mb,
            "prepared": self.prepared,
            "per_step": steps,
        }


# ----------------------------------------------------------------------------- printing
def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A Markdown table (pasteable into bench/README.md)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def machine_line() -> str:
    """CPU count and load average: the context every number here should be read in."""
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    import torch

    return f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load} (shared machine)"


TRAIN_HEADERS = ["side", "useful tok/s", "step-median tok/s", "tok/CPU-s", "slots/s", "pad", "useful tokens",
                 "loss tokens", "prepared tokens (vs corpus)", "peak RSS train MB", "peak RSS process MB"]


def train_row(name: str, runs: list[dict], corpus_tokens: int) -> list:
    """One :data:`TRAIN_HEADERS` row: medians over the repeats ``runs`` of one side."""
    prep = runs[0]["prepared"]
    m = lambda key: median([r[key] for r in runs])  # noqa: E731
    return [name, m("tok_s"), m("tok_s_step_median"), m("tok_cpu_s"), m("slots_s"), f"{m('pad_fraction'):.1%}",
            m("useful_tokens"), m("loss_tokens"), f"{prep['tokens']:,} ({prep['tokens'] - corpus_tokens:+,})",
            m("train_peak_rss_mb"), m("process_peak_rss_mb")]


def run_line(r: int, side: str, res: dict) -> str:
    """One progress line per measured run."""
    return (f"  repeat {r + 1} {side:>3}: {res['useful_tokens']:,} useful tokens in {res['steps']} steps, "
            f"steady {res['tok_s']:.1f} tok/s (step median {res['tok_s_step_median']:.1f}, "
            f"{res['tok_cpu_s']:.1f} tok/CPU-s), pad {res['pad_fraction']:.1%}, train {res['train_s']:.0f} s, "
            f"peak RSS train {res['train_peak_rss_mb']:.0f} MB / process {res['process_peak_rss_mb']:.0f} MB")


def ratios(d: list[dict], t: list[dict], key: str) -> list[float]:
    """Per-repeat ratios dft/baseline of ``key`` (each pair measured back to back)."""
    return [a[key] / b[key] for a, b in zip(d, t)]
