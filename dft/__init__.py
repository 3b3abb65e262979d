"""dft: domain fine-tuning experiment grid (CPT, SFT, DPO, ORPO, merging, evaluation).

Reproduces and generalises Lu, Luu & Buehler, "Fine-tuning large language models for domain
adaptation" (arXiv 2409.03444). ``python -m dft.train`` is the entry point.
"""

import logging as _logging
from pathlib import Path

# bitsandbytes looks, at import, for an optional CPU 4-bit kernel (the `kernels` package, fetched
# from the Hugging Face Hub) and logs "Failed to load CPU gemm_4bit_forward from kernels-community"
# when it cannot have it; `kernels` then warns about its publisher check offline. dft needs neither
# (qlora on CPU runs without that kernel), so both are quiet below ERROR in every dft process.
for _name in ("bitsandbytes", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

__version__ = "0.1.0"

#: Repository root (the folder that holds ``conf/``, ``data/`` and ``dft/``).
ROOT = Path(__file__).resolve().parent.parent


class DftError(Exception):
    """A user-facing error: its message is printed as one line, without a traceback."""
