"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453): ``config.py``, ``layer.py`` (the adapter; the hosting, the
conditioning argument and the UNet hook are ControlNet's, ``controlnet/side.py``), ``files.py`` (diffusers' folder)."""

from .config import T2IAdapterConfig
from .files import load_t2i_adapter, save_t2i_adapter
from .layer import T2IAdapterAdapter

__all__ = ["T2IAdapterAdapter", "T2IAdapterConfig", "load_t2i_adapter", "save_t2i_adapter"]
