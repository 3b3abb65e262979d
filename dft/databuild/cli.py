"""Hydra entry of ``python -m dft.data build`` (dispatched from :mod:`dft.data.__main__`)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from dft import ROOT, DftError
from dft.databuild.config import register_configs

log = logging.getLogger("dft.databuild")

register_configs()


@hydra.main(config_path=str(ROOT / "conf" / "databuild"), config_name="build", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dft.databuild.pipeline import build, format_report

    try:
        report = build(cfg)
    except DftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_report(report))
