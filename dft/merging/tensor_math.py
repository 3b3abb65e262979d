"""Small pure-torch reference implementations of the merge formulas.

mergekit does the real merging (:func:`dft.merging.merge_models`); these functions exist so that
tests can check mergekit's output against a formula written down independently, and so that
analyses can reason about a schedule without importing mergekit.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

#: mergekit's SLERP switches to linear interpolation when |cos(angle)| exceeds this.
DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Linear interpolation ``(1 - t) * v0 + t * v1`` (``t=0`` gives ``v0``, ``t=1`` gives ``v1``).

    Computed in float32 (float64 if the inputs are float64) and returned in ``v0``'s dtype.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    out = (1 - t) * v0.to(dtype) + t * v1.to(dtype)
    return out.to(v0.dtype)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8, dot_threshold: float = DOT_THRESHOLD
) -> torch.Tensor:
    """Spherical linear interpolation of two whole tensors, treated as flat vectors.

    Formula (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985)::

        theta = arccos(<v0/|v0|, v1/|v1|>)
        slerp(t; v0, v1) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

    The angle comes from the normalised vectors, but the coefficients multiply the original
    (unnormalised) tensors, as mergekit does. Also as in mergekit: a norm below ``eps`` is taken
    as 1, and when ``|cos theta| > dot_threshold`` (nearly parallel or antiparallel, where
    ``sin theta`` is about 0) it falls back to :func:`lerp`. ``t=0`` returns ``v0`` and ``t=1``
    returns ``v1``. Computed in float32 (float64 for float64 inputs), returned in ``v0``'s dtype.
    """
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return lerp(t, v0, v1)
    theta = math.acos(dot)
    s = math.sin(theta)
    c0 = math.sin((1 - t) * theta) / s
    c1 = math.sin(t * theta) / s
    return (c0 * a + c1 * b).reshape(v0.shape).to(v0.dtype)


def layer_t(schedule: Union[float, Sequence[float]], layer_idx: int, num_layers: int) -> float:
    """The interpolation factor mergekit uses for layer ``layer_idx`` of ``num_layers``.

    mergekit treats a list of values as anchor points spread evenly over the depth: layer ``i``
    sits at ``x = i / (num_layers - 1)`` (``x = 1`` when there is a single layer), the list at
    ``x * (len(schedule) - 1)``, and the value is linearly interpolated between its two
    neighbouring anchors. So ``[0, 1]`` rises linearly from the first to the last layer, and a
    five-value list on a five-layer model gives each layer its own value. A scalar is constant.

    Tensors outside the decoder layers (embeddings, final norm, ``lm_head``) are evaluated at
    ``x = 0`` by mergekit, i.e. they get ``schedule[0]``.
    """
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx={layer_idx} is outside 0..{num_layers - 1}")
    if isinstance(schedule, (int, float)):
        return float(schedule)
    values = [float(v) for v in schedule]
    if not values:
        raise ValueError("empty schedule")
    x = layer_idx / (num_layers - 1) if num_layers > 1 else 1
    # Same operations in the same order as mergekit.config.evaluate_setting (bit-identical).
    scaled = x * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]
