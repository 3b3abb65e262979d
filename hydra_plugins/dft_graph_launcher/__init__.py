"""dft's graph launcher for Hydra (``hydra/launcher=dft_graph``, selected by ``launcher=slurm``).

Shipped in the dft repository as part of the ``hydra_plugins`` namespace package, where Hydra's
plugin discovery looks (it imports every ``hydra_plugins.*`` module and registers the
``Launcher`` subclasses and config-store entries it finds). The work is in :mod:`dft.graph_launch`.
"""
