"""Read a ``conf/model/<option>.yaml`` outside Hydra, typed by :class:`dft.config.ModelConfig`."""

from __future__ import annotations

from typing import Any, Optional

from dft import ROOT


def load_model_option(name: str) -> Optional[Any]:
    """The model config option ``name`` (``conf/model/<name>.yaml``) or None when there is no such option.

    The option is merged onto the schema, so its pad/end tokens, chat template and weights location are
    the same ones ``dft.train`` uses. Interpolations that need the training config (``${paths...}``) are
    not resolvable here; model options do not use them.
    """
    if "/" in name or "\\" in name:
        return None
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    from dft.config import ModelConfig

    node = OmegaConf.load(path)
    if "defaults" in node:
        node.pop("defaults")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
