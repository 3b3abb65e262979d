"""``python -m dft.train`` end to end: the chain, merge, evaluation, summary, W&B, rerun, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import run_train

BASE = ["model=tiny", "data=tiny", "eval.max_items=4", "eval.ppl_max_tokens=400", "eval.max_new_tokens=3",
        "experiment=e2e"]


def steps(*stages: str, n: int = 2) -> list[str]:
    return [f"strategy.{s}.trainer.max_steps={n}" for s in stages]


FAST = BASE + steps("cpt", "sft")


def _summary(runs: Path, experiment: str, cell: str) -> dict:
    return json.loads((runs / experiment / cell / "summary.json").read_text())


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory, tiny_model):
    runs = tmp_path_factory.mktemp("runs")
    p = run_train(["strategy=cpt_sft_dpo", "merge=slerp", *FAST, *steps("dpo")], runs)
    return runs, p


def test_chain_writes_every_artefact_and_a_summary(tiny_chain):
    runs, p = tiny_chain
    cells = [d for d in (runs / "e2e").iterdir() if (d / "summary.json").exists()]
    assert len(cells) == 1
    cell = cells[0]
    s = json.loads((cell / "summary.json").read_text())
    assert s["status"] == "finished" and s["chain"] == ["cpt", "sft", "dpo"] and s["merge"] == "slerp"
    assert s["eval_dtype"] == "float32"  # model.dtype=auto on CPU
    assert [a["name"] for a in s["artefacts"]] == ["start", "cpt", "cpt_sft", "cpt_sft_dpo", "cpt_sft_dpo+slerp"]
    for a in s["artefacts"]:
        unc = ("", "_stderr", "_ci_low", "_ci_high")  # every metric with its stderr and 95 % interval
        assert set(a["metrics"]) == {f"{b}/{k}{u}" for b in ("mascqa", "mmlu_stem", "anatomy_mcq")
                                     for k in ("acc", "acc_ll") for u in unc} | {
            f"{b}/n" for b in ("mascqa", "mmlu_stem", "anatomy_mcq")} | {f"ppl{u}" for u in unc}
        assert 0 <= a["metrics"]["mascqa/acc_ll"] <= 1 and a["metrics"]["ppl"] > 1
        for bench in ("mascqa", "mmlu_stem", "anatomy_mcq"):
            rec = json.loads((cell / "eval" / a["name"] / f"{bench}.json").read_text())
            assert rec["n"] == 4 and len(rec["items"]) == 4
            assert rec["acc_ll"] == a["metrics"][f"{bench}/acc_ll"]
    # the merge lives in merged/ with its mergekit config; stages are linked from the stage cache
    assert (cell / "merged" / "cpt_sft_dpo+slerp" / "final" / "mergekit.yaml").exists()
    for st in ("cpt", "cpt_sft", "cpt_sft_dpo"):
        assert (cell / "stages" / st / "final" / "model.safetensors").exists()  # 13 MB: one shard
        assert (cell / "stages" / st / "manifest.json").exists()
    assert s["train"]["cpt_sft_dpo"]["rows_dropped_long_prompt"] == 0 and s["train"]["cpt_sft_dpo"]["rows"] > 0
    # what each stage trained on (dft.stages.audit), in summary.json and the cache manifest alike
    audit = s["train"]["cpt_sft"]["audit"]
    assert audit["rows"] == audit["rows_given"] - sum(audit["rows_dropped"].values()) and audit["truncation"] == "drop"
    assert audit["rows_missing_end_token"] == 0 and audit["first_example"]["input_ids"][0] == 1  # <|im_start|>
    manifest = json.loads((cell / "stages" / "cpt_sft" / "manifest.json").read_text())
    assert manifest["train"]["audit"] == audit and s["train"]["cpt_sft"]["probe"]["max_abs_diff"] <= 1e-4
    # synergy of the merge against its parents: E = (P1 + P2) / 2 exactly
    syn = {r["metric"]: r for r in s["synergy"]}
    by = {a["name"]: a["metrics"] for a in s["artefacts"]}
    r = syn["mascqa/acc_ll"]
    assert r["p1"] == by["cpt_sft_dpo"]["mascqa/acc_ll"] and r["p2"] == by["start"]["mascqa/acc_ll"]
    assert r["expected"] == pytest.approx((r["p1"] + r["p2"]) / 2)
    assert r["merged_score"] == by["cpt_sft_dpo+slerp"]["mascqa/acc_ll"]
    assert s["metrics"]["eval/cpt/ppl"] == by["cpt"]["ppl"]
    assert {"config.yaml", "meta.json"} <= {f.name for f in cell.iterdir()}
    meta = json.loads((cell / "meta.json").read_text())
    assert meta["packages"]["trl"] and meta["experiment"] == "e2e"
    assert list((cell / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run"
    assert "cpt_sft_dpo+slerp" in p.stdout  # the final table
    assert "per token; evaluated in float32 on cpu; [95 % interval]" in p.stdout
    # paired comparisons: each stage vs its parent, the merge vs each parent and vs their mean
    kinds = {(c["kind"], c["a"], c["b"]) for c in s["comparisons"] if c["metric"] == "mascqa/acc_ll"}
    assert kinds == {("stage_vs_parent", "cpt", "start"), ("stage_vs_parent", "cpt_sft", "cpt"),
                     ("stage_vs_parent", "cpt_sft_dpo", "cpt_sft"), ("merge_vs_parent", "cpt_sft_dpo+slerp", "cpt_sft_dpo"),
                     ("merge_vs_parent", "cpt_sft_dpo+slerp", "start"),
                     ("merge_vs_mean_of_parents", "cpt_sft_dpo+slerp", "mean(cpt_sft_dpo,start)")}
    c = next(c for c in s["comparisons"] if c["kind"] == "merge_vs_mean_of_parents" and c["metric"] == "mascqa/acc_ll")
    assert c["diff"] == pytest.approx(r["deviation"]) and (r["ci_low"], r["ci_high"], r["p"]) == (c["ci_low"], c["ci_high"], c["p"])
    assert "memory estimate per process (CPU)" in p.stdout + p.stderr and "training runs without bf16" in p.stdout + p.stderr


def test_same_overrides_rerun_skips_the_finished_cell(tiny_chain, tiny_model):
    runs, _ = tiny_chain
    t0 = time.time()
    p = run_train(["strategy=cpt_sft_dpo", "merge=slerp", *FAST, *steps("dpo")], runs)
    assert "already finished" in p.stderr + p.stdout
    assert time.time() - t0 < 60


def test_a_new_cell_reuses_the_shared_prefix(tiny_chain, tiny_model):
    """cpt_sft_orpo shares CPT->SFT with cpt_sft_dpo: only ORPO trains."""
    runs, _ = tiny_chain
    run_train(["strategy=cpt_sft_orpo", "merge=none", *FAST, *steps("orpo")], runs)
    s = next(json.loads(f.read_text()) for f in (runs / "e2e").glob("*/summary.json")
             if json.loads(f.read_text())["strategy"] == "cpt_sft_orpo")
    assert s["cache"] == {"trained": 1, "reused": 2}
    assert s["train"]["cpt"]["cached"] and s["train"]["cpt_sft"]["cached"] and not s["train"]["cpt_sft_orpo"]["cached"]


def test_eval_dtype_sets_the_evaluation_precision_and_is_cached_apart(tmp_path, tiny_model):
    """eval.dtype loads the evaluated model in that dtype, records it, and keys the eval cache by
    the resolved precision (the eval.dtype name itself is not in the key): a bf16 evaluation is
    never reused for an fp32 one (they differ on near-ties), and one precision asked for in two
    ways shares one entry."""
    p = run_train(["-m", "eval.dtype=bfloat16,float32", "strategy=none", "merge=none", *BASE], tmp_path)
    # nothing is trained: no training-memory estimate, no note on training without bf16
    assert "memory estimate" not in p.stdout + p.stderr and "training runs without" not in p.stdout + p.stderr
    cells = sorted(d for d in (tmp_path / "e2e").iterdir() if (d / "summary.json").exists())
    assert [c.name.split("eval.dtype=")[1].split(",")[0] for c in cells] == ["bfloat16", "float32"]
    ppl = []
    for cell, dtype in zip(cells, ["bfloat16", "float32"]):
        rec = json.loads((cell / "eval" / "start" / "mascqa.json").read_text())
        assert (rec["dtype"], rec["device"], rec["n"]) == (dtype, "cpu", 4)
        p = json.loads((cell / "eval" / "start" / "perplexity.json").read_text())
        assert p["dtype"] == dtype
        ppl.append(p["ppl"])
    # the model really ran in each precision: bf16 rounding moves the perplexity, by well under 5 %
    assert ppl[0] != ppl[1] and ppl[0] == pytest.approx(ppl[1], rel=0.05)
    assert len(list((tmp_path / "_stages" / "_eval").glob("*/metrics.json"))) == 2
    # one precision, one entry: on a CPU eval.dtype=null (model.dtype=auto) is float32 and reuses it
    run_train(["strategy=none", "merge=none", *BASE, "experiment=e2e_null"], tmp_path)
    assert len(list((tmp_path / "_stages" / "_eval").glob("*/metrics.json"))) == 2
    # bf16 asked for through model.dtype is the same precision as eval.dtype=bfloat16: reused
    run_train(["strategy=none", "merge=none", "model.dtype=bfloat16", *BASE, "experiment=e2e_bf16"], tmp_path)
    assert len(list((tmp_path / "_stages" / "_eval").glob("*/metrics.json"))) == 2
    s = json.loads(next((tmp_path / "e2e_bf16").glob("*/summary.json")).read_text())
    assert s["eval_dtype"] == "bfloat16"


def test_multirun_gives_two_cells_and_two_wandb_runs(tmp_path, tiny_model):
    """Two cells in one process: two W&B runs, each with its own config and tags (no cell logs
    into another's run), and no secret from the environment in any file under the sweep."""
    secrets = {"WANDB_API_KEY": "sekret-wandb-0123456789abcdef0123456789abcdef01234567",
               "HF_TOKEN": "hf_sekretTOKEN0123456789"}
    run_train(["-m", "strategy=dpo,orpo", "merge=none", "eval=none", "model=tiny", "data=tiny", "logger.mode=offline",
               "strategy.dpo.trainer.max_steps=1", "strategy.orpo.trainer.max_steps=1", "experiment=mr"], tmp_path,
              env=secrets)
    cells = sorted(d.name for d in (tmp_path / "mr").iterdir() if (d / "summary.json").exists())
    assert cells == ["data=tiny,eval=none,merge=none,model=tiny,strategy.dpo.trainer.max_steps=1,"
                     "strategy.orpo.trainer.max_steps=1,strategy=dpo",
                     "data=tiny,eval=none,merge=none,model=tiny,strategy.dpo.trainer.max_steps=1,"
                     "strategy.orpo.trainer.max_steps=1,strategy=orpo"]
    ids = set()
    for c in cells:  # eval=none: nothing evaluated, no precision to record
        assert json.loads((tmp_path / "mr" / c / "summary.json").read_text())["eval_dtype"] is None
    for c, mine, other in zip(cells, ["dpo", "orpo"], ["orpo", "dpo"]):
        runs = list((tmp_path / "mr" / c / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        ids.add(runs[0].name.rsplit("-", 1)[1])
        blob = next(runs[0].glob("run-*.wandb")).read_bytes()
        assert f"strategy:{mine}".encode() in blob and f"strategy:{other}".encode() not in blob
    assert len(ids) == 2
    for f in tmp_path.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for v in secrets.values():
                assert v.encode() not in data, f"secret found in {f}"


@pytest.mark.parametrize("args,message", [
    (["strategy=sft", "data.messages=null"],
     "error: stage 'sft' needs data.messages, but domain 'tiny' has none (set data.messages=<file>)"),
    (["model.path=/nonexistent/model"],
     "error: model.path=/nonexistent/model: no model there (expected a Hugging Face folder with config.json)"),
    (["strategy=dpo", "data.preference=data/tiny/nope.jsonl"], "data/tiny/nope.jsonl"),
])
def test_bad_input_fails_in_one_line_before_training(args, message, tmp_path, tiny_model):
    p = run_train(["model=tiny", "data=tiny", *args], tmp_path, check=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert message in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not list(tmp_path.rglob("checkpoint-*")) and not list(tmp_path.rglob("summary.json"))


def test_unknown_strategy_is_named(tmp_path):
    p = run_train(["strategy=sfft"], tmp_path, check=False)
    assert p.returncode != 0
    assert "Could not find 'strategy/sfft'" in p.stderr


def test_report_and_notebooks_on_the_real_tiny_sweep(tiny_chain, tmp_path, monkeypatch):
    """dft.report and both notebooks on the sweep the tiny model just produced (not a fixture):
    valid PNGs, and the results table's numbers equal the summary files'."""
    import subprocess
    import sys

    from conftest import ROOT
    from dft.report import parse_markdown_tables

    runs, _ = tiny_chain
    sweep = runs / "e2e"
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "dft.report", str(sweep), "--out", str(out), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert {"synergy.png", "training_loss.png"} <= {f.name for f in pngs}
    for f in pngs:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, f
    summaries = {json.loads(f.read_text())["cell"]: json.loads(f.read_text()) for f in sweep.glob("*/summary.json")}
    table = next(t for t in parse_markdown_tables((out / "report.md").read_text())
                 if {"artefact", "cell", "mascqa/acc_ll"} <= set(t.columns))
    checked = 0
    for _, row in table.iterrows():
        s = summaries[row["cell"]]
        art = next(a for a in s["artefacts"] if a["name"] == row["artefact"])
        for metric in ("mascqa/acc_ll", "ppl"):  # `value [95 % CI]`
            value, interval = row[metric].split(" [")
            lo, hi = (float(x) for x in interval.rstrip("]").split(", "))
            assert float(value) == pytest.approx(art["metrics"][metric], abs=5e-5)
            assert (lo, hi) == pytest.approx((art["metrics"][f"{metric}_ci_low"], art["metrics"][f"{metric}_ci_high"]),
                                             abs=5e-5)
            checked += 1
    assert checked >= 10

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DFT_SWEEP", str(sweep))
    monkeypatch.setenv("DFT_SWEEP_B", str(sweep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, nb_path.name


def test_chat_eval_runs_inside_the_cell(tmp_path, tiny_model):
    """eval=[quick,chat]: MCQ metrics and a transcript per artefact from the same cell."""
    run_train(["model=tiny", "data=tiny", "strategy=none", "merge=none", "eval=[quick,chat]", "eval.max_items=2",
               "eval.chat.sampling.max_new_tokens=3", "eval.ppl_max_tokens=200", "experiment=chat"], tmp_path)
    cell = next((tmp_path / "chat").glob("*/summary.json")).parent
    chat = json.loads((cell / "eval" / "start" / "chat.json").read_text())
    assert chat["artefact"] == "start" and chat["scenarios"]
    assert all(t["assistant"] is not None for sc in chat["scenarios"] for t in sc["turns"])
    s = json.loads((cell / "summary.json").read_text())
    assert "mascqa/acc_ll" in s["artefacts"][0]["metrics"]
