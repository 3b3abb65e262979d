"""``python -m dft.train [group=option ...]``: train, merge and evaluate one cell (or a grid with -m).

Hydra composes ``conf/train.yaml`` against the typed schema of :mod:`dft.config`; the run
directory is ``<paths.runs>/<experiment>/<override_dirname>`` so the same overrides always give
the same directory (and a rerun resumes or skips finished work). Errors in the input give one
line naming the key, file or row, and exit status 2.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dft import ROOT, DftError
from dft.config import register_configs

log = logging.getLogger("dft")


def cell_name(override_dirname: str) -> str:
    """Directory name of a cell: Hydra's ``override_dirname`` made path-safe (``default`` if empty).

    Slashes become ``_``; names over 200 characters (file systems allow 255 bytes) keep a readable
    180-character prefix and a hash of the whole.
    """
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", override_dirname) or "default"
    if len(name) > 200:
        name = name[:180] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs (``dft.cell``, ``dft.root`` and the launcher's)."""
    if not OmegaConf.has_resolver("dft.cell"):
        OmegaConf.register_new_resolver("dft.cell", cell_name)
    if not OmegaConf.has_resolver("dft.root"):
        OmegaConf.register_new_resolver("dft.root", lambda: str(ROOT))
    try:
        from dft.launching import register_resolvers as launcher_resolvers
    except ImportError:
        return
    launcher_resolvers()


register_configs()
register_resolvers()
# bitsandbytes warns on every import on CPU that an optional kernel package is missing
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    """Hydra task function: one cell. Returns the cell's objective (for sweepers)."""
    from dft.pipeline import run_cell

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return run_cell(cfg, run_dir, run_dir.name)
    except DftError as e:
        log.debug("%s", e)  # printed once, as the one line below
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
