"""One exclusive file lock (``flock``), shared by the stage cache, the tokenizers and the embedded model.

Its own module so that :mod:`dft.runs`, :mod:`dft.families` and :mod:`dft.tokenizers_offline`
need not import :mod:`dft.modeling` for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("dft.locks")

#: what :func:`file_lock` logs when another process holds the lock (tests look for it in job logs)
WAIT_MESSAGE = "waiting for lock"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing); blocks until acquired.

    Used so that concurrent cells (several SLURM jobs on one file system) never convert or
    train the same artefact twice: the second waiter finds the finished result. When the lock
    is held by another process it logs ``waiting for lock <path>`` (INFO) before blocking, and
    the seconds it waited once it has the lock: on a cluster, a job waiting here holds its
    allocation idle (the graph launcher, :mod:`dft.graph`, never lets one wait).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.monotonic()
            log.info("%s %s", WAIT_MESSAGE, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("got lock %s after %.1f s", path, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
