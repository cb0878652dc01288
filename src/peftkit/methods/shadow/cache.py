"""``ShadowCache``: the base model's KV cache and the shadow backbone's, threaded through ``generate`` as one.

Cached decoding must advance both paths: the base model's keys / values (computed under the shadow
injection) and the backbone's, so ``s^(0)`` of a new token sees the earlier ones. The model's forward hook
(``hook.py``) hands the base model its own half and packs both into a ``ShadowCache`` on the way out; layout
operations (reset, reorder, crop, repeat, select) act on both halves, everything else reads the base half.
Not compileable (the halves may differ in layout and width); no legacy tuple form (one tuple cannot hold both).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import Cache


class ShadowCache(Cache):
    """A base cache and a shadow-backbone cache (either may be None), as peft's class of the same name."""

    def __init__(self, base: Any = None, shadow: Any = None) -> None:  # no Cache.__init__: the halves own storage
        self.base = base
        self.shadow = shadow

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def _both(self, method: str, *args: Any) -> None:
        for cache in (self.base, self.shadow):
            fn = getattr(cache, method, None) if cache is not None else None
            if fn is not None:
                fn(*args)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.base is None:
            raise RuntimeError("ShadowCache.update: no base cache")
        return self.base.update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.base is None else self.base.get_seq_length(layer_idx)

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.get_mask_sizes(*args, **kwargs)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1 if self.base is None else self.base.get_max_cache_shape(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        caches = [c for c in (self.base, self.shadow) if c is not None]
        return bool(caches) and all(getattr(c, "is_initialized", True) for c in caches)

    @property
    def is_sliding(self) -> list[bool]:
        return [] if self.base is None else self.base.is_sliding

    @property
    def max_batch_size(self) -> int:
        return 0 if self.base is None else self.base.max_batch_size

    @property
    def max_cache_len(self) -> int:
        return 0 if self.base is None else self.base.max_cache_len

    def reset(self) -> None:
        self._both("reset")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._both("reorder_cache", beam_idx)

    def crop(self, max_length: int) -> None:
        self._both("crop", max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._both("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._both("batch_select_indices", indices)

    def to_legacy_cache(self) -> Any:
        raise NotImplementedError("ShadowCache cannot be represented by a single legacy cache tuple")

    @classmethod
    def from_legacy_cache(cls, past_key_values: Any = None) -> "ShadowCache":
        raise NotImplementedError("ShadowCache requires separate base and shadow Cache instances")

    def __getitem__(self, layer_idx: int) -> Any:
        return self.base[layer_idx]

    def __iter__(self) -> Any:
        return iter(self.base)

    def __len__(self) -> int:
        return 0 if self.base is None else len(self.base)

    def __repr__(self) -> str:
        return f"ShadowCache(base={self.base!r}, shadow={self.shadow!r})"
