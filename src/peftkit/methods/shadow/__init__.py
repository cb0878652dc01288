"""ShadowPEFT (peft's ``ShadowConfig``, PEFT type SHADOW): see ``layer.py``."""

from .cache import ShadowCache
from .config import ShadowConfig
from .detached import DetachedShadowModel, unload_shadow
from .layer import ShadowAdapter
from .wrapper import ShadowLayer

__all__ = ["DetachedShadowModel", "ShadowAdapter", "ShadowCache", "ShadowConfig", "ShadowLayer", "unload_shadow"]
