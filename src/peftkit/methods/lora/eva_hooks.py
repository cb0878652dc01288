"""EVA's forward hooks (``eva.py``): per adapted layer, an incremental PCA of its inputs (``SVDHook``), or the
inputs themselves on the first batch (``_InputsHook``), to find the layers that see equal inputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .incremental_pca import IncrementalPCA


# -- the hooks ---------------------------------------------------------------------------------------------
class _Hook:
    """Forward hook base: the layer's input as a 2-D (items, features) tensor, gathered over ranks."""

    def __init__(self, name: str, prepare_layer_inputs_fn: Optional[Callable] = None,
                 gather_distributed_inputs: bool = True) -> None:
        self.name = name
        self.gather_distributed_inputs = gather_distributed_inputs
        self._prepare_layer_inputs_fn = prepare_layer_inputs_fn or self._prepare_layer_inputs_fn_default
        self.model_input = None

    @staticmethod
    def _prepare_layer_inputs_fn_default(layer_input: Any, model_input: Any, layer_name: str) -> Tensor:
        if isinstance(layer_input, (tuple, list)):
            layer_input = layer_input[0]
        elif not isinstance(layer_input, Tensor):
            raise TypeError(f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
                            f"{layer_name}, please provide a custom prepare_layer_inputs_fn")
        return layer_input.view(-1, layer_input.size(-1)) if layer_input.ndim > 2 else layer_input

    @torch.no_grad()
    def prepare_layer_inputs(self, layer_input: Any) -> Tensor:
        return self._prepare_layer_inputs_fn(layer_input, self.model_input, self.name)

    def gather_layer_inputs(self, layer_input: Tensor) -> Tensor:
        if not (dist.is_initialized() and self.gather_distributed_inputs):
            return layer_input
        world_size = dist.get_world_size()
        local_size = torch.tensor([layer_input.shape[0]], device=layer_input.device)
        all_sizes = torch.empty(world_size, dtype=local_size.dtype, device=layer_input.device)
        dist.all_gather_into_tensor(all_sizes, local_size)
        sizes = all_sizes.tolist()
        padded = layer_input.new_zeros((max(sizes), *layer_input.shape[1:]))
        padded[: layer_input.shape[0]] = layer_input
        gathered = [torch.zeros_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.cat([t[:n] for t, n in zip(gathered, sizes)], dim=0)


class SVDHook(_Hook):
    """One incremental-PCA step per forward on the layer's inputs; ``converged[i]``: component i moved less than
    ``sim_thresh`` (cosine similarity) in the last step."""

    def __init__(self, n_components: int, sim_thresh: Union[float, Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_components, self.sim_thresh = n_components, sim_thresh
        if isinstance(sim_thresh, Tensor) and len(sim_thresh.shape) > 0:
            if not ((sim_thresh.size(0) in (n_components, 1)) and len(sim_thresh.shape) == 1):
                raise ValueError("if sim_thresh is a tensor with more than 0 dimensions it must have shape "
                                 "(n_components,) or (1,)")
        self.svd = IncrementalPCA(n_components=n_components, copy=True, lowrank=True, lowrank_seed=42)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, model: nn.Module, input: Any, output: Any) -> None:
        previous = self.svd.components_.clone().detach() if hasattr(self.svd, "components_") else None
        states = self.gather_layer_inputs(self.prepare_layer_inputs(input))
        if states.size(0) < self.n_components:  # too few items in this batch for the components asked
            warnings.warn(f"EVA: skipping the SVD step of {self.name}: fewer than {self.n_components} inputs in "
                          "this batch", stacklevel=2)
            return
        self.svd.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        components = self.svd.components_
        if len(components.shape) == 1:
            components, previous = components.reshape(1, -1), previous.reshape(1, -1)
        self.converged = nn.functional.cosine_similarity(components, previous) >= self.sim_thresh


class _InputsHook(_Hook):
    """Records the layer's (prepared) input of one forward, to find layers that see the same input."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inputs: list[Tensor] = []

    @torch.no_grad()
    def __call__(self, model: nn.Module, input: Any, output: Any) -> None:
        self.inputs.append(self.gather_layer_inputs(self.prepare_layer_inputs(input)).detach().cpu())


def _equal_groups(inputs: dict[str, Tensor]) -> list[list[str]]:
    """Names grouped by equal input (each group in ``inputs``' order, groups of two or more)."""
    groups: list[list[str]] = []
    for name, x in inputs.items():
        for group in groups:
            ref = inputs[group[0]]
            if ref.shape == x.shape and ref.dtype == x.dtype and torch.equal(ref, x):
                group.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]
