"""ControlNet (Zhang et al. 2023, arXiv 2302.05543) on a diffusers ``UNet2DConditionModel`` (diffusers'
``ControlNetModel``) or ``SD3Transformer2DModel`` (diffusers' ``SD3ControlNetModel``): ``config.py``, ``layer.py``
(the adapter, and its UNet side), ``sd3.py`` (its SD3 side: ``from_transformer``, the residuals through
``block_controlnet_hidden_states``), ``side.py`` (what it shares with T2I-Adapter: hosting, the conditioning
argument, the model hook), ``files.py`` (diffusers' folder, both backbones)."""

from .config import ControlNetConfig
from .files import load_controlnet, save_controlnet
from .layer import ControlNetAdapter
from .side import SideNetAdapter

__all__ = ["ControlNetAdapter", "ControlNetConfig", "SideNetAdapter", "load_controlnet", "save_controlnet"]
