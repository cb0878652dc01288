"""MAD-X invertible adapters (Pfeiffer et al. 2020, arXiv 2005.00052): a Pfeiffer bottleneck adapter plus a NICE
coupling block on the input embeddings and its inverse before the output embeddings.

Importing the package registers the method.
"""

from .config import PfeifferInvConfig
from .functional import nice_forward, nice_inverse
from .layer import PfeifferInvAdapter

__all__ = ["PfeifferInvAdapter", "PfeifferInvConfig", "nice_forward", "nice_inverse"]
