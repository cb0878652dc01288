"""Ladder side-tuning (LST): see ``layer.py``."""

from .config import LSTConfig
from .layer import LSTAdapter
from .wrapper import LSTLayer

__all__ = ["LSTAdapter", "LSTConfig", "LSTLayer"]
