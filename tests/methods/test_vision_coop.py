"""CoOp / CoCoOp on a tiny CLIP whose text tower pools at an in-vocabulary [EOS], with a tiny WordLevel tokenizer.

Also home of the CLIP test helpers the other vision tests import (tiny_clip, tokenizer, reference encoder).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit import PeftModel, get_peft_model
from peftkit.config import ConfigError
from peftkit.methods.vision import classify
from peftkit.methods.vision.clip import prompt_ids
from peftkit.methods.vision.coop import CoCoOpConfig, CoOpConfig
from peftkit.targeting import NotApplicableError

from peftkit import tiny_models

from ..families import FAMILY

VOCAB = ["<|startoftext|>", "<|endoftext|>", "X", "a", "photo", "of", ".", "cat", "dog", "car", "bird", "red", "fish"]
CLASSES = ["cat", "dog", "car"]


def tiny_clip(seed: int = 0, projection_dim: int = 32):
    """The clip family's towers on VOCAB (whose special tokens the text tower knows)."""
    torch.manual_seed(seed)
    return tiny_models.clip(text=dict(vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=1, pad_token_id=1),
                            projection_dim=projection_dim).eval()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def images(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_text_features(clip, ids, mask, ctx=None):
    """CLIP's text tower by hand, with rows' token embeddings 1..M replaced by ``ctx`` (T, M, d_t)."""
    tm = clip.text_model
    e = tm.embeddings.token_embedding.weight[ids]  # (T, L, d_t)
    if ctx is not None:
        e = torch.cat([e[:, :1], ctx, e[:, 1 + ctx.shape[1]:]], dim=1)
    h = tm.embeddings(inputs_embeds=e)
    L = ids.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    pad = torch.zeros(mask.shape, dtype=h.dtype).masked_fill(mask == 0, float("-inf"))
    attn = causal[None, None] + pad[:, None, None, :]
    for layer in tm.encoder.layers:
        h = layer(h, attn)
    h = tm.final_layer_norm(h)
    pooled = h[torch.arange(ids.shape[0]), (ids == tm.config.eos_token_id).int().argmax(-1)]
    return F.normalize(clip.text_projection(pooled), dim=-1)


def reference_image_features(clip, pixels):
    return F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)


def ctx_of(model):
    return next(a for _, a in model.base_model.adapters("default"))


def test_prompt_ids_layout():
    tok = tokenizer()
    ids, mask = prompt_ids(tiny_clip(), ["cat", "red fish"], tok, n_ctx=3)
    assert ids.tolist() == [[0, 2, 2, 2, 7, 6, 1, 1], [0, 2, 2, 2, 11, 12, 6, 1]]
    assert mask.tolist() == [[1] * 7 + [0], [1] * 8]
    ids, mask = prompt_ids(tiny_clip(), [[7], [11, 12]], n_ctx=2)  # token ids: [bos] + slots + name + [eos]
    assert ids.tolist() == [[0, 0, 0, 7, 1, 1], [0, 0, 0, 11, 12, 1]]
    ids, _ = prompt_ids(tiny_clip(), ["dog"], tok)  # zero-shot template
    assert ids.tolist() == [[0, 3, 4, 5, 3, 8, 6, 1]]


def test_zero_shot_classify_on_plain_clip_matches_reference():
    clip, tok = tiny_clip(), tokenizer()
    x = images(4)
    with torch.no_grad():
        got = classify(clip, x, CLASSES, tokenizer=tok)
        ids, mask = prompt_ids(clip, CLASSES, tok)
        want = clip.logit_scale.exp() * reference_image_features(clip, x) @ reference_text_features(clip, ids, mask).t()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("csc", [False, True])
def test_coop_classify_matches_reference(csc):
    tok = tokenizer()
    cfg = CoOpConfig(num_virtual_tokens=4, class_specific=csc, num_classes=3 if csc else None)
    model = get_peft_model(tiny_clip(), cfg).eval()
    ctx = ctx_of(model).coop_ctx.detach()
    assert ctx.shape == ((3, 4, 32) if csc else (4, 32))
    assert model.get_nb_trainable_parameters()[0] == (3 if csc else 1) * 4 * 32
    x = images(5)
    with torch.no_grad():
        got = model.classify(x, CLASSES, tokenizer=tok)  # reached through the PeftModel's attribute forwarding
        clip = tiny_clip()
        ids, mask = prompt_ids(clip, CLASSES, tok, n_ctx=4)
        rows = ctx if csc else ctx.expand(3, -1, -1)
        w = reference_text_features(clip, ids, mask, rows)
        want = clip.logit_scale.exp() * reference_image_features(clip, x) @ w.t()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():  # disabled: zero-shot CLIP ("a photo of a {}.")
        base = model.classify(x, CLASSES, tokenizer=tok)
        zs_ids, zs_mask = prompt_ids(clip, CLASSES, tok)
        zs = clip.logit_scale.exp() * reference_image_features(clip, x) @ reference_text_features(
            clip, zs_ids, zs_mask).t()
    torch.testing.assert_close(base, zs, atol=1e-5, rtol=1e-5)


def test_coop_plain_forward_contract(tmp_path):
    """The contract on a CLIP that pools at [EOS]: plain forward acts, disable = base, save/load exact,
    only the context trains, closed-form count."""
    tok = tokenizer()
    ids = tok(["X X X cat.", "X X X dog."], padding=True, return_tensors="pt")["input_ids"]
    x = images(2)
    model = get_peft_model(tiny_clip(), CoOpConfig(num_virtual_tokens=3)).eval()
    with torch.no_grad():
        base = tiny_clip()(input_ids=ids, pixel_values=x).logits_per_image
        out = model(input_ids=ids, pixel_values=x).logits_per_image
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, pixel_values=x).logits_per_image, base, atol=0, rtol=0)
    assert not torch.allclose(out, base, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=x).logits_per_image, out, atol=0, rtol=0)
        torch.testing.assert_close(loaded.classify(x, CLASSES, tokenizer=tok), model.classify(x, CLASSES, tokenizer=tok),
                                   atol=0, rtol=0)
    model.train()
    model(input_ids=ids, pixel_values=x).logits_per_image.pow(2).mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.text_model.embeddings.token_embedding.adapters.default.coop_ctx"]
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert ctx_of(model).coop_ctx.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        model(input_ids=ids[:, :4], pixel_values=x)


def test_coop_ctx_init_and_config_errors():
    clip = tiny_clip()
    init_ids = [3, 4, 5, 3]  # "a photo of a"
    model = get_peft_model(clip, CoOpConfig(ctx_init=init_ids))
    emb = model.get_base_model().text_model.embeddings.token_embedding.base_layer.weight
    assert torch.equal(ctx_of(model).coop_ctx.detach(), emb[init_ids])
    assert model.peft_config["default"].num_virtual_tokens == 4
    assert CoOpConfig().num_virtual_tokens == 16 and CoCoOpConfig().num_virtual_tokens == 4
    std = ctx_of(get_peft_model(tiny_clip(), CoOpConfig())).coop_ctx.std().item()
    assert 0.015 < std < 0.025  # N(0, 0.02^2) over 16 x 32 entries
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        CoOpConfig(num_virtual_tokens=3, ctx_init=init_ids)
    with pytest.raises(ConfigError, match="num_classes"):
        CoOpConfig(class_specific=True)
    with pytest.raises(ConfigError, match="class_token_position"):
        CoOpConfig(class_token_position="middle")
    with pytest.raises(ConfigError, match="class_specific"):
        CoCoOpConfig(class_specific=True, num_classes=3)
    with pytest.raises(NotApplicableError, match="eos_token_id 49407 is outside the vocabulary"):
        get_peft_model(FAMILY["clip"].model(), CoOpConfig(num_virtual_tokens=2))
    with pytest.raises(NotApplicableError, match="coop: not applicable to ViTForImageClassification"):
        get_peft_model(FAMILY["vit"].model(), CoOpConfig(num_virtual_tokens=2))


def test_coop_caches_text_classifier_in_inference():
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), CoOpConfig(num_virtual_tokens=2)).eval()
    calls = []
    model.get_base_model().text_model.register_forward_hook(lambda *a: calls.append(1))
    x = images(3)
    with torch.no_grad():
        first = model.classify(x, CLASSES, tokenizer=tok)
        second = model.classify(x, CLASSES, tokenizer=tok)
        assert len(calls) == 1 and torch.equal(first, second)
        # the context changed: recompute (noise, not a constant shift, which the pre-LN text tower cancels)
        ctx = ctx_of(model).coop_ctx
        ctx.add_(0.5 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(0)))
        third = model.classify(x, CLASSES, tokenizer=tok)
        assert len(calls) == 2 and not torch.allclose(third, first)
        model.classify(x, CLASSES[:2], tokenizer=tok)  # other classes: recompute
        assert len(calls) == 3
    model.train()
    model.classify(x, CLASSES, tokenizer=tok)
    model.classify(x, CLASSES, tokenizer=tok)
    assert len(calls) == 5  # training: never cached


def few_shot_loss_drops(model, steps=12, lr=0.05, classes=CLASSES):
    tok = tokenizer()
    x, y = images(6, seed=11), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(classify(model, x, classes, tokenizer=tok), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_coop_training_lowers_few_shot_loss():
    losses = few_shot_loss_drops(get_peft_model(tiny_clip(), CoOpConfig(num_virtual_tokens=4)))
    assert losses[-1] < 0.8 * losses[0]


def test_cocoop_matches_reference_per_image(tmp_path):
    tok = tokenizer()
    model = get_peft_model(tiny_clip(), CoCoOpConfig()).eval()
    a = ctx_of(model)
    d_t, d_v, h, m = 32, 32, 2, 4
    assert model.peft_config["default"].vision_dim == d_v
    assert model.get_nb_trainable_parameters()[0] == m * d_t + d_v * h + h + h * d_t + d_t
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    x = images(3)
    with torch.no_grad():
        got = model.classify(x, CLASSES, tokenizer=tok)
        clip = tiny_clip()
        ids, mask = prompt_ids(clip, CLASSES, tok, n_ctx=m)
        f = reference_image_features(clip, x)
        want = torch.empty(3, 3)
        for i in range(3):
            pi = torch.relu(f[i] @ a.meta_w1.t() + a.meta_b1) @ a.meta_w2.t() + a.meta_b2  # (d_t,)
            w = reference_text_features(clip, ids, mask, (a.coop_ctx + pi).expand(3, -1, -1))
            want[i] = clip.logit_scale.exp() * w @ f[i]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="call classify"):
        model(input_ids=ids, pixel_values=x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify(x, CLASSES, tokenizer=tok), got, atol=0, rtol=0)


def test_cocoop_trains_context_and_meta_net():
    model = get_peft_model(tiny_clip(), CoCoOpConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n.rsplit(".", 1)[1] for n in before) == ["coop_ctx", "meta_b1", "meta_b2", "meta_w1", "meta_w2"]
    losses = few_shot_loss_drops(model, steps=10, lr=0.05)
    # a random tiny CLIP separates these images poorly; the loss still falls step by step
    assert losses[-1] < 0.97 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


