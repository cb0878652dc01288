"""Tip-Adapter / Tip-Adapter-F on a tiny CLIP: the cache formula, few-shot use, training the keys, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError
from peftkit.methods.vision import build_cache
from peftkit.methods.vision.clip import prompt_ids
from peftkit.methods.vision.tip_adapter import TipAdapterConfig
from peftkit.targeting import NotApplicableError

from ..families import FAMILY
from .test_vision_coop import CLASSES, few_shot_loss_drops, images, reference_image_features, \
    reference_text_features, tiny_clip, tokenizer

SUPPORT, LABELS = images(6, seed=11), torch.tensor([0, 1, 2, 0, 1, 2])


def cache(model):
    return next(a for _, a in model.base_model.adapters("default"))


def test_logits_match_the_paper_formula():
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), TipAdapterConfig()).eval()
    assert model.get_nb_trainable_parameters()[0] == 0  # training-free
    build_cache(model, SUPPORT, LABELS)
    cfg = model.peft_config["default"]
    assert (cfg.cache_size, cfg.num_classes) == (6, 3)
    x = images(4, seed=3)
    with torch.no_grad():
        got = model.classify(x, CLASSES, tokenizer=tok)
        clip = tiny_clip()
        f, keys = reference_image_features(clip, x), reference_image_features(clip, SUPPORT)
        ids, mask = prompt_ids(clip, CLASSES, tok)
        zero_shot = clip.logit_scale.exp() * f @ reference_text_features(clip, ids, mask).t()
        values = F.one_hot(LABELS, 3).float()  # L (NK, N)
        want = zero_shot + 1.17 * torch.exp(-1.0 * (1 - f @ keys.t())) @ values
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache(model).tip_keys, keys, atol=1e-6, rtol=1e-6)
        with model.disable_adapter():  # the plain zero-shot CLIP classifier
            torch.testing.assert_close(model.classify(x, CLASSES, tokenizer=tok), zero_shot, atol=1e-5, rtol=1e-5)
        # the plain forward is CLIP's: the cache acts only in classify
        torch.testing.assert_close(model(input_ids=ids, pixel_values=x).logits_per_image,
                                   clip(input_ids=ids, pixel_values=x).logits_per_image, atol=0, rtol=0)


def test_cache_classifies_its_own_support_images():
    """A random tiny CLIP's image features are nearly parallel (cos > 0.95), so zero-shot CLIP is at chance
    here; a sharp cache (beta = 100, alpha = 10, within the paper's per-data-set search spirit) recalls the
    support labels exactly."""
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), TipAdapterConfig(alpha=10.0, beta=100.0)).eval()
    build_cache(model, SUPPORT, LABELS)
    with torch.no_grad():
        assert torch.equal(model.classify(SUPPORT, CLASSES, tokenizer=tok).argmax(1), LABELS)
        with model.disable_adapter():
            assert not torch.equal(model.classify(SUPPORT, CLASSES, tokenizer=tok).argmax(1), LABELS)


def test_tip_adapter_f_trains_keys_and_round_trips(tmp_path):
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), TipAdapterConfig(train_keys=True, alpha=2.0, beta=5.0))
    build_cache(model, SUPPORT, LABELS)  # before the optimizer: the keys are replaced
    assert model.get_nb_trainable_parameters()[0] == 6 * 32  # N K x D
    keys0 = cache(model).tip_keys.detach().clone()
    losses = few_shot_loss_drops(model, steps=10, lr=0.01)
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(cache(model).tip_keys.detach(), keys0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.visual_projection.adapters.default.tip_keys"]
    model.eval()
    x = images(3, seed=8)
    with torch.no_grad():
        want = model.classify(x, CLASSES, tokenizer=tok)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].cache_size == 6
    assert torch.equal(cache(loaded).tip_labels, LABELS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(x, CLASSES, tokenizer=tok), want, atol=0, rtol=0)


def test_errors():
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), TipAdapterConfig())
    with pytest.raises(RuntimeError, match="build_cache"):
        model.classify(SUPPORT, CLASSES, tokenizer=tok)
    build_cache(model, SUPPORT, LABELS)
    with pytest.raises(ValueError, match="num_classes"):
        model.classify(SUPPORT, CLASSES[:2], tokenizer=tok)
    with pytest.raises(ValueError, match="labels"):
        build_cache(model, SUPPORT, LABELS[:3])
    with pytest.raises(ConfigError, match="beta"):
        TipAdapterConfig(beta=-1.0)
    with pytest.raises(NotApplicableError, match="tip_adapter: not applicable to ViTForImageClassification"):
        get_peft_model(FAMILY["vit"].model(), TipAdapterConfig())


def test_with_coop_and_a_default_tokenizer():
    """CoOp and Tip-Adapter active together: CoOp's learned classifier plus the cache term; set_tokenizer lets
    ``model.classify(pixels, names)`` run without a tokenizer argument (as the clip_fewshot task calls it)."""
    from peftkit.methods.vision import set_tokenizer
    from peftkit.methods.vision.coop import CoOpConfig

    tok = tokenizer()
    model = get_peft_model(tiny_clip(), CoOpConfig(num_virtual_tokens=2)).eval()
    x = images(3, seed=4)
    with torch.no_grad():
        coop_only = model.classify(x, CLASSES, tokenizer=tok)
    model.add_adapter("tip", TipAdapterConfig(alpha=3.0, beta=2.0))
    build_cache(model, SUPPORT, LABELS, adapter_name="tip")
    model.set_adapter(["default", "tip"])
    set_tokenizer(model, tok)
    with torch.no_grad():
        got = model.classify(x, CLASSES)
        f, keys = reference_image_features(tiny_clip(), x), reference_image_features(tiny_clip(), SUPPORT)
        term = 3.0 * torch.exp(-2.0 * (1 - f @ keys.t())) @ F.one_hot(LABELS, 3).float()
    torch.testing.assert_close(got, coop_only + term, atol=1e-5, rtol=1e-5)
