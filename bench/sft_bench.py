"""Side by side: the SFT stage through dft vs TRL's ``SFTTrainer`` as a user first configures it.

    .venv/bin/python bench/sft_bench.py [--rows 400] [--steps 6] [--repeats 1] [--trl-batch-size B]
                                        [--dft-override KEY=VALUE ...] [--json FILE]

Both sides train the same model (the embedded SmolLM2-135M-Instruct, LoRA from
``conf/peft/lora.yaml``) on the same rows (the first ``--rows`` conversations of
``data/materials/messages.jsonl``: OpenStax glossary definitions interleaved with exercises and
review problems, 20-600 tokens) in the same prompt-completion form (``dft.stages.sft``), for the
same number of optimiser steps (``--steps``, default 6 so that one repeat of both sides fits in
about 10 minutes on 2 shared cores; ``--steps 0`` uses ``conf/stage/sft.yaml``'s ``max_steps``, 10):

* **dft**: ``dft.stages.train_stage(kind="sft", ...)`` with the stage config composed from
  ``conf/stage/sft.yaml``: packing with TRL's ``bfd`` strategy (padding-free, position ids restart
  per example), ``per_device_train_batch_size`` 2, ``max_length`` = the model's (256);
* **TRL**: ``SFTTrainer(model, SFTConfig(...), peft_config=<the same LoRA>)`` with TRL's
  defaults (no packing: every batch is padded to its longest example; batch size 8) except the
  precision settings this hardware cannot run (``dft.stages.hardware_overrides``: bf16 and gradient
  checkpointing off on CPU) and the same ``max_length``. Its tokenizer is the one shipped with
  the model, as a user would load it.

Each side runs in its own process (peak RSS is its own; the dft process also merges and saves
the LoRA model after training, which its process peak includes and its training peak does not).
The order alternates between repeats. Useful tokens (non-pad tokens after truncation) are counted
exactly from the collated batch each training step receives (``bench.common.TrainMeter``);
throughput is steady state: useful tokens / seconds over every step but the first (warm-up).

Printed: useful tokens/s per side (median over repeats), the dft/TRL ratio (median of per-repeat
ratios), peak RSS, the baseline's padding fraction p = pad slots / all slots and the ideal packing
gain 1/(1-p), and whether dft reaches the goal of 0.9 x 1/(1-p).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (OUT, TRAIN_HEADERS, TrainMeter, compose, machine_line, median, model_path,  # noqa: E402
                          offline_env, ratios, run_child, run_line, table, train_row, write_result)

GOAL = 0.9  # dft must reach this fraction of the ideal packing gain 1/(1-p)


def _rows(cfg, n: int) -> list[dict]:
    from dft.data import load_split

    return load_split(cfg.data, "messages")[:n]


def child(args) -> None:
    offline_env()
    cfg = compose([f"strategy.sft.trainer.max_steps={args.steps}"] + (args.dft_override if args.child == "dft" else []))
    path = model_path(cfg)
    rows = _rows(cfg, args.rows)
    meter = TrainMeter().install()
    from dft.modeling import resolve_device

    device = resolve_device(cfg.device)
    work = Path(tempfile.mkdtemp(prefix=f"sft-{args.child}-", dir=args.workdir))
    info: dict = {"side": args.child, "device": device, "rows": len(rows)}
    try:
        if args.child == "dft":
            from dft.stages import train_stage

            facts = train_stage(kind="sft", stage_cfg=cfg.strategy.sft, rows=rows, start_path=path, model_cfg=cfg.model,
                                peft_cfg=cfg.peft, work_dir=work / "work", out_dir=work / "final", device=device,
                                report_to="none", seed=cfg.seed)
            info.update(train_loss=facts["train_loss"], trainable_params=facts["trainable_params"])
        else:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import SFTConfig, SFTTrainer

            from dft.modeling import peft_config
            from dft.stages import hardware_overrides
            from dft.stages.sft import build_dataset

            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
            kw: dict = dict(output_dir=str(work / "work"), max_length=cfg.model.max_length, max_steps=args.steps,
                            report_to="none")
            if args.trl_batch_size:
                kw["per_device_train_batch_size"] = args.trl_batch_size
            kw.update(hardware_overrides(kw, device, cfg.peft))
            trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=build_dataset(rows, tok, cfg.model),
                                 processing_class=tok, peft_config=peft_config(cfg.peft, cfg.model))
            info.update(batch_size=trainer.args.per_device_train_batch_size, dtype=str(model.dtype),
                        torch_threads=torch.get_num_threads())
            result = trainer.train()
            info.update(train_loss=float(result.training_loss))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info.update(meter.summary())
    write_result(args.result, info)


def probe(args) -> None:
    """Per-token cost of one forward+backward (LoRA) on the same real tokens in five batch layouts.

    Two packs of exactly ``max_length`` tokens filled in order with the first conversations of
    at most ``max_length / 2`` tokens (the one that overflows a pack is cut to fill it), laid out as: (a) TRL's padding-free batch of 2 packs,
    flattened to one row of 2 x max_length with restarting position ids (what dft trains on);
    (b) the same 2 packs as 2 rows; (c) each pack alone (batch 1, as with
    ``per_device_train_batch_size=1``); (d) the same documents as padded rows of 8 with an
    attention mask (the baseline's layout); (e) the same tokens as if they were one document
    (plain causal attention, no block-diagonal mask: what an unpacked long document costs). Reports median wall and CPU milliseconds per real
    token over ``--probe-repeats`` rounds (after one warm-up round; layouts interleaved).
    """
    import statistics

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft.modeling import peft_config

    offline_env()
    cfg = compose()
    path = model_path(cfg)
    L = int(cfg.model.max_length)
    tok = AutoTokenizer.from_pretrained(path)
    docs: list[list[int]] = []
    packs: list[list[list[int]]] = [[], []]
    fill = [0, 0]
    for r in _rows(cfg, args.rows):
        ids = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]
        if len(ids) > L // 2:  # typical packs hold several documents; skip the rare long ones
            continue
        k = 0 if fill[0] < L else 1
        ids = ids[: L - fill[k]]  # the document that overflows a pack is cut to fill it exactly
        if not ids:
            break
        packs[k].append(ids)
        docs.append(ids)
        fill[k] += len(ids)
    n = sum(fill)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), peft_config(cfg.peft, cfg.model))
    model.train()

    def packed(pk):
        return (torch.tensor([t for d in pk for t in d])[None],
                torch.cat([torch.arange(len(d)) for d in pk])[None])

    def padded(batch):
        w = max(len(d) for d in batch)
        ids = torch.zeros(len(batch), w, dtype=torch.long)
        mask = torch.zeros(len(batch), w, dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = 1
        return ids, mask

    def step(inputs):
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = -100
        model(**inputs, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    (fi, fp), (ai, ap_), (bi, bp) = packed(packs[0] + packs[1]), packed(packs[0]), packed(packs[1])
    layouts = {
        f"(a) 2 packs flattened: 1 x {fi.shape[1]} (dft now)": [dict(input_ids=fi, position_ids=fp)],
        f"(b) 2 packs as rows: 2 x {L}": [dict(input_ids=torch.cat([ai, bi]), position_ids=torch.cat([ap_, bp]))]
        if ai.shape[1] == bi.shape[1] == L else [],
        f"(c) 1 pack per step: 2 x (1 x {L})": [dict(input_ids=ai, position_ids=ap_), dict(input_ids=bi, position_ids=bp)],
        "(d) padded rows of 8 + mask": [dict(zip(("input_ids", "attention_mask"), padded(docs[i: i + 8])))
                                        for i in range(0, len(docs), 8)],
        f"(e) same tokens as one document: 1 x {fi.shape[1]}, causal": [dict(input_ids=fi,
                                                                        attention_mask=torch.ones_like(fi))],
    }
    print(f"probe: {machine_line()}\n{len(docs)} documents, {n} tokens, packs of {fill} tokens\n")
    layouts = {k: v for k, v in layouts.items() if v}
    walls: dict[str, list[float]] = {k: [] for k in layouts}
    cpus: dict[str, list[float]] = {k: [] for k in layouts}
    for rep in range(args.probe_repeats + 1):  # layouts interleaved, so a change in the machine's load hits all
        for name, batches in (layouts.items() if rep % 2 else reversed(layouts.items())):
            t, c = time.perf_counter(), time.process_time()
            for b in batches:
                step(b)
            if rep:  # the first round is warm-up
                walls[name].append(time.perf_counter() - t)
                cpus[name].append(time.process_time() - c)
    res = [[name, sum(b["input_ids"].numel() for b in batches), statistics.median(walls[name]) / n * 1e3,
            statistics.median(cpus[name]) / n * 1e3] for name, batches in layouts.items()]
    base = res[0][3]
    print(table([r + [r[3] / base] for r in res], ["layout", "slots", "wall ms/token", "CPU ms/token",
                                                    "CPU vs (a)"]))


def corpus_lengths(cfg, n: int) -> list[int]:
    """Token count of every conversation before truncation (chat template, as TRL renders it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(cfg))
    return [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
            for r in _rows(cfg, n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=400, help="first N conversations of data/materials/messages.jsonl")
    ap.add_argument("--steps", type=int, default=6,
                    help="optimiser steps on each side (0: conf/stage/sft.yaml's max_steps, 10); the first is warm-up")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating order")
    ap.add_argument("--dft-override", action="append", default=[], metavar="KEY=VALUE",
                    help="Hydra override for the dft side only, e.g. strategy.sft.trainer.per_device_train_batch_size=1")
    ap.add_argument("--trl-batch-size", type=int, default=None, help="baseline batch size (default: TRL's)")
    ap.add_argument("--workdir", type=Path, default=OUT / "sft")
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("--probe", action="store_true",
                    help="instead: per-token cost of forward+backward in five batch layouts (see probe())")
    ap.add_argument("--probe-repeats", type=int, default=2, help="timed rounds of the probe (plus one warm-up)")
    ap.add_argument("--child", choices=["dft", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    if args.probe:
        return probe(args)

    offline_env()
    cfg = compose()
    steps = args.steps or int(cfg.strategy.sft.trainer.max_steps)
    dcfg = compose(args.dft_override) if args.dft_override else cfg
    dtr = dcfg.strategy.sft.trainer
    path = model_path(cfg)  # converts the embedded GGUF once, outside any timed process
    lengths = corpus_lengths(cfg, args.rows)
    max_len = int(cfg.model.max_length)
    kept = sum(min(n, max_len) for n in lengths)
    print(f"sft_bench: {time.strftime('%Y-%m-%d %H:%M')}, {machine_line()}")
    print(f"model {path.name}, peft {cfg.peft.method} r={cfg.peft.r}, {len(lengths)} rows "
          f"({sum(lengths):,} tokens, median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}; "
          f"{sum(n > max_len for n in lengths)} longer than max_length {max_len}), {steps} steps, "
          f"{args.repeats} repeat(s)\n")
    runs: dict[str, list[dict]] = {"dft": [], "trl": []}
    common = [__file__, "--rows", str(args.rows), "--steps", str(steps), "--workdir", str(args.workdir)]
    if args.trl_batch_size:
        common += ["--trl-batch-size", str(args.trl_batch_size)]
    for o in args.dft_override:
        common += ["--dft-override", o]
    for r in range(args.repeats):
        for side in (("dft", "trl") if r % 2 == 0 else ("trl", "dft")):
            res = run_child(common + ["--child", side, "--result", str(args.workdir / f"{side}.json")],
                            args.workdir / f"{side}.json", args.workdir / f"{side}-{r}.log")
            runs[side].append(res)
            print(run_line(r, side, res), flush=True)

    d, t = runs["dft"], runs["trl"]
    ratio = median(ratios(d, t, "tok_s"))
    cpu_ratio = median(ratios(d, t, "tok_cpu_s"))
    p = median([x["pad_fraction"] for x in t])
    ideal = 1 / (1 - p)
    dname = (f"dft ({dtr.packing_strategy if dtr.packing else 'no'} packing, batch "
             f"{dtr.per_device_train_batch_size}x{dtr.gradient_accumulation_steps})")
    rows = [train_row(dname, d, kept), train_row(f"TRL defaults (padding, batch {t[0]['batch_size']})", t, kept)]
    print()
    print(table(rows, TRAIN_HEADERS))
    print(f"\ndft / TRL useful tokens/s: {ratio:.2f}x (per repeat: {', '.join(f'{x:.2f}' for x in ratios(d, t, 'tok_s'))}); "
          f"per CPU-second: {cpu_ratio:.2f}x")
    print(f"baseline padding fraction p = {p:.3f}; ideal packing gain 1/(1-p) = {ideal:.2f}x; "
          f"goal {GOAL} x {ideal:.2f} = {GOAL * ideal:.2f}x -> {'MET' if ratio >= GOAL * ideal else 'NOT met'} "
          f"(dft reaches {ratio / ideal:.0%} of the ideal gain)")
    print(f"truncation: {sum(lengths) - kept:,} of {sum(lengths):,} corpus tokens ({(sum(lengths) - kept) / sum(lengths):.2%}) "
          f"lie beyond max_length {max_len} and are dropped on both sides (bfd truncates, as TRL's truncation does)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratio": ratio, "cpu_ratio": cpu_ratio, "p": p, "ideal": ideal},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
