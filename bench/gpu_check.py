"""dft's GPU path, checked and timed in one process: one JSON document, < 8 minutes on one H200.

    python bench/gpu_check.py --out bench/out/gpu_check.json          # CUDA, real shapes
    python bench/gpu_check.py --tiny --out bench/out/gpu_check_tiny.json   # CPU, tiny shapes (~1 min)

No weights are downloaded: every model is built with random weights from the architecture configs
dft ships (:data:`dft.families.REAL_ARCH`: Llama 3.1 8B, Mistral 7B v0.3, SmolLM 1.7B; with
``--tiny`` the :func:`dft.families.tiny_config` models of the same families), and every token
comes from a real tokenizer through dft's own loaders (:mod:`dft.tokenizers_offline`: Llama 3.1
from ``llama-models``, Mistral v0.3 from ``mistral-common``; the chat template, pad and end
tokens of ``conf/model/*.yaml`` applied by :func:`dft.modeling.load_tokenizer`). Training runs go
through :func:`dft.stages.train_stage` itself; only :func:`dft.modeling.load_model` is replaced by
a builder of the random-weight model (same dtype rule, :func:`dft.modeling.resolve_dtype`).

Checks (each reports ``status`` pass/fail/error/not_measured/skipped, its numbers and seconds):

* ``matmul``: this device's bf16 (CPU: fp32, the dtype dft trains in there) matrix-multiply rate,
  square n x n products (n = 8192; CPU 1024), mean of 10 after 3 warm-ups: the denominator of MFU.
* ``packing``: for the attention implementation dft's loader selects on this device and each
  other one available, a padding-free row of 3 real documents as TRL's collator builds it
  (``DataCollatorForLanguageModeling(padding_free=True)``: restarting ``position_ids``,
  ``cu_seq_lens``) gives each document's logits equal to its own forward (relative L2 error per
  document <= tolerance: bf16 5e-2, fp32 1e-4; bf16 rounding alone gave 0.8 % on an 8-layer and
  1.3-1.4 % on a 16-layer, 1024-wide Llama on CPU, the first document, which shares its prefix,
  included) and a loss equal to the token-weighted mean of the
  separate losses. A control (the same row as one causal document; 140 % in that measurement) must
  differ by > 10x the tolerance, so the comparison can see a leak across documents. Also
  recorded: the same row forwarded with ``use_cache=True`` (what a forward outside TRL's
  ``compute_loss`` does by default): transformers then skips its packed-sequence detection and the
  documents attend to each other.
* ``sft_lora``: LoRA SFT (``conf/peft/lora.yaml``: r 16, all linear projections) packed at 4096
  tokens (``conf/stage/sft.yaml``: ``bfd``, 2 packs per step), bf16, Llama 3.1 8B shape,
  ``data/materials/messages.jsonl``, through ``train_stage``; ``sft_trl_padded``: the same rows
  and LoRA through ``trl.SFTTrainer`` with TRL's defaults (batch 8, padding, no packing,
  max_length 1024) and dft's hardware settings (:func:`dft.stages.hardware_overrides`);
  ``sft_full``: full fine-tuning, SmolLM 1.7B shape; ``sft_qlora``: QLoRA (NF4, double quant) on
  the 8B shape when bitsandbytes imports with CUDA; ``dpo_lora``: DPO with LoRA on the 8B shape
  (reference = adapters disabled), ``data/materials/preference.jsonl``.
  Each: useful tokens/s (non-pad tokens, steady state after ``--warmup`` steps), achieved
  TFLOP/s, MFU vs the measured matmul rate and vs the datasheet peak, peak memory, and
  ``dft.memory``'s estimate for the same step with the measured/estimated ratio.
* ``mcq_eval``: :func:`dft.evaluation.mcq.evaluate_mcq` (greedy + log-likelihood, batch 32 as
  ``conf/eval/full.yaml``) on generated 4-option items, 8B shape, bf16: items/s.
* ``goals``: the issue's goals evaluated (LoRA SFT >= 40 % MFU of the measured matmul rate,
  dft >= 1.5x TRL padded in useful tokens/s, memory estimate within +-20 % of the peak, packing
  exact), each with the value, target and margin; where a speed goal is missed, the
  ``torch.profiler`` top kernels of one profiled step (always recorded, excluded from timing).

FLOPs (per step, counted from the token counts of the batches the trainer received):
``algorithmic`` = the work the method needs, no recomputation: full FT 6 N_mm T + 3 A; LoRA
4 N_mm T + 6 N_lora T + 3 A (frozen base: forward + input gradients, no weight gradients); DPO
adds the reference forward 2 N_mm T + A; N_mm = decoder linear + LM-head weights, T = useful
tokens, A = causal attention forward 2 * layers * q_dim * sum(len_doc^2) (each document attends
only to itself). ``hardware`` adds the forward recomputed by gradient checkpointing. ``mfu`` =
algorithmic FLOP/s / rate; ``mfu_6n`` = the PaLM convention 6 N T / s / rate (Chowdhery et al. 2022,
App. B) for comparison with other reports.

Datasheet peaks (dense bf16, no sparsity): H100/H200 SXM 989 TFLOP/s (NVIDIA H200 Tensor Core GPU
datasheet, nvidia.com/en-us/data-center/h200: "BF16 Tensor Core 1,979 TFLOPS" with sparsity, half
of it dense); A100 312 (NVIDIA A100 datasheet). ``--peak-tflops`` overrides.

Memory: CUDA peak = ``torch.cuda.max_memory_allocated`` during the run minus what was allocated
before it (the model is built inside the run). On CPU (``--tiny``) there is no allocator peak:
the RSS high-water mark above the RSS before the run, sampled every 5 ms (includes allocator and
library overheads; the +-20 % goal is evaluated on CUDA only).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SCHEMA = 1
#: Dense bf16 TFLOP/s by device-name substring (first match wins); source in the module docstring.
DATASHEET_BF16_TFLOPS = (("H200", 989.0, "NVIDIA H200 Tensor Core GPU datasheet (1,979 TFLOPS BF16 with sparsity; dense = half)"),
                         ("H100", 989.0, "NVIDIA H100 Tensor Core GPU datasheet, SXM (1,979 TFLOPS BF16 with sparsity)"),
                         ("A100", 312.0, "NVIDIA A100 Tensor Core GPU datasheet (312 TFLOPS BF16 dense)"))
GOALS = {"mfu": 0.40, "dft_over_trl": 1.5, "memory_ratio_tolerance": 0.20}
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
PACKING_EXTRA_S = 45  # implementations other than dft's own are skipped once the packing check has run this long
#: model yaml (conf/model/) and REAL_ARCH key / tiny family of each role; the SmolLM 1.7B shape
#: is tokenized by Mistral v0.3's tokenizer (ids < 32768 <= its 49152 rows): SmolLM's own tokenizer
#: ships only inside the 100 MB embedded GGUF, which does not travel to a GPU machine.
MODELS = {
    "llama": ("llama3_1_8b", "llama3_1_8b", "llama3"),
    "mistral": ("mistral_7b_v0_3", "mistral_7b_v0_3", "mistral"),
    "smollm_shape": ("mistral_7b_v0_3", "smollm_1_7b", "smollm"),
}


# ----------------------------------------------------------------------------- sizes
def sizes(tiny: bool) -> dict:
    """Every size this script uses; ``--tiny`` shrinks them to seconds on 2 CPU cores."""
    if tiny:
        return dict(matmul_n=512, sft_rows=60, sft_max_length=128, trl_max_length=128, trl_batch=2, dpo_rows=12,
                    dpo_batch=1, dpo_max_length=160, mcq_items=40, pack_docs_max=80, full_rows=60)
    return dict(matmul_n=8192, sft_rows=1400, sft_max_length=4096, trl_max_length=None, trl_batch=None, dpo_rows=64,
                dpo_batch=4,
                dpo_max_length=1024, mcq_items=320, pack_docs_max=600, full_rows=1400)


BUDGET_S = {  # per check, H200; a check that starts after --deadline-s is skipped
    "environment": 20, "matmul": 15, "packing": 60, "sft_lora": 75, "sft_trl_padded": 45, "dpo_lora": 50,
    "mcq_eval": 40, "sft_full": 45, "sft_qlora": 75,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the default-suite test runs this)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON document here (atomically)")
    p.add_argument("--steps", type=int, default=None, help="timed optimiser steps per training run (default 5; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 0)")
    p.add_argument("--checks", nargs="+", default=None, choices=list(BUDGET_S)[1:], help="run only these")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip checks that would start after this many seconds (default 450; tiny 300)")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet dense bf16 peak (default: by device name)")
    p.add_argument("--cache", type=Path, default=None,
                   help="dft cache for the converted tokenizers and the tiny model dft's loader is probed with "
                        "(default: a temp dir; ~/.cache/dft is what dft itself uses)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (1 if a.tiny else 5)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.tiny else 2)
    a.deadline_s = a.deadline_s if a.deadline_s is not None else (300.0 if a.tiny else 450.0)
    return a


def say(args, msg: str) -> None:
    if not args.quiet:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment
def environment(device: str) -> dict:
    """Versions and the device: what a reader needs to compare two runs of this script."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    pkgs = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "hydra-core",
                 "omegaconf", "llama-models", "mistral-common", "tiktoken", "sentencepiece", "flash-attn", "kernels"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    env = {"python": platform.python_version(), "packages": pkgs, "device": device, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                   sm_count=prop.multi_processor_count, cuda=torch.version.cuda,
                   bf16_supported=torch.cuda.is_bf16_supported())
    return env


def datasheet_peak(env: dict, override: Optional[float]) -> tuple[Optional[float], Optional[str]]:
    if override:
        return override, "--peak-tflops"
    name = env.get("gpu") or ""
    for key, tflops, source in DATASHEET_BF16_TFLOPS:
        if key in name:
            return tflops, source
    return None, None


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block, in bytes above what was in use when it began (see module docstring)."""

    def __init__(self, device: str):
        self.device, self.peak, self.source = device, None, None
        self._stop = threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            import torch

            sync(self.device)
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.source = "torch.cuda.max_memory_allocated minus allocated before"
        else:
            import psutil

            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self._max = self.base

            def sample():
                while not self._stop.wait(0.005):
                    self._max = max(self._max, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
            self.source = "RSS high-water above RSS before, sampled every 5 ms (CPU: no allocator peak)"
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated() - self.base
            self.reserved = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()
            import psutil

            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.peak = self._max - self.base
        return False


# ----------------------------------------------------------------------------- models and tokenizers
class Factory:
    """Random-weight models and start folders (tokenizer + ``config.json``, no weights) per role."""

    def __init__(self, args, device: str, cache: Path, scratch: Path):
        self.args, self.device, self.cache, self.scratch = args, device, cache, scratch
        self.start_dirs: dict[str, Path] = {}
        self._cfgs: dict[tuple, Any] = {}
        self.quantized = 0  # parameters the last QLoRA build stored in NF4

    def hf_config(self, role: str):
        from dft.families import REAL_ARCH, hf_config, tiny_config

        _, arch, family = MODELS[role]
        return tiny_config(family) if self.args.tiny else hf_config(REAL_ARCH[arch])

    def model_cfg(self, role: str, extra: Optional[list[str]] = None):
        from bench.common import compose

        key = (role, *(extra or []))
        if key not in self._cfgs:
            self._cfgs[key] = compose([f"model={MODELS[role][0]}", "logger=none", *(extra or [])])
        return self._cfgs[key]

    def start_dir(self, role: str) -> Path:
        """A folder with the role's real tokenizer (dft's offline loaders) and its config.json."""
        if role in self.start_dirs:
            return self.start_dirs[role]
        from dft import tokenizers_offline

        out = self.scratch / f"start-{role}"
        out.mkdir(parents=True, exist_ok=True)
        if MODELS[role][2] == "llama3":
            tok = tokenizers_offline.load_llama3_tokenizer(self.cache, instruct=False)
        else:
            tok = tokenizers_offline.load_mistral_v3_tokenizer(self.cache)
        tok.save_pretrained(out)
        cfg = self.hf_config(role)
        cfg.architectures = None
        cfg.save_pretrained(out)
        self.start_dirs[role] = out
        return out

    def build(self, hf_cfg, dtype, attn: Optional[str] = None, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        kw = {"dtype": dtype}
        if attn:
            kw["attn_implementation"] = attn
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(hf_cfg, **kw)
        return model

    def fake_load_model(self, qlora_ok: bool):
        """A stand-in for :func:`dft.modeling.load_model`: same signature and dtype rule, random weights."""
        import dft.modeling as M

        def load_model(path, model_cfg, *, device="cpu", peft_cfg=None, for_training=False, dtype=None):
            from transformers import AutoConfig

            torch_dtype = M.resolve_dtype(dtype, device, "dtype") if dtype is not None else M.resolve_dtype(model_cfg.dtype, device)
            model = self.build(AutoConfig.from_pretrained(path), torch_dtype)
            if for_training and peft_cfg is not None and peft_cfg.method == "qlora":
                if not qlora_ok:
                    raise RuntimeError("qlora requested without bitsandbytes on CUDA")
                from bench.gpu_lora_bench import quantize_linears_

                self.quantized = quantize_linears_(model, compute_dtype=torch_dtype)
                model.is_loaded_in_4bit = True  # what TRL and PEFT read to treat the model as QLoRA
                free(device)
            return model

        return load_model


def dft_attention_choice(factory: Factory) -> str:
    """The attention implementation dft's own loader ends up with on this device (tiny Llama folder)."""
    import dft.modeling as M
    from dft.families import ensure_tiny_model

    cfg = factory.model_cfg("llama")
    path = ensure_tiny_model(factory.cache, "llama3")
    model = M.load_model(path, cfg.model, device=factory.device)
    impl = model.config._attn_implementation
    del model
    return impl


# ----------------------------------------------------------------------------- packing
def _rel(a, b) -> float:
    import torch

    return float(torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float()).clamp_min(1e-30))


def check_packing(args, factory: Factory, S: dict) -> dict:
    """Packed row of 3 documents vs each document alone, for every attention implementation."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from dft.data import load_split
    from dft.modeling import load_tokenizer, resolve_dtype

    t0 = time.perf_counter()
    device = factory.device
    dtype = resolve_dtype("auto", device)
    tol = {"logits_rel_l2": 5e-2, "loss_rel": 1e-2} if dtype != torch.float32 else {"logits_rel_l2": 1e-4, "loss_rel": 1e-5}
    selected = dft_attention_choice(factory)
    out: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "dft_selects": selected, "tolerance": tol,
                           "families": {}}
    ok = True
    for role in ("llama", "mistral"):
        cfg = factory.model_cfg(role)
        tok = load_tokenizer(factory.start_dir(role), cfg.model)
        rows = load_split(cfg.data, "messages")
        from dft.families import encode_chat

        docs = []
        for r in rows:  # 3 real conversations of different lengths, longest first
            ids = encode_chat(tok, r["messages"], cfg.model)
            if len(ids) <= S["pack_docs_max"] and all(abs(len(ids) - len(d)) > 10 for d in docs):
                docs.append(ids)
            if len(docs) == 3:
                break
        collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in collate([{"input_ids": d} for d in docs]).items()}
        model = factory.build(factory.hf_config(role), dtype)
        model.eval()
        fam: dict[str, Any] = {"doc_tokens": [len(d) for d in docs], "implementations": {}}
        impls = [selected] + [i for i in ATTN_IMPLS if i != selected]  # flex_attention last: it compiles per shape
        for impl in impls:
            rec: dict[str, Any] = {"selected_by_dft": impl == selected}
            if impl != selected and time.perf_counter() - t0 > PACKING_EXTRA_S:
                fam["implementations"][impl] = {**rec, "available": None,
                                                "reason": f"skipped: packing check past {PACKING_EXTRA_S} s"}
                continue
            if device == "cpu" and impl.startswith(("flash", "flex")):
                fam["implementations"][impl] = {**rec, "available": False,
                                                "reason": "not tried on CPU (CUDA kernels / inductor compilation)"}
                continue
            try:
                model.set_attn_implementation(impl)
            except Exception as e:  # noqa: BLE001 - unavailable implementation: report why
                fam["implementations"][impl] = {**rec, "available": False, "reason": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            try:
                with torch.no_grad():
                    # as TRL's SFTTrainer.compute_loss calls it: the collated batch + use_cache=False
                    # (transformers detects packed rows from position_ids only without a cache)
                    packed = model(**batch, use_cache=False)
                    logits = packed.logits[0]
                    cached = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=True).logits[0]
                    seps, losses, counts, controls, with_cache = [], [], [], [], []
                    # control: the same row as one causal document (positions 0..T-1), so documents 2
                    # and 3 attend to the ones before them: what a leak across documents looks like
                    ctrl = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
                    start = 0
                    for i, d in enumerate(docs):
                        ids = torch.tensor([d], device=device)
                        o = model(input_ids=ids, labels=ids, use_cache=False)
                        seps.append(_rel(logits[start:start + len(d)], o.logits[0]))
                        if i:
                            controls.append(_rel(ctrl[start:start + len(d)], o.logits[0]))
                            with_cache.append(_rel(cached[start:start + len(d)], o.logits[0]))
                        losses.append(float(o.loss))
                        counts.append(len(d) - 1)
                        start += len(d)
                    control = min(controls)
                weighted = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
                loss_rel = abs(float(packed.loss) - weighted) / abs(weighted)
                passed = max(seps) <= tol["logits_rel_l2"] and loss_rel <= tol["loss_rel"]
                discriminates = control > 10 * tol["logits_rel_l2"]
                rec.update(available=True, logits_rel_l2_per_doc=[round(x, 7) for x in seps],
                           packed_loss=round(float(packed.loss), 6), weighted_separate_loss=round(weighted, 6),
                           loss_rel_diff=round(loss_rel, 8), control_rel_l2=round(control, 5),
                           control_discriminates=discriminates,
                           same_row_with_cache_rel_l2=round(max(with_cache), 5), status="pass" if passed and discriminates else "fail")
                ok = ok and passed and discriminates
            except Exception as e:  # noqa: BLE001
                rec.update(available=True, status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
                ok = False
            fam["implementations"][impl] = rec
        del model
        free(device)
        out["families"][role] = fam
    tried = [r for f in out["families"].values() for r in f["implementations"].values() if r.get("available")]
    out["status"] = "pass" if ok and tried else "fail"
    sel = [f["implementations"][selected].get("status") for f in out["families"].values()]
    out["selected_status"] = "pass" if sel and all(x == "pass" for x in sel) else "fail"
    return out


# ----------------------------------------------------------------------------- training meter
class StepMeter:
    """Class-level wrapper of a TRL trainer: per optimiser step useful tokens, slots, sum of squared
    document lengths (for attention FLOPs) and seconds (synchronised on CUDA); profiles step
    ``profile_step`` (1-based) with ``torch.profiler`` and leaves it out of the timing.

    Time of a step = end of the previous step (or the first ``training_step`` call) to
    ``on_step_end``, as :class:`bench.common.TrainMeter` measures it.
    """

    def __init__(self, trainer_cls, device: str, profile_step: Optional[int]):
        self.cls, self.device, self.profile_step = trainer_cls, device, profile_step
        self.steps: list[dict] = []
        self.max_slots_micro = 0
        self.profile: Optional[list] = None
        self.args_seen: dict = {}
        self._prev = self._cur = self._prof = None

    @staticmethod
    def _doc_lengths(inputs) -> list[int]:
        if inputs.get("cu_seq_lens_q") is not None:
            return [int(x) for x in inputs["cu_seq_lens_q"].diff().tolist() if x > 0]
        if inputs.get("attention_mask") is not None:
            return [int(x) for x in inputs["attention_mask"].sum(-1).tolist()]
        return [int(inputs["input_ids"].shape[-1])] * int(inputs["input_ids"].shape[0])

    def __enter__(self):
        import torch
        from transformers import TrainerCallback

        from bench.common import _batch_counts

        meter = self
        self._orig = (self.cls.training_step, self.cls.train)
        orig_step, orig_train = self._orig

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if meter.profile_step and state.global_step + 1 == meter.profile_step:
                    sync(meter.device)
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if meter.device == "cuda":
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    meter._prof = torch.profiler.profile(activities=acts)
                    meter._prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                sync(meter.device)
                now = time.perf_counter()
                profiled = meter._prof is not None
                if profiled:
                    meter._prof.__exit__(None, None, None)
                    try:
                        meter.profile = top_kernels(meter._prof, meter.device)
                    except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the run
                        meter.profile = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
                    meter._prof = None
                if meter._cur is not None and meter._prev is not None:
                    meter.steps.append({**meter._cur, "seconds": now - meter._prev, "profiled": profiled})
                meter._cur, meter._prev = None, time.perf_counter()

        def training_step(trainer, model, inputs, *a, **k):
            if meter._prev is None:
                sync(meter.device)
                meter._prev = time.perf_counter()
            useful, slots, loss_tokens = _batch_counts(inputs)
            lens = StepMeter._doc_lengths(inputs)
            meter.max_slots_micro = max(meter.max_slots_micro, slots)
            cur = meter._cur or {"useful": 0, "slots": 0, "loss_tokens": 0, "sum_len_sq": 0, "docs": 0}
            cur["useful"] += useful
            cur["slots"] += slots
            cur["loss_tokens"] += loss_tokens
            cur["sum_len_sq"] += sum(n * n for n in lens)
            cur["docs"] += len(lens)
            meter._cur = cur
            return orig_step(trainer, model, inputs, *a, **k)

        def train(trainer, *a, **k):
            trainer.add_callback(Cb())
            targs = trainer.args
            gc_new = getattr(targs, "activation_checkpointing", None)  # transformers >= 5.2x; older: gradient_checkpointing
            meter.args_seen = {"gradient_checkpointing": bool(gc_new if gc_new is not None
                                                              else getattr(targs, "gradient_checkpointing", False)),
                               "bf16": bool(trainer.args.bf16), "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
                               "max_length": getattr(trainer.args, "max_length", None),
                               "packing": getattr(trainer.args, "packing", None)}
            return orig_train(trainer, *a, **k)

        self.cls.training_step, self.cls.train = training_step, train
        return self

    def __exit__(self, *exc):
        self.cls.training_step, self.cls.train = self._orig
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
        return False

    def steady(self, warmup: int) -> list[dict]:
        return [s for s in self.steps[warmup:] if not s["profiled"]]


def top_kernels(prof, device: str, n: int = 12) -> list[dict]:
    """The ``n`` kernels (CUDA) or operators (CPU) with the most self time in a profiled step."""
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device == "cuda":
        events = [e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)] or events
    total = sum(getattr(e, attr) for e in events) or 1
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:120], "ms": round(getattr(e, attr) / 1e3, 3), "share": round(getattr(e, attr) / total, 4),
             "calls": e.count} for e in events[:n]]


# ----------------------------------------------------------------------------- FLOPs and rates
def flops(hf_cfg, method: str, tokens: int, sum_len_sq: int, *, trainable: int, gc: bool, dpo: bool = False) -> dict:
    """Algorithmic and hardware FLOPs of one training step (formulas in the module docstring)."""
    from dft.memory import _shape, count_parameters

    s = _shape(hf_cfg)
    c = count_parameters(hf_cfg)
    n_mm = c["linear"] + s["vocab"] * s["hidden"]  # decoder linears + LM head (tied or not, the matmul runs)
    attn = 2 * s["layers"] * s["q_dim"] * sum_len_sq  # causal forward: QK^T and AV over each document
    if method == "full":
        algo = 6 * n_mm * tokens + 3 * attn
        recompute = 2 * c["linear"] * tokens + attn
    else:
        algo = 4 * n_mm * tokens + 6 * trainable * tokens + 3 * attn
        recompute = 2 * c["linear"] * tokens + 2 * trainable * tokens + attn
    if dpo:
        algo += 2 * n_mm * tokens + attn  # reference forward (adapters disabled), no gradients
    return {"algorithmic": algo, "hardware": algo + (recompute if gc else 0), "palm_6n": 6 * c["total"] * tokens}


def measure_matmul(device: str, n: int) -> dict:
    """Mean TFLOP/s of ``n x n @ n x n`` in the training dtype (bf16 CUDA, fp32 CPU), 10 after 3 warm-ups."""
    import torch

    from dft.modeling import resolve_dtype

    dtype = resolve_dtype("auto", device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    reps = 10 if device == "cuda" else 3
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del a, b
    free(device)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds_per_product": round(dt, 6),
            "tflops": round(2 * n**3 / dt / 1e12, 4)}


def rates(fl: dict, seconds: float, rate_tflops: float, peak_tflops: Optional[float]) -> dict:
    achieved = fl["algorithmic"] / seconds / 1e12
    hw = fl["hardware"] / seconds / 1e12
    out = {"tflops_algorithmic": round(achieved, 4), "tflops_hardware": round(hw, 4),
           "mfu": round(achieved / rate_tflops, 4), "hfu": round(hw / rate_tflops, 4),
           "mfu_6n": round(fl["palm_6n"] / seconds / 1e12 / rate_tflops, 4)}
    if peak_tflops:
        out.update(mfu_vs_datasheet=round(achieved / peak_tflops, 4), hfu_vs_datasheet=round(hw / peak_tflops, 4))
    return out


def memory_estimate(hf_cfg, method: str, dtype: str, rows: int, *, r: int, dropout: float, gc: bool,
                    targets: list, per_device_batch: int, max_length: int, dpo: bool = False) -> dict:
    """dft.memory's estimate for the step as run (``rows`` = tokens of the largest micro-batch, pads
    included) and as ``dft.memory.describe`` prints it before a stage (batch x max_length)."""
    from dft.memory import estimate_for_config

    kw = dict(dtype=dtype, r=r, target_modules=targets, lora_dropout=dropout, gradient_checkpointing=gc)
    as_run = estimate_for_config(hf_cfg, method, batch=1, seq_len=rows, **kw)
    printed = estimate_for_config(hf_cfg, method, batch=per_device_batch * (2 if dpo else 1), seq_len=max_length, **kw)
    return {"as_run": as_run, "as_printed_total": printed["total"]}


# ----------------------------------------------------------------------------- training runs
def train_run(args, factory: Factory, ctx: dict, *, role: str, kind: str, peft: str, rows: list, overrides: dict,
              trl_padded: bool = False, qlora_ok: bool = False) -> dict:
    """One training run through ``dft.stages.train_stage`` (or TRL defaults), measured."""
    from unittest import mock

    import dft.modeling as M
    from dft.modeling import load_tokenizer, peft_config
    from dft.stages import hardware_overrides, stage_module, train_stage

    device = factory.device
    cfg = factory.model_cfg(role, [f"peft={peft}", f"strategy={kind}"])
    stage_cfg = cfg.strategy[kind]
    total_steps = args.warmup + args.steps + 1  # + 1 profiled step, not timed
    trainer_kw = {**dict(stage_cfg.trainer), "max_steps": total_steps, "save_strategy": "no",
                  "logging_steps": total_steps, **overrides}
    start = factory.start_dir(role)
    _, trainer_cls = stage_module(kind).trainer_classes()
    hf_cfg = factory.hf_config(role)
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=factory.scratch))
    with StepMeter(trainer_cls, device, profile_step=total_steps) as meter, PeakMemory(device) as mem, \
            mock.patch.object(M, "load_model", factory.fake_load_model(qlora_ok)):
        t0 = time.perf_counter()
        if not trl_padded:
            from omegaconf import OmegaConf

            stage = OmegaConf.create({**OmegaConf.to_container(stage_cfg, resolve=True), "trainer": trainer_kw})
            facts = train_stage(kind=kind, stage_cfg=stage, rows=rows, start_path=start, model_cfg=cfg.model,
                                peft_cfg=cfg.peft, work_dir=work / "work", out_dir=work / "final", device=device,
                                report_to="none", seed=cfg.seed, save=False)
            trainable = facts["trainable_params"]
            loss = facts["train_loss"]
        else:  # TRL's SFTTrainer as a user first configures it: its defaults + what the hardware needs
            from trl import SFTConfig, SFTTrainer

            from dft.stages.sft import build_dataset

            tok = load_tokenizer(start, cfg.model)
            kw: dict = dict(output_dir=str(work / "work"), max_steps=total_steps, report_to="none",
                            save_strategy="no", logging_steps=total_steps, **overrides)
            kw.update(hardware_overrides(kw, device, cfg.peft))
            model = M.load_model(start, cfg.model, device=device, peft_cfg=cfg.peft, for_training=True)
            model.config.pad_token_id = tok.pad_token_id
            trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=build_dataset(rows, tok, cfg.model),
                                 processing_class=tok, peft_config=peft_config(cfg.peft, cfg.model))
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            loss = float(trainer.train().training_loss)
            trainer_kw = {k: v for k, v in kw.items() if k != "output_dir"}
            del trainer, model
        wall = time.perf_counter() - t0
    free(device)
    steady = meter.steady(args.warmup)
    if not steady:
        raise RuntimeError(f"no steady-state step measured ({len(meter.steps)} steps)")
    secs = sum(s["seconds"] for s in steady)
    useful = sum(s["useful"] for s in steady)
    slots = sum(s["slots"] for s in steady)
    gc_on = meter.args_seen.get("gradient_checkpointing", False)
    method = cfg.peft.method
    fl = flops(hf_cfg, method, useful, sum(s["sum_len_sq"] for s in steady), trainable=trainable, gc=gc_on,
               dpo=kind == "dpo")
    dtype = "bfloat16" if meter.args_seen.get("bf16") else "float32"
    targets = list(cfg.peft.get("target_modules") or cfg.model.lora_target_modules)
    est = memory_estimate(hf_cfg, method, dtype, meter.max_slots_micro, r=int(cfg.peft.get("r", 16) or 16),
                          dropout=float(cfg.peft.get("dropout", 0.0) or 0.0), gc=gc_on, targets=targets,
                          per_device_batch=int(meter.args_seen["per_device_train_batch_size"]),
                          max_length=int(meter.args_seen.get("max_length") or 1024), dpo=kind == "dpo")
    res = {
        "model_shape": MODELS[role][1] if not args.tiny else f"tiny-{MODELS[role][2]}",
        "tokenizer": MODELS[role][0], "kind": kind, "peft": method, "side": "trl_defaults_padded" if trl_padded else "dft",
        "trainer": {k: v for k, v in trainer_kw.items() if isinstance(v, (int, float, str, bool, type(None)))},
        "settings_seen": meter.args_seen, "trainable_params": trainable, "train_loss": round(loss, 5),
        "steps_total": len(meter.steps), "steps_timed": len(steady), "steady_seconds": round(secs, 4),
        "useful_tokens_per_step": round(useful / len(steady), 1), "pad_fraction": round(1 - useful / slots, 4) if slots else None,
        "useful_tokens_per_s": round(useful / secs, 2),
        "step_seconds": [round(s["seconds"], 4) for s in meter.steps],
        **rates(fl, secs, ctx["matmul_tflops"], ctx["peak_tflops"]),
        "peak_memory_gib": round(mem.peak / 2**30, 4), "peak_memory_source": mem.source,
        "in_use_before_gib": round(mem.base / 2**30, 4),  # left over by earlier checks (CUDA) / RSS (CPU)
        "memory_estimate_gib": round(est["as_run"]["total"] / 2**30, 4),
        "memory_estimate_parts_gib": {k: round(est["as_run"][k] / 2**30, 4) for k in
                                      ("weights", "gradients", "optimizer", "activations", "logits")},
        "memory_estimate_as_printed_gib": round(est["as_printed_total"] / 2**30, 4),
        "largest_micro_batch_tokens": meter.max_slots_micro,
        "measured_over_estimate": round(mem.peak / est["as_run"]["total"], 4),
        "profile_top": meter.profile, "wall_s": round(wall, 2),
    }
    if method == "qlora":
        res["quantized_params"] = factory.quantized
    if device == "cuda":
        res["peak_reserved_gib"] = round(mem.reserved / 2**30, 3)
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss}")
    res["status"] = "measured"
    return res


def qlora_status(device: str) -> tuple[bool, str]:
    if device != "cuda":
        return False, "no CUDA device: QLoRA (bitsandbytes NF4) is measured on GPUs only"
    try:
        import bitsandbytes as bnb  # noqa: F401
        import torch

        from bitsandbytes.functional import quantize_4bit

        quantize_4bit(torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
    except Exception as e:  # noqa: BLE001
        return False, f"bitsandbytes unusable with CUDA here: {type(e).__name__}: {str(e)[:200]}"
    return True, ""


# ----------------------------------------------------------------------------- MCQ
def mcq_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` generated 4-option items (question ~30-60 words, options 2-6 words), answers A-D."""
    rng = random.Random(seed)
    words = ("alloy crystal lattice modulus fracture tensile grain boundary diffusion polymer ceramic oxide "
             "enzyme collagen tissue membrane protein neuron cortex artery ligament cartilage bone stress strain "
             "energy entropy phase transition temperature pressure density viscosity solvent catalyst").split()
    items = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(30, 60))).capitalize() + "?"
        opts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(4)]
        items.append({"id": f"gen-{i}", "question": q, "options": opts, "answer": "ABCD"[rng.randrange(4)],
                      "category": f"c{i % 4}"})
    return items


def check_mcq(args, factory: Factory, S: dict) -> dict:
    from dft.evaluation.mcq import evaluate_mcq
    from dft.modeling import generation_eos_ids, load_tokenizer, resolve_dtype

    cfg = factory.model_cfg("llama", ["eval=full"])
    device = factory.device
    dtype = resolve_dtype("auto", device)
    tok = load_tokenizer(factory.start_dir("llama"), cfg.model)
    items = mcq_items(S["mcq_items"])
    bs = int(cfg.eval.batch_size)
    with PeakMemory(device) as mem:
        model = factory.build(factory.hf_config("llama"), dtype)
        kw = dict(eos_ids=generation_eos_ids(tok, cfg.model), generate=bool(cfg.eval.generate), loglik=bool(cfg.eval.loglik),
                  max_new_tokens=int(cfg.eval.max_new_tokens), batch_size=bs, progress=False)
        evaluate_mcq(model, tok, cfg.model, items[:bs], **kw)  # warm-up: kernels, allocator
        sync(device)
        t0 = time.perf_counter()
        rec = evaluate_mcq(model, tok, cfg.model, items, **kw)
        sync(device)
        secs = time.perf_counter() - t0
        del model
    free(device)
    return {"status": "measured", "items": rec["n"], "batch_size": bs, "dtype": str(dtype).replace("torch.", ""),
            "generate": kw["generate"], "loglik": kw["loglik"], "max_new_tokens": kw["max_new_tokens"],
            "seconds": round(secs, 3), "items_per_s": round(rec["n"] / secs, 3),
            "prefilled_tokens_per_s": round(rec["tokens"]["prefilled"] / secs, 1), "tokens": rec["tokens"],
            "acc_ll": rec["acc_ll"], "peak_memory_gib": round(mem.peak / 2**30, 4)}


# ----------------------------------------------------------------------------- goals
def goals(checks: dict, device: str) -> list[dict]:
    out = []
    pk = checks.get("packing", {})
    out.append({"goal": "packing exact for every available attention implementation", "status": pk.get("status", "not_measured"),
                "dft_selects": pk.get("dft_selects"), "selected_status": pk.get("selected_status")})
    lora = checks.get("sft_lora", {})
    if lora.get("status") == "measured":
        v = lora["mfu"]
        g = {"goal": f"LoRA SFT MFU >= {GOALS['mfu']:.0%} of the measured matmul rate", "value": v, "target": GOALS["mfu"],
             "by": round(v / GOALS["mfu"] - 1, 4), "status": "pass" if v >= GOALS["mfu"] else "fail"}
        if g["status"] == "fail":
            g["profile_top_dft"] = lora.get("profile_top")
        out.append(g)
    trl = checks.get("sft_trl_padded", {})
    if lora.get("status") == "measured" and trl.get("status") == "measured":
        v = lora["useful_tokens_per_s"] / trl["useful_tokens_per_s"]
        g = {"goal": f"dft >= {GOALS['dft_over_trl']}x TRL padded defaults in useful tokens/s", "value": round(v, 4),
             "target": GOALS["dft_over_trl"], "by": round(v / GOALS["dft_over_trl"] - 1, 4),
             "status": "pass" if v >= GOALS["dft_over_trl"] else "fail",
             "trl_pad_fraction": trl.get("pad_fraction"), "ideal_gain_1_over_1_minus_p": round(1 / (1 - trl["pad_fraction"]), 3)
             if trl.get("pad_fraction") is not None and trl["pad_fraction"] < 1 else None}
        if g["status"] == "fail":
            g.update(profile_top_dft=lora.get("profile_top"), profile_top_trl=trl.get("profile_top"))
        out.append(g)
    tol = GOALS["memory_ratio_tolerance"]
    for name in ("sft_lora", "sft_trl_padded", "sft_full", "sft_qlora", "dpo_lora"):
        c = checks.get(name, {})
        if c.get("status") != "measured":
            continue
        v = c["measured_over_estimate"]
        g = {"goal": f"{name}: dft.memory estimate within +-{tol:.0%} of the measured peak", "value": v,
             "target": [1 - tol, 1 + tol], "by": round(abs(v - 1) - tol, 4)}
        g["status"] = ("pass" if abs(v - 1) <= tol else "fail") if device == "cuda" else "not_evaluated"
        if device != "cuda":
            g["reason"] = "CPU: RSS, not an allocator peak; evaluated on CUDA only"
        out.append(g)
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.common import offline_env

    offline_env()
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch

    device = "cpu" if args.tiny else ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device != "cuda":
        print("no CUDA device: run with --tiny (CPU, tiny shapes) or on a GPU", file=sys.stderr)
        return 2
    S = sizes(args.tiny)
    t_start = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="gpu-check-")  # start folders, trainer output dirs
    if args.cache is None:
        args.cache = Path(scratch.name) / "cache"
    args.cache.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"schema": SCHEMA, "script": "bench/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv,
                           "tiny": args.tiny, "sizes": S, "steps": args.steps, "warmup": args.warmup,
                           "goals_targets": GOALS, "checks": {}}
    checks = doc["checks"]
    factory = Factory(args, device, args.cache, Path(scratch.name))
    ctx: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], dict]) -> None:
        if args.checks and name not in args.checks and name != "matmul":
            return
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline_s:
            checks[name] = {"status": "skipped", "reason": f"time budget: {elapsed:.0f} s > --deadline-s {args.deadline_s:g}"}
            return
        say(args, f"{name} ...")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints metrics dicts: stdout is the JSON only
                res = fn()
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            res = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}",
                   "traceback": traceback.format_exc()[-3000:]}
        free(device)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        res["budget_s"] = BUDGET_S[name] if not args.tiny else None
        if not args.tiny and res["seconds"] > BUDGET_S[name]:
            res["over_budget_s"] = round(res["seconds"] - BUDGET_S[name], 1)
        checks[name] = res
        say(args, f"{name}: {res.get('status')} in {res['seconds']:.1f} s")

    env_t0 = time.perf_counter()
    doc["environment"] = environment(device)
    peak, source = datasheet_peak(doc["environment"], args.peak_tflops)
    doc["datasheet_peak_tflops"] = {"value": peak, "source": source}
    ctx["peak_tflops"] = peak
    doc["environment"]["seconds"] = round(time.perf_counter() - env_t0, 2)

    def matmul():
        r = measure_matmul(device, S["matmul_n"])
        ctx["matmul_tflops"] = r["tflops"]
        if peak:
            r["fraction_of_datasheet"] = round(r["tflops"] / peak, 4)
        return {"status": "measured", **r}

    run("matmul", matmul)
    if "matmul_tflops" not in ctx:
        ctx["matmul_tflops"] = float("nan")
    from dft.data import load_split

    data_cfg = factory.model_cfg("llama").data
    messages = load_split(data_cfg, "messages")
    prefs = load_split(data_cfg, "preference")
    run("packing", lambda: check_packing(args, factory, S))
    run("sft_lora", lambda: train_run(args, factory, ctx, role="llama", kind="sft", peft="lora",
                                      rows=messages[:S["sft_rows"]], overrides={"max_length": S["sft_max_length"]}))
    run("sft_trl_padded", lambda: train_run(args, factory, ctx, role="llama", kind="sft", peft="lora",
                                            rows=messages[:S["sft_rows"]], trl_padded=True,
                                            overrides={} if not args.tiny else  # TRL's defaults on the GPU
                                            {"max_length": S["trl_max_length"], "per_device_train_batch_size": S["trl_batch"]}))
    run("dpo_lora", lambda: train_run(args, factory, ctx, role="llama", kind="dpo", peft="lora", rows=prefs[:S["dpo_rows"]],
                                      overrides={"per_device_train_batch_size": S["dpo_batch"],
                                                 "max_length": S["dpo_max_length"]}))
    run("mcq_eval", lambda: check_mcq(args, factory, S))
    run("sft_full", lambda: train_run(args, factory, ctx, role="smollm_shape", kind="sft", peft="full",
                                      rows=messages[:S["full_rows"]], overrides={"max_length": S["sft_max_length"]}))
    ok, why = qlora_status(device)
    if ok:
        run("sft_qlora", lambda: train_run(args, factory, ctx, role="llama", kind="sft", peft="qlora",
                                           rows=messages[:S["sft_rows"]], overrides={"max_length": S["sft_max_length"]},
                                           qlora_ok=True))
    else:
        checks["sft_qlora"] = {"status": "not_measured", "reason": why}
    doc["goals"] = goals(checks, device)
    doc["total_seconds"] = round(time.perf_counter() - t_start, 2)
    text = json.dumps(doc, indent=1, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        part = args.out.with_name(args.out.name + f".tmp-{os.getpid()}")
        part.write_text(text)
        os.replace(part, args.out)
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
