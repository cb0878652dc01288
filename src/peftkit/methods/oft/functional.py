"""OFT / BOFT weight math as pure functions on tensors (no modules, no state): testable alone.

Notation (Qiu et al. 2023, arXiv 2306.07280; Liu et al. 2024, arXiv 2311.06243). A layer ``y = W x``
of input width ``n`` is fine-tuned as ``y = W R^T x``, i.e. the input row ``x`` becomes ``x R``:

- OFT: ``R = diag(R_1, ..., R_D)``, ``D`` blocks of size ``b`` (``n = D b``), each ``R_k`` the Cayley
  transform of a skew-symmetric ``Q_k`` stored as its ``b (b - 1) / 2`` upper-triangle entries.
- BOFT: ``R = A_{m-1} ... A_1 A_0`` with butterfly factors ``A_i = P_i diag(R_i1, ..., R_iD) P_i^T``;
  ``P_i`` is a fixed permutation (``P_0 = I``), each ``R_ik`` a Cayley-orthogonal ``b x b`` block.

Nothing here forms a dense ``n x n`` matrix in the hot path: a block-diagonal product is one batched
matmul over strided views, and a permutation is an index gather (``x P = x[..., argsort(p)]`` for the
permutation matrix ``P[i, p[i]] = 1``). Layouts and formulas follow Hugging Face PEFT, so the same
parameters give the same rotation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# a block-diagonal product runs as one dense batched GEMM over groups of blocks at least this wide: a
# batch of 4 x 4 matmuls is far below GEMM speed, a 16 x 16 block with zeros is not
GROUP_WIDTH = 16
# COFT: a vector already on the sphere (up to rounding) counts as inside, so projecting is idempotent
_COFT_SLACK = 1e-5

Perm = tuple[Tensor, Tensor]  # (p, argsort(p)): a permutation and its inverse


# -- Cayley parametrisation ------------------------------------------------------------------------
_UPPER_FLAT: dict[tuple[int, torch.device], Tensor] = {}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upper_flat(block_size: int, device: torch.device) -> Tensor:
    """Positions of the strict upper triangle in a flattened b x b block (row-major), built once per size."""
    key = (block_size, device)
    flat = _UPPER_FLAT.get(key)
    if flat is None:
        with torch.inference_mode(False):  # a normal tensor: an inference tensor cannot be saved for backward
            rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
            flat = _UPPER_FLAT[key] = rows * block_size + cols
    return flat


def skew_symmetric(vec: Tensor, block_size: int) -> Tensor:
    """(D, b (b - 1) / 2) upper-triangle entries -> (D, b, b) skew-symmetric ``Q = U - U^T``.

    Entries are in ``torch.triu_indices(b, b, 1)`` order (row-major), PEFT's layout of ``oft_R``.
    """
    upper = vec.new_zeros(vec.shape[0], block_size * block_size).index_copy(1, _upper_flat(block_size, vec.device), vec)
    upper = upper.view(-1, block_size, block_size)
    return upper - upper.transpose(1, 2)


def skew_entries(q: Tensor) -> Tensor:
    """Inverse of :func:`skew_symmetric`: the upper-triangle entries of (D, b, b) ``q``."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[:, rows, cols]


def cayley(q: Tensor, neumann_terms: int | None = None) -> Tensor:
    """Orthogonal blocks from skew-symmetric (D, b, b) ``q``.

    ``neumann_terms=None``: the exact Cayley transform ``R = (I - Q)(I + Q)^-1`` (a linear solve).
    Otherwise PEFT's truncated Neumann series of ``(I + Q)(I - Q)^-1``:
    ``I + 2 Q + 2 Q^2 + ... + 2 Q^(t-1) + Q^t`` with ``t = max(3, terms - 1)`` (``I + 2 Q`` for 2 terms,
    ``I`` for 1), only approximately orthogonal but free of a solve.
    """
    d, b, _ = q.shape
    if neumann_terms is None and q.dtype in _LOW_PRECISION:  # no half-precision LU (CPU): solve in float32
        return cayley(q.float()).to(q.dtype)
    eye = torch.eye(b, device=q.device, dtype=q.dtype).expand(d, b, b)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if neumann_terms <= 2:
        return eye + 2 * q if neumann_terms == 2 else eye.clone()
    # Horner: I + Q (2I + Q (2I + ... Q (2I + Q))), t - 1 batched products; the innermost two levels as
    # 2I + 2Q + Q Q, so no (2I + Q) tensor is kept for backward (autograd keeps Q and one product per level)
    two_eye = (2 * eye[0]).expand(d, b, b)  # one b x b constant, broadcast
    acc = torch.baddbmm(two_eye + 2 * q, q, q)
    for _ in range(max(3, neumann_terms - 1) - 3):
        acc = torch.baddbmm(two_eye, q, acc)
    return torch.baddbmm(eye, q, acc)


def cayley_full(a: Tensor) -> Tensor:
    """BOFT's blocks: the exact Cayley transform of the skew part ``(A - A^T) / 2`` of (D, b, b) ``a``."""
    return cayley(0.5 * (a - a.transpose(1, 2)))


def coft_project(vec: Tensor, eps: float) -> Tensor:
    """COFT: scale each block's skew matrix into the Frobenius ball of radius ``eps / sqrt(D)``.

    ``vec`` (D, b (b - 1) / 2) holds the upper triangles; ``||Q||_F = sqrt(2) ||vec||``. Blocks inside the
    ball are kept, the others are moved radially onto its surface (PEFT's ``_project_batch``).
    """
    radius = eps / math.sqrt(vec.shape[0])
    norm = vec.norm(dim=-1, keepdim=True) * math.sqrt(2.0)
    inside = norm <= radius * (1 + _COFT_SLACK)
    return torch.where(inside, vec, vec * (radius / norm.clamp_min(torch.finfo(vec.dtype).tiny)))


def identity_dropout(blocks: Tensor, p: float) -> Tensor:
    """Multiplicative dropout: ``int(p D)`` random blocks of one random factor become the identity.

    ``blocks`` is (m, D, b, b); a single shared block (D = 1) is never dropped (PEFT's rule).
    """
    m, d, b, _ = blocks.shape
    k = int(p * d)
    if k == 0 or d == 1:
        return blocks
    mask = torch.zeros(m, d, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[int(torch.randint(0, m, (1,))), torch.randperm(d, device=blocks.device)[:k]] = 1
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return blocks * (1 - mask) + eye * mask


# -- block-diagonal products -----------------------------------------------------------------------
def group_size(num_blocks: int, block_size: int, width: int = GROUP_WIDTH) -> int:
    """How many consecutive blocks to treat as one dense block (largest divisor g of D, g b <= width)."""
    best = 1
    for g in range(1, num_blocks + 1):
        if g * block_size > width:
            break
        if num_blocks % g == 0:
            best = g
    return best


def group_blocks(blocks: Tensor, g: int) -> Tensor:
    """(D, b, b) -> (D / g, g b, g b): each run of ``g`` blocks as one block-diagonal dense block."""
    if g == 1:
        return blocks
    d, b, _ = blocks.shape
    eye = torch.eye(g, device=blocks.device, dtype=blocks.dtype)
    return torch.einsum("kihc,ij->kihjc", blocks.reshape(d // g, g, b, b), eye).reshape(d // g, g * b, g * b)


def ungroup_blocks(big: Tensor, g: int, b: int) -> Tensor:
    """The diagonal (b x b) blocks of (D / g, g b, g b) ``big``, as (D, b, b)."""
    if g == 1:
        return big
    n = big.shape[0]
    return big.reshape(n, g, b, g, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(n * g, b, b)


def block_apply(x: Tensor, blocks: Tensor, transpose: bool = False, out: Tensor | None = None) -> Tensor:
    """``x diag(B_1, ..., B_D)`` for rows ``x`` (N, D b): block ``k`` of each row times ``B_k`` (``B_k^T``).

    ``blocks`` is (D, b, b), or (1, b, b) for one block shared by every position. One batched GEMM over
    strided views of ``x``; blocks narrower than ``GROUP_WIDTH`` are grouped into wider dense ones.
    ``out`` (N, D b), contiguous and outside autograd: written in place, without a transposing copy.
    """
    n_rows, width = x.shape
    d, b, _ = blocks.shape
    bt = blocks.transpose(1, 2) if transpose else blocks
    if d * b != width:  # shared block
        y = x.reshape(-1, b) @ bt[0]
        return y.view(n_rows, width) if out is None else out.copy_(y.view(n_rows, width))
    g = group_size(d, b)
    bt = group_blocks(bt, g)
    gb = g * b
    xs = x.view(n_rows, d // g, gb).transpose(0, 1)  # (D / g, N, g b), strided: no copy
    if out is not None:
        torch.bmm(xs, bt, out=out.view(n_rows, d // g, gb).transpose(0, 1))
        return out
    return torch.bmm(xs, bt).transpose(0, 1).reshape(n_rows, width)


def block_outer(a: Tensor, grad: Tensor, num_blocks: int, block_size: int, out: Tensor | None = None) -> Tensor:
    """``sum_rows a_k^T grad_k`` per block: the gradient of ``block_apply(a, B)`` w.r.t. ``B`` given the
    output gradient ``grad``. Returns (num_blocks, b, b) (``num_blocks = 1`` for a shared block), or adds
    it into ``out`` (outside autograd)."""
    n_rows, width = a.shape
    b = block_size
    if num_blocks * b != width:
        y = (a.reshape(-1, b).t() @ grad.reshape(-1, b)).unsqueeze(0)
        return y if out is None else out.add_(y)
    g = group_size(num_blocks, b)
    gb = g * b
    a3 = a.view(n_rows, num_blocks // g, gb).transpose(0, 1)
    g3 = grad.view(n_rows, num_blocks // g, gb).transpose(0, 1)
    if out is not None and g == 1:
        return out.baddbmm_(a3.transpose(1, 2), g3)
    y = ungroup_blocks(torch.bmm(a3.transpose(1, 2), g3), g, b)
    return y if out is None else out.add_(y)


# -- butterfly permutations ------------------------------------------------------------------------
def butterfly_permutation(n: int, b: int, r: int, n_butterfly_factor: int = 1) -> Tensor:
    """PEFT's ``block_butterfly_perm``: within each of ``b`` equal chunks of ``0..n-1``, reorder the
    sub-chunks of size ``r`` as evens then odds (identity when ``n_butterfly_factor == 0``)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError(f"invalid butterfly: {b} blocks of 2 x {r} exceed width {n}")
    chunk = n // b
    step = chunk // r
    starts = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = (starts[:, None] * r + torch.arange(r)).reshape(-1)  # (chunk,) new position -> old
    return (torch.arange(0, n, chunk)[:, None] + order).reshape(-1)


def butterfly_permutations(width: int, block_num: int, block_size: int, factors: int) -> list[Perm | None]:
    """``(p_i, p_i^-1)`` of each butterfly factor ``i`` (``P_i[j, p_i[j]] = 1``), None for the identity."""
    perms: list[Perm | None] = []
    for i in range(factors):
        perm = butterfly_permutation(width, block_num // 2**i, block_size // 2, factors - 1)
        perms.append(None if torch.equal(perm, torch.arange(width)) else (perm, torch.argsort(perm)))
    return perms


def butterfly_apply(x: Tensor, blocks: Tensor, perms: list[Perm | None], transpose: bool = False) -> Tensor:
    """``x R`` (``x R^T`` with ``transpose``) for rows ``x`` (N, n) and ``R = A_{m-1} ... A_0``.

    ``blocks`` is (m, D, b, b) (factor ``i`` at index ``i``); ``perms[i]`` is ``(p_i, p_i^-1)`` or None.
    Each factor costs one gather in, one block-diagonal GEMM and one gather out:
    ``x A_i = block_apply(x[..., p_i^-1], R_i)[..., p_i]`` and ``x A_i^T`` the same with ``R_i^T``.
    """
    m = blocks.shape[0]
    for i in factor_order(m, transpose):
        x = factor_apply(x, blocks[i], perms[i], transpose)
    return x


def factor_order(m: int, transpose: bool = False) -> range:
    """The order the factors act on a row: ``x R = x A_{m-1} ... A_0`` (``x R^T``: ``A_0^T`` first)."""
    return range(m) if transpose else range(m - 1, -1, -1)


def factor_apply(x: Tensor, blocks: Tensor, perm: Perm | None, transpose: bool = False) -> Tensor:
    """One factor: ``x P diag(B) P^T`` (``x P diag(B)^T P^T`` with ``transpose``)."""
    if perm is not None:
        x = x.index_select(1, perm[1])
    x = block_apply(x, blocks, transpose)
    return x if perm is None else x.index_select(1, perm[0])


def block_inverse(blocks: Tensor) -> Tensor:
    """The inverse of each (.., b, b) block (for blocks that are not exactly orthogonal; else transpose);
    float16 / bfloat16 blocks are inverted in float32 (linalg has no low-precision inverse)."""
    if blocks.dtype in _LOW_PRECISION:
        return torch.linalg.inv(blocks.float()).to(blocks.dtype)
    return torch.linalg.inv(blocks)


def orthogonality_defect(blocks: Tensor) -> float:
    """``max |R_k R_k^T - I|`` over (.., b, b) blocks: 0 for exact Cayley blocks up to rounding."""
    b = blocks.shape[-1]
    gram = blocks @ blocks.transpose(-1, -2)
    return float((gram - torch.eye(b, device=blocks.device, dtype=blocks.dtype)).abs().max())


def dense_rotation(blocks: Tensor, perms: list[Perm | None], width: int) -> Tensor:
    """The (n, n) matrix ``R`` itself (tests and inspection only; the layers never build it)."""
    eye = torch.eye(width, device=blocks.device, dtype=blocks.dtype)
    return butterfly_apply(eye, blocks, perms)
