"""IP-Adapter's pure functions: the image prompt's checked layout, and diffusers' file layout.

The image prompt of one adapter is ``(B, N, D)``: ``B`` batch rows, ``N`` images per row (their tokens are
concatenated, as diffusers' ``MultiIPAdapterImageProjection`` does), ``D`` = ``image_embed_dim``; ``(B, D)`` is one
image per row. diffusers' file (``load_ip_adapter`` / ``UNet2DConditionModel._load_ip_adapter_weights``) holds
``image_proj.{proj,norm}.{weight,bias}`` (the ``ImageProjection``'s ``image_embeds`` Linear is saved as ``proj``)
and ``ip_adapter.<k>.to_{k,v}_ip.weight`` with ``k = 1, 3, 5, ...`` over the UNet's cross-attention processors in
``attn_processors`` order (the original IP-Adapter counts every attention processor, self-attention even, cross odd).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

ARG = "ip_adapter_image_embeds"
# diffusers' ImageProjection parameter -> its name in the IP-Adapter file (``_convert_ip_adapter_image_proj``)
PROJ_FILE_KEYS = {"image_embeds.weight": "proj.weight", "image_embeds.bias": "proj.bias",
                  "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
DIFFUSERS_TOKENS = 4  # the token count diffusers' loader assumes for an ``ImageProjection`` file


def check_image_embeds(embeds: Any, dim: int, rows: int | None, who: str, middle: str = "images") -> Tensor:
    """``embeds`` as ``(B, N, D)``, after checking it is a float tensor ``(B, D)`` or ``(B, N, D)`` with ``D == dim``
    and ``B == rows`` (when known); ValueError naming ``ip_adapter_image_embeds`` and the expected shape otherwise.
    ``middle`` names N in the message (SD3's image prompt is ``tokens`` of one image's features)."""
    want = f"a float tensor (batch, {dim}) or (batch, {middle}, {dim})" + (f" with batch = {rows}" if rows else "")
    if not isinstance(embeds, Tensor) or not embeds.is_floating_point():
        got = f"a {embeds.dtype} tensor" if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(f"{ARG}: {who} expects {want}, got {got}")
    if embeds.dim() not in (2, 3) or embeds.shape[-1] != dim or embeds.shape[0] == 0 or (
            embeds.dim() == 3 and embeds.shape[1] == 0):
        raise ValueError(f"{ARG}: {who} expects {want}, got shape {tuple(embeds.shape)}")
    if rows is not None and embeds.shape[0] != rows:
        raise ValueError(f"{ARG}: {who} expects {want} (one image prompt per batch row), got shape "
                         f"{tuple(embeds.shape)}")
    return embeds if embeds.dim() == 3 else embeds.unsqueeze(1)


def per_adapter(embeds: Any, names: list[str]) -> dict[str, Any]:
    """Which image prompt goes to which adapter: one tensor for every adapter, a list / tuple in ``names``' order
    (diffusers' one-entry-per-IP-Adapter list), or a dict by adapter name."""
    if isinstance(embeds, dict):
        unknown = sorted(set(embeds) - set(names))
        if unknown:
            raise ValueError(f"{ARG}: {unknown} are not active IP-Adapter adapters (active: {names})")
        return {n: embeds[n] for n in names if embeds.get(n) is not None}
    if isinstance(embeds, (list, tuple)):
        if len(embeds) != len(names):
            raise ValueError(f"{ARG}: expected one image prompt per active IP-Adapter adapter ({len(names)}: "
                             f"{names}), got a list of {len(embeds)}")
        return {n: e for n, e in zip(names, embeds) if e is not None}
    return {n: embeds for n in names}


def diffusers_state_dict(proj: dict[str, Tensor], layers: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """diffusers' flat IP-Adapter file: ``proj`` (ImageProjection parameter -> tensor) and ``layers`` (to_k_ip,
    to_v_ip of each cross-attention processor, in ``attn_processors`` order) -> ``image_proj.*`` / ``ip_adapter.*``."""
    out = {f"image_proj.{PROJ_FILE_KEYS[k]}": v for k, v in proj.items()}
    for i, (k, v) in enumerate(layers):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = k
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = v
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_diffusers_state_dict(state: dict[str, Any], n_layers: int) -> tuple[dict[str, Tensor],
                                                                             list[tuple[Tensor, Tensor]]]:
    """The inverse of ``diffusers_state_dict``; takes the flat form or diffusers' nested one (``{"image_proj": ...,
    "ip_adapter": ...}``). ValueError naming the missing key when the file is not a plain IP-Adapter of
    ``n_layers`` cross-attention layers."""
    if "image_proj" in state and isinstance(state["image_proj"], dict):
        flat = {f"image_proj.{k}": v for k, v in state["image_proj"].items()}
        flat.update({f"ip_adapter.{k}": v for k, v in state.get("ip_adapter", {}).items()})
        state = flat
    back = {v: k for k, v in PROJ_FILE_KEYS.items()}
    proj = {}
    for file_key, name in back.items():
        key = f"image_proj.{file_key}"
        if key not in state:
            raise ValueError(f"IP-Adapter file: missing {key!r}; expected a plain IP-Adapter (ImageProjection: "
                             f"{sorted('image_proj.' + k for k in back)})")
        proj[name] = state[key]
    layers = []
    for i in range(n_layers):
        pair = tuple(state.get(f"ip_adapter.{2 * i + 1}.to_{m}_ip.weight") for m in "kv")
        if any(t is None for t in pair):
            raise ValueError(f"IP-Adapter file: missing 'ip_adapter.{2 * i + 1}.to_k_ip.weight' / to_v_ip; the model "
                             f"has {n_layers} cross-attention layers")
        layers.append(pair)
    extra = sorted(k for k in state if k.startswith("ip_adapter.") and int(k.split(".")[1]) > 2 * n_layers - 1)
    if extra:
        raise ValueError(f"IP-Adapter file: {extra[0]!r} is beyond the model's {n_layers} cross-attention layers")
    return proj, layers


def tokens_per_image(proj_weight: Tensor, cross_attention_dim: int) -> int:
    """N of an ImageProjection weight (N * cross_attention_dim, D)."""
    rows = proj_weight.shape[0]
    if rows % cross_attention_dim:
        raise ValueError(f"IP-Adapter file: image_proj.proj.weight has {rows} rows, not a multiple of the "
                         f"cross-attention width {cross_attention_dim}")
    return rows // cross_attention_dim
