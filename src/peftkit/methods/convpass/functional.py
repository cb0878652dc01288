"""Convpass's bypass as pure functions on tensors (the official code's arithmetic, step for step)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's QuickGELU, ``x sigmoid(1.702 x)``, the activation of the official code."""
    return x * torch.sigmoid(1.702 * x)


def grid_side(tokens: int) -> int:
    """Side of the square patch grid of a ViT sequence of ``tokens`` tokens ([CLS] first)."""
    side = math.isqrt(tokens - 1) if tokens > 1 else 0
    if side * side != tokens - 1:
        raise ValueError(f"Convpass: a sequence of {tokens} tokens is not [CLS] + a square grid of patch tokens "
                         "(the bypass reshapes the patch tokens to their 2-D grid)")
    return side


def conv_tokens(h: Tensor, conv_weight: Tensor, conv_bias: Tensor) -> Tensor:
    """The 3x3 convolution over ``h`` (B, 1 + n*n, c): the patch tokens on their n x n grid (padding 1), the [CLS]
    token on its own 1 x 1 grid through the same convolution. With padding 1 a 1 x 1 grid meets only the
    kernel's centre tap, so the [CLS] path is ``conv_weight[:, :, 1, 1] h_cls + conv_bias``."""
    b, n_tok, c = h.shape
    side = grid_side(n_tok)
    if not torch.is_grad_enabled():  # CPU convolution picks its kernel by the weight's requires_grad: detached,
        conv_weight, conv_bias = conv_weight.detach(), conv_bias.detach()  # trained and loaded adapters agree
    patches = h[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)  # (B, c, n, n)
    patches = F.conv2d(patches, conv_weight, conv_bias, padding=1)
    patches = patches.permute(0, 2, 3, 1).reshape(b, side * side, c)
    cls = F.linear(h[:, :1], conv_weight[:, :, 1, 1], conv_bias)  # the 1 x 1 grid: centre tap only
    return torch.cat([cls, patches], dim=1)


def convpass(x: Tensor, down_weight: Tensor, down_bias: Tensor, conv_weight: Tensor, conv_bias: Tensor,
             up_weight: Tensor, up_bias: Tensor, scale: float, dropout=None) -> Tensor:
    """``s Up(drop(act(Conv(act(Down x)))))``: x (B, 1 + n*n, d) -> (B, 1 + n*n, d); act is QuickGELU.

    Shapes: ``down_weight`` (c, d), ``conv_weight`` (c, c, 3, 3), ``up_weight`` (d, c), biases (c,), (c,), (d,).
    """
    h = quick_gelu(F.linear(x, down_weight, down_bias))  # (B, N, c): a 1x1 convolution
    h = quick_gelu(conv_tokens(h, conv_weight, conv_bias))
    if dropout is not None:
        h = dropout(h)
    return scale * F.linear(h, up_weight, up_bias)  # (B, N, d)
