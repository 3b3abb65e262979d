"""Comparing a sweep's cells (issue 20) on a REAL tiny sweep: 2 strategies x 2 merges = 4 cells
of the tiny model, logged offline to W&B and to trackio (``logger=[wandb,trackio]``).

* every summary.json and every offline W&B run has the same start/ final/ delta/ keys, delta =
  final - start, and the flat config under ``cell``;
* per-stage curves ``train/<stage>/...`` against ``train/<stage>/step`` (define_metric);
* evaluation results are summary keys, never history rows, also when a finished cell is
  evaluated again later (the backfill) in a resumed run;
* the W&B workspace spec (``python -m dft.report <sweep> --wandb-workspace --dry-run``) refers only
  to keys the runs have, groups by strategy and merge and filters to the sweep's group;
* the trackio dashboard, served on 127.0.0.1, shows the 4 runs and ``final/`` metrics in headless
  Chromium (skipped when Chromium is not installed).

The sweep takes about 1 minute on 2 CPU cores (one process, stage 1 of each chain trained for 2
steps, 2 MCQ items of one benchmark).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import compose, run_train
from tests.fixtures.wandb_records import offline_runs, read_run

EXP = "dash"
SWEEP = ["-m", "strategy=cpt,sft", "merge=none,slerp", "model=tiny", "data=tiny", "eval.benchmarks=[mascqa]",
         "eval.max_items=2", "eval.ppl_max_tokens=200", "eval.max_new_tokens=2", "eval.stages=false",
         "strategy.cpt.trainer.max_steps=2", "strategy.sft.trainer.max_steps=2", "logger=[wandb,trackio]",
         "logger.mode=offline", f"experiment={EXP}"]
ROLE_PREFIXES = ("start/", "final/", "delta/")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model):
    runs = tmp_path_factory.mktemp("dash_runs")
    t0 = time.time()
    run_train(SWEEP, runs)
    print(f"sweep of 4 cells: {time.time() - t0:.0f} s")
    cells = sorted(d for d in (runs / EXP).iterdir() if (d / "summary.json").exists())
    assert len(cells) == 4
    return runs, cells


def _summary(cell: Path) -> dict:
    return json.loads((cell / "summary.json").read_text())


def _wandb(cell: Path) -> dict:
    """The cell's W&B run as the sweep wrote it (the first offline run; the backfill test adds one)."""
    return read_run(offline_runs(cell)[0])


def test_every_cell_has_the_same_uniform_keys_in_summary_json_and_wandb(sweep):
    _, cells = sweep
    summaries = [_summary(c) for c in cells]
    assert {(s["strategy"], s["merge"]) for s in summaries} == {("cpt", "none"), ("cpt", "slerp"), ("sft", "none"),
                                                                 ("sft", "slerp")}
    base = ("mascqa/acc", "mascqa/acc_ll", "ppl")
    # start/ and final/ carry each metric with its stderr and 95 % interval and the item count; delta/ the metrics only
    with_ci = (*base, *(f"{k}{sfx}" for k in base for sfx in ("_stderr", "_ci_low", "_ci_high")), "mascqa/n")
    expected = {f"{r}{m}" for r in ("start/", "final/") for m in with_ci} | {f"delta/{m}" for m in base}
    for cell, s in zip(cells, summaries):
        m = s["metrics"]
        assert {k for k in m if k.startswith(ROLE_PREFIXES)} == expected, cell.name
        for k in ("mascqa/acc", "mascqa/acc_ll", "ppl"):
            assert m[f"delta/{k}"] == m[f"final/{k}"] - m[f"start/{k}"]
        # the roles point at the right artefacts of this cell
        final_name = f"{s['strategy']}+{s['merge']}" if s["merge"] != "none" else s["strategy"]
        assert m["artefact/final"] == final_name and m["artefact/trained"] == s["strategy"]
        assert m["final/ppl"] == m[f"eval/{final_name}/ppl"] and m["start/ppl"] == m["eval/start/ppl"]
        assert ("artefact/merged" in m) == (s["merge"] != "none")
        w = _wandb(cell)
        assert w["run"]["group"] == EXP
        assert {k for k in w["summary"] if k.startswith(ROLE_PREFIXES)} == expected
        for k in expected:
            assert w["summary"][k] == pytest.approx(m[k], rel=1e-12, abs=1e-15)
        assert w["config"]["cell"] == {"model": "tiny", "family": "smollm2", "start": "instruct",
                                       "strategy": s["strategy"], "chain": s["strategy"], "merge": s["merge"],
                                       "peft": "lora", "seed": 42, "data": "tiny", "eval": "quick"}


def test_stage_curves_share_keys_against_their_own_step_metric(sweep):
    _, cells = sweep
    for cell in cells:
        s, w = _summary(cell), _wandb(cell)
        st = s["strategy"]  # one-stage chains: cpt or sft
        (logged,) = [e for e in s["train"][st]["log_history"] if "loss" in e]  # max_steps=2, logging_steps=2
        rows = [h for h in w["history"] if f"train/{st}/loss" in h]
        assert len(rows) == 1
        assert rows[0][f"train/{st}/step"] == 2 == logged["step"]
        assert rows[0][f"train/{st}/loss"] == pytest.approx(logged["loss"], rel=1e-12)
        assert rows[0][f"train/{st}/grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-12)
        assert rows[0][f"train/{st}/learning_rate"] == pytest.approx(logged["learning_rate"], rel=1e-12)
        for f in ("loss", "grad_norm", "learning_rate"):
            assert w["metrics"][f"train/{st}/{f}"] == f"train/{st}/step"
        # a cell that reused the stage from the cache still has its curves (the run that trained it)
        other = "sft" if st == "cpt" else "cpt"
        assert not any(f"train/{other}/loss" in h for h in w["history"])


def test_evaluation_results_are_summary_keys_not_history_rows(sweep):
    _, cells = sweep
    for cell in cells:
        w = _wandb(cell)
        for h in w["history"]:
            assert not any(k.startswith(("eval/", "eval_items/", "final/", "synergy")) for k in h), h
        assert "eval/start/mascqa/acc" in w["summary"]
        assert w["summary"]["eval_items/start/mascqa"]["_type"] == "table-file"
        assert ("synergy" in w["summary"]) == (_summary(cell)["merge"] == "slerp")


def test_reevaluating_a_finished_cell_logs_no_history_below_the_runs_last_step(sweep, capfd):
    """The backfill: a finished cell is evaluated again (cached evaluations, as after a new
    ``eval=`` on the same stages) in a resumed W&B run. Its results go to the summary and tables
    only: the resumed offline run gets no history row at all, so none can be below the step the
    first run reached (before: ``tracker.log`` put them at steps 0.., which W&B rejects on sync
    with 'step must be monotonically increasing')."""
    from dft.pipeline import Artefact, Cell
    from dft.tracking import Tracker

    runs, cells = sweep
    cell = next(c for c in cells if (_summary(c)["strategy"], _summary(c)["merge"]) == ("sft", "none"))
    s = _summary(cell)
    first = _wandb(cell)
    last_step = max(h["_step"] for h in first["history"])
    assert last_step >= 1  # the first run logged training rows
    overrides = [a for a in SWEEP if "=" in a and not a.startswith(("strategy=", "merge=", "logger", "experiment"))]
    cfg = compose([*overrides, "strategy=sft", "merge=none", f"experiment={EXP}", f"paths.runs={runs}",
                   "logger=wandb", "logger.mode=offline"])
    c = Cell(cfg, cell, s["cell"])
    c.check_inputs()
    c.tracker = Tracker(cfg.logger, run_dir=cell, experiment=EXP, cell=s["cell"], name="tiny|sft|none",
                        job_type="sft", tags=[], config={"cell": {"strategy": "sft"}})
    assert c.tracker.run.id == first["run"]["id"]  # the same run, resumed
    for a in s["artefacts"]:
        art = Artefact(name=a["name"], kind=a["kind"], path=Path(a["path"]), key=a["key"])
        assert c.evaluate(art) == a["metrics"]  # from the evaluation cache: nothing recomputed
    c.tracker.finish()
    files = offline_runs(cell)
    assert len(files) == 2
    again = read_run(files[-1])
    assert again["run"]["id"] == first["run"]["id"]
    assert again["history"] == []
    for a in s["artefacts"]:
        for k, v in a["metrics"].items():
            assert again["summary"][f"eval/{a['name']}/{k}"] == pytest.approx(v, rel=1e-12)
        assert again["summary"][f"eval_items/{a['name']}/mascqa"]["nrows"] == 2
    out = capfd.readouterr()
    assert "monotonically" not in out.out + out.err and "less than the current step" not in out.out + out.err


def test_wandb_workspace_spec_from_the_real_sweep(sweep, capsys):
    from dft.dashboards.workspace import referenced_keys
    from dft.report import main

    runs, cells = sweep
    assert main([str(runs / EXP), "--wandb-workspace", "--dry-run", "--wandb-entity", "lab",
                 "--wandb-project", "dft"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert (spec["entity"], spec["project"], spec["displayName"]) == ("lab", "dft", f"dft sweep {EXP}")
    (rs,) = spec["spec"]["section"]["runSets"]
    assert rs["filters"]["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=", "value": EXP,
                                         "disabled": False}]
    assert rs["grouping"] == [{"section": "config", "name": "cell.value.strategy"},
                              {"section": "config", "name": "cell.value.merge"}]
    sections = {s["name"]: s["panels"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    assert list(sections) == ["Final model (uniform keys final/, delta/)", "Model -> strategy -> merge -> final metrics",
                              "Merge synergy", "Training curves per stage"]
    bars = {p["config"]["chartTitle"]: p["config"]["metrics"] for p in sections[list(sections)[0]]}
    assert bars["final model: mascqa"] == ["summary_metrics.final/mascqa/acc", "summary_metrics.final/mascqa/acc_ll"]
    assert bars["final model: held-out perplexity (lower is better)"] == ["summary_metrics.final/ppl"]
    assert bars["gain over the start model: mascqa"] == ["summary_metrics.delta/mascqa/acc",
                                                         "summary_metrics.delta/mascqa/acc_ll"]
    (pc,) = sections["Model -> strategy -> merge -> final metrics"]
    assert [c["accessor"] for c in pc["config"]["columns"]] == [
        "config:cell.value.model", "config:cell.value.strategy", "config:cell.value.merge",
        "summary:final/mascqa/acc", "summary:final/mascqa/acc_ll", "summary:final/ppl"]
    assert [c.get("inverted") for c in pc["config"]["columns"]][-1] is True  # perplexity: lower is better
    (syn,) = sections["Merge synergy"]
    assert syn["viewType"] == "Weave"
    curves = {(p["config"]["xAxis"], tuple(p["config"]["metrics"])) for p in sections["Training curves per stage"]}
    assert curves == {(f"train/{st}/step", (f"train/{st}/{f}",)) for st in ("cpt", "sft")
                      for f in ("loss", "grad_norm", "learning_rate")}
    assert rs["runFeed"]["columnOrder"][:4] == ["run:displayName", "config:cell.value.model",
                                                "config:cell.value.family", "config:cell.value.start"]

    # the spec is what wandb-workspaces uploads: it loads back into the same workspace
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    back = ws.Workspace._from_model(internal.View.model_validate(spec))
    assert [x.name for x in back.runset_settings.groupby] == ["cell.strategy", "cell.merge"]
    assert [x.name for x in back.sections] == list(sections)

    # every key the spec refers to exists in the runs as W&B stored them
    keys = referenced_keys(spec)
    ws = [_wandb(c) for c in cells]
    assert keys["run"] == {"group"} and all(w["run"]["group"] == EXP for w in ws)
    for k in keys["config"]:
        top, sub = k.split(".")
        assert all(sub in w["config"][top] for w in ws), k
    assert "synergy" in keys["summary"]
    for k in keys["summary"] - {"synergy"}:
        assert all(k in w["summary"] for w in ws), k
    assert sum("synergy" in w["summary"] for w in ws) == 2  # the merging cells
    for k in keys["history"]:
        assert any(k in h for w in ws for h in w["history"]), k


def test_wandb_workspace_errors(tmp_path, capsys):
    from dft.report import main

    assert main([str(tmp_path / "nope"), "--wandb-workspace", "--dry-run"]) == 2
    assert capsys.readouterr().err == f"dft.report: {tmp_path / 'nope'}: no such sweep folder\n"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--wandb-workspace", "--dry-run"]) == 2
    assert "no finished cell" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["data"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_trackio_dashboard_in_headless_chromium(sweep, tmp_path_factory):
    runs, cells = sweep
    tdir = runs / "trackio"
    assert (tdir / "dft.db").exists()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import trackio; trackio.show(project='dft', open_browser=False, block_thread=True, "
         f"server_port={port}, host='127.0.0.1')"],
        env=dict(os.environ, TRACKIO_DIR=str(tdir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    art = tmp_path_factory.mktemp("trackio_screenshot")
    try:
        for _ in range(120):  # up to 60 s for the server to come up
            try:
                names = [r["name"] for r in _post(f"{base}/api/get_runs_for_project", {"project": "dft"})]
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail("the trackio dashboard did not answer in 60 s")
        # the data endpoint: the sweep's 4 runs (W&B name + run id), each with final/ metrics
        assert sorted(n.split(" [")[0] for n in names) == ["tiny|cpt|none", "tiny|cpt|slerp", "tiny|sft|none",
                                                           "tiny|sft|slerp"]
        finals: set[str] = set()
        for n in names:
            metrics = _post(f"{base}/api/get_metrics_for_run", {"project": "dft", "run": n})
            assert {"final/mascqa/acc", "final/ppl", "delta/ppl", "train/cpt/loss" if "|cpt|" in n
                    else "train/sft/loss"} <= set(metrics), n
            finals |= {k for k in metrics if k.startswith("final/")}
        # the page, as a person sees it
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,3600", "--virtual-time-budget=20000"]
        url = f"{base}/?project=dft"
        shot = art / "trackio_dashboard.png"
        subprocess.run([CHROMIUM, *flags, f"--user-data-dir={art / 'profile1'}", f"--screenshot={shot}", url],
                       capture_output=True, timeout=120, check=True)
        dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={art / 'profile2'}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        print(f"trackio screenshot: {shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        for n in names:
            assert n in dom, n
        # the metrics page's final/ section with one bar chart per final/ metric
        assert f'<span class="accordion-label">final ({len(finals)})</span>' in dom  # every final/ metric (intervals too)
        for k in ("final/mascqa/acc", "final/mascqa/acc_ll", "final/ppl"):
            assert f'data-metric="{k}"' in dom, k
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_stage_curves_rows_from_a_log_history():
    from dft.keys import stage_curves

    hist = [{"loss": 2.5, "grad_norm": 1.25, "learning_rate": 1e-4, "epoch": 0.5, "step": 5},
            {"loss": 2.0, "learning_rate": 5e-5, "step": 10},  # no grad_norm logged
            {"eval_loss": 3.0, "step": 10},  # an evaluation entry: not a training-curve row
            {"train_runtime": 9.0, "train_loss": 2.25, "step": 10}]  # the closing entry
    assert stage_curves("sft", hist) == [
        {"train/sft/step": 5, "train/sft/loss": 2.5, "train/sft/grad_norm": 1.25, "train/sft/learning_rate": 1e-4},
        {"train/sft/step": 10, "train/sft/loss": 2.0, "train/sft/learning_rate": 5e-5}]
    assert stage_curves("dpo", None) == []


def test_logger_choices_compose():
    c = compose(["logger=trackio"])
    assert (c.logger.backend, c.logger.trackio.enabled) == ("none", True)
    c = compose(["logger=[wandb,trackio]"])
    assert (c.logger.backend, c.logger.trackio.enabled) == ("wandb", True)
    c = compose([])
    assert (c.logger.backend, c.logger.trackio.enabled) == ("wandb", False)


TRACKIO_ALONE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import compose
from dft.tracking import Tracker

tmp = Path(sys.argv[1])
cfg = compose(["logger=trackio", f"paths.runs={tmp}"])
t = Tracker(cfg.logger, run_dir=tmp / "cell", experiment="exp", cell="c1", name="tiny|sft|none", job_type="sft",
            tags=[], config={"cell": {"strategy": "sft", "merge": "none"}})
assert t.run is None and t.trackio is not None and t.report_to == "none"
t.curves("sft", [{"loss": 2.5, "grad_norm": 1.25, "learning_rate": 1e-4, "step": 5}])
t.summary({"final/mascqa/acc": 0.5, "delta/ppl": -3.0, "artefact/final": "sft"})
t.table("synergy", [{"metric": "mascqa/acc", "deviation": 0.125}])
name = t.trackio.name
t.finish()
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps({"name": name, "logs": SQLiteStorage.get_logs("dft", name),
                  "config": SQLiteStorage.get_all_run_configs("dft")}, default=str))
"""


def test_trackio_alone_logs_curves_summary_and_tables(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    env.pop("TRACKIO_DIR", None)
    p = subprocess.run([sys.executable, "-c", TRACKIO_ALONE, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("{")))
    assert out["name"].startswith("tiny|sft|none [")
    assert (tmp_path / "trackio" / "dft.db").exists()  # logger.trackio.dir = <paths.runs>/trackio
    assert not (tmp_path / "cell" / "wandb").exists()  # no W&B run
    logs = out["logs"]
    curve = next(r for r in logs if "train/sft/loss" in r)
    assert (curve["train/sft/step"], curve["train/sft/loss"], curve["train/sft/grad_norm"]) == (5, 2.5, 1.25)
    summ = next(r for r in logs if "final/mascqa/acc" in r)
    assert (summ["final/mascqa/acc"], summ["delta/ppl"]) == (0.5, -3.0) and "artefact/final" not in summ
    assert any("synergy" in r for r in logs)
    (cfg,) = out["config"].values()
    assert cfg["cell"] == {"strategy": "sft", "merge": "none"} and cfg["_Group"] == "exp"


def test_wandb_workspace_save_without_a_server_is_one_line(tmp_path, monkeypatch, capsys):
    from dft.report import main
    from tests.fixtures.sweep_builder import write_sweep

    sweep = write_sweep(tmp_path / "runs", experiment="syn")
    for k in ("WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandbcfg"))
    assert main([str(sweep), "--wandb-workspace"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dft.report: saving the workspace needs a W&B server and login (") and err.count("\n") == 1
    assert err.rstrip().endswith("use --dry-run to print the specification")
    # the same synthetic sweep's spec: 3 models x 3 strategies x 2 merges, one group
    assert main([str(sweep), "--wandb-workspace", "--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["spec"]["section"]["runSets"][0]["filters"]["filters"][0]["value"] == "syn"
