"""FRoD weight math as pure functions (PEFT's arithmetic, step for step, where files or numbers depend on it)."""

from __future__ import annotations

import torch
from torch import Tensor


def category_from_key(key: str) -> str:
    """The module category a target shares its basis with: the last two path parts joined by ``_``
    (``model.layers.0.self_attn.q_proj`` -> ``self_attn_q_proj``), the last part alone after a block index
    (``h.0.c_attn``... -> ``attn_c_attn``; ``layers.3.fc`` -> ``fc``), and BERT's ``attention.output.dense`` ->
    ``attention_output`` (apart from the MLP's ``output.dense``). PEFT's ``_category_from_key``."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def layer_index_from_key(key: str, fallback: int) -> int:
    """The block index of a target: the number after ``layers``, else the first numeric part, else ``fallback``."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    for part in parts:
        if part.isdigit():
            return int(part)
    return fallback


def projection_from_weights(matrices: list[Tensor], regularization_alpha: float) -> Tensor:
    """The shared full-rank basis ``V`` (d_in x d_in) of one category from its layers' weights ``W_i``
    (d_out_i x d_in, float32): with ``[W_1; ...; W_n] = Q R``, the eigenvectors ``E`` of
    ``T = mean_i (Q_i^T Q_i + alpha I)^-1`` give ``V = R^T E`` (the right singular vectors when the stack is wider
    than tall)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        _, _, vh = torch.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q_matrix, r_matrix = torch.linalg.qr(stacked)
    dim = r_matrix.shape[1]
    t_pi = torch.zeros((dim, dim), dtype=r_matrix.dtype)
    start = 0
    for matrix in matrices:
        q_slice = q_matrix[start:start + matrix.shape[0], :]
        start += matrix.shape[0]
        t_pi += torch.linalg.inv(q_slice.T @ q_slice + regularization_alpha * torch.eye(dim, dtype=r_matrix.dtype))
    t_pi /= len(matrices)
    _, eigenvectors = torch.linalg.eigh(t_pi)
    return r_matrix.T @ eigenvectors


def nnz_of(d_in: int, sparse_rate: float) -> int:
    """Trained entries of ``S`` (d_in x d_in, off-diagonal): ``int(d_in^2 rate)``, at most ``d_in (d_in - 1)``,
    at least 1 when ``rate > 0`` and there is an off-diagonal entry."""
    off = d_in * (d_in - 1)
    nnz = min(int(d_in * d_in * sparse_rate), off)
    if sparse_rate > 0 and off > 0:
        nnz = max(1, nnz)
    return nnz


def sparse_pattern(d_in: int, sparse_rate: float, generator: torch.Generator) -> Tensor:
    """COO indices (2, nnz) of ``S``: the first ``nnz`` of a random permutation of the off-diagonal positions in
    row-major order (PEFT's draw; no draw when nnz = 0)."""
    rows, cols = torch.meshgrid(torch.arange(d_in), torch.arange(d_in), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off_diagonal = positions[positions[:, 0] != positions[:, 1]]
    nnz = nnz_of(d_in, sparse_rate)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    perm = torch.randperm(off_diagonal.shape[0], generator=generator)[:nnz]
    return off_diagonal[perm].t().contiguous()


def u_and_lambda(v: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``W = U diag(lambda) V^T`` solved for a layer (float64, on CPU): ``B = W V^-T``, ``lambda`` its column
    norms and ``U`` its normalised columns (zero where a norm vanishes); float32 results."""
    w = w.detach().to(torch.float64).cpu()
    v = v.detach().to(torch.float64).cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lambda_l = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    nonzero = lambda_l > 1e-12
    u[:, nonzero] = b[:, nonzero] / lambda_l[nonzero]
    return u.float(), lambda_l.float()


def core(indices: Tensor, values: Tensor, lambda_l: Tensor) -> Tensor:
    """``S + diag(lambda_l)`` dense (d_in x d_in), ``S`` the COO matrix (``indices``, ``values``), differentiable."""
    return torch.diag(lambda_l).index_put((indices[0], indices[1]), values, accumulate=True)


def adapted_weight(u: Tensor, m: Tensor, v: Tensor) -> Tensor:
    """``W' = U M V^T`` (d_out x d_in), ``M = S + L`` the core: the weight FRoD puts in place of ``W``."""
    return u @ (m @ v.T)



def _row_blocks(d: int) -> list[tuple[int, int]]:
    """(lo, hi) row blocks of a (d x d) float32 matrix, about 4 MiB each."""
    step = max(1, (1 << 20) // max(d, 1))
    return [(lo, min(lo + step, d)) for lo in range(0, d, step)]


def core_rows(indices: Tensor, values: Tensor, lambda_l: Tensor, lo: int, hi: int) -> Tensor:
    """Rows ``lo:hi`` of ``core(indices, values, lambda_l)``, dense ((hi - lo) x d_in)."""
    d = lambda_l.shape[0]
    if lo == 0 and hi == d:
        return core(indices, values, lambda_l)
    hit = (indices[0] >= lo) & (indices[0] < hi)
    block = torch.zeros(hi - lo, d, dtype=values.dtype, device=values.device)
    diag = torch.arange(lo, hi, device=values.device)
    block[diag - lo, diag] = lambda_l[lo:hi]
    return block.index_put((indices[0][hit] - lo, indices[1][hit]), values[hit], accumulate=True)


class CoreLinear(torch.autograd.Function):
    """``z M^T`` with ``M = S + diag(lambda_l)`` (``core``), built a block of rows at a time in forward and again
    in backward, never whole and never kept: autograd composing ``core`` and ``F.linear`` keeps the dense
    (d_in x d_in) ``M`` of every layer until backward, which is more than the activations when d_in exceeds the
    tokens (1536^2 floats = 9 MiB per MLP layer of a MiniLM). Kept here: ``z`` (tokens x d_in), the indices,
    values and ``lambda_l``."""

    @staticmethod
    def forward(ctx, z: Tensor, indices: Tensor, values: Tensor, lambda_l: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(z, indices, values, lambda_l)
        d = lambda_l.shape[0]
        blocks = _row_blocks(d)
        if len(blocks) == 1:
            return torch.nn.functional.linear(z, core(indices, values, lambda_l))
        out = z.new_empty(*z.shape[:-1], d)
        for lo, hi in blocks:
            out[..., lo:hi] = torch.nn.functional.linear(z, core_rows(indices, values, lambda_l, lo, hi))
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        z, indices, values, lambda_l = ctx.saved_tensors
        need_z, _, need_values, need_lambda = ctx.needs_input_grad
        d = lambda_l.shape[0]
        g2, z2 = g.reshape(-1, d), z.reshape(-1, d)
        blocks = _row_blocks(d)
        grad_z = None
        if need_z and len(blocks) == 1:
            grad_z = g2 @ core(indices, values, lambda_l)
        elif need_z:
            grad_z = torch.zeros_like(z2)
        grad_values = torch.empty_like(values) if need_values else None
        rows = indices[0]
        for lo, hi in blocks:
            if need_z and len(blocks) > 1:  # g M = sum over row blocks of g[:, block] M[block]
                grad_z.addmm_(g2[:, lo:hi], core_rows(indices, values, lambda_l, lo, hi))
            if need_values:  # (g^T z)[i, j] for the nnz entries, one row block of g^T z at a time
                block = g2[:, lo:hi].t() @ z2
                if lo == 0 and hi == d:
                    grad_values = block[rows, indices[1]]
                else:
                    hit = (rows >= lo) & (rows < hi)
                    grad_values[hit] = block[rows[hit] - lo, indices[1][hit]]
        grad_lambda = torch.linalg.vecdot(g2, z2, dim=0) if need_lambda else None  # diag(g^T z)
        return None if grad_z is None else grad_z.view_as(z), None, grad_values, grad_lambda
