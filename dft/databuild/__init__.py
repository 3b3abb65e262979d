"""Bring your own domain: a folder of papers -> CPT text, SFT Q&A and DPO/ORPO preference data.

    python -m dft.data build source=<folder> name=<domain> [generator=local|openai] [key=value ...]

The recipe follows arXiv 2409.03444 (Q&A pairs and deliberately wrong answers distilled from papers by an
LLM), with provenance on every row, a call cache that makes builds resumable, counted rejects and an
evaluation-contamination guard. Config: ``conf/databuild/build.yaml`` (schema :mod:`dft.databuild.config`);
pipeline: :mod:`dft.databuild.pipeline`.
"""

from dft.databuild.pipeline import build, format_report

__all__ = ["build", "format_report"]
