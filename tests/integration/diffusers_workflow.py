"""diffusers' PEFT integration with peftkit configs: add_adapter, set_adapters (weights), disable,
save_lora_adapter / load_lora_adapter, a pipeline's save_lora_weights / load_lora_weights, and
inject_adapter_in_model + get_peft_model_state_dict on a bare UNet."""

from __future__ import annotations

from peftkit import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from tests.integration.common import setup, write

X = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([3])
ENC = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1))
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()


class UnetPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """A pipeline holding only a UNet: enough for the LoRA loader mixin of Stable Diffusion."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder)


@torch.no_grad()
def run(model: UNet2DConditionModel) -> torch.Tensor:
    return model(X, T, ENC).sample


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> None:
    out = setup()
    u = unet()
    base = run(u)
    u.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False), adapter_name="a")
    full = run(u)
    u.set_adapters(["a"], weights=[0.5])
    half = run(u)
    # weight 0.5 == the same adapter with lora_B halved
    ref = unet()
    ref.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False), adapter_name="a")
    ref.load_state_dict(u.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    half_ref = run(ref)
    u.set_adapters("a", 1.0)
    restored = run(u)
    u.disable_adapters()
    disabled = run(u)
    u.enable_adapters()
    state = get_peft_model_state_dict(u, adapter_name="a")
    u.save_lora_adapter(f"{out}/unet_lora", adapter_name="a")
    u2 = unet()
    u2.load_lora_adapter(f"{out}/unet_lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="b",
                         prefix=None)
    reloaded = run(u2)

    # hotswap: another adapter's weights (other alpha) into "b" in place, through peft.utils.hotswap
    other = unet()
    torch.manual_seed(5)
    other.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="a")
    other.save_lora_adapter(f"{out}/other_lora", adapter_name="a")
    u2.load_lora_adapter(f"{out}/other_lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="b",
                         prefix=None, hotswap=True)
    hotswapped = run(u2)
    other_out = run(other)

    StableDiffusionPipeline.save_lora_weights(f"{out}/pipe_lora", unet_lora_layers=state)
    pipe = UnetPipeline(unet())
    pipe.load_lora_weights(f"{out}/pipe_lora", adapter_name="c")
    pipe_out = run(pipe.unet)

    from safetensors.torch import save_file

    save_file({"full": full.contiguous(), "base": base.contiguous()}, f"{out}/outputs.safetensors")
    bare = unet()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), bare, adapter_name="x")
    write(out, {
        "acts": gap(full, base), "half_vs_ref": gap(half, half_ref), "half_vs_full": gap(half, full),
        "restored": gap(restored, full), "disabled": gap(disabled, base), "reloaded": gap(reloaded, full),
        "pipeline": gap(pipe_out, full), "hotswap": gap(hotswapped, other_out),
        "hotswap_changed": gap(hotswapped, full), "pipe_adapters": sorted(pipe.unet.peft_config),
        "config_type": type(u2.peft_config["b"]).__module__,
        "keys": sorted(state), "bare_keys": sorted(get_peft_model_state_dict(bare, adapter_name="x")),
        "bare_config": sorted(bare.peft_config)})


if __name__ == "__main__":
    main()
