"""dft: domain fine-tuning experiment grid (CPT, SFT, DPO, ORPO, merging, evaluation).

Reproduces and generalises Lu, Luu & Buehler, "Fine-tuning large language models for domain
adaptation" (arXiv 2409.03444). ``python -m dft.train`` is the entry point.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the folder that holds ``conf/``, ``data/`` and ``dft/``).
ROOT = Path(__file__).resolve().parent.parent


class DftError(Exception):
    """A user-facing error: its message is printed as one line, without a traceback."""
