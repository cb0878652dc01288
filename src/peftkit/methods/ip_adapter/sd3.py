"""IP-Adapter on SD3's MMDiT (diffusers' ``SD3Transformer2DModel``), as diffusers runs the SD3.5 IP-Adapter
(InstantX): the adapter's part for a transformer backbone.

Each joint attention (a diffusers ``Attention`` running ``JointAttnProcessor2_0``: every block's ``attn``, and the
``attn2`` of SD3.5's dual-attention blocks) runs diffusers' ``SD3IPAdapterJointAttnProcessor2_0`` in its place while
an image prompt comes with the call. The text stream is the base's; the image stream gets an image branch before
``to_out``:

    Z = A + lambda softmax(norm_q(Q) [norm_k(K); norm_ip_k(c' W'_k)]^T / sqrt(h)) [V; c' W'_v],
    c' = AdaLN(c, temb) = LayerNorm(c) (1 + scale(temb)) + shift(temb)

(A: the joint attention's image-stream output; Q, K, V: the image stream's own projections, before the layer's
q / k norms; h: the head width). The image tokens ``c`` (B, num_tokens, d) and ``temb`` (B, resampler_dim) come from
one ``IPAdapterTimeImageProjection`` per adapter, a perceiver resampler over the image features (B, L, D)
conditioned on the call's timestep, computed once per call: what ``SD3Transformer2DModel.forward`` does with
``self.image_proj(ip_adapter_image_embeds, timestep)`` before its blocks.

Trained, per joint attention: the processor's ``norm_ip.linear`` (W -> 2 d), ``to_k_ip`` / ``to_v_ip`` (d -> d, from
the layer's ``to_k`` / ``to_v`` with ``init_weights``) and its three RMSNorm weights, ``2 W d + 2 d + 2 d^2 + 3 h``;
once per adapter, the resampler (``projection_param_count``). W: ``resampler_dim``; d: the attention width.

The call, as diffusers': ``model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
timestep=t, joint_attention_kwargs={"ip_adapter_image_embeds": e})`` (or ``ip_adapter_image_embeds=e``) with ``e``
(B, L, D). One IP-Adapter per call: diffusers' SD3 processor has one image branch.

diffusers' file (``SD3IPAdapterMixin.load_ip_adapter`` / ``SD3Transformer2DModel._load_ip_adapter_weights``):
``image_proj.<resampler key>`` in the original (InstantX) names, which diffusers' loader renames
(``layers.<i>.0.to_q`` for ``layers.<i>.attn.to_q`` ...), and ``ip_adapter.<k>.<processor key>`` with ``k``
numbering every attention processor in ``attn_processors`` order. diffusers' loader builds a resampler of depth 4
with 64-wide heads, and its processors with scale 0.5 (``set_ip_adapter_scale`` sets the pipeline's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import functional as IF

HEAD_DIM = 64  # the resampler's head width (diffusers' loader infers heads as to_q rows // 64)
DIFFUSERS_DEPTH = 4  # the resampler depth diffusers' loader builds
# the resampler's parameter names in diffusers, and in the original file (diffusers'
# ``_convert_ip_adapter_image_proj_to_diffusers`` maps the second to the first)
ORIGINAL_NAMES = (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_kv", "0.to_kv"),
                  ("attn.to_out.0", "0.to_out"), ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"), ("ff.net.2", "1.3"),
                  ("adaln_proj", "2.1"))


def _diffusers_attention(module: nn.Module) -> bool:
    return type(module).__name__ == "Attention" and type(module).__module__.startswith("diffusers")


def _processor_name(module: nn.Module) -> str:
    return type(getattr(module, "processor", None)).__name__


def is_joint_attention(module: nn.Module) -> bool:
    """SD3's joint attention: a diffusers ``Attention`` with ``JointAttnProcessor2_0`` and to_k / to_v Linears."""
    return (_diffusers_attention(module) and _processor_name(module) == "JointAttnProcessor2_0"
            and isinstance(getattr(module, "to_k", None), nn.Linear) and isinstance(getattr(module, "to_v", None), nn.Linear))


def joint_attentions(named: list[tuple[str, nn.Module]]) -> list[str]:
    """Paths of the model's joint attentions (empty: not an SD3-style transformer). ValueError when diffusers' own
    SD3 IP-Adapter is loaded on the base (its processors are SD3IPAdapterJointAttnProcessor2_0)."""
    loaded = [p for p, m in named if p and _diffusers_attention(m)
              and _processor_name(m) == "SD3IPAdapterJointAttnProcessor2_0"]
    if loaded:
        raise ValueError(f"IP-Adapter on {loaded[0]!r}: its attention processor is SD3IPAdapterJointAttnProcessor2_0 "
                         "(diffusers' own IP-Adapter is loaded on the base); expected JointAttnProcessor2_0: unload it "
                         "first (pipeline.unload_ip_adapter())")
    return [p for p, m in named if p and is_joint_attention(m)]


def attention_processor_paths(model: nn.Module) -> list[str]:
    """Every attention processor's module path in ``model``, as diffusers numbers them in its IP-Adapter file
    (``attn_processors`` order; adapter wrappers unwrapped, adapters' own modules left out)."""
    out: list[str] = []
    for path, module in model.named_modules():
        if ".adapters." in f".{path}." or not _diffusers_attention(module):
            continue
        path = path.replace(".base_layer", "")
        if path not in out:
            out.append(path)
    return out


def _kv(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    return tuple(getattr(getattr(module, n), "base_layer", getattr(module, n)) for n in ("to_k", "to_v"))


def widths(base: nn.Module) -> tuple[int, int]:
    """(d, h): the joint attention's width (to_k's output) and its head width."""
    d = _kv(base)[0].out_features
    return d, d // base.heads


def processor_param_count(base: nn.Module, config: Any) -> int:
    """norm_ip.linear (W -> 2 d), to_k_ip / to_v_ip (d -> d), norm_q / norm_k / norm_ip_k (h each)."""
    d, h = widths(base)
    return 2 * config.resampler_dim * d + 2 * d + 2 * d * d + 3 * h


def projection_param_count(d: int, config: Any) -> int:
    """IPAdapterTimeImageProjection of output width ``d``: latents N W, proj_in D W + W, proj_out W d + d, norm_out 2 d,
    time_embedding t W + W + W^2 + W, and per block 4 W I (to_q, to_kv, to_out; I = 64 heads) + 8 W^2 (FFN) +
    4 W^2 + 4 W (adaln_proj) + 6 W (three LayerNorms)."""
    w, i = config.resampler_dim, HEAD_DIM * config.resampler_heads
    block = 4 * w * i + 12 * w * w + 10 * w
    return (config.num_tokens * w + config.image_embed_dim * w + w + w * d + d + 2 * d
            + config.timestep_in_dim * w + w + w * w + w + config.resampler_depth * block)


def build_processor(base: nn.Module, config: Any, init: bool) -> nn.Module:
    """diffusers' SD3 IP-Adapter processor for joint attention ``base``, on its device and dtype; with ``init`` and
    ``init_weights``, to_k_ip / to_v_ip copy the layer's to_k / to_v weights (the paper's initialisation)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    to_k, to_v = _kv(base)
    d, h = widths(base)
    processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=d, ip_hidden_states_dim=d, head_dim=h,
                                                  timesteps_emb_dim=config.resampler_dim, scale=float(config.scale))
    processor.to(device=to_k.weight.device, dtype=to_k.weight.dtype)
    if init and config.init_weights:
        with torch.no_grad():
            processor.to_k_ip.weight.copy_(to_k.weight)
            processor.to_v_ip.weight.copy_(to_v.weight)
    return processor


def build_projection(d: int, config: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A new ``IPAdapterTimeImageProjection`` making ``num_tokens`` tokens of width ``d`` (diffusers' initialisation)."""
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    proj = IPAdapterTimeImageProjection(embed_dim=config.image_embed_dim, output_dim=d, hidden_dim=config.resampler_dim,
                                        depth=config.resampler_depth, dim_head=HEAD_DIM, heads=config.resampler_heads,
                                        num_queries=config.num_tokens, timestep_in_dim=config.timestep_in_dim)
    return proj.to(device=device, dtype=dtype)


def pop_joint_embeds(model: Any, kwargs: dict[str, Any]) -> Any:
    """diffusers' ``joint_attention_kwargs["ip_adapter_image_embeds"]``, taken out of the call (the caller's dict is
    left as it was: the call gets a copy without it, or None when nothing else is in it), unless the base transformer
    has an ``image_proj`` of its own (diffusers' IP-Adapter loaded), which reads it then."""
    joint = kwargs.get("joint_attention_kwargs")
    if not isinstance(joint, dict) or IF.ARG not in joint:
        return None
    if getattr(model.get_base_model(), "image_proj", None) is not None:
        return None
    rest = {k: v for k, v in joint.items() if k != IF.ARG}
    kwargs["joint_attention_kwargs"] = rest or None
    return joint[IF.ARG]


def check_call(names: list[str], timestep: Any) -> None:
    """One IP-Adapter with an image prompt per call, and a timestep: ValueError naming what is wrong."""
    if len(names) > 1:
        raise ValueError(f"{IF.ARG}: SD3's IP-Adapter processor (SD3IPAdapterJointAttnProcessor2_0) has one image "
                         f"branch, and the IP-Adapter adapters {names} all got an image prompt: give it to one (a dict "
                         "by adapter name) or activate one")
    if not isinstance(timestep, Tensor):
        raise ValueError("timestep: IP-Adapter on SD3 conditions its image projection (IPAdapterTimeImageProjection) "
                         f"on the call's timestep; expected a tensor (batch,), got {type(timestep).__name__}")


# -- diffusers' file ------------------------------------------------------------------------------------------
def _rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``layers.<i>.<a>.<rest>`` -> ``layers.<i>.<b>.<rest>`` for the first pair (a, b) whose ``a`` matches."""
    if not name.startswith("layers."):
        return name
    _, idx, rest = name.split(".", 2)
    for old, new in pairs:
        if rest.startswith(old + "."):
            return f"layers.{idx}.{new}{rest[len(old):]}"
    return name


def _original(name: str) -> str:
    """A resampler parameter's name in the original file (``layers.0.attn.to_q.weight`` -> ``layers.0.0.to_q.weight``)."""
    return _rename(name, ORIGINAL_NAMES)


def _diffusers_name(key: str) -> str:
    """The inverse of ``_original``: diffusers' renaming of an original file key (names already diffusers' stay)."""
    return _rename(key, tuple((theirs, ours) for ours, theirs in ORIGINAL_NAMES))


def file_state_dict(proj: dict[str, Tensor], processors: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """diffusers' flat SD3 IP-Adapter file: the resampler's parameters (diffusers names) and each attention
    processor's, in ``attn_processors`` order -> ``image_proj.*`` / ``ip_adapter.<k>.*`` (CPU copies)."""
    out = {f"image_proj.{_original(k)}": v for k, v in proj.items()}
    for k, state in enumerate(processors):
        out.update({f"ip_adapter.{k}.{name}": v for name, v in state.items()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_file_state_dict(state: dict[str, Any], n_layers: int) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """The inverse of ``file_state_dict``; takes the flat form or diffusers' nested one (``{"image_proj": ...,
    "ip_adapter": ...}``), the resampler in original or diffusers names. ValueError naming what is missing."""
    if isinstance(state.get("image_proj"), dict):
        flat = {f"image_proj.{k}": v for k, v in state["image_proj"].items()}
        flat.update({f"ip_adapter.{k}": v for k, v in state.get("ip_adapter", {}).items()})
        state = flat
    proj = {_diffusers_name(k[len("image_proj."):]): v for k, v in state.items() if k.startswith("image_proj.")}
    for need in ("latents", "proj_in.weight", "time_embedding.linear_1.weight", "layers.0.attn.to_q.weight"):
        if need not in proj:
            raise ValueError(f"SD3 IP-Adapter file: missing 'image_proj.{need}'; expected an IPAdapterTimeImageProjection")
    processors: list[dict[str, Tensor]] = [{} for _ in range(n_layers)]
    for key, value in state.items():
        if key.startswith("ip_adapter."):
            _, k, name = key.split(".", 2)
            if not k.isdigit() or int(k) >= n_layers:
                raise ValueError(f"SD3 IP-Adapter file: {key!r} is beyond the model's {n_layers} attention processors")
            processors[int(k)][name] = value
    empty = [k for k, p in enumerate(processors) if not p]
    if empty:
        raise ValueError(f"SD3 IP-Adapter file: no 'ip_adapter.{empty[0]}.*' tensors; the model has {n_layers} "
                         "attention processors, which the file numbers")
    return proj, processors


def file_config(proj: dict[str, Tensor]) -> dict[str, int]:
    """The ``IPAdapterConfig`` fields a resampler's tensors (diffusers names) fix."""
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    return {"image_embed_dim": proj["proj_in.weight"].shape[1], "num_tokens": proj["latents"].shape[1],
            "resampler_dim": proj["proj_in.weight"].shape[0], "resampler_depth": depth,
            "resampler_heads": proj["layers.0.attn.to_q.weight"].shape[0] // HEAD_DIM,
            "timestep_in_dim": proj["time_embedding.linear_1.weight"].shape[1]}
