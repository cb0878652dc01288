"""ControlNet (Zhang et al. 2023, arXiv 2302.05543): ``config.py``, ``layer.py`` (the adapter), ``side.py`` (what it
shares with T2I-Adapter: hosting, the conditioning argument, the UNet hook), ``files.py`` (diffusers' folder)."""

from .config import ControlNetConfig
from .files import load_controlnet, save_controlnet
from .layer import ControlNetAdapter
from .side import SideNetAdapter

__all__ = ["ControlNetAdapter", "ControlNetConfig", "SideNetAdapter", "load_controlnet", "save_controlnet"]
