"""Nothing lost, nothing done twice: a tiny chain cell killed (SIGKILL) at every fault point and
rerun ends bit-identical to an uninterrupted run (DESIGN.md §7; issue 17).

The cell: ``cpt_sft_dpo`` + SLERP on the tiny model, 3 steps per stage with a checkpoint every
step and a constant learning rate (an extra or a missing step changes the weights), MCQ on 2
items and perplexity on 200 tokens. ``DFT_FAULT=<point>[:<n>]`` (dft/faults.py) kills it at the
n-th hit of a point. ``python tests/test_faults.py`` (see README) runs the whole matrix and prints
the figure README reports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, also for `python tests/test_faults.py`
from conftest import ROOT, run_train  # noqa: E402

STEPS = 3
STAGE_ARGS = [f"strategy.{s}.trainer.{k}={v}" for s in ("cpt", "sft", "dpo") for k, v in (
    ("max_steps", STEPS), ("save_steps", 1), ("logging_steps", 1), ("lr_scheduler_type", "constant"),
    ("warmup_steps", 0))]
CELL_ARGS = ["model=tiny", "data=tiny", "strategy=cpt_sft_dpo", "merge=slerp", "logger=none", "eval.benchmarks=[mascqa]",
             "eval.max_items=2", "eval.ppl_max_tokens=200", "eval.max_new_tokens=2", "eval.stages=false",
             "experiment=faults", *STAGE_ARGS]
STAGES = ("cpt", "cpt_sft", "cpt_sft_dpo")
MERGED = "cpt_sft_dpo+slerp"

#: (fault, stages whose training is interrupted and so attempted twice). ``checkpoint:n`` is the
#: n-th checkpoint of the cell: 2 = mid-CPT, 3 = CPT's last step, 5 = mid-SFT, 9 = DPO's last step.
MATRIX = [
    ("checkpoint:2", {"cpt"}),
    ("checkpoint:3", {"cpt"}),
    ("checkpoint:5", {"cpt_sft"}),
    ("checkpoint:9", {"cpt_sft_dpo"}),
    ("final_save", {"cpt"}),
    ("final_save:3", {"cpt_sft_dpo"}),
    ("commit", {"cpt"}),
    ("merge_write", set()),
    ("eval_write", set()),
    ("eval_write:2", set()),
    ("summary", set()),
]
#: in the default suite (a kill mid-stage, resumed from its checkpoint); the rest is marked slow
#: (each point ~40 s on 2 cores)
DEFAULT = {"checkpoint:5"}

TIMING = {"runtime_s", "finished_at", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
#: provenance that differs by design between an interrupted and an uninterrupted run
PROVENANCE = {"cached", "cache", "resumed_from", "attempts"}


def run_cell(root: Path, fault: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {"DFT_FAULT": fault or ""}
    return run_train([*CELL_ARGS, f"paths.stages={root / '_stages'}"], root, env=env, timeout=600, check=check)


def cell_dir(root: Path) -> Path:
    (d,) = [p for p in (root / "faults").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return d


def normalise(obj, root: Path):
    """The summary without timings and provenance, with the run root replaced by ``ROOT``."""
    if isinstance(obj, dict):
        return {k: normalise(v, root) for k, v in obj.items() if k not in TIMING | PROVENANCE}
    if isinstance(obj, list):
        return [normalise(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(root), "ROOT")
    return obj


def differences(a, b, path: str = "") -> list[str]:
    """Paths (``train.cpt.steps``) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def weights(cell: Path) -> dict[str, bytes]:
    """Bytes of every safetensors file of every stage and of the merge."""
    out = {}
    for name in STAGES:
        for f in sorted((cell / "stages" / name / "final").glob("*.safetensors")):
            out[f"{name}/{f.name}"] = f.read_bytes()
    for f in sorted((cell / "merged" / MERGED / "final").glob("*.safetensors")):
        out[f"{MERGED}/{f.name}"] = f.read_bytes()
    return out


def manifests(root: Path) -> dict[str, float]:
    return {p.parent.name: json.loads(p.read_text())["finished_at"] for p in (root / "_stages").glob("*/manifest.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("uninterrupted")
    run_cell(root)
    cell = cell_dir(root)
    return root, json.loads((cell / "summary.json").read_text()), weights(cell)


def check_fault(root: Path, fault: str, redone: set[str], reference) -> dict:
    """Kill the cell at ``fault``, rerun it, compare with the reference; return what was seen."""
    ref_root, ref_summary, ref_weights = reference
    p = run_cell(root, fault, check=False)
    assert p.returncode == -9, f"{fault}: the run was not killed (rc {p.returncode})\n{p.stderr[-2000:]}"
    assert f"dft fault injection: SIGKILL at {fault.split(':')[0]}" in p.stderr
    committed = manifests(root)
    p2 = run_cell(root)
    cell = cell_dir(root)
    summary = json.loads((cell / "summary.json").read_text())
    diff = differences(normalise(summary, root), normalise(ref_summary, ref_root))
    assert not diff, f"{fault}: the summary differs: {diff[:5]}"
    w = weights(cell)
    assert set(w) == set(ref_weights) and len(w) == 4
    corrupted = [k for k in w if w[k] != ref_weights[k]]
    assert not corrupted, f"{fault}: {corrupted} differ from the uninterrupted run"
    # nothing committed before the kill was redone: same manifests, one attempt
    after = manifests(root)
    assert all(after[k] == v for k, v in committed.items()), f"{fault}: a committed entry was rewritten"
    attempts = {name: summary["train"][name]["attempts"] for name in STAGES}
    assert attempts == {name: 2 if name in redone else 1 for name in STAGES}, (fault, attempts)
    # every stage kept its step count (no extra step after a resume at max_steps)
    assert {summary["train"][n]["steps"] for n in STAGES} == {STEPS}
    left = [str(p) for p in root.rglob("*.tmp-*")]
    assert not left, f"{fault}: temporary files left: {left}"
    return {"fault": fault, "summary": summary, "resumed": {n: summary["train"][n]["resumed_from"] for n in STAGES},
            "rerun_log": p2.stdout + p2.stderr}


@pytest.mark.parametrize("fault,redone", [
    pytest.param(f, r, marks=() if f in DEFAULT else pytest.mark.slow, id=f) for f, r in MATRIX])
def test_killed_and_rerun_is_bit_identical(fault, redone, reference, tmp_path):
    seen = check_fault(tmp_path, fault, redone, reference)
    if fault in ("checkpoint:3", "final_save", "commit"):
        # CPT's last checkpoint is at max_steps: saved from it, not trained again
        assert seen["resumed"]["cpt"] == f"checkpoint-{STEPS}"
        assert "saving it without training again" in seen["rerun_log"]
    if fault == "checkpoint:5":
        # killed after SFT's 2nd step and resumed: train_loss (equal to the reference's, checked
        # with the whole summary above) is the mean of all 3 step losses, not the resumed step's
        assert seen["resumed"]["cpt_sft"] == "checkpoint-2"
        sft = seen["summary"]["train"]["cpt_sft"]
        losses = [e["loss"] for e in sft["log_history"] if "loss" in e]
        assert len(losses) == STEPS and sft["train_loss"] == pytest.approx(sum(losses) / STEPS, rel=1e-12)
        assert sft["train_loss"] != pytest.approx(losses[-1], rel=1e-6)  # transformers' number after a resume


def test_uninterrupted_train_loss_is_the_mean_of_the_step_losses(reference):
    _, ref_summary, _ = reference
    for name in STAGES:
        t = ref_summary["train"][name]
        losses = [e["loss"] for e in t["log_history"] if "loss" in e]
        assert len(losses) == STEPS and t["train_loss"] == pytest.approx(sum(losses) / STEPS, rel=1e-12)
        assert (t["resumed_from"], t["attempts"]) == (None, 1)


def test_whole_run_loss_weights_each_log_by_its_steps():
    from dft.stages.resume import whole_run_loss

    hist = [{"loss": 2.0, "step": 2}, {"loss": 1.0, "step": 5}, {"train_loss": 9.0, "step": 5}]
    assert whole_run_loss(hist, 5) == pytest.approx((2.0 * 2 + 1.0 * 3) / 5)
    assert whole_run_loss(hist, 6) is None  # step 6 never logged


def test_finished_checkpoint_is_at_this_runs_last_step(tmp_path):
    from dft.stages.resume import finished_checkpoint

    ck = tmp_path / "checkpoint-6"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 6}))
    assert finished_checkpoint(str(ck), 6) and finished_checkpoint(str(ck), -1)  # -1: the state's total
    assert not finished_checkpoint(str(ck), 10)  # a longer run continues from it
    assert not finished_checkpoint(None) and not finished_checkpoint(str(tmp_path / "checkpoint-9"), 9)


def test_fault_spec_is_checked():
    from dft.faults import parse

    assert parse("checkpoint:3") == ("checkpoint", 3, 9) and parse("summary") == ("summary", 1, 9)
    assert parse("step:5:TERM") == ("step", 5, 15) and parse("step:2:SIGUSR2")[2] == 12
    with pytest.raises(ValueError, match="unknown signal 'TREM'"):
        parse("step:1:TREM")
    with pytest.raises(ValueError, match=r"DFT_FAULT='chekpoint': unknown point 'chekpoint' \(points: checkpoint, "):
        parse("chekpoint")
    with pytest.raises(ValueError, match="must be a positive integer"):
        parse("summary:0")


def main() -> int:
    """The whole matrix, once per point (``python tests/test_faults.py [--runs M]``); prints README's line."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1, help="repetitions of the matrix")
    ns = ap.parse_args()
    from dft.families import ensure_tiny_model

    from conftest import CACHE

    ensure_tiny_model(CACHE, "smollm2")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        ref_root = Path(d) / "ref"
        run_cell(ref_root)
        cell = cell_dir(ref_root)
        reference = (ref_root, json.loads((cell / "summary.json").read_text()), weights(cell))
        failures: dict[str, list[str]] = {"corrupted": [], "redone": [], "other": []}
        for m in range(ns.runs):
            for fault, redone in MATRIX:
                root = Path(d) / f"{m}-{re.sub('[^a-z0-9]', '_', fault)}"
                try:
                    check_fault(root, fault, redone, reference)
                    print(f"ok   {fault}", flush=True)
                except AssertionError as e:
                    msg = str(e)
                    kind = ("corrupted" if "differ from the uninterrupted run" in msg else
                            "redone" if "committed entry was rewritten" in msg or "attempts" in msg else "other")
                    failures[kind].append(fault)
                    print(f"FAIL {fault} ({kind}): {msg[:300]}", flush=True)
    n = len(MATRIX) * ns.runs
    bad = sum(map(len, failures.values()))
    print(f"faults injected at {len(MATRIX)} points x {ns.runs} runs: {len(failures['corrupted'])} corrupted, "
          f"{len(failures['redone'])} stages redone after commit, results identical in {n - bad}/{n} "
          f"(summaries equal except timings, no temporary file left; {time.time() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.exit(main())
