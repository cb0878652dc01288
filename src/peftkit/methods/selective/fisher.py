"""The empirical Fisher information diagonal, and masks chosen from it.

FISH mask (Sung, Nair, Raffel 2021, arXiv 2111.09839) and Child-Tuning D (Xu et al. 2021, arXiv
2109.05687) score every parameter entry by

    F_i = (1 / N) sum_n (d log p(y_n | x_n) / d theta_i)^2

over N training samples (the *empirical* Fisher: the true labels y_n, i.e. the squared per-sample gradient
of the loss), and keep the entries with the largest scores.

``fisher_diagonal`` is a pure function of a model, a dataloader and a loss function; it leaves the model's
parameters, gradients, ``requires_grad`` flags and train/eval mode as it found them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SelectionError
from .select import global_top_k, target_count

LossFn = Callable[[nn.Module, Any], Tensor]


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy of a classifier's logits against ``batch["labels"]``, else the model's loss.

    ``batch``: a dict of model inputs with ``labels`` (a Hugging Face batch). A 1-d result gives one Fisher
    sample per row; a scalar counts as one sample (use batches of one for the exact per-sample estimate).
    """
    if not isinstance(batch, Mapping):
        raise SelectionError("the default loss needs dict batches of model inputs with 'labels'; pass loss_fn")
    out = model(**batch)
    logits, labels = getattr(out, "logits", None), batch.get("labels")
    if isinstance(logits, Tensor) and isinstance(labels, Tensor) and logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    loss = getattr(out, "loss", None)
    if not isinstance(loss, Tensor):
        raise SelectionError("the model returned no loss for a batch (does it carry 'labels'?); pass loss_fn")
    return loss


def fisher_diagonal(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn | None = None,
    num_samples: int = 1024,
    params: Mapping[str, nn.Parameter] | None = None,
) -> dict[str, Tensor]:
    """The empirical Fisher diagonal of ``params`` (default: every parameter of ``model``) over
    ``num_samples`` samples: name -> tensor of the parameter's shape (float32).

    ``loss_fn(model, batch)`` returns per-sample losses (a 1-d tensor: one backward pass each) or one
    scalar (one sample). The model runs in eval mode (no dropout noise in the scores). Raises
    ``SelectionError`` when the data yields no sample or an estimate is NaN / inf.
    """
    if num_samples < 1:
        raise SelectionError(f"num_samples must be positive, got {num_samples}")
    loss_fn = loss_fn or default_loss
    params = dict(model.named_parameters()) if params is None else dict(params)
    names, tensors = list(params), list(params.values())
    flags = [p.requires_grad for p in tensors]
    was_training = model.training
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in tensors]
    seen = 0
    try:
        model.eval()
        for p in tensors:
            p.requires_grad_(True)
        for batch in dataloader:
            losses = loss_fn(model, batch)
            losses = losses.reshape(-1) if losses.dim() else losses.reshape(1)
            n = min(losses.numel(), num_samples - seen)
            for i in range(n):
                grads = torch.autograd.grad(losses[i], tensors, retain_graph=i < n - 1, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g.detach().float().square())
            seen += n
            if seen >= num_samples:
                break
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise SelectionError("the dataloader yielded no sample; the Fisher information cannot be estimated")
    out = {}
    for name, a in zip(names, acc):
        if not torch.isfinite(a).all():
            raise SelectionError(
                f"the Fisher estimate of {name!r} is NaN or inf after {seen} samples (the loss or its gradient "
                "overflowed: check loss_fn and the data); no mask was chosen"
            )
        out[name] = a.div_(seen)
    return out


def fisher_mask(scores: Mapping[str, Tensor], density: float | None = None, top_k: int | None = None) -> dict[str, Tensor]:
    """The global top-k of ``scores``: name -> sorted flat indices, exactly ``round(density * N)`` (or
    ``top_k``) entries over all tensors together (N: their total size)."""
    total = sum(s.numel() for s in scores.values())
    return global_top_k(dict(scores), target_count(total, density, top_k))
