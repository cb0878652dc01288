"""Chunked (fused) linear cross-entropy: the causal-LM loss without the ``tokens x vocab`` logits
(``train.ce_chunk_size``).

The plain loss projects the ``N`` supervised hidden states ``h`` (``N x d``) through the output layer
``W`` (``V x d``, bias ``b``) to logits ``z = h W^T + b`` (``N x V``), then takes
``L = (1/N) sum_i (logsumexp(z_i) - z_i[y_i])``. Autograd keeps ``z`` (and its float32 copy and the
log-softmax) for the backward pass, so the peak grows as ``N x V``: for a 49,152-token vocabulary,
4,096 supervised tokens cost 805 MB per float32 copy.

:class:`LinearCrossEntropy` walks the rows in chunks of ``C``: the forward pass keeps only ``logsumexp(z_i)``
per row (``N`` floats) and the running sum; the backward pass recomputes each chunk's logits and forms
``dL/dz = (softmax(z) - onehot(y)) / N`` for that chunk only, giving ``dL/dh = (dL/dz) W`` chunk by chunk,
``dL/dW = sum_chunks (dL/dz)^T h`` (accumulated in float32, or float64 for float64 inputs) and ``dL/db = sum_chunks sum_rows dL/dz``.
The peak is ``O(C x V)``; the price is the output-layer matmul once more in the backward pass.
The value and the gradients are the plain loss's (``F.cross_entropy`` over float32 logits, mean over
non-ignored targets) up to float rounding.

:func:`chunked_lm_loss` is :func:`peftkit.train.losses.supervised_lm_loss` with this loss: a pre-hook on
the model's output layer takes the hidden states that predict a supervised token (labels shifted by one,
-100 ignored; prompt-method virtual tokens on the left skipped) and hands the layer an empty batch, so the
model's own forward never projects a position. That needs the output layer to be a plain ``nn.Linear``
whose output the model returns as its logits: an adapter on the head (LoRA on ``lm_head``, trainable
tokens) or a model that post-processes logits (soft-capping, logit scales) is refused
(:func:`check_plain_head` probes the second before training).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packages import ModelError


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), target, ignore_index=-100)`` in row chunks,
    with the logits recomputed in backward. ``hidden``: ``N x d``; ``target``: ``N``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                chunk_size: int, ignore_index: int) -> Tensor:
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # the logits' dtype: at least float32
        keep = target != ignore_index
        safe = torch.where(keep, target, 0)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_size):
            z = F.linear(hidden[s : s + chunk_size], weight, bias).to(acc)
            lse[s : s + chunk_size] = torch.logsumexp(z, -1)
            picked = z.gather(1, safe[s : s + chunk_size, None]).squeeze(1)
            total += ((lse[s : s + chunk_size] - picked) * keep[s : s + chunk_size]).sum()
        count = keep.sum()
        ctx.save_for_backward(hidden, weight, bias, safe, keep, lse)
        ctx.chunk_size = chunk_size
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, safe, keep, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        c = ctx.chunk_size
        acc = lse.dtype
        scale = grad_out.to(acc) / ctx.count
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], c):
            h = hidden[s : s + c]
            p = F.linear(h, weight, bias).to(acc)
            p.sub_(lse[s : s + c, None]).exp_()  # softmax, from the forward's logsumexp
            rows = torch.arange(p.shape[0], device=p.device)
            p[rows, safe[s : s + c]] -= 1.0
            p *= (keep[s : s + c] * scale)[:, None]
            g = p.to(hidden.dtype)
            if need_h:
                gh[s : s + c] = g @ weight.to(g.dtype)
            if need_w:
                gw.addmm_(p.t(), h.to(acc))
            if need_b:
                gb += p.sum(0)
        return (gh, gw.to(weight.dtype) if need_w else None, gb.to(bias.dtype) if need_b else None,
                None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                         chunk_size: int, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of ``hidden W^T + b`` against ``target`` without the whole logits matrix.

    Under autocast the operands are cast to the autocast dtype first (as ``F.linear`` would be), and the
    chunks run with autocast off, so the forward and the recomputing backward see the same logits."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, bias, target, chunk_size, ignore_index)


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's output layer, which must be a plain ``nn.Linear`` with unsharded weights."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ModelError(f"train.ce_chunk_size: {type(inner).__name__} has no output layer "
                         "(get_output_embeddings() is None)")
    if type(head) is not nn.Linear:
        raise ModelError(f"train.ce_chunk_size: the output layer is a {type(head).__name__}, not a plain "
                         "Linear (an adapter on the LM head?); set train.ce_chunk_size=null or leave the head "
                         "out of the method's targets")
    if head._forward_hooks or head._forward_pre_hooks:
        raise ModelError("train.ce_chunk_size: the output layer has forward hooks, which the chunked loss would "
                         "skip; set train.ce_chunk_size=null")
    if type(head.weight) is not nn.Parameter and type(head.weight) is not Tensor:
        raise ModelError(f"train.ce_chunk_size: the output layer's weight is a {type(head.weight).__name__} "
                         "(sharded by FSDP?); set train.ce_chunk_size=null")
    return head


def chunked_lm_loss(model: nn.Module, batch: dict[str, Any], chunk_size: int) -> Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100, in chunks of
    ``chunk_size`` positions through the output layer."""
    labels = batch["labels"]
    head = output_layer(model)
    target = labels[:, 1:]
    keep = target != -100
    picked: list[Tensor] = []

    def pick(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        virtual = hidden.shape[1] - labels.shape[1]
        if virtual < 0:
            raise ValueError(f"chunked_lm_loss: {hidden.shape[1]} hidden positions for "
                             f"{labels.shape[1]} labels; the model dropped positions")
        picked.append(hidden[:, virtual : virtual + labels.shape[1] - 1][keep])
        return (picked[-1][:0],) + tuple(args[1:])  # the head projects nothing

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    handle = head.register_forward_pre_hook(pick)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if len(picked) != 1:
        raise ModelError(f"train.ce_chunk_size: the output layer ran {len(picked)} times in one forward")
    return linear_cross_entropy(picked[0], head.weight, head.bias, target[keep], chunk_size)


@torch.no_grad()
def check_plain_head(model: nn.Module) -> None:
    """Raise ``ModelError`` unless the model returns its output layer's output unchanged as logits
    (no soft-capping or scaling after the head), which :func:`chunked_lm_loss` relies on."""
    head = output_layer(model)
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(out))
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(1, 4, device=first.device)[None] % head.out_features
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
        model.train(was_training)
    if len(seen) != 1 or seen[0].shape != logits.shape or not torch.equal(seen[0], logits):
        raise ModelError(f"train.ce_chunk_size: {type(model).__name__} changes its output layer's result "
                         "before returning the logits (soft-capping or a logit scale); set "
                         "train.ce_chunk_size=null for this model")
