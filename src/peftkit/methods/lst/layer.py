"""Ladder side-tuning (LST; Sung et al. 2022, arXiv 2206.06522; the survey's "side tuning", additive).

A side network of width ``d_s = d / r`` (``r``: ``reduction_factor``) runs beside the frozen encoder, one side
block per backbone block, fed by "ladders" from the backbone's intermediate states (``functional.py``):

    s_0 = D_0 h_0;   u_i = mu_i D_i h_i + (1 - mu_i) s_{i-1},  mu_i = sigmoid(alpha_i / T);   s_i = f_i(u_i)
    y   = h_N + U s_N                    (y replaces the encoder's last hidden state for the task head)

``h_0``: the embedding output (the first block's input), ``h_i``: block i's output, ``D_i``: Linear(d, d_s),
``f_i``: a block of the backbone's own class (``BertLayer``, ``RobertaLayer``, ``ViTLayer``) built at width
``d_s`` (heads ``gcd(heads, d_s)``, FFN ``intermediate_size // r`` unless set), ``U``: Linear(d_s, d). The
backbone's blocks run under ``torch.no_grad`` (``wrapper.py``): backpropagation never enters them, so training
keeps none of their activations, only the ladder inputs ``h_i`` (for ``D_i``'s gradient) and the side network's
own. Trainable: ``(N + 1)(d d_s + d_s)`` + ``N`` gates + ``N`` side blocks + ``d_s d + d``, plus the task head
(``modules_to_save``).

File keys (peft has no LST): ``base_model.model.<encoder>.side_downsamples.<i>.{weight,bias}`` (i = 0..N),
``.side_gates`` (N), ``.side_blocks.<i>.<the block's own keys>``, ``.side_upsample.{weight,bias}``.

Where peftkit differs from the paper:
- initialisation: the paper initialises the side blocks from the backbone's weights pruned to width ``d_s``
  (Fisher-information structural pruning); here they take BERT's initialisation (normal(0, initializer_range)
  weights, zero biases, unit LayerNorms). The gates start at ``alpha = gate_init`` (the paper's 0).
- combination: the paper's T5 feeds the up-projected side state onward in place of the backbone's; here it is
  added to the backbone's last hidden state with ``U = 0`` at init (``init_weights``), so the model starts at
  the base and the head sees ``h_N`` plus the learned correction. The head (BERT's pooler, frozen, and the
  trained classifier; ViT's final LayerNorm, frozen, and its classifier) runs with autograd, from ``y``.
- scope (``find_encoder``): a model called with ``input_ids`` or ``pixel_values`` holding a block stack: an
  ``encoder`` with the block list ``layer`` (BERT, RoBERTa) or an image model with its block list ``layers``
  (``ViTModel`` inside ``ViTForImageClassification``; a bare ``ViTModel`` is its own stack and cannot be
  wrapped); other models (CNNs, decoders) raise ``NotApplicableError`` before anything changes. Not mergeable
  (a side network, not a weight delta); per-row routing (``adapter_names``) is refused.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype
from ...layers import Adapter
from ...registry import register_method
from ...targeting import NotApplicableError
from ..prompt.inputs import forward_params
from . import functional as LF
from . import wrapper
from .config import LSTConfig
from .wrapper import LSTLayer

MERGE_ERROR = "LST cannot be merged into the base model: it is a side network beside the encoder, not a weight delta"
_SIZES = ("hidden_size", "num_attention_heads", "intermediate_size")


def _stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block stack LST can ride (``wrapper.stack_layout``): an ``encoder`` holding a ModuleList ``layer``, or
    an image model holding its ModuleList ``layers``; either with a config giving the three sizes as integers."""
    found = []
    for n, m in model.named_modules():
        layout = wrapper.stack_layout(m)
        if layout is None or (layout[0] == "encoder" and n.split(".")[-1] != "encoder"):
            continue
        if all(isinstance(getattr(getattr(m, "config", None), a, None), int) for a in _SIZES):
            found.append((n, m))
    return found


def find_encoder(model: nn.Module, config: LSTConfig) -> str:
    """The path of the block stack LST rides; ``NotApplicableError`` naming the model and why when it has none.

    The rule: the model's forward takes ``input_ids`` or ``pixel_values``, and it holds a block stack below its
    root: a module ``encoder`` with a non-empty ModuleList ``layer`` (BERT, RoBERTa) or an image model (main input
    ``pixel_values``) with a non-empty ModuleList ``layers`` (ViT's ``ViTModel`` in transformers 5), whose config
    gives ``hidden_size`` / ``num_attention_heads`` / ``intermediate_size`` and is no decoder."""
    name = type(model).__name__
    if not forward_params(model) & {"input_ids", "pixel_values"}:
        raise NotApplicableError(f"LST on {name}: its forward takes neither input_ids nor pixel_values; LST rides a "
                                 "BERT-style text encoder or a ViT")
    found = _stacks(model)
    if not found:
        raise NotApplicableError(f"LST on {name}: no transformer block stack (a module 'encoder' holding a ModuleList "
                                 "'layer', or an image model holding its ModuleList 'layers'; with a config giving "
                                 "hidden_size / num_attention_heads / intermediate_size)")
    if found[0][0] == "":
        raise NotApplicableError(f"LST on {name}: the model is itself the block stack; LST wraps the stack inside a "
                                 f"model: adapt a model holding the {name} (e.g. ViTForImageClassification)")
    cfg = found[0][1].config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise NotApplicableError(f"LST on {name}: the encoder is configured as a decoder (is_decoder / "
                                 "add_cross_attention); LST supports bidirectional encoders only")
    targets = config.target_modules
    if targets is None:
        return found[0][0]
    targets = [targets] if isinstance(targets, str) else list(targets)
    hits = [n for n, _ in found if any(n == t or n.endswith("." + t) for t in targets)]
    if len(hits) != 1:
        raise ValueError(f"LSTConfig.target_modules: {targets} matches {len(hits)} encoders; expected one of "
                         f"{[n for n, _ in found]}")
    return hits[0]


def side_sizes(encoder: nn.Module, config: LSTConfig, path: str = "") -> tuple[int, int, int]:
    """(d_s, side heads, side FFN width), checked against the encoder's width."""
    cfg = encoder.config
    d, r = cfg.hidden_size, config.reduction_factor
    if d % r:
        raise ValueError(f"LSTConfig.reduction_factor: {r} does not divide the hidden size {d} of {path or 'the encoder'}"
                         f"; expected a divisor of {d}")
    ds = d // r
    heads = config.side_num_attention_heads or math.gcd(cfg.num_attention_heads, ds)
    if ds % heads:
        raise ValueError(f"LSTConfig.side_num_attention_heads: {heads} does not divide the side width {ds} "
                         f"(= {d} / {r}) on {path or 'the encoder'}; expected a divisor of {ds}")
    ffn = config.side_intermediate_size or max(1, cfg.intermediate_size // r)
    return ds, heads, ffn


def side_config(encoder: nn.Module, config: LSTConfig) -> Any:
    ds, heads, ffn = side_sizes(encoder, config)
    cfg = copy.deepcopy(encoder.config)
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = ds, heads, ffn
    return cfg


def _block(cls: type, cfg: Any, i: int) -> nn.Module:
    try:
        return cls(cfg, layer_idx=i)
    except TypeError:
        return cls(cfg)


@register_method(
    "lst", config=LSTConfig, category="additive", modalities=("text", "vision"), mergeable=False,
    param_formula="(N + 1)(d d_s + d_s) + N + N side blocks of width d_s = d / r + d_s d + d (N backbone blocks)",
    position="a narrow side network beside the frozen encoder, fed by gated ladders from every block",
    changes_structure=True, starts_at_base=True, paper="arXiv 2206.06522 (Sung et al. 2022), ladder side-tuning",
    examples={"lst": {"reduction_factor": 4}},
)
class LSTAdapter(Adapter):
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)
    default_roles: ClassVar[tuple[str, ...]] = ()
    supports_routing: ClassVar[bool] = False
    layer_cls: ClassVar[type | None] = LSTLayer

    # -- targets -----------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: LSTConfig) -> None:
        path = find_encoder(model, config)
        side_sizes(model.get_submodule(path), config, path)
        config.target_modules = {path}

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: LSTConfig) -> list[str]:
        return [find_encoder(model, config)]

    @classmethod
    def param_count(cls, base: nn.Module, config: LSTConfig, key: str = "") -> int:
        d, n = base.config.hidden_size, len(wrapper.blocks_of(base))
        ds, _, ffn = side_sizes(base, config, key)
        block = 4 * (ds * ds + ds) + 2 * ds + (ds * ffn + ffn) + (ffn * ds + ds) + 2 * ds  # attention, FFN, 2 LNs
        return (n + 1) * (d * ds + ds) + n + n * block + ds * d + d

    # -- the adapter ----------------------------------------------------------------------------------------
    def __init__(self, base: nn.Module, config: LSTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.__dict__["config"] = config
        self.key = key
        blocks = wrapper.blocks_of(base)
        d, n = base.config.hidden_size, len(blocks)
        cfg = side_config(base, config)
        ds = cfg.hidden_size
        self.temperature = float(config.gate_temperature)
        self.side_downsamples = nn.ModuleList(nn.Linear(d, ds) for _ in range(n + 1))
        self.side_gates = nn.Parameter(torch.full((n,), float(config.gate_init)))
        self.side_blocks = nn.ModuleList(_block(type(blocks[0]), cfg, i) for i in range(n))
        self.side_upsample = nn.Linear(ds, d)
        std = float(getattr(cfg, "initializer_range", 0.02))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if config.init_weights:
            nn.init.zeros_(self.side_upsample.weight)
        ref = next(base.parameters(), None)
        self.to(device=ref.device if ref is not None else None, dtype=adapter_dtype(base))

    def mu(self) -> Tensor:
        return LF.gates(self.side_gates, self.temperature)

    def side(self, h0: Tensor, hidden: list[Tensor], mask: Tensor | None) -> Tensor:
        """``U s_N`` from the backbone states (``h0``, ``hidden`` = block outputs) and the encoder's attention mask."""
        dtype = self.side_upsample.weight.dtype
        blocks = [lambda u, b=b: wrapper.hidden_of(b(u, mask)) for b in self.side_blocks]
        s = LF.side_forward(h0.to(dtype), [h.to(dtype) for h in hidden], self.side_downsamples, blocks, self.mu())
        return self.side_upsample(s)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # the wrapper runs the encoder
        return out

    # -- the file ---------------------------------------------------------------------------------------------
    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        return {f"base_model.model.{self.key}.{name}": t for name, t in self.state_dict(keep_vars=True).items()}

    # -- merging: refused -------------------------------------------------------------------------------------
    merge_refusal: ClassVar[str | None] = MERGE_ERROR

    # -- the call ----------------------------------------------------------------------------------------------
    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, LSTLayer):
                wrapper.install(m.base_layer)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        wrapper.uninstall(model)  # every module's recorder hook (the wrappers are already gone on unload)
