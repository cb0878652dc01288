"""Shared checks against the reference implementation (Hugging Face PEFT) for every method's tests."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import peftkit


class TwoProjections(nn.Module):
    """Two adapted projections (``query`` with a bias, ``value`` without) mixed non-linearly: the smallest
    model on which a kernel's output and every factor's gradient can be compared with peft's layers."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(12, 20)
        self.value = nn.Linear(12, 20, bias=False)

    def forward(self, x):
        return self.query(x) * 0.5 + self.value(x).tanh()


def _output_and_grads(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, input gradient and the trainable parameters' gradients under one name scheme (peft:
    "...query.hada_w1_a.default", peftkit: "...query.adapters.default.hada_w1_a": both "...query.hada_w1_a")."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 2, y.shape[-1])).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name.replace(".adapters.default", "").replace(".default", "")] = p.grad
            p.grad = None
    return y.detach(), x.grad, grads


def assert_same_outputs_and_grads(ref: nn.Module, ours: nn.Module, x: Tensor, min_params: int,
                                  tol: float = 1e-5) -> None:
    """peft's model and ours give the same output, input gradient and parameter gradients (``min_params``:
    at least that many trainable tensors compared)."""
    y_ref, gx_ref, g_ref = _output_and_grads(ref, x)
    y, gx, g = _output_and_grads(ours, x)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
    assert g.keys() == g_ref.keys() and len(g) >= min_params, (sorted(g), sorted(g_ref))
    for key, grad in g.items():
        torch.testing.assert_close(grad, g_ref[key], atol=tol, rtol=tol, msg=key)


def field_defaults(cls: type) -> dict[str, object]:
    """A config dataclass's fields -> their defaults (factories called): what the two libraries' classes share."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def train_a_little(model: nn.Module, family, steps: int = 3, lr: float = 0.5) -> None:
    """A few SGD steps so that the saved adapter is non-trivial (zero-initialised factors have moved)."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        family.run(model).float().pow(2).mean().backward()
        opt.step()
    model.eval()


def adalora_train(model: nn.Module, family, steps: int = 8, lr: float = 0.5) -> None:
    """PEFT's AdaLoRA loop: backward, step, ``update_and_allocate(step)``, zero_grad."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        family.run(model).float().pow(2).mean().backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.eval()


def adalora_train_perturbed(model: nn.Module, family) -> None:
    """AdaLoRA: non-zero singular values first (the same in both libraries), so that the adapter visibly acts."""
    perturb(model, only="lora_E")
    adalora_train(model, family)


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.2, seed: int = 3, only: str = "") -> None:
    """Push trainable tensors (whose name contains ``only``) further than a few steps move them."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and only in name:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def paired_configs(family, ref_cls: type, our_cls: type, **kwargs) -> tuple[object, object]:
    """The same config for both libraries, with the family's explicit targets and task type."""
    extra = {}
    if family.targets:
        extra["target_modules"] = family.targets
    if family.task_type:
        extra["task_type"] = family.task_type
    return ref_cls(**kwargs, **extra), our_cls(**kwargs, **extra)


def linearized(model: nn.Module) -> nn.Module:
    """A copy with every GPT-2 Conv1D replaced by the equivalent nn.Linear (for peft methods that cannot wrap it)."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            lin = nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(module.weight.t())
                lin.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def assert_same_file_layout(folder: Path, key_suffix: str) -> None:
    """The files saved by ``assert_loads_both_ways`` hold the same keys and shapes, including ``key_suffix``."""
    a = load_file(folder / "peft" / "adapter_model.safetensors")
    b = load_file(folder / "peftkit" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(k.endswith(key_suffix) for k in a)


def assert_loads_both_ways(
    family,
    ref_cfg,
    our_cfg,
    folder: Path,
    *,
    train: Callable[[nn.Module, object], None] = train_a_little,
    reference_model: Callable[[], nn.Module] | None = None,
    min_change: float = 1e-4,
    min_change_ref: float | None = None,
) -> tuple[nn.Module, nn.Module]:
    """An adapter trained in peft loads into peftkit with the same outputs (<= 1e-5), and the other way round.

    ``reference_model`` builds the base peft wraps when it differs from the family's (e.g. a model whose
    layers peft cannot wrap, replaced by equivalents). ``min_change`` (``min_change_ref`` for the peft side,
    default the same) is how far each trained adapter must move the output from the base's.
    Returns (peftkit model, peft model that loaded it).
    """
    make_ref = reference_model or family.model
    base_out = family.run(family.model())

    theirs = peft.get_peft_model(make_ref(), ref_cfg)
    train(theirs, family)
    theirs.save_pretrained(folder / "peft")
    expected = family.run(theirs)
    ref_change = min_change if min_change_ref is None else min_change_ref
    assert (expected - base_out).abs().max() > ref_change, "the peft adapter changed nothing"
    ours = peftkit.PeftModel.from_pretrained(family.model(), folder / "peft")
    torch.testing.assert_close(family.run(ours), expected, atol=1e-5, rtol=0)

    mine = peftkit.get_peft_model(family.model(), our_cfg)
    train(mine, family)
    mine.save_pretrained(folder / "peftkit")
    expected = family.run(mine)
    assert (expected - base_out).abs().max() > min_change, "the peftkit adapter changed nothing"
    loaded = peft.PeftModel.from_pretrained(make_ref(), folder / "peftkit")
    torch.testing.assert_close(family.run(loaded), expected, atol=1e-5, rtol=0)
    return mine, loaded


def assert_same_trainable_state(ref: nn.Module, ours: nn.Module) -> None:
    """Same trainable-parameter count and the same adapter file keys and shapes."""
    assert ours.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0]
    ref_state = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref).items()}
    our_state = {k: tuple(v.shape) for k, v in peftkit.get_peft_model_state_dict(ours).items()}
    assert our_state == ref_state


def assert_merges_like_peft(family, theirs: nn.Module, ours: nn.Module) -> list[str]:
    """Merged == unmerged, unmerge restores the base bit for bit, and merge_and_unload gives peft's merged
    parameters (<= 1e-6). Returns the base parameter names the merge changed."""
    before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if ".adapters." not in k}
    unmerged = family.run(ours)
    ours.merge_adapter()
    torch.testing.assert_close(family.run(ours), unmerged, atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before), "unmerge is not bit-exact"

    ref_plain = theirs.merge_and_unload().state_dict()
    our_plain = ours.merge_and_unload().state_dict()
    original = family.model().state_dict()
    assert ref_plain.keys() == our_plain.keys() == original.keys()
    for key in ref_plain:
        torch.testing.assert_close(our_plain[key], ref_plain[key], atol=1e-6, rtol=0, msg=key)
    return [k for k in original if not torch.equal(our_plain[k], original[k])]
