"""Fixtures for tests against a real single-node SLURM (``launch/slurm.sh``).

``slurm`` (session-scoped) makes sure the local cluster runs: it starts it with
``launch/slurm.sh start`` when ``status`` says it is down (installing the Debian packages if
needed, which takes root), and skips the test with the reason when it cannot. Set
``DFT_TEST_SLURM=0`` to skip these tests without trying. The cluster is left running at the end
(a second session reuses it; ``launch/slurm.sh stop`` stops it).

Import it in a test module with ``from slurm_fixtures import slurm  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "slurm.sh"


@dataclass
class LocalSlurm:
    """The running local cluster: its partition, node and the fake GPUs it advertises."""

    partition: str
    node: str
    gpus: int
    cpus: int

    def sacct_state(self, job_id: str) -> str:
        """The job's (or array task's) state in accounting, ``''`` if not recorded yet."""
        p = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"],
                           capture_output=True, text=True, timeout=30)
        for line in p.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid == job_id:
                return state.split()[0] if state else ""
        return ""

    def wait_state(self, job_id: str, states: set, timeout: float) -> tuple[str, float]:
        """Poll sacct until the job reaches one of ``states``; return (state, seconds waited)."""
        t0 = time.monotonic()
        state = ""
        while time.monotonic() - t0 < timeout:
            state = self.sacct_state(job_id)
            if state in states:
                return state, time.monotonic() - t0
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s (last: {state!r})")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # The daemons detach from stdout/stderr (slurm.sh makes sure), so capturing them cannot hang.
    return subprocess.run([str(SCRIPT), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def slurm() -> LocalSlurm:
    """The local SLURM, started if needed; the test is skipped (with the reason) if it cannot run."""
    if os.environ.get("DFT_TEST_SLURM", "1") == "0":
        pytest.skip("DFT_TEST_SLURM=0")
    if not sys.platform.startswith("linux"):
        pytest.skip("the local SLURM needs Linux")
    status = _run("status", timeout=60)
    if status.returncode != 0:
        installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
        if os.geteuid() != 0:
            pytest.skip("local SLURM is not running and starting it needs root: sudo launch/slurm.sh start")
        if not installed and not shutil.which("apt-get"):
            pytest.skip("local SLURM is not installed and there is no apt-get to install it")
        t0 = time.monotonic()
        start = _run("start", timeout=600)
        if start.returncode != 0:
            pytest.skip(f"launch/slurm.sh start failed ({start.returncode}):\n{start.stdout[-2000:]}\n{start.stderr[-2000:]}")
        sys.stderr.write(f"\n[slurm fixture] local SLURM started in {time.monotonic() - t0:.1f} s\n")
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    info = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%P|%G|%c"], capture_output=True, text=True,
                          timeout=30).stdout.strip().splitlines()
    if not info:
        pytest.skip(f"sinfo shows no node {node}")
    partition, gres, cpus = info[0].split("|")
    gpus = int(gres.split(":")[-1].split("(")[0]) if gres.startswith("gpu") else 0
    return LocalSlurm(partition=partition.rstrip("*"), node=node, gpus=gpus, cpus=int(cpus))
