"""DiffFit (Xie et al. 2023, arXiv 2304.06648): fine-tune a diffusion model's biases, its normalization layers and
one learned scale factor per residual branch.

The paper freezes a pre-trained DiT and trains the bias terms, the LayerNorm affine parameters,
the class embedding and a scale factor gamma, initialized to 1, on each block's residual branches:

    x = x + gamma_1 * attn(norm_1(x)),        x = x + gamma_2 * mlp(norm_2(x))

so the adapted model starts exactly at the base and about 0.12% of DiT-XL's parameters train. Here:

- **biases and norms** are BitFit / norm tuning deltas on the shared selective adapter
  (``methods/selective/adapter.py``): ``b = b0 + delta_b`` on every bias of the targeted modules (the
  ``target_modules`` field; None: the whole model but the task head), ``weight/bias = w0/b0 + delta`` on every
  normalization layer (LayerNorm, GroupNorm, RMSNorm, a model's own ``*Norm``). File keys
  ``<module>.bias.delta``, ``<module>.weight.delta`` (the selective layout); ``selected_params`` in the saved
  config records each parameter's shape.
- **gamma** (d_out,), one factor per output channel of the branch (a vector of ones at the start),
  multiplies the output of the *last projection of a residual branch*, which is the branch output itself:
  ``gamma * f(x) = gamma * (W h + b)`` with ``h`` the branch's hidden state. File key ``<module>.difffit_gamma``.
  Where it sits by default (``scale_modules=None``, resolved to full paths when the adapter is built):

  * transformer blocks (every architecture in the role table): the attention output projection and the FFN
    output projection, DiT's ``attn.proj`` and ``mlp.fc2`` (Llama ``o_proj`` / ``down_proj``, GPT-2
    ``attn.c_proj`` / ``mlp.c_proj``, BERT / ViT ``attention.output.dense`` / ``output.dense``, T5 ``o`` / ``wo``,
    CLIP ``out_proj`` / ``fc2``);
  * diffusers ``UNet2DConditionModel``: in each ``BasicTransformerBlock`` (the DiT block of the UNet's attention
    stacks) ``attn1.to_out.0`` (self-attention), ``attn2.to_out.0`` (cross-attention) and ``ff.net.2`` (the
    feed-forward), where the community diffusers port of DiffFit puts its ``gamma_attn1`` / ``gamma_attn2`` /
    ``gamma_ff``; and in each ``ResnetBlock2D`` its ``conv2``, whose output is the whole residual branch
    (``(x + conv2(...)) / output_scale_factor``). The ``Transformer2DModel``'s own outer residual (``proj_out``) wraps a stack of
    blocks, as DiT's whole network would, and gets no gamma unless ``scale_modules`` names it.
  * diffusers ``SD3Transformer2DModel`` (MMDiT): in each ``JointTransformerBlock`` the image stream's
    ``attn.to_out.0`` and ``ff.net.2`` (the UNet's names) and the text stream's ``attn.to_add_out`` and
    ``ff_context.net.2`` (absent in the last block, whose text stream ends before its feed-forward).

Merging: the bias and norm deltas are added into the base parameters, and gamma folds into the projection,
``W' = diag(gamma) W``, ``b' = gamma * (b0 + delta_b)``, so the merged model has no extra operation. Unmerge
divides gamma out again and restores the base bit for bit (the wrapper's exact-restore record corrects the
rounding; channels whose gamma is zero, which the division cannot give back, are kept at merge time).

Not in Hugging Face PEFT (peftkit only, ``peft_type`` "DIFFFIT"). Differences from the paper: the class embedding
is not trained by default (DiT's label embedder; list it in ``modules_to_save``); gamma goes on every block by
default (a regex in ``scale_modules`` restricts it to some blocks).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import CONV1D_TYPES, adapter_dtype, has_hooks, is_transposed, layer_dims
from ...registry import register_method
from ...targeting import NotApplicableError, TargetError, is_target, role_paths
from ..selective.adapter import SelectiveAdapter
from ..selective.layernorm import is_norm
from ..selective.select import check_fits, eligible, record, task_heads
from . import functional as DF
from .config import DiffFitConfig

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# layers gamma can scale and fold into: output linear in the input, channels known
GAMMA_LAYERS: tuple[type, ...] = (nn.Linear, *CONV1D_TYPES, *_CONV)
# roles (peftkit.default_targets) whose module ends a transformer block's residual branch
BRANCH_ROLES = ("attention_output", "ffn_output")
# a diffusers JointTransformerBlock's text-stream branch outputs (absent in a block with context_pre_only)
JOINT_CONTEXT_BRANCHES = ("attn.to_add_out", "ff_context.net.2")


def residual_branch_outputs(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
    """Full paths of the default gamma sites: the attention and FFN output projections of the architecture (role
    table), and the ``conv2`` of every diffusers ResNet block; in model order, task heads left out."""
    found = {p for role in BRANCH_ROLES for p in role_paths(model, named, role)}
    for path, module in named:
        if type(module).__name__.startswith("ResnetBlock") and isinstance(getattr(module, "conv2", None), _CONV):
            found.add(f"{path}.conv2" if path else "conv2")
        if type(module).__name__ == "JointTransformerBlock":  # SD3 / MMDiT: the text stream's own branches
            for branch in JOINT_CONTEXT_BRANCHES:
                if any(n == f"{path}.{branch}" for n, _ in named):
                    found.add(f"{path}.{branch}")
    heads = task_heads(config)
    modules = dict(named)
    return [p for p, _ in named if p in found and isinstance(modules[p], GAMMA_LAYERS)
            and not any(p == h or p.endswith("." + h) or p.startswith(h + ".") for h in heads)]


def _has_gamma(base: nn.Module, config: DiffFitConfig, key: str) -> bool:
    scale = config.scale_modules
    return bool(scale) and isinstance(base, GAMMA_LAYERS) and is_target(config, key, scale)


@register_method(
    "difffit",
    config=DiffFitConfig,
    category="selective",
    modalities=("vision", "generation", "text", "vision-language"),
    mergeable=True,
    param_formula="every selected bias and norm parameter, plus d_out per residual-branch output (gamma)",
    position="biases, normalization layers and a per-channel scale on each residual branch",
    paper="arXiv 2304.06648 (DiffFit)",
    examples={"difffit": {}},
)
class DiffFitAdapter(SelectiveAdapter):
    method = "difffit"
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)

    def __init__(self, base: nn.Module, config: DiffFitConfig, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        self.transposed = is_transposed(base)
        self.channels_last = not isinstance(base, _CONV)
        if _has_gamma(base, config, key):
            ref = base.weight
            d_out = layer_dims(base)[0]
            self.difffit_gamma = nn.Parameter(torch.ones(d_out, device=ref.device, dtype=adapter_dtype(base)))
            self.checkpoint_keys["difffit_gamma"] = "difffit_gamma"
            folds = ("weight",) + (("bias",) if getattr(base, "bias", None) is not None else ())
            self.merged_params = tuple(dict.fromkeys(self.merged_params + folds))
        else:
            self.register_parameter("difffit_gamma", None)
        self._lost_bias: tuple[Tensor, Tensor] | None = None

    # -- selection -----------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: DiffFitConfig) -> None:
        """``scale_modules=None`` becomes the full paths of the architecture's residual-branch outputs."""
        if config.scale_modules is None:
            config.scale_modules = residual_branch_outputs(model, named, config)

    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: DiffFitConfig) -> None:
        """Record every bias (``train_bias``) and every norm layer's parameters (``train_norm``) of the targets."""
        modules = dict(named)
        found = []
        for path, pname, p in eligible(model, named, config):
            if is_norm(modules[path]):
                if config.train_norm:
                    found.append((path, pname, tuple(p.shape), p.numel(), "full"))
            elif pname == "bias" and config.train_bias:
                found.append((path, pname, tuple(p.shape), p.numel(), "full"))
        config.selected_params = record(found)

    @classmethod
    def scale_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: DiffFitConfig) -> list[str]:
        """Paths of the modules gamma scales; a module it cannot scale, or a list that matches nothing, is an error."""
        scale = config.scale_modules
        if not scale:
            return []
        hits = [(p, m) for p, m in named if p and is_target(config, p, scale)]
        bad = [(p, m) for p, m in hits if not isinstance(m, GAMMA_LAYERS)]
        if bad:
            path, module = bad[0]
            raise TargetError(
                f"DiffFitConfig.scale_modules: {path!r} is a {type(module).__name__}; gamma scales the output of a "
                f"residual branch's last projection, one of {[t.__name__ for t in GAMMA_LAYERS]}")
        if not hits:
            raise TargetError(f"DiffFitConfig.scale_modules: {scale!r} matched no module of {type(model).__name__}")
        return [p for p, _ in hits]

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: DiffFitConfig) -> list[str]:
        if config.selected_params is None:
            cls.select(model, named, config)
        paths = set(check_fits(named, config.selected_params)) | set(cls.scale_targets(model, named, config))
        if not paths:
            raise NotApplicableError(f"DiffFit: {type(model).__name__} has no bias, normalization layer or residual "
                                     "branch output among the targets")
        return [p for p, _ in named if p in paths]

    @classmethod
    def param_count(cls, base: nn.Module, config: DiffFitConfig, key: str = "") -> int:
        """The selected bias / norm entries, plus d_out for gamma."""
        gamma = layer_dims(base)[0] if _has_gamma(base, config, key) else 0
        return super().param_count(base, config, key) + gamma

    # -- forward: gamma * (W h + b0 + delta_b) --------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        if self.difffit_gamma is None:
            return super().fused_forward(base, x)
        if self.op is None or has_hooks(base):
            return None
        return DF.scale_output(self._run(base, x, with_base=True), self.difffit_gamma, self.channels_last)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        out = super().forward(base, x, out)
        if self.difffit_gamma is None:
            return out
        return DF.scale_output(out, self.difffit_gamma, self.channels_last)

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """The scaled weight / biased, scaled bias, differentiable (for a parent that reads the parameters)."""
        value = super().effective_param(base, name, value)
        gamma = self.difffit_gamma
        if gamma is None or name not in ("weight", "bias"):
            return value
        return DF.scale_weight(value, gamma, self.transposed and name == "weight")

    # -- merge: deltas added, gamma folded into the projection ----------------------------------------------
    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        gamma = self.difffit_gamma
        if gamma is None:
            return super().merge(base, weight)
        g = gamma.detach()
        return DF.scale_weight(weight, g, self.transposed), DF.lost_channels(weight, g, self.transposed)

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        gamma = self.difffit_gamma
        if gamma is None:
            return super().unmerge(base, weight, state)
        restored = DF.unscale_weight(weight, gamma.detach(), self.transposed)
        return DF.restore_channels(restored, state, self.transposed)

    def _bias_delta(self) -> Tensor | None:
        return self.dense("bias").detach() if "bias" in self.formats else None

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        gamma = self.difffit_gamma
        if gamma is None or name != "bias":
            return super().merge_param(base, name, value)
        g = gamma.detach()
        self._lost_bias = DF.lost_channels(value, g)
        return DF.merged_bias(value, g, self._bias_delta())

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        gamma = self.difffit_gamma
        if gamma is None or name != "bias":
            return super().unmerge_param(base, name, value)
        restored = DF.unmerged_bias(value, gamma.detach(), self._bias_delta())
        return DF.restore_channels(restored, self._lost_bias)

    def extra_repr(self) -> str:
        text = super().extra_repr() if self.formats else ""
        if self.difffit_gamma is not None:
            text = ", ".join(t for t in (text, f"gamma: {self.difffit_gamma.numel()}") if t)
        return text
