"""Model merging: mergekit backend, pure-torch reference formulas, kinship and synergy.

* :func:`merge_models` merges a fine-tuned model with its partner (the instruct model) through
  mergekit's Python API; the partner is mergekit's ``base_model`` (SLERP ``t=0`` = partner).
* :func:`slerp`, :func:`lerp`, :func:`layer_t`: the formulas mergekit applies, written out
  independently so tests can check mergekit's output tensor by tensor.
* :func:`kinship` (arXiv 2410.12613) and :func:`synergy` (arXiv 2409.03444): analyses of a merge.

Importing this package does not import mergekit (slow); :func:`merge_models` does.
"""

from dft.merging.analysis import kinship, synergy
from dft.merging.backend import (
    MERGEKIT_YAML,
    build_merge_config,
    check_compatible,
    merge_models,
    read_merge_yaml,
)
from dft.merging.tensor_math import DOT_THRESHOLD, layer_t, lerp, slerp

__all__ = [
    "DOT_THRESHOLD",
    "MERGEKIT_YAML",
    "build_merge_config",
    "check_compatible",
    "kinship",
    "layer_t",
    "lerp",
    "merge_models",
    "read_merge_yaml",
    "slerp",
    "synergy",
]
