"""Dashboards for a sweep: a ready-made W&B workspace (:mod:`dft.dashboards.workspace`) and a local
trackio run per cell (:mod:`dft.dashboards.trackio_logger`). Both read the uniform keys of
:mod:`dft.keys` (``start/``, ``trained/``, ``merged/``, ``final/``, ``delta/``) and the flat run
config (``cell.model``, ``cell.strategy``, ...)."""
