"""``python -m dft.sync runs/<experiment> [--dry-run]``: upload a sweep's offline W&B runs safely.

``wandb sync runs/<exp>/*/wandb/offline-run-*`` uploads cells that are still running, uploads a
requeued cell's attempts (one offline folder per attempt, one run id) as it finds them, and
takes no project or entity. This command, per cell of the sweep:

* skips a cell that is not finished (no ``summary.json`` with ``status: finished``) or that a
  process is running now (its ``.cell.lock`` is held), saying so;
* uploads its offline folders with one ``wandb sync --id <run id> --project <p> [--entity <e>]``
  (project and entity from the cell's ``config.yaml``), attempts in order of start, so a requeued
  cell's attempts continue one run (``--id``: wandb syncs several files of one id in order);
* writes ``wandb/.dft-synced.json`` (the folders uploaded) after a successful upload, so a rerun
  uploads nothing new; a folder added later (``force=true`` rerun) is uploaded on the next call;
* prints what it uploaded and every cell it skipped, with the reason.

``--dry-run`` passes ``--dry-run`` to ``wandb sync`` (the real client lists what it would upload;
nothing is sent, no marker is written). Exit status: 0, or 1 when an upload failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MARKER = ".dft-synced.json"


@dataclass
class CellSync:
    """What :func:`plan` decided for one cell folder."""

    cell: Path
    run_id: Optional[str] = None
    project: Optional[str] = None
    entity: Optional[str] = None
    folders: list[Path] = field(default_factory=list)  #: offline folders to upload, oldest first
    skipped: Optional[str] = None  #: why nothing is uploaded (None: upload ``folders``)

    def command(self, dry_run: bool = False) -> list[str]:
        """The ``wandb sync`` command line that uploads :attr:`folders` into run :attr:`run_id`."""
        cmd = [sys.executable, "-m", "wandb", "sync", "--id", str(self.run_id), "--project", str(self.project)]
        if self.entity:
            cmd += ["--entity", self.entity]
        if dry_run:
            cmd.append("--dry-run")
        return cmd + [str(f) for f in self.folders]


def _offline_folders(cell: Path) -> list[Path]:
    # offline-run-<YYYYMMDD_HHMMSS>-<id>: the name sorts by start time
    return sorted((cell / "wandb").glob("offline-run-*"), key=lambda p: p.name)


def _running(cell: Path) -> Optional[str]:
    from dft.runs import _try_lock, read_json

    lock = cell / ".cell.lock"
    if not lock.exists():
        return None
    fh = _try_lock(lock)
    if fh is not None:
        fh.close()
        return None
    h = read_json(lock) or {}
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}"


def plan(sweep: Path) -> list[CellSync]:
    """One :class:`CellSync` per cell folder of ``sweep`` (folders starting with ``.`` or ``_`` are
    not cells), sorted by name."""
    from omegaconf import OmegaConf

    from dft.runs import read_json

    out = []
    # a cell folder holds Hydra's .hydra/, its config.yaml or a summary.json; others (dft.report's report/) are not cells
    for cell in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0] not in "._"
                       and ((p / ".hydra").is_dir() or any((p / f).exists() for f in ("summary.json", "config.yaml")))):
        c = CellSync(cell=cell)
        out.append(c)
        folders = _offline_folders(cell)
        summary = read_json(cell / "summary.json") or {}
        holder = _running(cell)
        if holder:
            c.skipped = f"running now ({holder})"
        elif summary.get("status") != "finished":
            c.skipped = "not finished (no finished summary.json)"
        elif not folders:
            c.skipped = "no offline W&B run (logged online, or logger disabled)"
        if c.skipped:
            continue
        done = set((read_json(cell / "wandb" / MARKER) or {}).get("folders", []))
        c.folders = [f for f in folders if f.name not in done]
        if not c.folders:
            c.skipped = f"already uploaded ({len(done)} offline run(s), wandb/{MARKER})"
            continue
        cfg = OmegaConf.load(cell / "config.yaml") if (cell / "config.yaml").exists() else None
        c.project = OmegaConf.select(cfg, "logger.project", default=None) if cfg is not None else None
        c.entity = OmegaConf.select(cfg, "logger.entity", default=None) if cfg is not None else None
        if not c.project:
            c.skipped, c.folders = "config.yaml has no logger.project", []
            continue
        # every attempt of a cell logs under one id (dft.tracking.run_id); should they differ, the
        # first attempt's id wins and ``--id`` puts the later ones into it
        c.run_id = folders[0].name.rsplit("-", 1)[1]
    return out


def sync(sweep: Path, *, dry_run: bool = False,
         runner: Callable[[list[str]], subprocess.CompletedProcess] | None = None) -> int:
    """Plan and upload ``sweep`` (see the module docstring); print the outcome; return the exit status.

    ``runner`` runs one command (default: ``subprocess.run``, output shown); tests pass their own.
    """
    from dft.runs import write_json

    if not sweep.is_dir():
        print(f"error: {sweep} is not a sweep folder (runs/<experiment>)", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # dft's runs set offline; sync uploads
    run = runner or (lambda cmd: subprocess.run(cmd, text=True, capture_output=True, env=env))
    failed = 0
    cells = plan(sweep)
    uploaded = []
    for c in cells:
        if c.skipped:
            continue
        p = run(c.command(dry_run))
        if getattr(p, "stdout", None):
            sys.stdout.write(p.stdout)
        if getattr(p, "stderr", None):
            sys.stdout.write(p.stderr)
        if p.returncode != 0:
            failed += 1
            c.skipped = f"wandb sync failed (exit {p.returncode})"
            continue
        uploaded.append(c)
        if not dry_run:
            from dft.runs import read_json

            marker = c.cell / "wandb" / MARKER
            prev = (read_json(marker) or {}).get("folders", [])
            write_json(marker, {"run_id": c.run_id, "project": c.project, "entity": c.entity,
                                "folders": prev + [f.name for f in c.folders]})
    verb = "would upload" if dry_run else "uploaded"
    for c in uploaded:
        where = f"{c.entity}/{c.project}" if c.entity else c.project
        print(f"{verb}: {c.cell.name} -> {where} run {c.run_id} ({len(c.folders)} offline run(s))")
    for c in cells:
        if c.skipped:
            print(f"skipped: {c.cell.name}: {c.skipped}")
    print(f"{len(uploaded)} cell(s) {verb}, {sum(1 for c in cells if c.skipped)} skipped")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dft.sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, help="a sweep folder: runs/<experiment>")
    ap.add_argument("--dry-run", action="store_true", help="ask wandb what it would upload; send nothing")
    ns = ap.parse_args(argv)
    return sync(ns.sweep, dry_run=ns.dry_run)


if __name__ == "__main__":
    sys.exit(main())
