"""Fault injection: ``DFT_FAULT=<point>[:<n>]`` kills the process with SIGKILL at a named point.

The points sit at every boundary where a crash or a preemption could leave half-written output
(tests/test_faults.py kills a tiny chain cell at each and checks the rerun's results are
bit-identical to an uninterrupted run's):

=================  ==========================================================================
``checkpoint``     right after the trainer wrote a ``checkpoint-<step>`` (dft.stages)
``final_save``     inside a stage's final save: ``final.tmp-<pid>`` written, not yet renamed
``commit``         before a stage's cache commit: ``final/`` in place, no ``manifest.json``
``merge_write``    inside a merge's write: mergekit wrote ``final.tmp-<pid>``, not yet renamed
``eval_write``     inside an evaluation's write: some result files in the temp folder
``summary``        before the cell's ``summary.json``
``step``           at the end of every optimizer step (to deliver a signal at a chosen step)
=================  ==========================================================================

``<point>:<n>`` kills at the n-th time the point is reached in this process (1-based; default 1),
e.g. ``DFT_FAULT=checkpoint:3`` at the third checkpoint of the cell. ``<point>:<n>:<SIGNAL>``
sends that signal instead of SIGKILL (``step:5:TERM`` is a preemption notice at the 5th step).
Unset, :func:`fault_point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

#: every point dft calls :func:`fault_point` with
POINTS = ("checkpoint", "final_save", "commit", "merge_write", "eval_write", "summary", "step")

_hits: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, int]:
    """``"name"``, ``"name:n"`` or ``"name:n:SIG"`` -> ``(name, n, signal number)``.

    Raises:
        ValueError: an unknown point or signal, or an ``n`` that is not a positive integer (one line).
    """
    name, _, rest = spec.partition(":")
    n, _, sig = rest.partition(":")
    if name not in POINTS:
        raise ValueError(f"DFT_FAULT={spec!r}: unknown point {name!r} (points: {', '.join(POINTS)})")
    try:
        count = int(n) if n else 1
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"DFT_FAULT={spec!r}: the count after ':' must be a positive integer")
    signum = getattr(signal, f"SIG{sig.upper().removeprefix('SIG')}", None) if sig else signal.SIGKILL
    if not isinstance(signum, int):
        raise ValueError(f"DFT_FAULT={spec!r}: unknown signal {sig!r} (e.g. KILL, TERM, USR2)")
    return name, count, int(signum)


def fault_point(name: str) -> None:
    """SIGKILL this process (or send the signal ``DFT_FAULT`` names) if ``DFT_FAULT`` names
    ``name`` and this is its n-th hit; else nothing."""
    spec = os.environ.get("DFT_FAULT")
    if not spec:
        return
    point, count, signum = parse(spec)
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == count:
        print(f"dft fault injection: {signal.Signals(signum).name} at {name} (hit {count})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signum)
