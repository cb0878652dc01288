"""Chunked linear cross-entropy (``train.ce_chunk_size``): the plain loss's value and gradients (hidden states,
LM head, adapter parameters) to 1e-5, with no logits tensor larger than ``chunk x vocab``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import peftkit
from peftkit import tiny_models
from peftkit.train import RecipeError, load_recipe, train
from peftkit.train.chunked_ce import check_plain_head, chunked_lm_loss, linear_cross_entropy
from peftkit.train.losses import supervised_lm_loss
from peftkit.train.models import ModelError

from .train_helpers import fruit_recipe

VOCAB = 1031


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _largest_vocab_tensor(shapes, hidden_size: int) -> int:
    """The most elements of a tensor with a vocabulary-sized last dimension, other than the head's weight
    (seen transposed, ``hidden x vocab``, by the matmuls)."""
    return max((int(torch.Size(s).numel()) for s in shapes if s and s[-1] == VOCAB and s != (hidden_size, VOCAB)),
               default=0)


def _operands(dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(VOCAB, 16, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(VOCAB, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    target = torch.randint(0, VOCAB, (37,), generator=g)
    target[[0, 5, 6, 30]] = -100
    return hidden, weight, b, target


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_equal_the_plain_loss(chunk, bias):
    hidden, weight, b, target = _operands(bias=bias)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    plain = F.cross_entropy(F.linear(hidden, weight, b).float(), target, ignore_index=-100)
    ref = torch.autograd.grad(plain * 3.0, leaves)
    ours = linear_cross_entropy(hidden, weight, b, target, chunk)
    got = torch.autograd.grad(ours * 3.0, leaves)
    assert abs(float(ours.detach()) - float(plain.detach())) <= 1e-5
    for a, r in zip(got, ref):
        assert float(r.abs().max()) > 1e-4
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_gradcheck_in_double():
    hidden, weight, b, target = _operands(torch.float64)
    small = (hidden[:9].detach().requires_grad_(), weight[:23].detach().requires_grad_(),
             b[:23].detach().requires_grad_())
    target = target[:9] % 23
    target[2] = -100
    assert torch.autograd.gradcheck(lambda h, w, bb: linear_cross_entropy(h, w, bb, target, 4), small)


def test_logits_are_never_whole():
    hidden, weight, b, target = _operands()
    with _Shapes() as rec:
        linear_cross_entropy(hidden, weight, b, target, 8).backward()
    assert 0 < _largest_vocab_tensor(rec.shapes, 16) <= 8 * VOCAB
    with _Shapes() as rec:  # the plain loss does form them: the measure can tell
        F.cross_entropy(F.linear(hidden, weight, b), target).backward()
    assert _largest_vocab_tensor(rec.shapes, 16) == 37 * VOCAB


def test_autocast_matches_the_plain_loss_under_autocast():
    hidden, weight, b, target = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight, b).float(), target)
        ours = linear_cross_entropy(hidden, weight, b, target, 8)
    (gp,) = torch.autograd.grad(plain, [hidden])
    (go,) = torch.autograd.grad(ours, [hidden])
    assert abs(float(ours.detach()) - float(plain.detach())) <= 1e-3 * float(plain.detach())
    torch.testing.assert_close(go, gp, atol=2e-3, rtol=2e-2)


def _lora_llama():
    torch.manual_seed(0)
    base = tiny_models.llama(vocab_size=VOCAB)
    torch.manual_seed(1)
    return peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules="all-linear",
                                                           init_lora_weights=False))


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 10:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_lora_llama_loss_and_gradients_equal_the_plain_loss():
    model = _lora_llama()
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    hidden: list[torch.Tensor] = []  # the final norm's output: the hidden states the head reads

    def keep(module, args, out):
        out.retain_grad()
        hidden.append(out)

    model.get_base_model().model.norm.register_forward_hook(keep)
    plain = supervised_lm_loss(model, batch)
    plain.backward()
    ref = [p.grad.clone() for p in params] + [hidden[-1].grad.clone()]
    model.zero_grad()
    with _Shapes() as rec:
        ours = chunked_lm_loss(model, batch, chunk_size=5)
        ours.backward()
    got = [p.grad.clone() for p in params] + [hidden[-1].grad.clone()]
    assert abs(float(ours.detach()) - float(plain.detach())) <= 1e-5
    assert float(ref[-1].abs().max()) > 1e-4
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    assert model.get_output_embeddings().weight.grad is None  # the frozen head gets none
    assert 0 < _largest_vocab_tensor(rec.shapes, 32) <= 5 * VOCAB


def test_an_adapted_or_post_processed_head_is_refused():
    torch.manual_seed(0)
    base = tiny_models.llama(vocab_size=VOCAB)
    check_plain_head(base)
    on_head = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ModelError, match="train.ce_chunk_size: the output layer is a .*not a plain Linear"):
        chunked_lm_loss(on_head, _batch(), 4)
    handle = base.lm_head.register_forward_hook(lambda m, a, out: out * 0.5)  # a logit scale in a hook
    with pytest.raises(ModelError, match="train.ce_chunk_size: the output layer has forward hooks"):
        chunked_lm_loss(base, _batch(), 4)
    handle.remove()
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            final_logit_softcapping=30.0))
    with pytest.raises(ModelError, match="train.ce_chunk_size: Gemma2ForCausalLM changes its output layer's result"):
        check_plain_head(gemma2)
    gemma2.config.final_logit_softcapping = None
    check_plain_head(gemma2)


def _recipe(tmp_path, **train_over):
    answers = {"red": "apple", "yellow": "banana, ripe", "green": "lime", "purple": "grape"}
    return fruit_recipe(tmp_path, answers, 3, max_steps=3, batch_size=4, log_every=1, **train_over)


def test_training_run_equals_the_plain_loss_run(tmp_path):
    for name in ("c", "p"):
        (tmp_path / name).mkdir()
    chunked = train(_recipe(tmp_path / "c", ce_chunk_size=7), quiet=True)
    plain = train(_recipe(tmp_path / "p"), quiet=True)
    assert abs(chunked["test_loss"] - plain["test_loss"]) <= 1e-5
    assert abs(chunked["before_test_loss"] - plain["before_test_loss"]) <= 1e-5
    assert plain["test_loss"] < plain["before_test_loss"]
    a = load_file(str(tmp_path / "c" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "p" / "run" / "adapter" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("value, message", [
    (0, "train.ce_chunk_size: expected a positive integer or null, got 0"),
    ("fast", "train.ce_chunk_size: expected an integer or null, got 'fast'"),
    (2.5, "train.ce_chunk_size: expected an integer or null"),
])
def test_bad_chunk_size_names_its_path(tmp_path, value, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(tmp_path, ce_chunk_size=value)


def test_chunk_size_is_a_causal_lm_option(tmp_path):
    with pytest.raises(RecipeError, match="train.ce_chunk_size: only task causal_lm reads it"):
        load_recipe(None, ["train.ce_chunk_size=128", f"output_dir={tmp_path / 'run'}"])
