"""``PeftModel.forward`` that reports the base model's signature to ``inspect``.

Tools that keep only the inputs a model's ``forward`` accepts (``transformers.Trainer`` dropping unused
data columns) would otherwise see ``forward(*args, **kwargs)`` and keep nothing.
"""

from __future__ import annotations

import inspect
from typing import Any


class BoundForward:
    """``model.forward`` of a PeftModel: calls through, and reports the base model's signature.

    ``inspect.signature(model.forward)`` then lists the base model's arguments (plus ``adapter_names``), so
    tools that keep only the inputs a model accepts, such as ``transformers.Trainer`` dropping unused data
    columns, treat the wrapped model like the base model.
    """

    __slots__ = ("func", "owner")

    def __init__(self, func: Any, owner: Any) -> None:
        self.func, self.owner = func, owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        base = inspect.signature(self.owner.get_base_model().forward)
        params = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if "adapter_names" not in base.parameters:
            params.append(inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
        params += [p for p in base.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        return base.replace(parameters=params)


class ForwardWithBaseSignature:
    """Descriptor giving each PeftModel a ``forward`` that is a :class:`BoundForward`."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, owner: Any, cls: type | None = None) -> Any:
        return self.func if owner is None else BoundForward(self.func, owner)
