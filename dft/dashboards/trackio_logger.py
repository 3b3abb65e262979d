"""A trackio run per cell: the same keys, config and tables as the cell's W&B run, kept locally.

trackio (PyPI ``trackio``) is local-first: runs go into a SQLite database under ``TRACKIO_DIR``
(``logger.trackio.dir``, default ``<paths.runs>/trackio`` in conf/logger/trackio.yaml) and
``trackio show`` serves a dashboard on 127.0.0.1. The run has the W&B run's project, group
(= experiment) and config (flat keys under ``cell``), and its name is the W&B run name plus the
run id, so a rerun of the same cell resumes it. trackio has no separate run summary: the
summary keys (``final/...``, ``eval/...``) are logged once as one row, which is what its runs
table shows as the latest value.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from dft import DftError

log = logging.getLogger(__name__)


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


class TrackioRun:
    """One trackio run (see the module docstring).

    Raises:
        DftError: trackio is not installed.
    """

    def __init__(self, trackio_cfg: Any, *, project: str, experiment: str, name: str, run_id: str, config: dict):
        d = trackio_cfg.get("dir") if hasattr(trackio_cfg, "get") else None
        if d:
            d = str(Path(d).resolve())
            if "trackio" in sys.modules and os.environ.get("TRACKIO_DIR") != d:
                log.warning("trackio was imported with TRACKIO_DIR=%s; logging there, not to %s",
                            os.environ.get("TRACKIO_DIR"), d)
            else:
                os.environ["TRACKIO_DIR"] = d  # read by trackio at import
        try:
            import trackio
        except ImportError:
            raise DftError("logger=trackio needs the trackio package: pip install 'dft[dashboards]'") from None
        self._trackio = trackio
        self.name = f"{name} [{run_id[:8]}]"
        self.run = trackio.init(project=project, name=self.name, group=experiment, config=config, resume="allow",
                                embed=False, auto_log_gpu=False, auto_log_cpu=False)
        self.dir = os.environ.get("TRACKIO_DIR")
        log.info("trackio run %s in project %s (%s)", self.name, project, self.dir or "trackio's default dir")

    def log(self, metrics: dict) -> None:
        """One history row (trackio numbers its steps itself)."""
        if metrics:
            self.run.log({k: _plain(v) for k, v in metrics.items()})

    def summary(self, metrics: dict) -> None:
        """The numeric summary keys as one row (trackio keeps no separate summary)."""
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if nums:
            self.run.log(nums)

    def table(self, key: str, rows: list[dict]) -> None:
        """``rows`` (dicts with the same keys) as a trackio table under ``key``."""
        if not rows:
            return
        import pandas as pd

        df = pd.DataFrame([{k: _plain(v) for k, v in r.items()} for r in rows])
        self.run.log({key: self._trackio.Table(dataframe=df)})

    def finish(self) -> None:
        self.run.finish()
