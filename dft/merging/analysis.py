"""Merge analyses: model kinship (arXiv 2410.12613) and merge synergy (arXiv 2409.03444)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterator, Tuple

#: Elements per chunk when streaming a tensor (bounds the float64 scratch to a few tens of MB).
_CHUNK = 1 << 22


def _safetensors_index(path: str) -> Dict[str, str]:
    """Map every tensor name of a local HF model dir to the safetensors file that holds it."""
    from safetensors import safe_open

    from dft import DftError

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(root / fname) for name, fname in weight_map.items()}
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        raise DftError(f"kinship needs a local model dir with safetensors weights; {path} has none")
    out: Dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = str(f)
    return out


class _Moments:
    """Streaming first and second moments of two paired sequences x, y (float64).

    Means and centred co-moments are combined chunk by chunk with Chan et al.'s parallel update
    ("Updating formulae and a pairwise algorithm for computing sample variances", 1979), which
    stays accurate where the naive ``sum(x*y) - sum(x)*sum(y)/n`` would cancel.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mx = self.my = 0.0
        self.cxx = self.cyy = self.cxy = 0.0  # centred sums of squares / products
        self.dot = self.xx = self.yy = 0.0  # raw sums for the cosine
        self.sq_diff = 0.0  # sum (x - y)^2 for the Euclidean distance

    def update(self, x, y) -> None:  # x, y: 1-D float64 torch tensors of equal length
        n2 = x.numel()
        if n2 == 0:
            return
        mx2, my2 = float(x.mean()), float(y.mean())
        xc, yc = x - mx2, y - my2
        cxx2, cyy2, cxy2 = float(xc @ xc), float(yc @ yc), float(xc @ yc)
        n1, n = self.n, self.n + n2
        dx, dy = mx2 - self.mx, my2 - self.my
        self.cxx += cxx2 + dx * dx * n1 * n2 / n
        self.cyy += cyy2 + dy * dy * n1 * n2 / n
        self.cxy += cxy2 + dx * dy * n1 * n2 / n
        self.mx += dx * n2 / n
        self.my += dy * n2 / n
        self.n = n
        self.dot += float(x @ y)
        self.xx += float(x @ x)
        self.yy += float(y @ y)
        d = x - y
        self.sq_diff += float(d @ d)


def _paired_deltas(base_path: str, a_path: str, b_path: str) -> Iterator[Tuple[object, object]]:
    """Yield float64 chunks of (a - base, b - base), one tensor at a time."""
    from safetensors import safe_open

    from dft import DftError

    idx = {p: _safetensors_index(p) for p in (base_path, a_path, b_path)}
    names = set(idx[base_path])
    for p in (a_path, b_path):
        if set(idx[p]) != names:
            diff = sorted(names.symmetric_difference(idx[p]))
            raise DftError(
                f"kinship: {p} and {base_path} hold different tensors "
                f"({len(diff)} differ, e.g. {', '.join(diff[:3])})"
            )
    handles: Dict[str, object] = {}
    try:
        for name in sorted(names):
            ts = []
            for p in (base_path, a_path, b_path):
                f = idx[p][name]
                if f not in handles:
                    handles[f] = safe_open(f, framework="pt").__enter__()
                ts.append(handles[f].get_tensor(name))
            base, a, b = ts
            if not (base.shape == a.shape == b.shape):
                raise DftError(
                    f"kinship: tensor {name} has shapes {tuple(base.shape)} (base), {tuple(a.shape)}, "
                    f"{tuple(b.shape)}"
                )
            base, a, b = (t.reshape(-1) for t in ts)
            for s in range(0, base.numel(), _CHUNK):
                bc = base[s : s + _CHUNK].double()
                yield a[s : s + _CHUNK].double() - bc, b[s : s + _CHUNK].double() - bc
            del ts, base, a, b
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def kinship(base_path: str, a_path: str, b_path: str) -> Dict[str, float]:
    """Model kinship of two models fine-tuned from ``base_path`` (Hu et al., arXiv 2410.12613).

    Kinship compares the *delta parameters* ``da = a - base`` and ``db = b - base``, each
    flattened over every tensor of the model into one vector:

    * ``pearson``: Pearson correlation of ``da`` and ``db``;
    * ``cosine``: ``<da, db> / (|da| |db|)``;
    * ``euclidean``: ``|da - db|`` (``= |a - b|``: the base cancels).

    Streams tensor by tensor (in chunks) from local safetensors files, so at most one tensor of
    each model is in memory. A correlation or cosine that is undefined (a zero delta, e.g. when
    ``a`` is ``base`` itself) is ``nan``.
    """
    m = _Moments()
    for x, y in _paired_deltas(str(base_path), str(a_path), str(b_path)):
        m.update(x, y)
    denom_p = math.sqrt(m.cxx * m.cyy)
    denom_c = math.sqrt(m.xx * m.yy)
    return {
        "pearson": m.cxy / denom_p if denom_p > 0 else float("nan"),
        "cosine": m.dot / denom_c if denom_c > 0 else float("nan"),
        "euclidean": math.sqrt(m.sq_diff),
    }


def synergy(p1: float, p2: float, merged: float) -> Dict[str, float]:
    """Synergy of a merge from the scores of its two parents and of the merged model.

    Following arXiv 2409.03444: a merge is *synergistic* when it beats what averaging the parents
    would predict, and *emergent* when it beats the better parent:

    * ``expected = (p1 + p2) / 2``
    * ``deviation = merged - expected``
    * ``improvement = merged - max(p1, p2)``
    * ``diversity = |p1 - p2|``
    """
    p1, p2, merged = float(p1), float(p2), float(merged)
    expected = (p1 + p2) / 2
    return {
        "p1": p1,
        "p2": p2,
        "expected": expected,
        "merged_score": merged,
        "deviation": merged - expected,
        "improvement": merged - max(p1, p2),
        "diversity": abs(p1 - p2),
    }
