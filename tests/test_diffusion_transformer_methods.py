"""LoRA, DiffFit and SVDiff on a diffusers transformer backbone: a tiny SD3Transformer2DModel (MMDiT) built from a
config. Each attaches where it should, starts at the base output, trains only its own tensors; DiffFit's
gamma sits on both streams' residual branches and merges / unmerges bit-exactly."""

from __future__ import annotations

import pytest
import torch

from peftkit import DiffFitConfig, LoraConfig, SVDiffConfig, get_peft_model, tiny_models

G = torch.Generator().manual_seed(1)
X, CTX, POOL = torch.randn(2, 4, 8, 8, generator=G), torch.randn(2, 5, 16, generator=G), torch.randn(2, 8, generator=G)
T = torch.tensor([10.0, 500.0])


def sd3_tiny() -> torch.nn.Module:
    """The tiny SD3 transformer of the contract suite's sd3 family (seed 0)."""
    torch.manual_seed(0)
    return tiny_models.sd3()


def run(model: torch.nn.Module) -> torch.Tensor:
    return model(hidden_states=X, encoder_hidden_states=CTX, pooled_projections=POOL, timestep=T).sample


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    model = sd3_tiny().eval()
    with torch.no_grad():
        return {k: v.clone() for k, v in model.state_dict().items()}, run(model)


# (config, trained tensor names, trainable parameter count)
CASES = {
    # r=4 on q/k/v/out of the image stream of 2 blocks (width 16): 2 * 4 * 4 * (16 + 16)
    "lora": (lambda: LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), ("lora_A", "lora_B"), 1_024),
    "difffit": (DiffFitConfig, ("bias_delta", "weight_delta", "difffit_gamma"), 1_040),
    # every Linear / Conv2d: one shift per singular value, min(d_out, d_in') each
    "svdiff": (SVDiffConfig, ("svdiff_delta",), 520),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_starts_at_base_and_trains_only_its_tensors(base, name):
    state, out0 = base
    make, kinds, count = CASES[name]
    model = get_peft_model(sd3_tiny(), make())
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model), out0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == count
    assert all(n.rsplit(".", 1)[-1] in kinds for n in trainable)
    run(model).pow(2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    grads = [p.grad for p in trainable.values()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    with torch.no_grad():
        assert (run(model) - out0).abs().max() > 1e-4
    base_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(base_state[k], v) for k, v in state.items())  # the base weights never moved


def test_difffit_gamma_sites_and_exact_merge_on_sd3(base):
    state, out0 = base
    model = get_peft_model(sd3_tiny(), DiffFitConfig())
    # the image stream's attention / FFN outputs, and the text stream's where the block has one (not the last)
    assert model.peft_config["default"].scale_modules == [
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.ff.net.2"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        adapted = run(model)
        model.merge_adapter()
        assert torch.allclose(run(model), adapted, atol=1e-5)
        model.unmerge_adapter()
        assert torch.equal(run(model), adapted)
        with model.disable_adapter():
            assert torch.equal(run(model), out0)
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(run(merged), adapted, atol=1e-5)
    assert set(merged.state_dict()) == set(state)
