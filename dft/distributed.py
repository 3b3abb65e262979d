"""The distributed environment of this process: who am I (rank), how many are we, who is master.

One place reads it, from the first of these that applies:

1. ``torchrun`` (or anything that set ``RANK`` and ``WORLD_SIZE``, e.g. accelerate);
2. a submitit local job with several tasks (``SUBMITIT_LOCAL_*``, ``launcher=submitit_local``
   with ``launcher.tasks_per_node>1``);
3. a SLURM step started by ``srun`` (submitit's ``launcher=slurm*`` runs every cell that way):
   ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``, the first host of
   ``SLURM_STEP_NODELIST``; the master port is derived from the job id, so the tasks of one job
   agree on it without talking and two jobs on one node do not collide;
4. otherwise a single process (rank 0 of 1).

A SLURM batch script outside ``srun`` is a single process even if the job has several tasks
(``SLURM_NTASKS`` counts the job's tasks, not the processes running this code).

Transformers' ``Trainer`` (hence TRL) and accelerate read the torchrun variables, so
:func:`export` writes ours there; :func:`init_process_group` does that and starts
``torch.distributed`` (gloo on CPU, nccl with CUDA) and picks ``cuda:<local_rank>``. Importing this
module does not import torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional

#: master ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN)
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in its job."""

    rank: int = 0  #: global rank, 0..world_size-1
    local_rank: int = 0  #: rank on this node (the GPU index to use)
    world_size: int = 1  #: processes in the job
    local_world_size: int = 1  #: processes on this node
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  #: ``torchrun`` | ``submitit_local`` | ``slurm`` | ``single``

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand SLURM's compressed host list: ``gpu[01-03,7],cpu5`` -> ``gpu01 gpu02 gpu03 gpu7 cpu5``.

    Zero padding is kept; a suffix after the brackets is kept (``n[1-2]-ib`` -> ``n1-ib n2-ib``).
    """
    groups, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "," and depth == 0:
            groups.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    groups.append(cur)
    hosts: List[str] = []
    for group in filter(None, (g.strip() for g in groups)):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if not m:
            hosts.append(group)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def _first_int(value: Optional[str], default: int) -> int:
    """``'2(x3)'`` (SLURM's tasks-per-node format) -> 2; missing -> ``default``."""
    m = re.match(r"\d+", value or "")
    return int(m.group()) if m else default


def port_for_job(job_id: str) -> int:
    """A master port every task of a job derives alike: ``PORT_BASE + job_id % PORT_SPAN``."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def detect(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read this process's distributed environment (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        world = int(env.get("SUBMITIT_LOCAL_NTASKS", 1))
        return DistEnv(
            rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", env["SUBMITIT_LOCAL_GLOBALID"])),
            world_size=world,
            local_world_size=world,
            master_addr="127.0.0.1",
            master_port=port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID", "0")),
            source="submitit_local",
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        n_nodes = int(env.get("SLURM_STEP_NUM_NODES", len(nodes) or 1))
        # One node: loopback, so a host name that does not resolve (containers, CI) cannot hurt.
        master = nodes[0] if n_nodes > 1 and nodes else "127.0.0.1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world,
            local_world_size=_first_int(env.get("SLURM_STEP_TASKS_PER_NODE"), max(1, world // n_nodes)),
            master_addr=master,
            master_port=port_for_job(env.get("SLURM_JOB_ID", "0")),
            source="slurm",
        )
    return DistEnv()


def is_rank0() -> bool:
    """True in the process that writes shared outputs (summary, W&B, final artefacts)."""
    return detect().is_rank0


def export(dist: Optional[DistEnv] = None, overwrite: bool = False) -> DistEnv:
    """Write the torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) into ``os.environ`` for torch, transformers and accelerate.

    Variables already set are kept unless ``overwrite``. A single process exports nothing (a
    stray ``LOCAL_RANK=0`` would make transformers set up distributed training). Returns the
    environment.
    """
    dist = dist or detect()
    if not dist.is_distributed:
        return dist
    values = {
        "RANK": dist.rank,
        "LOCAL_RANK": dist.local_rank,
        "WORLD_SIZE": dist.world_size,
        "LOCAL_WORLD_SIZE": dist.local_world_size,
        "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": dist.master_port,
    }
    for key, value in values.items():
        if overwrite or key not in os.environ:
            os.environ[key] = str(value)
    return dist


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: Optional[str] = None, timeout_s: float = 1800) -> DistEnv:
    """Start ``torch.distributed`` for this process (a no-op for a single process).

    Exports the torchrun variables (:func:`export`), selects ``cuda:<local_rank>`` when CUDA is
    available, and initialises the default process group with ``init_method="env://"``.

    Args:
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA); default :func:`default_backend`.
        timeout_s: how long collectives wait for the other ranks.

    Returns:
        The environment used. Calling it again once initialised returns it unchanged.
    """
    dist = export()
    if not dist.is_distributed:
        return dist
    import datetime

    import torch
    import torch.distributed as td

    if td.is_initialized():
        return dist
    backend = backend or default_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
    td.init_process_group(
        backend=backend,
        init_method="env://",
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist


def destroy_process_group() -> None:
    """Tear the default process group down if one was started (call at the end of a cell)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
