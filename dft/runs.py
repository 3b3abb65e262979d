"""Run directories, metadata, and the stage cache shared by all cells.

A stage's artefact is identified by a hash of its *lineage*: the starting model, every earlier
stage's resolved config and data, its own config and data (DESIGN.md §5). Cells whose chains
share a prefix (CPT->SFT is shared by the DPO and ORPO chains) find it in the cache instead of
retraining. Entries are written atomically: the model goes to ``final/``, and ``manifest.json``
(lineage, metrics, the size of every file) is written last, so an entry without a manifest, or
whose files do not match it (a crash, a truncated copy), is not complete and is retrained.
A file lock per entry makes concurrent cells wait for one training instead of doing two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from dft.locks import file_lock


def canonical_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """sha256 (first ``n`` hex digits) of a file's bytes: data identity in lineages."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Any]:
    """Parsed JSON, or None when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _tree_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


class StageCache:
    """Content-addressed store of trained stages, merges and evaluations under ``root``.

    Layout: ``<root>/<key>/final/`` (HF model folder), ``<root>/<key>/manifest.json``,
    ``<root>/<key>/work/`` (trainer checkpoints while training), ``<root>/<key>.lock``.
    ``stats`` counts ``trained`` and ``reused`` entries in this process (tests and benches).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.stats = {"trained": 0, "reused": 0}

    def entry(self, key: str) -> Path:
        return self.root / key

    def manifest(self, key: str) -> Optional[dict]:
        return read_json(self.entry(key) / "manifest.json")

    def is_complete(self, key: str) -> bool:
        """True when the manifest exists and every file it lists has the recorded size."""
        man = self.manifest(key)
        if not man or "files" not in man:
            return False
        final = self.entry(key) / "final"
        for rel, size in man["files"].items():
            p = final / rel
            if not p.is_file() or p.stat().st_size != size:
                return False
        return True

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with file_lock(self.root / f"{key}.lock"):
            yield

    def prepare(self, key: str) -> Path:
        """Clear a stale (incomplete) ``final/`` and any ``final.tmp-<pid>`` left by a killed writer
        (the caller holds the entry's lock, so no live process writes one) and return the entry
        folder, keeping ``work/`` (the trainer's checkpoints)."""
        e = self.entry(key)
        shutil.rmtree(e / "final", ignore_errors=True)
        for tmp in e.glob("final.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        (e / "manifest.json").unlink(missing_ok=True)
        e.mkdir(parents=True, exist_ok=True)
        return e

    def attempt(self, key: str) -> int:
        """Count one more attempt at building entry ``key`` (``attempts.json``); return the count."""
        path = self.entry(key) / "attempts.json"
        n = int((read_json(path) or {}).get("attempts", 0)) + 1
        write_json(path, {"attempts": n})
        return n

    def commit(self, key: str, manifest: dict) -> None:
        """Record a finished entry: file sizes of ``final/`` + ``manifest`` written last, atomically."""
        e = self.entry(key)
        manifest = dict(manifest, key=key, files=_tree_sizes(e / "final"), finished_at=time.time())
        from dft.faults import fault_point

        fault_point("commit")
        write_json(e / "manifest.json", manifest)
        shutil.rmtree(e / "work", ignore_errors=True)


_TMP = re.compile(r"^(?P<stem>.+)\.tmp-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (``kill(pid, 0)``; EPERM counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(path: Path):
    """An open file holding a non-blocking exclusive ``flock`` on ``path``, or None if held."""
    import fcntl

    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def remove_stale_tmp(cache_root: str | os.PathLike, run_dir: Optional[str | os.PathLike] = None,
                     min_age_s: float = 60.0) -> list[Path]:
    """Remove temporary ``*.tmp-<pid>`` folders and files that killed processes left; return them.

    A folder in the stage cache (``<key>/final.tmp-<pid>``, ``_eval/<key>.tmp-<pid>``) is written
    only by the holder of its entry's lock, so it is removed when that lock can be taken now (no
    live writer, on any host sharing the file system). Other temporaries (atomic JSON writes,
    under ``run_dir`` and the cache) are removed when their pid is not alive on this host and they
    are older than ``min_age_s`` seconds; a live process's are never touched.
    """
    root = Path(cache_root)
    removed: list[Path] = []
    candidates: list[tuple[Path, Optional[Path]]] = []
    if root.is_dir():
        for p in root.glob("*/final.tmp-*"):
            candidates.append((p, root / f"{p.parent.name}.lock"))
        for p in (root / "_eval").glob("*.tmp-*"):
            m = _TMP.match(p.name)
            if m:
                candidates.append((p, root / f"_eval-{m['stem']}.lock"))
        for p in root.glob("*/.*.tmp-*"):
            candidates.append((p, None))
    if run_dir is not None and Path(run_dir).is_dir():
        for p in Path(run_dir).rglob(".*.tmp-*"):
            candidates.append((p, None))
    now = time.time()
    for p, lock in candidates:
        m = _TMP.match(p.name)
        if not m or not (p.exists() or p.is_symlink()):
            continue
        if lock is not None:
            fh = _try_lock(lock)
            if fh is None:
                continue  # a live writer holds the entry
            try:
                if p.exists():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
            finally:
                fh.close()
        else:
            try:
                age = now - p.lstat().st_mtime
            except OSError:
                continue
            if pid_alive(int(m["pid"])) or age < min_age_s:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def link(target: Path, link_path: Path) -> None:
    """Point ``link_path`` at ``target`` (relative symlink), replacing an old link."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        if link_path.is_dir() and not link_path.is_symlink():
            shutil.rmtree(link_path)
        else:
            link_path.unlink()
    link_path.symlink_to(os.path.relpath(target, link_path.parent))


def git_sha(root: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def package_versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ["torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "hydra-core",
              "omegaconf", "wandb", "submitit", "hydra-submitit-launcher", "mergekit", "gguf"]:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def meta(root: Path, extra: dict) -> dict:
    """Provenance of a cell: git sha, package versions, host, Python, SLURM ids, and ``extra``."""
    slurm = {k: v for k, v in os.environ.items() if k in (
        "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION",
        "SLURM_NODELIST", "SLURM_NTASKS")}
    return {
        "git_sha": git_sha(root),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "slurm": slurm,
        "started_at": time.time(),
        **extra,
    }


@contextlib.contextmanager
def cell_lock(run_dir: Path, label: str, *, wait: bool = True, poll_s: float = 5.0) -> Iterator[None]:
    """Hold ``<run_dir>/.cell.lock`` (``flock``) while a cell runs: one cell, one runner.

    The holder writes its pid, host and start time into the lock file. A second process finding
    the lock held says who holds it and, with ``wait``, waits until it is free (then finds the
    cell finished and skips it, or resumes it if the holder died); without ``wait`` it raises.
    The lock is released when the holder exits, however it exits (kill -9 included).

    Raises:
        dft.DftError: ``wait=False`` and another process holds the cell (naming cell and holder).
    """
    from dft import DftError

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".cell.lock"
    fh = _try_lock(path)
    if fh is None:
        holder = read_json(path) or {}
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started_at', 0)))}")
        if not wait:
            raise DftError(f"cell {label} is already running ({who}); busy=wait waits for it")
        import logging

        logging.getLogger("dft").warning("cell %s is already running (%s); waiting for it to finish", label, who)
        while fh is None:
            time.sleep(poll_s)
            fh = _try_lock(path)
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}))
        fh.flush()
        yield
    finally:
        fh.close()
