"""Side by side: the CPT stage through dft vs TRL's ``SFTTrainer`` defaults on the same raw text.

    .venv/bin/python bench/cpt_bench.py [--docs 0] [--steps 6] [--trl-steps 4] [--trl-batch-size 1]
                                        [--repeats 1] [--dft-override KEY=VALUE ...] [--json FILE]

Both sides train the embedded SmolLM2-135M-Instruct with the LoRA of ``conf/peft/lora.yaml`` on
the same ``{"text"}`` rows (``data/materials/text.jsonl``: 447 OpenStax sections, ~1.5 M tokens;
``--docs N`` takes the first N):

* **dft**: ``dft.stages.train_stage(kind="cpt", ...)`` with ``conf/stage/cpt.yaml``: packing with
  TRL's ``bfd_split`` (documents longer than a block are split, not cut; padding-free, position
  ids restart per piece), blocks of the model's ``max_length`` (256), batch 2;
* **TRL**: ``SFTTrainer`` with TRL's defaults (no packing, ``max_length`` 1024 with
  ``keep_start`` truncation, padding) except the precision settings the hardware cannot run
  (``dft.stages.hardware_overrides``) and the batch size: TRL's default of 8 sequences of 1024
  tokens per step needs ~8,200 token slots per step, which on this 24 GB machine would not fit
  next to its other users (the SFT bench measured ~3.5 MB of peak RSS per slot), so the baseline
  runs ``--trl-batch-size 1`` by default (throughput per token barely depends on the batch size
  once a row is 1024 tokens long); pass ``--trl-batch-size 8`` where memory allows.

Each side runs in its own process (order alternating between repeats); useful tokens are counted
from the collated batches (``bench.common.TrainMeter``), throughput is steady state (every step
but the first). The two sides run different step counts (``--steps`` for dft, ``--trl-steps``
for TRL) because a baseline step holds several times more tokens; the comparison is tokens/s.

The truncation check tokenizes the corpus as TRL does (text + EOS, no special tokens added) and
compares that token count with the tokens in the training set each side prepared: dft must keep
every corpus token (difference 0); the baseline's dropped fraction is what its default
truncation to 1024 tokens discards.
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

GOAL = 1.0  # dft tokens/s >= the baseline's


def _rows(cfg, n: int) -> list[dict]:
    from dft.data import load_split

    rows = load_split(cfg.data, "text")
    return rows[:n] if n else rows


def child(args) -> None:
    offline_env()
    cfg = compose([f"strategy.cpt.trainer.max_steps={args.steps}"] + (args.dft_override if args.child == "dft" else []))
    path = model_path(cfg)
    rows = _rows(cfg, args.docs)
    meter = TrainMeter().install()
    from dft.modeling import resolve_device

    device = resolve_device(cfg.device)
    work = Path(tempfile.mkdtemp(prefix=f"cpt-{args.child}-", dir=args.workdir))
    info: dict = {"side": args.child, "device": device, "rows": len(rows)}
    try:
        if args.child == "dft":
            from dft.stages import train_stage

            facts = train_stage(kind="cpt", stage_cfg=cfg.strategy.cpt, rows=rows, start_path=path, model_cfg=cfg.model,
                                peft_cfg=cfg.peft, work_dir=work / "work", out_dir=work / "final", device=device,
                                report_to="none", seed=cfg.seed)
            info.update(train_loss=facts["train_loss"], batch_size=int(cfg.strategy.cpt.trainer.per_device_train_batch_size))
        else:
            from datasets import Dataset
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import SFTConfig, SFTTrainer

            from dft.modeling import peft_config
            from dft.stages import hardware_overrides

            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
            kw: dict = dict(output_dir=str(work / "work"), max_steps=args.trl_steps, report_to="none")
            if args.trl_batch_size:
                kw["per_device_train_batch_size"] = args.trl_batch_size
            kw.update(hardware_overrides(kw, device, cfg.peft))
            ds = Dataset.from_list([{"text": r["text"]} for r in rows])
            trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                                 peft_config=peft_config(cfg.peft, cfg.model))
            info.update(batch_size=trainer.args.per_device_train_batch_size, max_length=trainer.args.max_length,
                        dtype=str(model.dtype))
            info.update(train_loss=float(trainer.train().training_loss))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info.update(meter.summary())
    write_result(args.result, info)


def corpus_tokens(cfg, n: int) -> int:
    """Tokens of the corpus as TRL tokenizes it for language modelling: text + EOS, no special tokens added."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(cfg))
    texts = [r["text"] if r["text"].endswith(tok.eos_token) else r["text"] + tok.eos_token for r in _rows(cfg, n)]
    return sum(len(x) for x in tok(texts)["input_ids"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=0, help="first N documents of data/materials/text.jsonl (0: all)")
    ap.add_argument("--steps", type=int, default=6, help="dft optimiser steps (0: conf/stage/cpt.yaml's, 12)")
    ap.add_argument("--trl-steps", type=int, default=4, help="baseline optimiser steps")
    ap.add_argument("--trl-batch-size", type=int, default=1, help="baseline batch size (0: TRL's default, 8)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating order")
    ap.add_argument("--dft-override", action="append", default=[], metavar="KEY=VALUE",
                    help="Hydra override for the dft side only")
    ap.add_argument("--workdir", type=Path, default=OUT / "cpt")
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("--child", choices=["dft", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)

    offline_env()
    cfg = compose()
    steps = args.steps or int(cfg.strategy.cpt.trainer.max_steps)
    dtr = (compose(args.dft_override) if args.dft_override else cfg).strategy.cpt.trainer
    path = model_path(cfg)
    n_tok = corpus_tokens(cfg, args.docs)
    n_docs = len(_rows(cfg, args.docs))
    print(f"cpt_bench: {time.strftime('%Y-%m-%d %H:%M')}, {machine_line()}")
    print(f"model {path.name}, peft {cfg.peft.method} r={cfg.peft.r}, {n_docs} documents, {n_tok:,} corpus tokens "
          f"(text + EOS); dft {steps} steps, TRL {args.trl_steps} steps; {args.repeats} repeat(s)\n")
    runs: dict[str, list[dict]] = {"dft": [], "trl": []}
    common = [__file__, "--docs", str(args.docs), "--steps", str(steps), "--trl-steps", str(args.trl_steps),
              "--trl-batch-size", str(args.trl_batch_size), "--workdir", str(args.workdir)]
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
    tp = t[0]["prepared"]
    rows = [train_row(f"dft ({dtr.packing_strategy if dtr.packing else 'no'} packing {d[0]['prepared']['max_length']}, "
                      f"batch {dtr.per_device_train_batch_size})", d, n_tok),
            train_row(f"TRL defaults (truncate {tp['max_length']}, batch {t[0]['batch_size']})", t, n_tok)]
    print()
    print(table(rows, TRAIN_HEADERS))
    print(f"\ndft / TRL useful tokens/s: {ratio:.2f}x (per repeat: {', '.join(f'{x:.2f}' for x in ratios(d, t, 'tok_s'))}); "
          f"per CPU-second: {cpu_ratio:.2f}x; goal >= {GOAL:.1f}x -> {'MET' if ratio >= GOAL else 'NOT met'}")
    dropped_d = n_tok - d[0]["prepared"]["tokens"]
    dropped_t = n_tok - tp["tokens"]
    print(f"corpus tokens dropped before training: dft {dropped_d:,} of {n_tok:,} "
          f"({'none: every corpus token is in a packed sequence' if dropped_d == 0 else 'TOKENS LOST'}); "
          f"TRL defaults {dropped_t:,} ({dropped_t / n_tok:.1%}, keep_start truncation to {tp['max_length']})")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratio": ratio, "cpu_ratio": cpu_ratio, "corpus_tokens": n_tok},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
