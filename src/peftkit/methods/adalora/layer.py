"""AdaLoRA adapter (Zhang et al. 2023, arXiv 2303.10512): LoRA in SVD form with an adaptive rank budget.

    h = W0 x + (alpha / (r0 + 1e-5)) P diag(lambda) Q x                 (eq. 3, PEFT's scaling)

``Q`` = ``lora_A`` (r, d_in), ``lambda`` = ``lora_E`` (r, 1), ``P`` = ``lora_B`` (d_out, r); ``r0`` =
``ranknum`` is the starting rank ``init_r`` and stays so when ranks are pruned, which keeps the scale of the
surviving triplets. ``lambda`` starts at zero (the adapter starts at the identity), ``P`` and ``Q`` at
N(0, 0.02). For a Conv2d, ``Q`` is (r, c_in * kh * kw) and the delta is reshaped into a kernel.

Training: the PeftModel's ``update_and_allocate(step)`` (this class's ``on_step``) scores the triplets and
masks the least important ones (``allocator.RankAllocator``); the forward adds the orthogonality penalty
to the model's loss (``extra_loss``). A mask is recorded in the config's ``rank_pattern``; files keep only
the unmasked triplets, and loading rebuilds each matrix at that rank (as Hugging Face PEFT does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import Adapter
from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...targeting import LINEAR_TYPES
from ...registry import register_method
from ..lora.kernels import LoraLinear
from .allocator import Mask, RankAllocator, orthogonality_penalty
from .config import AdaLoraConfig


def pattern_mask(rank_pattern: dict[str, Mask] | None, path: str) -> Mask | None:
    """The kept-triplet mask of module ``path`` in a ``rank_pattern`` (keys ``<path>.lora_E``, optionally
    followed by ``.<adapter name>`` as in PEFT's in-memory patterns)."""
    for key, mask in (rank_pattern or {}).items():
        if key == f"{path}.lora_E" or key.startswith(f"{path}.lora_E."):
            return list(mask)
    return None


@register_method(
    "adalora",
    config=AdaLoraConfig,
    category="reparameterized",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="init_r (d_in + d_out + 1) per target (after pruning: the kept ranks)",
    position="weight delta in SVD form beside each targeted layer",
    paper="arXiv 2303.10512",
    examples={"adalora": {"init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10, "tinit": 2, "tfinal": 2}},
)
class AdaLoraAdapter(Adapter):
    supported_layers = (nn.Linear, nn.Conv2d) + CONV1D_TYPES
    # PEFT's AdaLoRA defaults: LoRA's, except every projection of T5, BART and OPT, and q / k / v + every
    # "dense" of RoBERTa and DeBERTa-v2 (peft's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING)
    default_roles = {"t5": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
                     "mt5": ("query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out"),
                     "bart": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
                     "opt": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
                     "roberta": ("query", "key", "value", "dense"),
                     "deberta-v2": ("query", "key", "value", "dense"),
                     "*": ("query", "value")}
    # files hold only the kept triplets (see ``saved_A``); ``ranknum`` is not saved (it is init_r)
    checkpoint_keys = {"saved_A": "lora_A", "saved_E": "lora_E", "saved_B": "lora_B"}

    def __init__(self, base: nn.Module, config: AdaLoraConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv and base.groups != 1:
            raise ValueError(f"{key}: AdaLoRA on grouped convolutions (groups={base.groups}) is not supported")
        mask = pattern_mask(config.rank_pattern, key)
        # a new adapter starts at init_r; a loaded one has the ranks its file kept (PEFT resizes on load)
        self.r = r = sum(mask) if mask is not None and not init else config.init_r
        # which triplets a file keeps; set by the allocator while training (None: all)
        self.rank_mask: Mask | None = mask if init else None
        self.scaling = float(config.lora_alpha)
        self.fan_in_fan_out = is_transposed(base)
        w = base.weight
        dtype = adapter_dtype(base)  # fp32 on half-precision / quantized bases
        d_out, d_in = layer_dims(base)
        d_in *= base.kernel_size[0] * base.kernel_size[1] if self.is_conv else 1
        shapes = {"lora_A": (r, d_in), "lora_E": (r, 1), "lora_B": (d_out, r)}
        if init:  # PEFT's order of random draws (ranknum included), on the CPU, so one seed gives its weights
            values = {name: torch.randn(shape) for name, shape in shapes.items()}
            torch.randn(1)
            if config.init_lora_weights:
                nn.init.zeros_(values["lora_E"])
                nn.init.normal_(values["lora_A"], mean=0.0, std=0.02)
                nn.init.normal_(values["lora_B"], mean=0.0, std=0.02)
        else:
            values = {name: torch.empty(shape) for name, shape in shapes.items()}
        for name, value in values.items():
            setattr(self, name, nn.Parameter(value.to(device=w.device, dtype=dtype)))
        self.register_buffer("ranknum", torch.full((1,), float(config.init_r), device=w.device, dtype=dtype),
                             persistent=False)
        # alpha / (ranknum + 1e-5) as a number (ranknum never changes): the forward's one scale, no device sync
        self.delta_scale = self.scaling / float(torch.full((1,), float(config.init_r), dtype=dtype) + 1e-5)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: AdaLoraConfig, adapter_name: str) -> None:
        """PEFT's AdaLoraModel rule: one trainable AdaLoRA adapter (its rank allocator is the model's)."""
        trainable = [n for n, c in configs.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
        if trainable and not config.inference_mode:
            raise ValueError(
                f"inference_mode: AdaLoraModel supports only 1 trainable adapter; adapter {trainable[0]!r} trains, "
                f"so adapter {adapter_name!r} needs inference_mode=True (set inference_mode to True for all "
                "adapters except the one you want to train)")

    @classmethod
    def param_count(cls, base: nn.Module, config: AdaLoraConfig, key: str = "") -> int:
        """Closed form of a new adapter: init_r (d_in * prod(kernel) + d_out + 1)."""
        d_out, d_in = layer_dims(base)
        k = base.kernel_size[0] * base.kernel_size[1] if isinstance(base, nn.Conv2d) else 1
        return config.init_r * (d_in * k + d_out + 1)

    # -- saved layout: the kept triplets ---------------------------------------------------------------
    def _kept(self) -> Tensor | None:
        """Indices of the triplets a file keeps, or None when it keeps this adapter's tensors as they are."""
        mask = self.rank_mask
        if mask is None or len(mask) != self.r or all(mask):
            return None
        return torch.tensor([i for i, keep in enumerate(mask) if keep], dtype=torch.long, device=self.lora_A.device)

    def _saved(self, name: str, dim: int) -> Tensor:
        param, kept = getattr(self, name), self._kept()
        return param if kept is None else param.index_select(dim, kept)

    @property
    def saved_A(self) -> Tensor:
        return self._saved("lora_A", 0)

    @property
    def saved_E(self) -> Tensor:
        return self._saved("lora_E", 0)

    @property
    def saved_B(self) -> Tensor:
        return self._saved("lora_B", 1)

    @torch.no_grad()
    def before_load(self) -> None:
        """Drop the masked triplets so a file (which holds only the kept ones) loads into the parameters.

        As PEFT's ``resize_modules_by_rank_pattern``: ``ranknum`` (the scale) stays at init_r.
        """
        kept = self._kept()
        if kept is None:
            return
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.index_select(dim, kept), requires_grad=old.requires_grad))
        self.r = kept.numel()
        self.rank_mask = None

    # -- math ------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        """``P diag(lambda) Q * alpha / (ranknum + 1e-5)`` in the base weight's layout."""
        delta = self.lora_B @ (self.lora_A * self.lora_E)  # (d_out, d_in [* kh * kw])
        if self.is_conv:
            return (delta * self.scaling / (self.ranknum + 1e-5)).reshape(base.weight.shape)
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling / (self.ranknum + 1e-5)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Base and adapter in one pass for a plain Linear / GPT-2 Conv1D base: LoRA's kernel with
        ``A = Q diag(lambda)`` and scale ``alpha / (ranknum + 1e-5)``. The update accumulates into the fresh
        base output and the low-rank input gradient into the base one, so no (tokens x d_out) temporaries
        (the composed form makes three: the product, its scaled and its divided copy)."""
        transposed = type(base) is not nn.Linear
        if self.is_conv or type(base) not in LINEAR_TYPES or transposed != self.fan_in_fan_out:
            return None
        w, A = base.weight, self.lora_A
        if x.dtype != w.dtype or A.dtype != w.dtype or has_hooks(base) or torch.is_autocast_enabled(x.device.type):
            return None
        x2d = x.reshape(-1, A.shape[1])
        xd = self.dropout(x2d) if self.dropout is not None else None
        out = LoraLinear.apply(x2d, xd, w, base.bias, A * self.lora_E, self.lora_B, self.delta_scale, transposed)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        A, E, B = self.lora_A, self.lora_E, self.lora_B
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.is_conv:
            kernel = (B @ (A * E) * self.scaling / (self.ranknum + 1e-5)).reshape(base.weight.shape)
            delta = F.conv2d(x, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
            return out + delta.to(out.dtype)
        h = F.linear(x, A * E)  # (..., r)
        if out.dtype != A.dtype:
            return out + (F.linear(h, B) * self.delta_scale).to(out.dtype)
        out2d, h2d = out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        return torch.addmm(out2d, h2d, B.t(), alpha=self.delta_scale).view(out.shape)  # out + s h B^T, one GEMM

    # -- training-loop hooks (called by the TunerModel for a trainable, active adapter) ---------------------
    @classmethod
    def on_step(cls, tuner: Any, adapter_name: str, global_step: int) -> None:
        """``update_and_allocate``: importance update and rank (re-)allocation; see ``RankAllocator``."""
        config = tuner.peft_config[adapter_name]
        triplets = dict(tuner.adapters(adapter_name))
        allocator = tuner.hook_state.get(adapter_name)
        if allocator is None:
            allocator = tuner.hook_state[adapter_name] = RankAllocator(config, {p: a.r for p, a in triplets.items()})
        current = {p: m for p in triplets if (m := pattern_mask(config.rank_pattern, p)) is not None}
        masks = allocator.update_and_allocate(triplets, global_step, current)
        if masks is not None:
            config.rank_pattern = {f"{path}.lora_E": mask for path, mask in masks.items()}
            for path, adapter in triplets.items():
                adapter.rank_mask = masks[path]

    @classmethod
    def extra_loss(cls, tuner: Any, adapter_name: str) -> Tensor | None:
        """``orth_reg_weight`` times the orthogonality penalty of ``P`` and ``Q`` (eq. 4, PEFT's form)."""
        weight = tuner.peft_config[adapter_name].orth_reg_weight
        penalty = orthogonality_penalty((a.lora_A, a.lora_B) for _, a in tuner.adapters(adapter_name))
        return None if penalty is None else weight * penalty
