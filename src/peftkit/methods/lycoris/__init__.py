"""The LyCORIS family: LoHa (Hadamard product of low-rank factors) and LoKr (Kronecker product)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers every method in the package

from .config import LoHaConfig, LoKrConfig  # noqa: E402
from .layer import LoHaAdapter, LoKrAdapter  # noqa: E402

__all__ = ["LoHaConfig", "LoKrConfig", "LoHaAdapter", "LoKrAdapter"]
