"""ShadowPEFT's backbone on diffusers' ``Flux2Transformer2DModel``: a reduced copy of the base (peft's Flux2 backend).

``"mirror"`` builds the base class from its own config with ``shadow_num_hidden_layers`` (1) double-stream
and twice as many single-stream blocks, at ``shadow_num_attention_heads`` heads (the base head width kept) and
``shadow_intermediate_size``, and copies the base tensors into it: the blocks spread evenly over the base
stack (one block: the last), each tensor's leading slice, the fused projections (single-stream QKV + MLP in,
attention + MLP out, the modulations' shift / scale / gate groups, the SwiGLU halves) segment by segment. At
the base width with ``share_embeddings`` the stems (``x_embedder``, ``context_embedder``,
``time_guidance_embed``, ``pos_embed``) are the base's own, reached through a proxy that is no submodule
(not trained, not saved). The seed ``s^(0)`` runs the reduced single-stream blocks on the first wrapped
block's input and that block's conditioning (its text stream, modulation, rotary embedding), each cut to the
shadow width. Any other ``shadow_model`` is the folder of a pretrained ``Flux2Transformer2DModel`` checked
against the base (its stems then stay frozen); ``save_pretrained`` writes such a folder from a reduced copy, its shared
stems included. Keys of the file: ``base_model.shadow_backbone.default.model.<key>``.
"""

from __future__ import annotations

import json
import os
from copy import copy as shallow_copy
from typing import Any

import torch
from torch import Tensor, nn

EMBEDDERS = ("x_embedder", "context_embedder", "time_guidance_embed", "pos_embed")
_BLOCK_ARGS = ("encoder_hidden_states", "temb_mod", "image_rotary_emb", "joint_attention_kwargs")


def is_flux2(model: nn.Module) -> bool:
    return type(model).__name__ == "Flux2Transformer2DModel"


class SharedModule(nn.Module):
    """Calls a base module without registering it on the shadow model (peft's ``_SharedModuleProxy``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._shared_module: list[nn.Module] = [module]

    @property
    def shared_module(self) -> nn.Module:
        return self._shared_module[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.shared_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_shared_module":
                raise
            return getattr(self.shared_module, name)


def _spread(total: int, count: int) -> list[int]:
    """``count`` block indices spread evenly over ``total`` (one: the last)."""
    if not 1 <= count <= total:
        raise ValueError(f"ShadowConfig.shadow_num_hidden_layers: the reduced Flux2 shadow needs between 1 and {total} "
                         f"layers, got {count}")
    return [total - 1] if count == 1 else [round(i * (total - 1) / (count - 1)) for i in range(count)]


def _rows(source: Tensor, groups: int, size: int, keep: int, cols: int) -> Tensor:
    return torch.cat([source[i * size:i * size + keep, :cols] for i in range(groups)], dim=0).clone()


def _copy_tensor(key: str, target: Tensor, source: Tensor, d: int, sd: int, m: int, sm: int) -> Tensor:
    """``source`` (base width d, MLP width m) cut to ``target`` (shadow widths sd, sm), fused segments kept."""
    if target.shape == source.shape:
        return source.clone()
    if key.endswith("to_qkv_mlp_proj.weight"):
        bounds = (0, d, 2 * d, 3 * d, 3 * d + m, source.shape[0])
        keep = (sd, sd, sd, sm, sm)
        return torch.cat([source[bounds[i]:bounds[i + 1]][:keep[i], :sd] for i in range(5)], dim=0).clone()
    if key == "attn.to_out.weight" or (".single_transformer_blocks." in f".{key}" and key.endswith(".attn.to_out.weight")):
        return torch.cat((source[:sd, :sd], source[:sd, d:d + sm]), dim=1).clone()
    if key.endswith(("double_stream_modulation_img.linear.weight", "double_stream_modulation_txt.linear.weight")):
        return _rows(source, 6, d, sd, sd)
    if key.endswith("single_stream_modulation.linear.weight"):
        return _rows(source, 3, d, sd, sd)
    if key.endswith("norm_out.linear.weight"):
        return _rows(source, 2, d, sd, sd)
    if key.endswith((".ff.linear_in.weight", ".ff_context.linear_in.weight")):
        return _rows(source, 2, m, sm, sd)
    if target.ndim != source.ndim or any(t > s for t, s in zip(target.shape, source.shape)):
        raise ValueError(f"ShadowPEFT: cannot initialise a Flux2 shadow tensor {key!r} of shape {tuple(target.shape)} "
                         f"from {tuple(source.shape)}")
    return source[tuple(slice(0, n) for n in target.shape)].clone()


def _load_reduced(target: nn.Module, source: nn.Module, *widths: int) -> None:
    src, out = source.state_dict(), {}
    for key, t in target.state_dict().items():
        if key not in src:
            raise KeyError(f"ShadowPEFT: the base Flux2 model has no tensor {key!r}")
        out[key] = _copy_tensor(key, t, src[key], *widths)
    target.load_state_dict(out, strict=True)


def _shell(model: nn.Module) -> nn.Module:
    """``model`` without its block stacks (the same modules otherwise)."""
    shell = shallow_copy(model)
    shell._modules = model._modules.copy()
    shell.transformer_blocks = nn.ModuleList()
    shell.single_transformer_blocks = nn.ModuleList()
    return shell


def _shadow_heads(base_heads: int, head_dim: int, hidden: int | None, heads: int | None) -> int:
    if hidden is None:
        return base_heads if heads is None else int(heads)
    if hidden % head_dim or (heads is not None and hidden != heads * head_dim):
        raise ValueError(f"ShadowConfig.shadow_hidden_size: a Flux2 shadow keeps the base attention head width "
                         f"({head_dim}); expected shadow_hidden_size == shadow_num_attention_heads x {head_dim}, "
                         f"got {hidden} and {heads}")
    return hidden // head_dim


class Flux2Shadow(nn.Module):
    """A reduced ``Flux2Transformer2DModel`` producing ``s^(0)`` (peft's ``DetachedFluxShadowModel``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.num_attention_heads) * int(self.model.config.attention_head_dim)

    @classmethod
    def from_base(cls, base: nn.Module, config: Any) -> "Flux2Shadow":
        layers = config.shadow_num_hidden_layers or 1
        doubles = _spread(len(base.transformer_blocks), layers)
        singles = _spread(len(base.single_transformer_blocks), 2 * layers)
        base_heads, head_dim = int(base.config.num_attention_heads), int(base.config.attention_head_dim)
        d = base_heads * head_dim
        m = int(d * float(base.config.mlp_ratio))
        heads = _shadow_heads(base_heads, head_dim, config.shadow_hidden_size, config.shadow_num_attention_heads)
        if not 1 <= heads <= base_heads:
            raise ValueError(f"ShadowConfig.shadow_num_attention_heads: between 1 and the base model's {base_heads}, "
                             f"got {heads}")
        sd = heads * head_dim
        sm = m if config.shadow_intermediate_size is None else int(config.shadow_intermediate_size)
        if not 1 <= sm <= m:
            raise ValueError(f"ShadowConfig.shadow_intermediate_size: between 1 and the base model's {m}, got {sm}")
        reduced_config = {**dict(base.config), "num_layers": layers, "num_single_layers": 2 * layers,
                          "num_attention_heads": heads, "attention_head_dim": head_dim, "mlp_ratio": sm / sd}
        reduced = type(base).from_config(reduced_config)
        widths = (d, sd, m, sm)
        _load_reduced(_shell(reduced), _shell(base), *widths)
        for stack, picks in (("transformer_blocks", doubles), ("single_transformer_blocks", singles)):
            for target, i in zip(getattr(reduced, stack), picks):
                source = getattr(base, stack)[i]
                _load_reduced(target, getattr(source, "base_layer", source), *widths)
        if config.share_embeddings and sd == d:
            for name in EMBEDDERS:
                if isinstance(getattr(base, name, None), nn.Module):
                    setattr(reduced, name, SharedModule(getattr(base, name)))
        if getattr(base, "gradient_checkpointing", False):
            reduced.enable_gradient_checkpointing()
        return cls(reduced)

    @classmethod
    def from_folder(cls, base: nn.Module, folder: str) -> "Flux2Shadow":
        """A pretrained ``Flux2Transformer2DModel`` checked against the base (peft's checks), every tensor from the
        folder: a folder of another class, or missing a tensor (which diffusers would draw at random), is refused."""
        name = type(base).__name__
        config_file = os.path.join(folder, "config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as fh:
                saved = json.load(fh).get("_class_name")
            if saved != name:
                raise ValueError(f"ShadowConfig.shadow_model: {folder!r} holds a {saved}, expected a saved {name}")
        try:
            shadow, info = type(base).from_pretrained(folder, output_loading_info=True)
        except OSError as err:
            raise ValueError(f"ShadowConfig.shadow_model: {folder!r} is not a folder of a saved {name} ({err})") from err
        missing = sorted({*info.get("missing_keys", ()), *(k for k, *_ in info.get("mismatched_keys", ()))})
        if missing:
            raise ValueError(f"ShadowConfig.shadow_model: the {name} in {folder!r} lacks tensors {missing[:6]}"
                             f"{' ...' if len(missing) > 6 else ''} (a reduced shadow sharing the base stems is saved "
                             "with them by Flux2Shadow.save_pretrained)")
        for attr in ("in_channels", "out_channels", "joint_attention_dim", "timestep_guidance_channels",
                     "attention_head_dim", "axes_dims_rope", "guidance_embeds"):
            mine, theirs = getattr(base.config, attr, None), getattr(shadow.config, attr, None)
            norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
            if norm(mine) != norm(theirs):
                raise ValueError(f"ShadowConfig.shadow_model: the Flux2 shadow in {folder!r} has {attr}={theirs!r}, "
                                 f"the base {mine!r}")
        for attr in ("num_attention_heads", "num_layers", "num_single_layers"):
            if not 1 <= int(getattr(shadow.config, attr)) <= int(getattr(base.config, attr)):
                raise ValueError(f"ShadowConfig.shadow_model: the Flux2 shadow's {attr} must be between 1 and the "
                                 f"base's {getattr(base.config, attr)}, got {getattr(shadow.config, attr)}")
        d = int(base.config.num_attention_heads) * int(base.config.attention_head_dim)
        sd = int(shadow.config.num_attention_heads) * int(shadow.config.attention_head_dim)
        if sd > d or int(sd * float(shadow.config.mlp_ratio)) > int(d * float(base.config.mlp_ratio)):
            raise ValueError(f"ShadowConfig.shadow_model: the Flux2 shadow in {folder!r} is wider than the base")
        return cls(shadow)

    def save_pretrained(self, folder: str) -> None:
        """Write the shadow as a ``Flux2Transformer2DModel`` folder that ``from_folder`` (and peft's loader) reads,
        the stems it shares with the base written as its own."""
        model = shallow_copy(self.model)
        model._modules = {k: v.shared_module if isinstance(v, SharedModule) else v for k, v in self.model._modules.items()}
        model.save_pretrained(folder)

    def freeze_stems(self) -> None:
        for name in EMBEDDERS:
            module = getattr(self.model, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    def unused_prefixes(self) -> tuple[str, ...]:
        """The submodules the seed never runs (trained and saved as in peft, reached by no gradient)."""
        return tuple(n for n, _ in self.model.named_children() if n != "single_transformer_blocks")

    def forward(self, hidden: Tensor, args: tuple = (), kwargs: dict[str, Any] | None = None) -> Tensor:
        """The reduced single-stream blocks on a wrapped block's input ``hidden`` and conditioning (the block's
        remaining positional ``args`` and keyword ``kwargs``)."""
        block = dict(kwargs or {})
        for name, value in zip(_BLOCK_ARGS, args):  # gradient checkpointing calls the blocks positionally
            block.setdefault(name, value)
        sd = self.hidden_size
        if hidden.size(-1) < sd:
            raise ValueError(f"ShadowPEFT: the Flux2 shadow got hidden size {hidden.size(-1)}, smaller than its {sd}")
        hidden = hidden[..., :sd]
        text = block.get("encoder_hidden_states")
        text = text[..., :sd] if text is not None else None
        mod = block.get("temb_mod")
        if mod is not None and mod.size(-1) != 3 * sd:
            d = mod.size(-1) // 3
            mod = torch.cat([mod[..., i * d:i * d + sd] for i in range(3)], dim=-1)
        for layer in self.model.single_transformer_blocks:
            hidden = layer(hidden_states=hidden, encoder_hidden_states=text, temb_mod=mod,
                           image_rotary_emb=block.get("image_rotary_emb"),
                           joint_attention_kwargs=block.get("joint_attention_kwargs"))
        return hidden
