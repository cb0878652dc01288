"""CLIP-Adapter on a tiny CLIP: the residual blend formula, text features, counts, few-shot training, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError
from peftkit.methods.vision import classify
from peftkit.methods.vision.clip_adapter import ClipAdapterConfig
from peftkit.targeting import NotApplicableError

from ..families import FAMILY
from .test_vision_coop import CLASSES, few_shot_loss_drops, images, tiny_clip, tokenizer


def adapters(model):
    return dict(model.base_model.adapters("default"))


def blend(adapter, f, alpha):
    """f' = alpha * ReLU(W2 ReLU(W1 f)) + (1 - alpha) * f."""
    a = torch.relu(torch.relu(f @ adapter.clip_adapter_down.t()) @ adapter.clip_adapter_up.t())
    return alpha * a + (1 - alpha) * f


@pytest.mark.parametrize("text", [False, True])
def test_features_follow_the_formula(text):
    model = get_peft_model(tiny_clip(), ClipAdapterConfig(text=text)).eval()
    found = adapters(model)
    assert sorted(found) == (["text_projection", "visual_projection"] if text else ["visual_projection"])
    d, hidden = 32, 8
    assert found["visual_projection"].clip_adapter_down.shape == (hidden, d)
    assert model.get_nb_trainable_parameters()[0] == (2 if text else 1) * 2 * d * hidden
    x, ids = images(3), torch.tensor([[0, 3, 4, 7, 1], [0, 3, 4, 8, 1]])
    clip = tiny_clip()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=x)
        ref = clip(input_ids=ids, pixel_values=x)
        f = clip.get_image_features(pixel_values=x).pooler_output
        g = clip.get_text_features(input_ids=ids).pooler_output
        f2 = blend(found["visual_projection"], f, 0.2)
        g2 = blend(found["text_projection"], g, 0.2) if text else g
        torch.testing.assert_close(out.image_embeds, F.normalize(f2, dim=-1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.text_embeds, F.normalize(g2, dim=-1), atol=1e-6, rtol=1e-5)
        want = clip.logit_scale.exp() * F.normalize(f2, dim=-1) @ F.normalize(g2, dim=-1).t()
        torch.testing.assert_close(out.logits_per_image, want, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, pixel_values=x).logits_per_image, ref.logits_per_image,
                                       atol=0, rtol=0)


def test_alpha_extremes():
    x = images(2)
    clip = tiny_clip()
    with torch.no_grad():
        f = clip.get_image_features(pixel_values=x).pooler_output
        zero = get_peft_model(tiny_clip(), ClipAdapterConfig(alpha=0.0)).eval()
        torch.testing.assert_close(zero.get_image_features(pixel_values=x).pooler_output, f, atol=0, rtol=0)
        one = get_peft_model(tiny_clip(), ClipAdapterConfig(alpha=1.0)).eval()
        a = adapters(one)["visual_projection"]
        torch.testing.assert_close(one.get_image_features(pixel_values=x).pooler_output, blend(a, f, 1.0),
                                   atol=1e-6, rtol=1e-5)


def test_few_shot_training_lowers_loss_and_round_trips(tmp_path):
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), ClipAdapterConfig())  # alpha = 0.2, the paper's
    losses = few_shot_loss_drops(model, steps=20, lr=0.1)
    assert losses[-1] < 0.85 * losses[0]  # a random tiny CLIP's features are nearly parallel: slow, but falls
    trainable = sorted(n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["clip_adapter_down", "clip_adapter_up"]
    model.eval()
    x = images(4, seed=9)
    with torch.no_grad():
        want = classify(model, x, CLASSES, tokenizer=tok)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(classify(loaded, x, CLASSES, tokenizer=tok), want, atol=0, rtol=0)
    assert not hasattr(loaded, "classify")  # acts in the plain forward: the training loop uses that


def test_errors():
    with pytest.raises(ConfigError, match="alpha"):
        ClipAdapterConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="reduction"):
        ClipAdapterConfig(reduction=0)
    with pytest.raises(ConfigError, match="image"):
        ClipAdapterConfig(image=False, text=False)
    with pytest.raises(NotApplicableError, match="clip_adapter: not applicable to ViTForImageClassification"):
        get_peft_model(FAMILY["vit"].model(), ClipAdapterConfig())
