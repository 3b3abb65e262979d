"""The launcher configs, dft.distributed, and jobs on a real single-node SLURM (launch/slurm.sh).

Tests marked ``slurm`` use the ``slurm`` fixture (tests/slurm_fixtures.py): it starts the local
cluster if needed and skips with the reason when it cannot (not root, no apt-get, ...).
Unmarked tests here need no SLURM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from slurm_fixtures import ROOT, LocalSlurm, slurm  # noqa: F401  (fixture)

LAUNCHERS = ["local", "submitit_local", "slurm", "slurm_8gpu"]


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
        assert target.endswith("SlurmLauncher")
        assert hl.partition == "gpu"
        assert hl.max_num_timeout == cfg.launcher.max_num_timeout >= 1
        assert hl.array_parallelism == cfg.launcher.array_parallelism
        assert cfg.launcher.timeout_min >= 11  # submitit counts every USR2 as a timeout at <= 10
        assert hl.signal_delay_s >= 60
        assert "dft_launcher" in cfg.hydra.callbacks
    if name == "slurm_8gpu":
        assert (cfg.launcher.gpus_per_node, cfg.launcher.tasks_per_node) == (8, 8)


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
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1", SLURM_JOB_ID=str(os.getpid()),
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert sorted(o.split() for o, _ in outs) == [["gloo", "0", "2", "3"], ["gloo", "1", "2", "3"]]


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
