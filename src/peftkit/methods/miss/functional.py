"""MiSS weight math as pure functions, all in the (d_out, d_in) layout of ``nn.Linear``.

Shapes: ``W`` (d_out, d_in); the default block ``D`` (r, d_out); bat blocks ``D`` (d_out / r, r, r);
mini block ``D`` (r, mini_r), tiled to (r, d_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def tile_mini(block: Tensor, d_out: int) -> Tensor:
    """The mini block (r, mini_r) repeated along the output dimension to (r, d_out) (PEFT's ``repeat``)."""
    return block.repeat(1, d_out // block.shape[1])


def shard_sum(x: Tensor, r: int) -> Tensor:
    """``x`` (..., d_in) zero-padded to a multiple of r, cut into shards of width r and summed: (..., r)."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)


def shared_delta(block: Tensor, d_in: int) -> Tensor:
    """``dW`` (d_out, d_in) of the default / mini variant: ``dW[o, j r + k] = D[k, o]`` (the last shard of a
    width that r does not divide is cut to the remainder)."""
    r = block.shape[0]
    n = -(-d_in // r)
    return block.t().repeat(1, n)[:, :d_in]


def _shards(w: Tensor, r: int) -> Tensor:
    """(d_out, d_in) -> (d_in / r, d_out / r, r, r): the weight's (r, r) shards."""
    d_out, d_in = w.shape
    return w.reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)


def _unshards(shards: Tensor, shape: torch.Size) -> Tensor:
    return shards.permute(1, 2, 0, 3).reshape(shape)


def bat_delta(w: Tensor, block: Tensor) -> Tensor:
    """Bat's ``dW`` (d_out, d_in): every (r, r) shard ``W_ij`` of ``W`` becomes ``W_ij D_i + D_i`` added,
    i.e. ``dW_ij = W_ij D_i + D_i`` (``D_i``: the block of output shard i). ``w`` in ``block``'s dtype."""
    r = block.shape[-1]
    shards = _shards(w, r)
    return _unshards(shards @ block + block, w.shape)


def bat_unmerge(merged: Tensor, block: Tensor) -> Tensor:
    """Inverse of ``W + bat_delta(W, D)``: ``W_ij = (W'_ij - D_i) (I + D_i)^-1`` (PEFT's unmerge)."""
    r = block.shape[-1]
    eye = torch.eye(r, device=block.device, dtype=torch.float32)
    inv = torch.linalg.inv_ex(eye + block.float()).inverse.to(block.dtype)  # a singular I + D_i: no raise;
    # the wrapper's exact-restore record then carries the difference (finite values only)
    return torch.nan_to_num(_unshards((_shards(merged, r) - block) @ inv, merged.shape))
