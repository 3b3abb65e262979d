"""The Hydra launcher ``dft_graph``: a sweep as one graph of SLURM jobs (see :mod:`dft.graph_launch`).

Built on hydra-submitit-launcher's SLURM launcher (same ``hydra.launcher.*`` keys, same submitit
folder and logs); only ``launch`` differs: instead of one job array of cells, one job per
distinct node that is not done, each with ``--dependency=afterok:<parents>``. A cell's last
node (its summary) is the cell itself, run by the base class's ``__call__`` as a Hydra job.
"""

from dataclasses import dataclass
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher


@dataclass
class DftGraphLauncherConf(SlurmQueueConf):
    """``hydra.launcher`` of ``launcher=slurm``: the submitit SLURM keys (per-kind resources are
    dft's ``launcher.stage|merge|eval|summary``)."""

    _target_: str = "hydra_plugins.dft_graph_launcher.graph_launcher.DftGraphLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="dft_graph", node=DftGraphLauncherConf(), provider="dft")


class DftGraphLauncher(BaseSubmititLauncher):
    """Submits the sweep's graph (:func:`dft.graph_launch.launch_graph`)."""

    _EXECUTOR = "slurm"

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from dft.graph_launch import launch_graph

        return launch_graph(self, job_overrides, initial_job_idx)
