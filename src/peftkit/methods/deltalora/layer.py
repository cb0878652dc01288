"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411) on Linear and GPT-2 Conv1D layers.

LoRA's forward, ``h = W x + s B A x`` (``s = lora_alpha / r``, no dropout on the branch, as the paper), where the
"frozen" weight W also learns: after each optimizer step t > K (``update_start_step``) the paper adds

    W_{t+1} = W_t + lambda s (B_{t+1} A_{t+1} - B_t A_t)        (lambda: ``update_ratio``)

without W's gradient or optimizer state. The sum of those updates telescopes (``functional``):
``W_T = W_0 + lambda s (B_T A_T - B_K' A_K')`` with ``(A_K', B_K')`` the factors when the updates began. peftkit
keeps it in that form: the base weight stays ``W_0`` in memory, the start factors are two frozen buffers
(``lora_A_start`` (r, d_in), ``lora_B_start`` (d_out, r)), and the layer computes with ``W_T`` through them (one
more product of rank 2r with detached factors: W is not differentiated, as in the paper, while the input's
gradient goes through ``W_T``). The model is the paper's exactly
(the sum of the in-place updates, to float rounding: ``tests/methods/test_deltalora.py`` trains the paper's
in-place loop beside it), and:

- the adapter file reproduces the model: it holds ``lora_A.weight``, ``lora_B.weight`` (LoRA's keys) and the start
  factors ``lora_A_start``, ``lora_B_start`` (twice LoRA's size), i.e. W's update ``lambda s (B A - B_K' A_K')`` in
  factored form; loading it into a fresh base gives the trained model's outputs bit for bit, with no copy of the
  targeted weights in the file and no write into the base on load;
- the base stays the pre-trained model: ``disable_adapter`` gives it, several adapters share it, ``unload`` returns
  it; merge writes ``W_0 + s ((1 + lambda) B A - lambda B_K' A_K')`` (bit-exact unmerge);
- in low precision no update is lost to rounding (an in-place ``W += tiny`` on a bf16 weight is mostly rounded
  away).

The training-loop hook (``on_step``: ``peftkit.train`` calls it after every optimizer step; in a loop of your own
call ``delta_lora_step(model)`` after ``optimizer.step()``, or ``model.update_and_allocate(step)``) copies the
factors into the start buffers after every step t <= K, so the start factors are those after step K and W moves
from step K + 1 on. Without the hook the start factors stay the initial ones (W follows from the first step).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype, is_transposed, layer_dims
from ...layers import Adapter
from ...registry import register_method
from ..lorafa.functional import init_factors
from ..lorafa.layer import LINEAR_LAYERS, check_base
from . import functional as DF
from .config import DeltaLoraConfig


@register_method(
    "deltalora",
    config=DeltaLoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="r (d_in + d_out) per target (W follows the factors' delta, untrained)",
    position="weight delta beside each targeted layer; the layer's weight follows the delta of B A",
    paper="arXiv 2309.02411 (Delta-LoRA)",
    examples={"deltalora": {"r": 4, "lora_alpha": 8, "update_ratio": 0.5, "update_start_step": 0}},
)
class DeltaLoraAdapter(Adapter):
    supported_layers = LINEAR_LAYERS
    default_roles = ("query", "value")
    checkpoint_keys: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
        "lora_A_start": "lora_A_start", "lora_B_start": "lora_B_start",
    }

    def __init__(self, base: nn.Module, config: DeltaLoraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        check_base(base, key, "Delta-LoRA")
        self.r = r = config.r
        self.lora_alpha = config.lora_alpha
        self.unit_scaling = self.scaling = config.lora_alpha / r
        self.update_ratio, self.update_start_step = config.update_ratio, config.update_start_step
        self.transposed = is_transposed(base)
        d_out, d_in = layer_dims(base)
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base)}
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **factory))
        self.register_buffer("lora_A_start", torch.empty(r, d_in, **factory))
        self.register_buffer("lora_B_start", torch.empty(d_out, r, **factory))
        if init:
            init_factors(self.lora_A, self.lora_B, config.init_lora_weights)
            self.restart()

    @classmethod
    def param_count(cls, base: nn.Module, config: DeltaLoraConfig, key: str = "") -> int:
        """Closed form: A and B, r (d_in + d_out) per target (the start factors are frozen buffers)."""
        d_out, d_in = layer_dims(base)
        return config.r * (d_in + d_out)

    @torch.no_grad()
    def restart(self) -> None:
        """Start factors = the current factors: W's update ``lambda s (B A - B_start A_start)`` is zero now."""
        self.lora_A_start.copy_(self.lora_A)
        self.lora_B_start.copy_(self.lora_B)

    # -- weights ---------------------------------------------------------------------------------------
    def _layout(self, delta: Tensor) -> Tensor:
        return delta.t() if self.transposed else delta

    def weight_update(self) -> Tensor:
        """``W_T - W_0``, the paper's updates of the layer's weight so far, in the base weight's layout."""
        return self._layout(DF.weight_update(self.lora_A, self.lora_B, self.lora_A_start, self.lora_B_start,
                                             self.scaling, self.update_ratio))

    def delta_weight(self, base: nn.Module) -> Tensor:
        """``W_T + s B A - W_0`` in the base weight's layout."""
        return self._layout(DF.delta(self.lora_A, self.lora_B, self.lora_A_start, self.lora_B_start, self.scaling,
                                     self.update_ratio))

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        factors = (A, self.lora_B, self.lora_A_start, self.lora_B_start, self.scaling, self.update_ratio)
        if out.dtype == A.dtype:
            return DF.accumulate(out, x, *factors)
        return out + DF.output(x, *factors).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, update_ratio={self.update_ratio:g}, " \
               f"update_start_step={self.update_start_step}"

    # -- the training-loop hook ------------------------------------------------------------------------
    @classmethod
    def on_step(cls, tuner: Any, adapter_name: str, global_step: int) -> None:
        """After optimizer step ``t = global_step - 1`` (``global_step``: steps done so far, as ``peftkit.train``
        passes it): while ``t <= update_start_step`` the start factors follow A and B, so W's updates begin with
        step ``update_start_step + 1`` (the paper's ``if t > K``)."""
        layers = [(path, layer) for path, layer in tuner.adapter_layers() if adapter_name in layer.adapters]
        merged = [path for path, layer in layers if adapter_name in layer.merged_adapters]
        if merged:
            raise RuntimeError(f"Delta-LoRA adapter {adapter_name!r} is merged into {merged[0]!r}: unmerge it "
                               "before training (the merged weight would not follow the update)")
        tuner.hook_state[adapter_name] = global_step
        for _, layer in layers:
            adapter = layer.adapters[adapter_name]
            if isinstance(adapter, DeltaLoraAdapter) and global_step - 1 <= adapter.update_start_step:
                adapter.restart()


def delta_lora_step(model: nn.Module, global_step: int | None = None, adapter_name: str | None = None) -> int:
    """Call after ``optimizer.step()`` in a training loop of your own: the Delta-LoRA update of every active,
    trainable Delta-LoRA adapter (``adapter_name``: only that one). ``global_step``: optimizer steps done so far
    (default: one more than at the previous call, counted per adapter from 1). Returns the step it used.

    ``model``: a ``PeftModel`` (or its ``base_model``). ``peftkit.train`` and ``model.update_and_allocate(step)``
    run the same hook."""
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "hook_state") or not hasattr(tuner, "peft_config"):
        raise TypeError(f"delta_lora_step: expected a PeftModel from get_peft_model, got {type(model).__name__}")
    names = [n for n in tuner.active_adapters if not tuner.peft_config[n].inference_mode
             and isinstance(tuner.peft_config[n], DeltaLoraConfig) and adapter_name in (None, n)]
    if adapter_name is not None and not names:
        raise ValueError(f"delta_lora_step: {adapter_name!r} is not an active, trainable Delta-LoRA adapter; "
                         f"adapters: {sorted(tuner.peft_config)}")
    step = global_step or 0
    for name in names:
        step = global_step if global_step is not None else tuner.hook_state.get(name, 0) + 1
        DeltaLoraAdapter.on_step(tuner, name, step)
    return step
