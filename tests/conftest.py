"""Shared fixtures: offline environment, the embedded and tiny models, running ``dft.train``.

Models are cached under ``$DFT_CACHE`` (default ``~/.cache/dft``), so the embedded GGUF is
converted once per machine, not once per test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CACHE = Path(os.environ.get("DFT_CACHE", Path.home() / ".cache" / "dft")).expanduser()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE


@pytest.fixture(scope="session")
def embedded_model(cache_dir) -> Path:
    from dft.modeling import ensure_embedded_model

    return ensure_embedded_model(cache_dir)


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    from dft.families import ensure_tiny_model

    return ensure_tiny_model(cache_dir, "smollm2")


def run_train(args: list[str], runs_dir: Path, *, timeout: float = 900, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m dft.train *args`` with ``DFT_RUNS=runs_dir``; return the finished process."""
    e = dict(os.environ, DFT_RUNS=str(runs_dir), DFT_CACHE=str(CACHE), HYDRA_FULL_ERROR="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "dft.train", *args], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"dft.train {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p



def run_gloo_ranks(code: str, job_id: str, n: int = 2, timeout: float = 180) -> list[str]:
    """Run ``python -c code`` as ``n`` ranks of one SLURM-style step (gloo on CPU, no GPU), the way
    ``dft.distributed.detect`` sees ``srun``'s tasks; assert each exits 0; return their stdouts by rank."""
    procs = []
    for rank in range(n):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS=str(n),
                   SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1", SLURM_JOB_ID=job_id,
                   CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return [out for out, _ in outs]

def compose(overrides: list[str] | None = None):
    """Compose ``conf/train.yaml`` with Hydra's compose API (no run); the resolvers of dft.train apply."""
    import dft.train  # noqa: F401  registers the schema and resolvers
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides or []))



#: grid=paper_demo on the tiny model: one step per stage, 2 items per benchmark
PAPER_DEMO = ["grid=paper_demo", "model=tiny", "data=tiny", "logger=none", "eval.max_items=2", "eval.ppl_max_tokens=200",
              "eval.max_new_tokens=2"] + [f"strategy.{s}.trainer.max_steps=1" for s in ("cpt", "sft", "dpo", "orpo")]


@pytest.fixture(scope="session")
def paper_demo_local(tmp_path_factory, tiny_model) -> Path:
    """The runs folder of ``-m PAPER_DEMO`` with launcher=local, trained once per session.

    One torch thread (``OMP_NUM_THREADS=1``, what the local SLURM gives a task), so that
    tests/test_slurm.py can compare the numbers of the same grid run through SLURM. Read-only:
    a test that writes into it (a dry run's plans, a report) works on a copy.
    """
    runs = tmp_path_factory.mktemp("paper_demo_local")
    run_train(["-m", *PAPER_DEMO], runs, env={"OMP_NUM_THREADS": "1"}, timeout=1200)
    return runs
