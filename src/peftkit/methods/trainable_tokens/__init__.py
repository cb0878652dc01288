"""Trainable tokens (Hugging Face PEFT's ``TRAINABLE_TOKENS``): chosen rows of the embedding train, the rest stay.

``config.py``: ``TrainableTokensConfig`` and the index checks LoRA's ``trainable_token_indices`` shares;
``layer.py``: the adapter (forward, merge, file keys) and the choice of layers (the input embedding, the
layers tied to it).
"""

from .config import TrainableTokensConfig, check_token_indices
from .layer import TrainableTokensAdapter

__all__ = ["TrainableTokensAdapter", "TrainableTokensConfig", "check_token_indices"]
