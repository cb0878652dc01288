"""VPT: the math against a hand-written reference forward, exact counts (ViT-B closed form), init, targeting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError
from peftkit.methods.vision.vpt import VPTConfig
from peftkit.targeting import NotApplicableError

from ..families import FAMILY


def prompts(model) -> dict[str, torch.Tensor]:
    """Layer path -> prompt tensor of the default adapter."""
    return {path: a.vpt_prompt.detach() for path, a in model.base_model.adapters("default")}


def reference_vit_logits(base, pixel_values, table, p, deep):
    """VPT by hand: insert after [CLS], replace the prompt slice before each later block."""
    vit = base.vit
    h = vit.embeddings(pixel_values)
    B = h.shape[0]
    h = torch.cat([h[:, :1], table["vit.embeddings"].expand(B, -1, -1), h[:, 1:]], dim=1)
    for i, layer in enumerate(vit.layers):
        if deep and i > 0:
            h = torch.cat([h[:, :1], table[f"vit.layers.{i - 1}"].expand(B, -1, -1), h[:, 1 + p:]], dim=1)
        h = layer(h)
    return base.classifier(vit.layernorm(h)[:, 0])


@pytest.mark.parametrize("deep", [False, True])
def test_vit_matches_reference_forward(deep):
    family = FAMILY["vit"]
    p = 4
    model = get_peft_model(family.model(), VPTConfig(num_virtual_tokens=p, deep=deep)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(pixel_values=x).logits
        want = reference_vit_logits(family.model(), x, prompts(model), p, deep)
        base = family.model()(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)
    # the sequence grows by p tokens; [CLS] stays at 0
    hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (3, 1 + p + 16, 32)
    # targets: the embeddings, plus blocks 0..L-2 when deep
    paths = sorted(prompts(model))
    assert paths == (["vit.embeddings", "vit.layers.0"] if deep else ["vit.embeddings"])


def test_deep_prompt_outputs_are_discarded():
    """VPT-deep: the prompt slice entering block 1 is exactly P_1; block 0's prompt outputs are discarded."""
    family = FAMILY["vit"]
    model = get_peft_model(family.model(), VPTConfig(num_virtual_tokens=2, deep=True)).eval()
    seen = {}
    block1 = model.base_model.model.vit.layers[1]
    block1.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0].detach().clone()))
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32))
    p1 = prompts(model)["vit.layers.0"]
    torch.testing.assert_close(seen["in"][:, 1:3], p1.expand(2, -1, -1), atol=0, rtol=0)


def test_vit_base_closed_form_counts():
    """VPT-deep on ViT-B (ViTConfig() defaults: L=12, d=768, patch 16), p=50: 12 x 50 x 768 = 460,800."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit_b = ViTModel(ViTConfig())
    deep = get_peft_model(vit_b, VPTConfig(num_virtual_tokens=50, deep=True))
    assert deep.get_nb_trainable_parameters()[0] == 460_800 == 12 * 50 * 768
    # Xavier-uniform bound of the paper's code: sqrt(6 / (3 * 16^2 + 768))
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 768))
    allp = torch.cat([a.vpt_prompt.reshape(-1) for _, a in deep.base_model.adapters()])
    assert allp.abs().max() <= bound and allp.abs().max() > 0.99 * bound
    cfg = deep.peft_config["default"]
    assert (cfg.token_dim, cfg.patch_fan_in, cfg.num_layers) == (768, 768, 12)
    shallow = get_peft_model(deep.unload(), VPTConfig(num_virtual_tokens=50))
    assert shallow.get_nb_trainable_parameters()[0] == 38_400 == 50 * 768


def test_clip_vision_tower_only():
    family = FAMILY["clip"]
    model = get_peft_model(family.model(), VPTConfig(num_virtual_tokens=3, deep=True)).eval()
    assert sorted(prompts(model)) == ["vision_model.embeddings", "vision_model.encoder.layers.0"]
    inputs = family.inputs()
    with torch.no_grad():
        out = model(**inputs)
        base = family.model()(**inputs)
    assert out.vision_model_output.last_hidden_state.shape[1] == 1 + 3 + 16
    torch.testing.assert_close(out.text_embeds, base.text_embeds, atol=0, rtol=0)  # text tower untouched
    assert not torch.allclose(out.image_embeds, base.image_embeds, atol=1e-4)
    assert model.get_nb_trainable_parameters()[0] == 2 * 3 * 32


class TinyViT(nn.Module):
    """A ViT-shaped module without a transformers config: reached through embeddings_module / layers_module."""

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 16, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)

    def __init__(self) -> None:
        super().__init__()
        self.stem = self.Embed()
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                     for _ in range(3)])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h[:, 0])


def test_custom_vit_shaped_module():
    torch.manual_seed(0)
    model = get_peft_model(TinyViT(), VPTConfig(num_virtual_tokens=2, deep=True, embeddings_module="stem",
                                                layers_module="blocks")).eval()
    table = prompts(model)
    assert sorted(table) == ["blocks.0", "blocks.1", "stem"]
    assert model.get_nb_trainable_parameters()[0] == 3 * 2 * 16
    base = model.get_base_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), model.disable_adapter():
        h = base.stem(x)
    h = torch.cat([h[:, :1], table["stem"].expand(2, -1, -1), h[:, 1:]], dim=1)
    with torch.no_grad(), model.disable_adapter():
        for i, blk in enumerate(base.blocks):
            if i:
                h = torch.cat([h[:, :1], table[f"blocks.{i - 1}"].expand(2, -1, -1), h[:, 3:]], dim=1)
            h = blk(h)
        want = base.head(h[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_dropout_train_only_and_training_lowers_loss():
    family = FAMILY["vit"]
    # the paper trains the prompts and the linear head
    model = get_peft_model(family.model(), VPTConfig(num_virtual_tokens=4, deep=True, prompt_dropout=0.5,
                                                     modules_to_save=["classifier"]))
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, model(pixel_values=x).logits)
    model.train()
    torch.manual_seed(0)
    a = model(pixel_values=x).logits
    b = model(pixel_values=x).logits
    assert not torch.allclose(a, b)
    model.peft_config["default"].prompt_dropout = 0.0
    for _, ad in model.base_model.adapters():
        ad.dropout.p = 0.0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * 32 + (32 * 3 + 3)


def test_save_load_keeps_resolved_fields(tmp_path):
    family = FAMILY["vit"]
    model = get_peft_model(family.model(), VPTConfig(num_virtual_tokens=3, deep=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(family.model(), tmp_path)
    cfg = loaded.peft_config["default"]
    assert (cfg.embeddings_module, cfg.layers_module, cfg.token_dim, cfg.num_layers) == (
        "vit.embeddings", "vit.layers", 32, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, want, atol=0, rtol=0)


def test_not_applicable_and_config_errors():
    with pytest.raises(NotApplicableError, match="vpt: not applicable to BertForSequenceClassification"):
        get_peft_model(FAMILY["bert"].model(), VPTConfig(num_virtual_tokens=2))
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                        num_attention_heads=2))
    with pytest.raises(NotApplicableError, match="no patch projection"):
        get_peft_model(text, VPTConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        VPTConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prompt_dropout"):
        VPTConfig(prompt_dropout=1.5)


def test_clip_vision_model_alone():
    """CLIPVisionModel (model_type clip_vision_model) has ``embeddings`` / ``encoder.layers`` at its root."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                              num_hidden_layers=3, num_attention_heads=4))
    model = get_peft_model(vision, VPTConfig(num_virtual_tokens=5, deep=True)).eval()
    assert sorted(prompts(model)) == ["embeddings", "encoder.layers.0", "encoder.layers.1"]
    assert model.get_nb_trainable_parameters()[0] == 3 * 5 * 32
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32))
    assert out.last_hidden_state.shape == (2, 1 + 5 + 16, 32)


def test_mixed_batches_are_refused_with_a_clear_error():
    family = FAMILY["vit"]
    model = get_peft_model(family.model(), VPTConfig(num_virtual_tokens=3, deep=True)).eval()
    with pytest.raises(ValueError, match=r"adapter_names: adapter\(s\) \['default'\] \(VPTPrompt\) change the shape"):
        model(pixel_values=torch.randn(2, 3, 32, 32), adapter_names=["default", "__base__"])
    plain = model(pixel_values=torch.randn(2, 3, 32, 32)).logits  # the failed call left nothing behind
    assert plain.shape == (2, 3)
