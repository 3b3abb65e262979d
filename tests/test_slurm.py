"""The launcher configs, dft.distributed, and jobs on a real single-node SLURM (launch/slurm.sh).

Tests marked ``slurm`` use the ``slurm`` fixture (tests/slurm_fixtures.py): it starts the local
cluster if needed and skips with the reason when it cannot (not root, no apt-get, ...).
Unmarked tests here need no SLURM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import PAPER_DEMO, run_gloo_ranks
from slurm_fixtures import ROOT, LocalSlurm, slurm  # noqa: F401  (fixture)

LAUNCHERS = ["local", "submitit_local", "slurm", "slurm_cells", "slurm_8gpu"]


def _compose(overrides: list[str]):
    import dft.train  # noqa: F401  registers the schema and resolvers
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# --- configs (no SLURM needed) -------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_configs_compose(name):
    """Every launcher option composes; hydra.launcher takes its values from launcher.*."""
    first = (ROOT / "conf" / "launcher" / f"{name}.yaml").read_text().splitlines()[0]
    assert first == "# @package _global_"
    cfg = _compose([f"launcher={name}", "launcher.partition=gpu"])
    assert cfg.launcher.name == name
    target = cfg.hydra.launcher._target_
    if name == "local":
        assert target.endswith("BasicLauncher")
        return
    hl = cfg.hydra.launcher
    assert OmegaConf.to_container(hl)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    for key in ("timeout_min", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb"):
        assert hl[key] == cfg.launcher[key], key
    if name.startswith("slurm"):
        # slurm, slurm_8gpu: the graph launcher (tests/test_graph_slurm.py); slurm_cells: the cell array
        assert target.endswith("SlurmLauncher" if name == "slurm_cells" else "DftGraphLauncher")
        assert hl.partition == "gpu"
        assert hl.max_num_timeout == cfg.launcher.max_num_timeout >= 1
        assert hl.array_parallelism == cfg.launcher.array_parallelism
        assert cfg.launcher.timeout_min >= 11  # submitit counts every USR2 as a timeout at <= 10
        assert hl.signal_delay_s >= 60
        assert "dft_launcher" in cfg.hydra.callbacks
    if name == "slurm_8gpu":
        assert (cfg.launcher.gpus_per_node, cfg.launcher.tasks_per_node) == (8, 8)


def _sbatch_script(overrides: list[str], folder: Path) -> str:
    """The sbatch script submitit would write for these overrides (no cluster needed)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    hl = OmegaConf.to_container(_compose(overrides).hydra.launcher, resolve=True)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=hl["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # the plugin's own mapping of keys
    ex.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in hl.items()
                            if k not in ("submitit_folder", "max_num_timeout", "_target_")})
    return ex._executor._make_submission_file_text("CMD", "uid")


def test_slurm_8gpu_sbatch_script(tmp_path):
    """slurm_8gpu asks for one node, 8 GPUs, 8 tasks (srun starts one process per GPU), all memory."""
    script = _sbatch_script(["launcher=slurm_8gpu", "launcher.partition=gpu", "experiment=big"], tmp_path)
    for flag in ("--nodes=1", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=8", "--mem=0GB",
                 "--partition=gpu", "--time=720", "--signal=USR2@120", "--job-name=dft-big"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "\nsrun " in script
    assert "--account" not in script and "--qos" not in script and "--constraint" not in script


def test_no_cluster_values_committed():
    """Partition, account, qos and constraint come from conf/local/ or the command line only."""
    for name in LAUNCHERS:
        cfg = OmegaConf.load(ROOT / "conf" / "launcher" / f"{name}.yaml")
        for key in ("partition", "account", "qos", "constraint"):
            assert OmegaConf.select(cfg, f"launcher.{key}") is None, (name, key)


def test_missing_partition_fails_before_submitting(tmp_path):
    """launcher=slurm without a partition: one line saying where to set it, exit 2, nothing submitted."""
    env = dict(os.environ, DFT_RUNS=str(tmp_path))
    # launcher.partition=null: as if no conf/local/slurm.yaml (a developer's would supply one)
    p = subprocess.run(
        [sys.executable, "-m", "dft.train", "-m", "launcher=slurm", "launcher.partition=null", "seed=1,2",
         "experiment=nopart"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: launcher.partition is not set"), p.stderr[-2000:]
    assert "conf/local/slurm.yaml" in last
    assert not (tmp_path / "nopart" / ".submitit").exists()


# --- dft.distributed (no SLURM needed) -----------------------------------------------------------


def test_distributed_env_sources():
    from dft.distributed import detect, expand_nodelist, port_for_job

    assert expand_nodelist("gpu[01-03,7],cpu5,n[1-2]-ib") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5", "n1-ib", "n2-ib"]
    assert detect({}).world_size == 1 and detect({}).is_rank0
    tr = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.local_rank, tr.world_size, tr.master_addr, tr.master_port, tr.source) == (3, 1, 4, "h", 1234, "torchrun")
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
            "SLURM_JOB_ID": "4242"}
    d = detect(step)
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size, d.master_addr) == (9, 1, 16, 8, "gpu07")
    assert d.master_port == port_for_job("4242") and not d.is_rank0
    one_node = detect(dict(step, SLURM_STEP_NODELIST="vm", SLURM_STEP_NUM_NODES="1"))
    assert one_node.master_addr == "127.0.0.1"
    # a batch script outside srun is one process, whatever SLURM_NTASKS says
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"}).world_size == 1
    loc = detect({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
                  "SUBMITIT_LOCAL_JOB_ID": "777"})
    assert (loc.rank, loc.world_size, loc.source) == (1, 2, "submitit_local")


def test_gloo_process_group_two_processes(tmp_path):
    """init_process_group starts gloo on CPU from SLURM-style variables; an all_reduce adds up."""
    code = (
        "import torch, torch.distributed as td\n"
        "from dft.distributed import init_process_group, destroy_process_group\n"
        "d = init_process_group()\n"
        "t = torch.tensor([d.rank + 1.0]); td.all_reduce(t)\n"
        "print(td.get_backend(), d.rank, d.world_size, int(t.item()))\n"
        "destroy_process_group()\n"
    )
    outs = run_gloo_ranks(code, str(os.getpid()))
    assert sorted(o.split() for o in outs) == [["gloo", "0", "2", "3"], ["gloo", "1", "2", "3"]]


# --- waiting on cells (fake jobs, no SLURM needed) -----------------------------------------------


class _FakeJob:
    def __init__(self, job_id: str, done_after: float, error: Exception | None = None):
        self.job_id, self._t, self._error = job_id, time.monotonic() + done_after, error
        self.state = "RUNNING"
        self.paths = type("P", (), {"stderr": Path(f"/x/{job_id}_0_log.err")})()

    def done(self):
        if time.monotonic() >= self._t:
            self.state = "FAILED" if self._error else "COMPLETED"
            return True
        return False

    def results(self):
        if self._error:
            raise self._error
        return [self.job_id]


def test_wait_fails_fast_naming_the_cell():
    """A failed cell ends the wait at once, named with its overrides, run dir and log, even while
    an earlier cell still runs; the running cells are listed."""
    from dft.launching import CellFailed, wait_for_cells

    jobs = [_FakeJob("7_0", 3600), _FakeJob("7_1", 0.2, RuntimeError("killed by signal 9"))]
    t0 = time.monotonic()
    with pytest.raises(CellFailed) as e:
        wait_for_cells(jobs, ["'strategy=sft'", "'strategy=dpo'"], poll_s=0.05, run_dir=lambda i: f"/runs/x/cell{i}")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "cell #1 'strategy=dpo' failed (job 7_1, state FAILED)" in msg
    assert "/runs/x/cell1" in msg and "7_1_0_log.err" in msg and "killed by signal 9" in msg
    assert "1 other cell(s) still running" in msg and "7_0 'strategy=sft'" in msg
    ok = [_FakeJob("8_0", 0.1), _FakeJob("8_1", 0.0)]
    assert wait_for_cells(ok, ["a", "b"], poll_s=0.05) == ["8_0", "8_1"]


# --- real SLURM ----------------------------------------------------------------------------------


def _sbatch(tmp_path: Path, *args: str) -> str:
    p = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "slurm-%j.out"), *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_sbatch_job_completes_in_sacct(slurm: LocalSlurm, tmp_path):
    t0 = time.monotonic()
    job = _sbatch(tmp_path, "-p", slurm.partition, "--mem=100M", "--wrap", "echo hello from $SLURM_JOB_ID")
    state, waited = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=60)
    assert state == "COMPLETED"
    assert (tmp_path / f"slurm-{job}.out").read_text().strip() == f"hello from {job}"
    print(f"sbatch -> COMPLETED in sacct: {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
def test_gpu_flags_on_fake_gres(slurm: LocalSlurm, tmp_path):
    """--gpus-per-node is accepted by the fake-GRES node and the job sees CUDA_VISIBLE_DEVICES."""
    if slurm.gpus < 1:
        pytest.skip("the local node advertises no GPUs")
    job = _sbatch(tmp_path, "-p", slurm.partition, "--mem=100M", "--gpus-per-node=1", "--wrap",
                  "echo CVD=$CUDA_VISIBLE_DEVICES")
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)[0] == "COMPLETED"
    assert (tmp_path / f"slurm-{job}.out").read_text().strip() == "CVD=0"


@pytest.mark.slurm
def test_sigkilled_job_is_failed_in_sacct_quickly(slurm: LocalSlurm, tmp_path):
    """A hard-killed job (SIGKILL to its batch script) is FAILED in sacct within seconds, and the
    processes it started are gone (no orphan keeps running)."""
    job = _sbatch(tmp_path, "-p", slurm.partition, "--mem=100M", "--wrap", "sleep 300 & wait")
    slurm.wait_state(job, {"RUNNING"}, timeout=60)
    try:
        deadline = time.monotonic() + 30
        pids: list[tuple[int, str]] = []
        while time.monotonic() < deadline:
            out = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout
            pids = [(int(f[0]), f[3]) for f in (line.split() for line in out.splitlines()[1:]) if len(f) >= 4]
            if len(pids) >= 2:
                break
            time.sleep(0.2)
        script = [pid for pid, local in pids if local == "0"]
        children = [pid for pid, local in pids if local != "0"]
        assert script, f"no batch script pid in scontrol listpids: {pids}"
        t0 = time.monotonic()
        os.kill(script[0], 9)
        state, waited = slurm.wait_state(job, {"FAILED", "CANCELLED", "NODE_FAIL", "COMPLETED"}, timeout=30)
        assert state in ("FAILED", "CANCELLED"), state
        assert waited < 15, f"sacct took {waited:.1f} s to report the killed job"
        print(f"SIGKILL -> {state} in sacct: {time.monotonic() - t0:.1f} s")
        time.sleep(1)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert not alive, f"processes of the killed job still running: {alive}"
    finally:
        subprocess.run(["scancel", job], capture_output=True)


# --- dft.train sweeps on the real local SLURM (tiny model, CPU) ----------------------------------

#: the cheapest real cell: tiny random model, tiny data, 2 SFT steps, no merge, no eval
TINY = ["model=tiny", "data=tiny", "strategy=sft", "merge=none", "eval=none", "strategy.sft.trainer.max_steps=2"]


def _slurm_args(slurm: LocalSlurm, **launcher) -> list[str]:
    values = {"partition": slurm.partition, "mem_gb": 2, "cpus_per_task": 1, "gpus_per_node": 0}
    values.update(launcher)
    # the one-job-per-cell array (launcher=slurm is the graph launcher: tests/test_graph_slurm.py)
    return ["launcher=slurm_cells"] + [f"launcher.{k}={v}" for k, v in values.items()]


def _train_env(runs: Path) -> dict:
    cache = os.environ.get("DFT_CACHE", str(Path.home() / ".cache" / "dft"))
    return dict(os.environ, DFT_RUNS=str(runs), DFT_CACHE=cache, WANDB_MODE="offline", WANDB_SILENT="true",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DFT_LAUNCH_POLL_S="2")


def _multirun(args: list[str], runs: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft.train", "-m", *args], cwd=ROOT, env=_train_env(runs),
                          capture_output=True, text=True, timeout=timeout)


def _cells(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _sbatch_flags(script: Path) -> dict:
    flags = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def _job_pids(job: str, match: str) -> list[int]:
    """PIDs of the job's processes whose command line contains ``match`` (array ids like 7_1 work)."""
    show = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    raw = next((f.split("=", 1)[1] for f in show.split() if f.startswith("JobId=")), job)
    out = subprocess.run(["scontrol", "listpids", raw], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines()[1:]:
        pid = int(line.split()[0])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if match in cmd:
            pids.append(pid)
    return pids


def _array_tasks(job_array: str) -> dict:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_array, "-o", "JobID,State"], capture_output=True,
                         text=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


@pytest.mark.slurm
def test_grid_is_one_job_array_with_expected_flags(slurm: LocalSlurm, tmp_path):
    """A 4-cell multirun is one job array; the sbatch script carries the launcher's values; every
    cell has its run dir, summary.json and a W&B offline run."""
    gpus = 1 if slurm.gpus else 0
    t0 = time.monotonic()
    p = _multirun(TINY + _slurm_args(slurm, gpus_per_node=gpus, array_parallelism=2, timeout_min=30)
                  + ["seed=1,2,3,4", "experiment=grid4"], tmp_path)
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    sweep = tmp_path / "grid4"
    scripts = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1, scripts  # one sbatch for the whole grid
    flags = _sbatch_flags(scripts[0])
    assert flags["array"] == "0-3%2"
    assert flags["partition"] == slurm.partition
    assert flags["time"] == "30"
    assert flags["mem"] == "2GB"
    assert flags["cpus-per-task"] == "1"
    assert flags["ntasks-per-node"] == "1"
    assert flags["signal"] == "USR2@120"
    assert flags["job-name"] == "dft-grid4"
    if gpus:
        assert flags["gpus-per-node"] == "1"
    array = scripts[0].parent.name
    # results are read as soon as each cell wrote its result; the job may take a moment to end
    for _ in range(120):
        tasks = _array_tasks(array)
        if set(tasks.values()) <= {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}:
            break
        time.sleep(0.5)
    assert sorted(tasks) == [f"{array}_{i}" for i in range(4)] and set(tasks.values()) == {"COMPLETED"}, tasks
    cells = _cells(sweep)
    assert [c.name.split("seed=")[1].split(",")[0] for c in cells] == ["1", "2", "3", "4"]
    for cell in cells:
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["status"] == "finished"
        assert list((cell / "wandb").glob("offline-run-*")), f"no W&B offline run in {cell}"
        meta = json.loads((cell / "meta.json").read_text())
        assert meta["slurm"]["SLURM_ARRAY_JOB_ID"] == array
    print(f"4-cell grid on SLURM: {wall:.1f} s")


@pytest.mark.slurm
def test_killed_cell_fails_the_multirun_fast_naming_it(slurm: LocalSlurm, tmp_path):
    """SIGKILL to one cell's process (as the OOM killer would): the multirun exits non-zero within a
    minute, naming that cell, while the other cell is still running."""
    args = (TINY[:-1] + _slurm_args(slurm, timeout_min=30)
            + ["strategy.sft.trainer.max_steps=400,401", "experiment=kill"])
    proc = subprocess.Popen([sys.executable, "-m", "dft.train", "-m", *args], cwd=ROOT, env=_train_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    array = None
    try:
        deadline = time.monotonic() + 240
        pids: list[int] = []
        while time.monotonic() < deadline and not pids:
            time.sleep(1)
            scripts = list((tmp_path / "kill" / ".submitit").glob("*/*_submission.sh"))
            if scripts:
                array = scripts[0].parent.name
                pids = _job_pids(f"{array}_1", "submitit.core._submit")
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert pids, "cell #1 never started"
        time.sleep(5)  # let it get into the cell
        t0 = time.monotonic()
        for pid in pids:
            os.kill(pid, 9)
        out, err = proc.communicate(timeout=120)
        waited = time.monotonic() - t0
        assert proc.returncode != 0
        assert waited < 60, f"the multirun noticed the killed cell after {waited:.0f} s"
        assert "cell #1 " in err and "strategy.sft.trainer.max_steps=401" in err, err[-3000:]
        assert f"job {array}_1" in err and "other cell(s) still running" in err, err[-3000:]
        print(f"killed cell -> multirun exit {proc.returncode} after {waited:.1f} s; its error:\n{err[-1500:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        if array:
            subprocess.run(["scancel", array], capture_output=True)


@pytest.mark.slurm
@pytest.mark.slurm_heavy
def test_preempted_cell_is_requeued_and_finishes(slurm: LocalSlurm, tmp_path):
    """USR2 (what SLURM sends before preempting or at the time limit) requeues the cell; it starts
    again (SLURM_RESTART_COUNT=1) and finishes; the multirun exits 0."""
    args = (TINY[:-1] + _slurm_args(slurm, timeout_min=30, max_num_timeout=3)
            + ["strategy.sft.trainer.max_steps=40", "experiment=preempt", "seed=7"])
    proc = subprocess.Popen([sys.executable, "-m", "dft.train", "-m", *args], cwd=ROOT, env=_train_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(1)
            scripts = list((tmp_path / "preempt" / ".submitit").glob("*/*_submission.sh"))
            if scripts:
                job = scripts[0].parent.name
                if _job_pids(job, "submitit.core._submit"):
                    break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert job, "the cell never started"
        time.sleep(8)  # into the cell, training
        t0 = time.monotonic()
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        log = "".join(f.read_text() for f in (tmp_path / "preempt" / ".submitit").glob("*/*_log.*"))
        assert "this job is preempted" in log or "this job is timed-out" in log, log[-3000:]
        assert "Requeued job" in log, log[-3000:]
        cell = _cells(tmp_path / "preempt")[0]
        assert json.loads((cell / "summary.json").read_text())["status"] == "finished"
        meta = json.loads((cell / "meta.json").read_text())
        assert meta["slurm"].get("SLURM_RESTART_COUNT") == "1", meta["slurm"]
        print(f"USR2 -> requeued -> finished: {time.monotonic() - t0:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        if job and proc.returncode != 0:
            subprocess.run(["scancel", job], capture_output=True)


def test_submitit_local_grid_without_slurm(tmp_path):
    """launcher=submitit_local: a 2-cell grid, each cell a background process, no SLURM."""
    t0 = time.monotonic()
    p = _multirun(TINY + ["launcher=submitit_local", "launcher.cpus_per_task=1", "seed=1,2", "experiment=local2"],
                  tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    sweep = tmp_path / "local2"
    cells = _cells(sweep)
    assert len(cells) == 2
    for cell in cells:
        assert json.loads((cell / "summary.json").read_text())["status"] == "finished"
        assert "slurm" not in json.loads((cell / "meta.json").read_text()) or not json.loads(
            (cell / "meta.json").read_text())["slurm"]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    print(f"2-cell submitit_local grid: {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
def test_two_task_job_trains_ddp_with_gloo(slurm: LocalSlurm, tmp_path):
    """launcher.tasks_per_node=2: one cell, two processes, a few DDP steps over gloo, one summary."""
    p = _multirun(TINY + _slurm_args(slurm, tasks_per_node=2, timeout_min=30) + ["experiment=ddp"], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    cells = _cells(tmp_path / "ddp")
    assert len(cells) == 1
    cell = cells[0]
    assert json.loads((cell / "summary.json").read_text())["status"] == "finished"
    assert len(list(cell.glob("summary*.json"))) == 1
    meta = json.loads((cell / "meta.json").read_text())
    assert meta.get("distributed", {}).get("world_size") == 2, meta.get("distributed")
    assert meta["distributed"].get("backend") == "gloo"
    logs = "".join(f.read_text() for f in (tmp_path / "ddp" / ".submitit").glob("*/*_log.*"))
    assert "global_rank=1(2)" in logs


@pytest.mark.slurm
@pytest.mark.slow  # 305 s at load ~6 (165 s sharing the local run); the default suite submits an array in
# test_grid_is_one_job_array_with_expected_flags and runs paper_demo locally in tests/test_grid.py
def test_paper_demo_through_slurm_matches_launcher_local(slurm: LocalSlurm, tmp_path, paper_demo_local):
    """grid=paper_demo (on the tiny model, one step per stage) through the local SLURM, as one job
    array whose cells share the stage cache, gives the same cells, the same four trainings and the
    same metrics per artefact as launcher=local (conftest's session run, shared with
    tests/test_grid.py). One torch thread on both sides (SLURM gives a task one CPU here), so the
    float sums, and hence the numbers, are the same."""
    runs = {"local": paper_demo_local, "slurm": tmp_path / "slurm"}
    env = dict(_train_env(runs["slurm"]), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "dft.train", "-m", *PAPER_DEMO,
                        *_slurm_args(slurm, array_parallelism=2, timeout_min=30)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"slurm: {p.stderr[-4000:]}"
    scripts = list((runs["slurm"] / "paper_demo" / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1 and _sbatch_flags(scripts[0])["array"] == "0-7%2"

    def cells(side: str) -> dict:
        out = {}
        for cell in _cells(runs[side] / "paper_demo"):
            s = json.loads((cell / "summary.json").read_text())
            assert s["status"] == "finished", cell
            out[cell.name] = s
        return out

    local, via_slurm = cells("local"), cells("slurm")
    assert len(local) == 8 and sorted(local) == sorted(via_slurm)
    for sums in (local, via_slurm):  # the stage cache trains each distinct stage once, whatever the launcher
        assert sorted(a for s in sums.values() for a, f in s["train"].items() if not f["cached"]) == [
            "cpt", "cpt_sft", "cpt_sft_dpo", "cpt_sft_orpo"]
    for name, s in local.items():
        got = {a["name"]: a["metrics"] for a in via_slurm[name]["artefacts"]}
        want = {a["name"]: a["metrics"] for a in s["artefacts"]}
        assert sorted(got) == sorted(want), name
        for art, metrics in want.items():
            assert sorted(got[art]) == sorted(metrics), (name, art)
            for key, value in metrics.items():
                assert got[art][key] == pytest.approx(value, rel=1e-5), (name, art, key)
