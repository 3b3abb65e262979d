"""The graph launcher (launcher=slurm): submission order and messages (no SLURM), and whole sweeps on
the real local SLURM (launch/slurm.sh; ``slurm`` + ``slurm_heavy``, minutes each on 2 cores)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_fixtures import ROOT, LocalSlurm, slurm  # noqa: F401  (fixture)

ONE_STEP = [f"strategy.{s}.trainer.max_steps=1" for s in ("cpt", "sft", "dpo", "orpo")]
TINY_EVAL = ["eval.max_items=2", "eval.ppl_max_tokens=200", "eval.max_new_tokens=2", "eval.stages=false"]
TINY = ["model=tiny", "data=tiny", "logger=none", *ONE_STEP, *TINY_EVAL]


def _graph():
    """cpt -> sft -> {dpo, orpo}, a start evaluation, an evaluation of dpo; cells D (dpo) and O (orpo)."""
    from dft.graph import Graph, Node

    g = Graph()
    ev0 = Node("eval/e0", "eval_start", "e0", "eval(start)", [])
    cpt = Node("stage/c", "stage", "c", "cpt", [], gpu_hours=1.0)
    sft = Node("stage/s", "stage", "s", "cpt_sft", ["stage/c"], gpu_hours=0.5)
    dpo = Node("stage/d", "stage", "d", "cpt_sft_dpo", ["stage/s"], gpu_hours=0.25)
    orpo = Node("stage/o", "stage", "o", "cpt_sft_orpo", ["stage/s"], gpu_hours=0.25)
    evd = Node("eval/ed", "eval", "ed", "eval(cpt_sft_dpo)", ["stage/d"])
    for cell, nodes in {"D": [ev0, cpt, sft, dpo, evd], "O": [ev0, cpt, sft, orpo]}.items():
        for n in nodes:
            g.add(cell, n)
        g.add(cell, Node(f"summary/{cell}", "summary", cell, f"summary({cell})", [n.id for n in nodes]))
    return g


class _Job:
    def __init__(self, job_id):
        self.job_id = job_id


def test_submit_order_arrays_and_dependencies():
    """Parents first; same resources and same parents' jobs = one array; cached nodes not submitted."""
    from dft.graph_launch import submit

    g = _graph()
    calls = []

    def submit_group(kind, ids, deps):
        base = 100 + len(calls)
        calls.append((kind, [g.nodes[i].name for i in ids], deps))
        return [_Job(f"{base}_{k}") if len(ids) > 1 else _Job(str(base)) for k in range(len(ids))]

    jobs = submit(g, set(g.nodes), submit_group)
    assert calls == [("eval", ["eval(start)"], []), ("stage", ["cpt"], []), ("stage", ["cpt_sft"], ["101"]),
                     ("stage", ["cpt_sft_dpo", "cpt_sft_orpo"], ["102"]), ("eval", ["eval(cpt_sft_dpo)"], ["103_0"]),
                     ("summary", ["summary(O)"], ["100", "101", "102", "103_1"]),
                     ("summary", ["summary(D)"], ["100", "101", "102", "103_0", "104"])]
    assert len(jobs) == len(g.nodes) == 8
    # a rerun after cpt, sft, orpo and O's summary are done: only D's remaining nodes, with no
    # dependency on what is done
    calls.clear()
    todo = {"stage/d", "eval/ed", "summary/D"}
    submit(g, todo, submit_group)
    assert calls == [("stage", ["cpt_sft_dpo"], []), ("eval", ["eval(cpt_sft_dpo)"], ["100"]),
                     ("summary", ["summary(D)"], ["100", "101"])]


def test_a_rerun_waits_on_the_live_jobs_of_an_earlier_submission(tmp_path):
    """Nodes whose recorded job is still queued/running are not submitted again; their dependants
    depend on those jobs; a live node under a parent that is resubmitted is resubmitted too."""
    from dft.graph_launch import live_jobs, record_submission, submit

    g = _graph()
    (tmp_path / ".graph").mkdir()
    record_submission(tmp_path, {i: _Job(str(100 + k)) for k, i in enumerate(g.nodes)}, g)
    ids = {g.nodes[i].name: str(100 + k) for k, i in enumerate(g.nodes)}
    # cpt finished (done, not in todo); sft running, dpo pending on it, orpo's job failed, the rest pending
    states = {ids["cpt_sft"]: "RUNNING", ids["cpt_sft_dpo"]: "PENDING", ids["eval(cpt_sft_dpo)"]: "PENDING",
              ids["summary(D)"]: "PENDING", ids["summary(O)"]: "PENDING", ids["cpt_sft_orpo"]: "FAILED"}
    todo = {"stage/s", "stage/d", "stage/o", "eval/ed", "summary/D", "summary/O"}
    live = live_jobs(tmp_path, g, todo, states=lambda: states)
    # summary(O) waits on orpo, which is resubmitted: its old job is dropped (SLURM cancels it)
    assert live == {"stage/s": ids["cpt_sft"], "stage/d": ids["cpt_sft_dpo"], "eval/ed": ids["eval(cpt_sft_dpo)"],
                    "summary/D": ids["summary(D)"]}
    calls = []

    def submit_group(kind, ids_, deps):
        calls.append((kind, [g.nodes[i].name for i in ids_], deps))
        return [_Job(str(200 + len(calls)))]

    jobs = submit(g, todo - set(live), submit_group, live={i: _Job(j) for i, j in live.items()})
    assert calls == [("stage", ["cpt_sft_orpo"], [ids["cpt_sft"]]), ("summary", ["summary(O)"], [ids["cpt_sft"], "201"])]
    assert sorted(jobs) == ["stage/o", "summary/O"]
    # the record of this submission says which earlier jobs it waits on; a third run finds them
    record_submission(tmp_path, jobs, g, {i: _Job(j) for i, j in live.items()})
    hist = json.loads((tmp_path / ".graph" / "submitted.json").read_text())
    assert sorted(hist[-1]["nodes"]) == ["stage/o", "summary/O"] and sorted(hist[-1]["live"]) == sorted(live)
    states.update({"201": "PENDING", "202": "PENDING"})
    assert live_jobs(tmp_path, g, todo, states=lambda: states) == {**live, "stage/o": "201", "summary/O": "202"}
    # nothing queued any more (squeue lists none of them): everything not done is submitted again
    assert live_jobs(tmp_path, g, todo, states=lambda: {}) == {}


def test_fuse_eval_runs_an_evaluation_in_its_stage_job():
    """launcher.fuse_eval=true: the evaluation of dpo rides in dpo's job (no job of its own), the
    summary depends on that job; the start evaluation has no parent and stays its own job."""
    from dft.graph_launch import fused_evals, submit

    g = _graph()
    riders = fused_evals(g, set(g.nodes))
    assert riders == {"stage/d": ["eval/ed"]}
    calls = []

    def submit_group(kind, ids, deps):
        base = 100 + len(calls)
        calls.append((kind, [g.nodes[i].name for i in ids], deps))
        return [_Job(f"{base}_{k}") if len(ids) > 1 else _Job(str(base)) for k in range(len(ids))]

    todo = set(g.nodes) - {"eval/ed"}
    jobs = submit(g, todo, submit_group, riders=riders)
    assert [c[1] for c in calls] == [["eval(start)"], ["cpt"], ["cpt_sft"], ["cpt_sft_dpo", "cpt_sft_orpo"],
                                     ["summary(D)"], ["summary(O)"]]
    assert jobs["eval/ed"] is jobs["stage/d"] and calls[4][2] == ["100", "101", "102", "103_0"]
    # an evaluation whose stage is done (cached) is not fused: nothing to ride on
    assert fused_evals(g, {"eval/ed", "summary/D"}) == {}


@pytest.mark.parametrize("tail,rc", [("", 0), ("raise RuntimeError('after the work')", 1), ("sys.exit(3)", 3)])
def test_fast_exit_of_a_job_keeps_a_failure_status(tail, rc):
    """dft.launching.register_fast_exit: a submitit SLURM job that succeeded skips the teardown (exit 0, the
    log flushed); an exception raised after the registration still ends the process with its status,
    and outside a submitit SLURM job nothing changes."""
    code = ("import logging, sys\nlogging.basicConfig(level=logging.INFO)\nfrom dft.launching import register_fast_exit\n"
            "register_fast_exit()\nlogging.getLogger('t').info('last line')\n" + tail)
    for executor in ("slurm", ""):
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, SUBMITIT_EXECUTOR=executor, PYTHONPATH=str(ROOT)))
        want = 0 if not tail else (1 if "raise" in tail else 3)
        assert (p.returncode, "last line" in p.stderr) == (want, True), (executor, p.returncode, p.stderr[-2000:])
    assert rc == want


def test_failure_message_names_the_node_its_log_and_the_blocked_cells():
    from dft.graph_launch import failure_message

    g = _graph()

    class J(_Job):
        state = "FAILED"
        paths = type("P", (), {"stderr": Path("/sweep/.submitit/103_0/103_0_0_log.err")})()

    jobs = {i: J(str(k)) for k, i in enumerate(g.nodes)}
    msg = failure_message(g, "stage/s", J("103_0"), RuntimeError("boom"), jobs)
    assert msg.splitlines()[0] == "node cpt_sft (stage, stage/s) failed (job 103_0, state FAILED)"
    assert "  log: /sweep/.submitit/103_0/103_0_0_log.err" in msg
    assert "  blocks 2 cell(s): D, O" in msg
    assert ("  5 dependant node(s) will not run (SLURM cancels them: --kill-on-invalid-dep): "
            "cpt_sft_dpo, eval(cpt_sft_dpo), summary(D), cpt_sft_orpo, summary(O)\n") in msg
    assert "RuntimeError: boom" in msg


def test_one_poller_waits_for_nodes_and_for_cells(monkeypatch):
    """wait_for_nodes and wait_for_cells are both dft.launching.poll_jobs: a failed node ends the wait
    at once, named, its dependants not listed as running, an independent node listed as going on."""
    import dft.launching as launching
    from dft.graph_launch import NodeFailed, wait_for_nodes
    from test_slurm import _FakeJob

    calls = []
    real = launching.poll_jobs
    monkeypatch.setattr(launching, "poll_jobs", lambda *a, **k: calls.append(k.get("what", a[3:4])) or real(*a, **k))
    g = _graph()
    jobs = {i: _FakeJob(str(10 + k), 3600) for k, i in enumerate(g.nodes)}
    jobs["stage/d"] = _FakeJob("13_0", 0.1, RuntimeError("boom"))
    t0 = time.monotonic()
    with pytest.raises(NodeFailed) as e:
        wait_for_nodes(g, jobs, poll_s=0.05)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("node cpt_sft_dpo (stage, stage/d) failed (job 13_0, state FAILED)") and "boom" in msg
    # going on: everything but dpo's dependants (eval(dpo), summary(D))
    assert "\n5 other node(s) still queued or running; they go on" in msg
    # what python -m dft.train ends with (a CellFailed: the details above it, then this line)
    assert e.value.line == "node cpt_sft_dpo (stage, stage/d) failed (job 13_0, state FAILED); log: /x/13_0_0_log.err"
    ok = {"stage/c": _FakeJob("1", 0.0), "stage/s": _FakeJob("2", 0.1)}
    assert wait_for_nodes(g, ok, poll_s=0.05) == {"stage/c": "1", "stage/s": "2"}
    assert launching.wait_for_cells([_FakeJob("8_0", 0.0)], ["a"], poll_s=0.05) == ["8_0"]
    assert calls == ["nodes", "nodes", "cells"]


def test_launcher_slurm_is_the_graph_plugin_and_slurm_cells_the_array():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    from test_slurm import _compose

    assert _compose(["launcher=slurm", "launcher.partition=p"]).hydra.launcher._target_ == \
        "hydra_plugins.dft_graph_launcher.graph_launcher.DftGraphLauncher"
    assert _compose(["launcher=slurm_cells", "launcher.partition=p"]).hydra.launcher._target_.endswith(
        "submitit_launcher.SlurmLauncher")
    names = {c.__name__ for c in Plugins.instance().discover(Launcher)}
    assert "DftGraphLauncher" in names
    cfg = _compose(["launcher=slurm_8gpu", "launcher.partition=p"])
    assert (cfg.launcher.gpus_per_node, cfg.launcher.eval.gpus_per_node, cfg.launcher.merge.gpus_per_node) == (8, 1, 0)


def test_graph_launcher_refuses_cells_whose_weights_are_not_here(tmp_path):
    """No Llama weights on this machine: the node keys cannot be computed; one line, nothing submitted."""
    p = subprocess.run([sys.executable, "-m", "dft.train", "-m", "grid=paper_llama", "strategy=cpt", "merge=none",
                        "grid/model=llama3_1_8b", "logger=none", "launcher=slurm", "launcher.partition=nowhere"],
                       cwd=ROOT, env=_env(tmp_path, HF_HOME=str(tmp_path / "hf")), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    # dft.train's weights check of every cell (before any launcher plans) says it in one line
    assert last == ("error: 1 of the 1 cells cannot run on this machine: no weights for meta-llama/Llama-3.1-8B "
                    "(HF_HUB_OFFLINE=1: nothing is downloaded); nothing was started"), last
    assert not list(tmp_path.rglob(".submitit")) and not list(tmp_path.rglob("submitted.json"))


# ------------------------------------------------------------------------------- real SLURM
def _env(runs: Path, **extra) -> dict:
    cache = os.environ.get("DFT_CACHE", str(Path.home() / ".cache" / "dft"))
    return dict(os.environ, DFT_RUNS=str(runs), DFT_CACHE=cache, WANDB_MODE="offline", WANDB_SILENT="true",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DFT_LAUNCH_POLL_S="2",
                OMP_NUM_THREADS="1", **extra)


def graph_args(slurm: LocalSlurm) -> list[str]:
    """launcher=slurm on the local cluster: 1 CPU, 2 GB, no GPU for every node kind."""
    args = ["launcher=slurm", f"launcher.partition={slurm.partition}", "launcher.timeout_min=30",
            "launcher.gpus_per_node=0"]
    for kind in ("stage", "merge", "eval", "summary"):
        args += [f"launcher.{kind}.gpus_per_node=0", f"launcher.{kind}.cpus_per_task=1", f"launcher.{kind}.mem_gb=2"]
    return args


def _metrics(sweep: Path) -> dict:
    out = {}
    for s in sorted(sweep.glob("*/summary.json")):
        d = json.loads(s.read_text())
        assert d["status"] == "finished", s
        out[s.parent.name] = {a["name"]: a["metrics"] for a in d["artefacts"]}
    return out


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for cell, arts in want.items():
        assert sorted(got[cell]) == sorted(arts), cell
        for art, m in arts.items():
            assert sorted(got[cell][art]) == sorted(m), (cell, art)
            for k, v in m.items():
                assert got[cell][art][k] == pytest.approx(v, rel=1e-5), (cell, art, k)


def _sacct(ids: list[str]) -> dict[str, str]:
    p = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(sorted({i.split("_")[0] for i in ids})),
                        "-o", "JobID,State"], capture_output=True, text=True, timeout=60)
    return dict(line.split("|", 1) for line in p.stdout.splitlines() if line)


def _wait_ended(ids: list[str], timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = _sacct(ids)
        if all(states.get(i, "").split(" ")[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")
               for i in ids):
            return states
        assert time.monotonic() < deadline, states
        time.sleep(1)


def _submitted(sweep: Path) -> list[dict]:
    p = sweep / ".graph" / "submitted.json"
    return json.loads(p.read_text()) if p.exists() else []


@pytest.mark.slurm
@pytest.mark.slurm_heavy
def test_graph_sweep_runs_each_node_once_and_matches_launcher_local(slurm: LocalSlurm, tmp_path, tiny_model):
    """6 cells (CPT -> SFT shared by all, DPO/ORPO leaves, none/SLERP merges): each distinct node is
    one SLURM job, dependants carry afterok, no log has a lock wait, summaries equal launcher=local."""
    grid = [*TINY, "strategy=cpt_sft,cpt_sft_dpo,cpt_sft_orpo", "merge=none,slerp", "experiment=g6"]
    local = subprocess.run([sys.executable, "-m", "dft.train", "-m", *grid], cwd=ROOT, env=_env(tmp_path / "local"),
                           capture_output=True, text=True, timeout=1800)
    assert local.returncode == 0, local.stderr[-3000:]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dft.train", "-m", *grid, *graph_args(slurm)], cwd=ROOT,
                            env=_env(tmp_path / "graph"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "graph" / "g6"
    deps_seen = {}
    try:
        while not _submitted(sweep):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - t0 < 600
            time.sleep(1)
        sub = _submitted(sweep)[0]["nodes"]
        # while the sweep runs: a not-yet-started node's job shows its afterok dependency
        for nid, rec in sub.items():
            if rec["kind"] in ("summary", "merge"):
                out = subprocess.run(["scontrol", "show", "job", rec["job"]], capture_output=True, text=True).stdout
                m = re.search(r"Dependency=(\S+)", out)
                if m and m.group(1) != "(null)":
                    deps_seen[nid] = m.group(1)
        out, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    wall = time.monotonic() - t0
    graph = json.loads((sweep / ".graph" / "graph.json").read_text())
    kinds = [n["kind"] for n in graph["nodes"]]
    assert {k: kinds.count(k) for k in set(kinds)} == {"eval_start": 1, "stage": 4, "merge": 3, "eval": 6, "summary": 6}
    assert sorted(sub) == sorted(n["id"] for n in graph["nodes"])  # every node submitted, once
    jobs = [rec["job"] for rec in sub.values()]
    assert len(set(jobs)) == len(jobs) == 20
    states = _wait_ended(jobs)
    assert {j: states.get(j) for j in jobs} == {j: "COMPLETED" for j in jobs}
    assert deps_seen and all(d.startswith("afterok:") for d in deps_seen.values()), deps_seen
    logs = "".join(f.read_text() for f in (sweep / ".submitit").glob("*/*_log.*"))
    assert "waiting for lock" not in logs
    assert "graph of 6 cell(s): 20 nodes" in out + err
    # each stage trained once, in its own job; every summary finds it cached
    train = [json.loads(p.read_text()) for p in (tmp_path / "graph" / "_stages").glob("*/manifest.json")]
    assert sorted(m["artefact"] for m in train if "train" in m) == ["cpt", "cpt_sft", "cpt_sft_dpo", "cpt_sft_orpo"]
    _same(_metrics(sweep), _metrics(tmp_path / "local" / "g6"))
    print(f"6-cell graph sweep on SLURM: {wall:.0f} s, {len(jobs)} jobs")


@pytest.mark.slurm
@pytest.mark.slurm_heavy
def test_failed_node_stops_its_dependants_and_a_rerun_submits_only_the_missing(slurm: LocalSlurm, tmp_path, tiny_model):
    grid = [*TINY, "strategy=cpt_sft,cpt_sft_dpo", "merge=none", "experiment=gf"]
    run = [sys.executable, "-m", "dft.train", "-m", *grid, *graph_args(slurm)]
    p = subprocess.run(run, cwd=ROOT, env=_env(tmp_path / "graph", DFT_NODE_FAIL="cpt_sft_dpo"), capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode != 0
    sweep = tmp_path / "graph" / "gf"
    first = _submitted(sweep)[0]["nodes"]
    assert len(first) == 8  # start eval, cpt, sft, eval(sft), dpo, eval(dpo), 2 summaries
    by_name = {rec["name"]: rec for rec in first.values()}
    dpo_job = by_name["cpt_sft_dpo"]["job"]
    assert f"node cpt_sft_dpo (stage, stage/" in p.stderr and f"failed (job {dpo_job}" in p.stderr, p.stderr[-3000:]
    cells = json.loads((sweep / ".graph" / "cells.json").read_text())
    (dpo_cell,) = [c for c, rec in cells.items() if "strategy=cpt_sft_dpo" in rec["overrides"]]
    assert f"  blocks 1 cell(s): {dpo_cell}\n" in p.stderr, p.stderr[-3000:]
    assert f"_log." in p.stderr.split(f"failed (job {dpo_job}")[1].split("\n")[1]
    assert "DFT_NODE_FAIL=cpt_sft_dpo: node cpt_sft_dpo" in p.stderr
    states = _wait_ended([rec["job"] for rec in first.values()])
    assert states[dpo_job] == "FAILED"
    blocked = [rec for rec in first.values() if rec["name"] in ("eval(cpt_sft_dpo)", f"summary({dpo_cell})")]
    assert len(blocked) == 2 and all(states[rec["job"]] == "CANCELLED" for rec in blocked), states
    ok = [rec for rec in first.values() if rec["job"] != dpo_job and rec not in blocked]
    assert len(ok) == 5 and all(states[rec["job"]] == "COMPLETED" for rec in ok), states
    # the same command without the fault: only the three missing nodes are submitted
    p = subprocess.run(run, cwd=ROOT, env=_env(tmp_path / "graph"), capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    second = _submitted(sweep)[1]["nodes"]
    assert sorted(rec["name"] for rec in second.values()) == sorted(
        ["cpt_sft_dpo", "eval(cpt_sft_dpo)", next(rec["name"] for rec in blocked if rec["kind"] == "summary")])
    local = subprocess.run([sys.executable, "-m", "dft.train", "-m", *grid], cwd=ROOT, env=_env(tmp_path / "local"),
                           capture_output=True, text=True, timeout=1800)
    assert local.returncode == 0, local.stderr[-3000:]
    _same(_metrics(sweep), _metrics(tmp_path / "local" / "gf"))


@pytest.mark.slurm
@pytest.mark.slurm_heavy
def test_a_rerun_while_the_first_submission_runs_submits_nothing_twice(slurm: LocalSlurm, tmp_path, tiny_model):
    """The first submission is held (sbatch --hold) so that it is still queued when the same command
    runs again; one of its jobs is cancelled. The rerun submits only that node and the dependant SLURM
    cancelled with it, the new job depends (afterok) on the earlier submission's live job, and after
    the hold is released every node has run exactly once."""
    grid = [*TINY, "eval=none", "strategy=cpt_sft,cpt_sft_dpo", "merge=none", "experiment=glive"]
    run = [sys.executable, "-m", "dft.train", "-m", *grid, *graph_args(slurm)]
    env = _env(tmp_path / "graph")
    p = subprocess.run(run + ["launcher.wait=false", "++hydra.launcher.additional_parameters.hold=true"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = tmp_path / "graph" / "glive"
    first = _submitted(sweep)[0]["nodes"]
    by_name = {rec["name"]: rec for rec in first.values()}
    assert sorted(by_name)[:3] == ["cpt", "cpt_sft", "cpt_sft_dpo"] and len(first) == 5
    held = sorted({rec["job"].split("_")[0] for rec in first.values()})
    try:
        subprocess.run(["scancel", by_name["cpt_sft_dpo"]["job"]], check=True, timeout=60)
        proc = subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while len(_submitted(sweep)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - t0 < 600
            time.sleep(1)
        second = _submitted(sweep)[1]
        (dpo_cell,) = [n for n in second["nodes"].values() if n["kind"] == "summary"]
        assert sorted(n["name"] for n in second["nodes"].values()) == ["cpt_sft_dpo", dpo_cell["name"]]
        assert sorted(n["name"] for n in second["live"].values()) == sorted(
            n for n in by_name if n not in ("cpt_sft_dpo", dpo_cell["name"]))
        assert {i: n["job"] for i, n in second["live"].items()} == {i: first[i]["job"] for i in second["live"]}
        new_dpo = next(n["job"] for n in second["nodes"].values() if n["name"] == "cpt_sft_dpo")
        out = subprocess.run(["scontrol", "show", "job", new_dpo], capture_output=True, text=True).stdout
        assert re.search(r"Dependency=afterok:" + re.escape(by_name["cpt_sft"]["job"]) + r"\b", out), out
    finally:
        subprocess.run(["scontrol", "release", ",".join(held)], timeout=60)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-4000:]
    assert "node(s) still queued or running from an earlier submission: not submitted again" in out + err
    jobs = {i: n["job"] for sub in _submitted(sweep) for i, n in sub["nodes"].items()}
    ran = [n["job"] for sub in _submitted(sweep) for n in sub["nodes"].values()]
    states = _wait_ended(ran)
    completed = [j for j in ran if states.get(j) == "COMPLETED"]
    # every node completed exactly once: the 5 nodes' jobs, the cancelled ones not counted
    assert sorted(completed) == sorted(jobs.values()) and len(jobs) == 5, states
    cancelled = [states[by_name[n]["job"]].split()[0] for n in ("cpt_sft_dpo", dpo_cell["name"])]
    assert cancelled == ["CANCELLED", "CANCELLED"], states
    assert len(_metrics(sweep)) == 2


@pytest.mark.slurm
@pytest.mark.slurm_heavy
def test_a_signalled_stage_node_is_requeued_resumes_and_its_dependants_run(slurm: LocalSlurm, tmp_path, tiny_model):
    """USR2 (what ``--signal=USR2@launcher.signal_delay_s`` sends before the time limit, and a
    preemption) to the SFT node's job mid-training: it checkpoints at the next step, submitit requeues
    the job, it resumes from the checkpoint, DPO and the summary after it still run, and the result
    equals the in-process run's (weights, train_loss, metrics)."""
    steps = 60
    grid = [*TINY, "eval=none", "strategy=cpt_sft_dpo", "merge=none", "experiment=greq",
            f"strategy.sft.trainer.max_steps={steps}", "strategy.sft.trainer.save_steps=1000",
            "strategy.sft.trainer.logging_steps=1", "strategy.sft.trainer.lr_scheduler_type=constant",
            "strategy.sft.trainer.warmup_steps=0"]
    local = subprocess.run([sys.executable, "-m", "dft.train", "-m", *grid], cwd=ROOT, env=_env(tmp_path / "local"),
                           capture_output=True, text=True, timeout=1800)
    assert local.returncode == 0, local.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "dft.train", "-m", *grid, *graph_args(slurm)], cwd=ROOT,
                            env=_env(tmp_path / "graph"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "graph" / "greq"
    at = random.Random(19).randint(3, 10)
    sft_job = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
            subs = _submitted(sweep)
            if not subs:
                continue
            sft_job = next(n["job"] for n in subs[0]["nodes"].values() if n["name"] == "cpt_sft")
            logs = [f.read_text(errors="replace") for f in (sweep / ".submitit").glob(f"{sft_job}/*_log.err")]
            done = [int(n) for text in logs for n in re.findall(rf"(\d+)/{steps} \[", text)]
            if done and max(done) >= at:
                subprocess.run(["scancel", "--signal=USR2", sft_job], check=True, timeout=60)
                break
        else:
            pytest.fail("the SFT node never trained")
        out, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    logs = "".join(f.read_text(errors="replace") for f in (sweep / ".submitit").glob(f"{sft_job}/*_log.*"))
    assert "received SIGUSR2: saving a checkpoint at the next step boundary" in logs
    assert logs.count("DUE TO JOB REQUEUE") + logs.count("Requeued job") >= 1, logs[-3000:]
    # one job per node still: the requeue is the same job id, no node was submitted twice
    sub = _submitted(sweep)
    assert len(sub) == 1 and len(sub[0]["nodes"]) == 4
    states = _wait_ended([n["job"] for n in sub[0]["nodes"].values()])
    assert all(states[n["job"]] == "COMPLETED" for n in sub[0]["nodes"].values()), states
    (cell,) = [p.parent for p in sweep.glob("*/summary.json")]
    (ref,) = [p.parent for p in (tmp_path / "local" / "greq").glob("*/summary.json")]
    s, r = (json.loads((c / "summary.json").read_text()) for c in (cell, ref))
    t = s["train"]["cpt_sft"]
    assert t["cached"] is True and t["steps"] == steps  # the summary job found it trained by the node
    man = json.loads(next(p for p in (tmp_path / "graph" / "_stages").glob("*/manifest.json")
                          if json.loads(p.read_text()).get("artefact") == "cpt_sft").read_text())
    assert man["train"]["attempts"] == 2 and man["train"]["resumed_from"].startswith("checkpoint-"), man["train"]
    assert 0 < int(man["train"]["resumed_from"].split("-")[1]) < steps
    assert man["train"]["train_loss"] == r["train"]["cpt_sft"]["train_loss"]
    for art in ("cpt_sft", "cpt_sft_dpo"):
        assert (cell / "stages" / art / "final" / "model.safetensors").read_bytes() == \
            (ref / "stages" / art / "final" / "model.safetensors").read_bytes(), art
    _same(_metrics(sweep), _metrics(tmp_path / "local" / "greq"))
