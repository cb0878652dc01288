"""diffusers' IP-Adapter file from a peftkit IP-Adapter, and back.

``save_ip_adapter(model, folder)`` writes ``folder/ip_adapter.safetensors`` with the keys diffusers' ``load_ip_adapter``
reads: ``image_proj.{proj,norm}.{weight,bias}`` and ``ip_adapter.<k>.to_{k,v}_ip.weight``, ``k = 1, 3, 5, ...`` over
the UNet's cross-attention processors in ``attn_processors`` order (``functional.py``). So
``StableDiffusionPipeline.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors",
image_encoder_folder=None)``, or ``unet._load_ip_adapter_weights(state)``, gives the same outputs for the same image
embeddings. diffusers numbers every attention processor but the self-attentions (``attn1``) and builds 4 tokens
for such a file, so the export needs ``num_tokens`` 4 and every cross-attention targeted; it says so otherwise.
``load_ip_adapter_file(model, path)`` reads such a file (or diffusers' nested state dict) into a peftkit model.

On SD3's transformer the file is diffusers' SD3 IP-Adapter file (``sd3.py``): ``image_proj.<resampler key>`` and
``ip_adapter.<k>.<processor key>`` over every attention processor, read by ``StableDiffusion3Pipeline.load_ip_adapter(
folder, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)`` or
``transformer._load_ip_adapter_weights(state)``; the export needs ``resampler_depth`` 4 (the depth diffusers builds)
and every joint attention adapted. diffusers' loader starts its processors at scale 0.5: set the pipeline's
(``set_ip_adapter_scale``) to the adapter's ``scale`` for the same outputs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ...config import ConfigError
from ...io import atomic_write
from ...layers import adapter_layers
from . import functional as IF
from . import sd3
from .config import IPAdapterConfig
from .layer import IPAdapterAdapter, is_cross_attention
from .wrapper import IPAdapterLayer

WEIGHTS_NAME = "ip_adapter.safetensors"


def _ip_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, IPAdapterAdapter]]:
    configs = getattr(model, "peft_config", {})
    if not isinstance(configs.get(adapter_name), IPAdapterConfig):
        names = [n for n, c in configs.items() if isinstance(c, IPAdapterConfig)]
        raise ValueError(f"no IP-Adapter adapter {adapter_name!r} on this model (IP-Adapter adapters: {names})")
    return [(p, layer.adapters[adapter_name]) for p, layer in adapter_layers(model)
            if isinstance(layer, IPAdapterLayer) and adapter_name in layer.adapters]


def _unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _processor_paths(model: nn.Module) -> list[str]:
    """The paths diffusers gives an IP-Adapter processor: every diffusers Attention but the attn1 self-attentions,
    in module order (wrappers unwrapped)."""
    out = []
    for path, module in model.named_modules():
        path = path.replace(".base_layer", "")
        if type(module).__name__ == "Attention" and type(module).__module__.startswith("diffusers") \
                and not path.endswith("attn1") and path not in out:
            out.append(path)
    return out


def ip_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name`` of a peftkit model in diffusers' flat IP-Adapter layout (CPU copies)."""
    layers = _ip_layers(model, adapter_name)
    config = model.peft_config[adapter_name]
    if layers and layers[0][1].joint:
        return _sd3_state_dict(model, config, layers)
    if config.num_tokens != IF.DIFFUSERS_TOKENS:
        raise ConfigError(f"{type(config).__name__}.num_tokens: diffusers' IP-Adapter file has "
                          f"{IF.DIFFUSERS_TOKENS} image tokens (its loader assumes 4), got {config.num_tokens}; save "
                          "with save_pretrained (peftkit's file) instead")
    paths = [p for p, _ in layers]
    expected = _processor_paths(model)
    if paths != expected:
        missing = [p for p in expected if p not in paths]
        raise ValueError(f"diffusers' IP-Adapter file needs every cross-attention adapted (its loader numbers all of "
                         f"them); not adapted: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    proj = dict(layers[0][1].projection.named_parameters())
    pairs = [(a.processor.to_k_ip[0].weight, a.processor.to_v_ip[0].weight) for _, a in layers]
    return IF.diffusers_state_dict(proj, pairs)


def save_ip_adapter(model: nn.Module, folder: str, adapter_name: str = "default",
                    weight_name: str = WEIGHTS_NAME) -> str:
    """Write ``folder/weight_name`` (diffusers' IP-Adapter file, safetensors); returns its path."""
    state = ip_adapter_state_dict(model, adapter_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, weight_name)
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path


def load_ip_adapter_file(model: Any, source: str | dict[str, Any], adapter_name: str = "default") -> None:
    """Read diffusers' IP-Adapter file (a ``.safetensors`` path, or the state dict, flat or nested) into adapter
    ``adapter_name`` of ``model`` (a PeftModel); the adapter is added (``image_embed_dim`` and ``num_tokens`` from
    the file) when the model lacks it. Every key and shape is checked before anything changes."""
    state = load_file(source) if isinstance(source, str) else dict(source)
    joint = sd3.attention_processor_paths(model)
    if joint and all(sd3.is_joint_attention(_unwrapped(model.get_submodule(p))) for p in joint):
        return _load_sd3(model, state, adapter_name, joint)
    paths = _processor_paths(model)
    if not paths or not all(is_cross_attention(_unwrapped(model.get_submodule(p))) for p in paths):
        raise ValueError(f"load_ip_adapter_file: {type(model.get_base_model()).__name__} has attention processors that are not "
                         "cross-attentions; diffusers' IP-Adapter numbering cannot be placed")
    proj, pairs = IF.from_diffusers_state_dict(state, len(paths))
    c = pairs[0][0].shape[1]
    n = IF.tokens_per_image(proj["image_embeds.weight"], c)
    d = proj["image_embeds.weight"].shape[1]
    configs = model.peft_config
    if adapter_name not in configs:
        model.add_adapter(adapter_name, IPAdapterConfig(image_embed_dim=d, num_tokens=n))
    config = configs[adapter_name]
    if not isinstance(config, IPAdapterConfig) or (config.image_embed_dim, config.num_tokens) != (d, n):
        raise ValueError(f"load_ip_adapter_file: adapter {adapter_name!r} is not an IP-Adapter of image_embed_dim {d} "
                         f"and num_tokens {n} (the file's)")
    layers = _ip_layers(model, adapter_name)
    if [p for p, _ in layers] != paths:
        raise ValueError(f"load_ip_adapter_file: adapter {adapter_name!r} does not adapt every cross-attention "
                         f"{paths}, which the file numbers")
    dest = [(t, proj[name], f"image_proj.{name}") for name, t in layers[0][1].projection.named_parameters()]
    for (path, a), (k, v) in zip(layers, pairs):
        dest.append((a.processor.to_k_ip[0].weight, k, f"{path}.to_k_ip"))
        dest.append((a.processor.to_v_ip[0].weight, v, f"{path}.to_v_ip"))
    for t, src, name in dest:  # every shape first: nothing changes on a bad file
        if tuple(t.shape) != tuple(src.shape):
            raise ValueError(f"load_ip_adapter_file: {name}: file shape {tuple(src.shape)}, model {tuple(t.shape)}")
    with torch.no_grad():
        for t, src, _ in dest:
            t.copy_(src.to(t.dtype))


def _sd3_state_dict(model: nn.Module, config: IPAdapterConfig, layers: list[tuple[str, IPAdapterAdapter]]
                    ) -> dict[str, Tensor]:
    """diffusers' SD3 IP-Adapter file of an adapter on SD3's joint attentions (``sd3.py``)."""
    if config.resampler_depth != sd3.DIFFUSERS_DEPTH:
        raise ConfigError(f"{type(config).__name__}.resampler_depth: diffusers' SD3 IP-Adapter loader builds a resampler "
                          f"of depth {sd3.DIFFUSERS_DEPTH}, got {config.resampler_depth}; save with save_pretrained "
                          "(peftkit's file) instead")
    expected = sd3.attention_processor_paths(model)
    missing = [p for p in expected if p not in {q for q, _ in layers}]
    if missing:
        raise ValueError(f"diffusers' SD3 IP-Adapter file needs every attention processor adapted (its loader numbers "
                         f"all of them); not adapted: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    proj = dict(layers[0][1].projection.named_parameters())
    return sd3.file_state_dict(proj, [dict(a.processor.named_parameters()) for _, a in layers])


def _load_sd3(model: Any, state: dict[str, Any], adapter_name: str, paths: list[str]) -> None:
    """``load_ip_adapter_file`` on SD3's transformer: every key and shape checked before any copy; an adapter this
    call added is removed again when the file does not fit."""
    proj, processors = sd3.from_file_state_dict(state, len(paths))
    fields = sd3.file_config(proj)
    configs = model.peft_config
    added = adapter_name not in configs
    if added:
        model.add_adapter(adapter_name, IPAdapterConfig(**fields))
    try:
        config = configs[adapter_name]
        if not isinstance(config, IPAdapterConfig) or any(getattr(config, k) != v for k, v in fields.items()):
            raise ValueError(f"load_ip_adapter_file: adapter {adapter_name!r} is not an IP-Adapter of {fields} (the "
                             "file's)")
        layers = _ip_layers(model, adapter_name)
        if [p for p, _ in layers] != paths:
            raise ValueError(f"load_ip_adapter_file: adapter {adapter_name!r} does not adapt every attention processor "
                             f"{paths}, which the file numbers")
        pairs = [(dict(layers[0][1].projection.named_parameters()), proj, "image_proj")]
        pairs += [(dict(a.processor.named_parameters()), processors[k], f"ip_adapter.{k}")
                  for k, (_, a) in enumerate(layers)]
        dest = []
        for params, file, where in pairs:
            odd = sorted(set(file) ^ set(params))
            if odd:
                raise ValueError(f"load_ip_adapter_file: {where}.{odd[0]}: {'not in the model' if odd[0] in file else 'missing'}"
                                 f"; expected the keys {sorted(params)}")
            for name, t in params.items():
                if tuple(t.shape) != tuple(file[name].shape):
                    raise ValueError(f"load_ip_adapter_file: {where}.{name}: file shape {tuple(file[name].shape)}, "
                                     f"model {tuple(t.shape)}")
                dest.append((t, file[name]))
    except ValueError:
        if added:
            model.delete_adapter(adapter_name)
        raise
    with torch.no_grad():
        for t, src in dest:
            t.copy_(src.to(t.dtype))
