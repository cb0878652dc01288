"""AdaMSS's weight math as pure functions: the SVD basis, the subspace clustering, the per-subspace
initialisation, and the update in its factored and dense forms.

The initialisation runs the same operations, in the same order and on the same random streams, as Hugging
Face PEFT 0.21 (``peft/tuners/adamss/utils.py`` and ``AdamssLayer.update_layer``), so a seed gives its
tensors: the top-R SVD under a forked RNG seeded with ``random_seed``, scikit-learn's KMeans with PEFT's
fixed ``random_state``, then per subspace a low-rank SVD of its Gram matrix on the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

KMEANS_ITERATIONS = 10  # PEFT's clustering_Z(..., iternum=10)
KMEANS_SEED = 123456789  # PEFT's KMeans random_state


def weight_with_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W | b]`` (d_out, d_in + 1) as float32 in nn.Linear's layout (``W`` (d_out, d_in); no bias: ``W``)."""
    w = weight if bias is None else torch.cat((weight, bias.unsqueeze(1)), dim=1)
    return w.to(torch.float32).contiguous()


def fork_kwargs(device: torch.device) -> dict:
    return {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}


def principal_basis(w: Tensor, r: int, seed: int) -> tuple[Tensor, Tensor]:
    """(U (d_out, R), V^T (R, d_in')) of ``w``'s randomized top-R SVD, ``R = min(r, d_out, d_in')``.

    ``torch.svd_lowrank(q=R, niter=2)`` under a forked RNG seeded with ``seed`` (PEFT's ``slice_pca``): the
    basis is the same on every build from the same weight, and the global RNG is left as it was."""
    rank = min(r, *w.shape)
    with torch.random.fork_rng(**fork_kwargs(w.device)):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(w, q=rank, niter=2, M=None)
    return u[:, :rank].contiguous(), v[:, :rank].T.contiguous()


def cluster_rows(u: Tensor, num_subspaces: int, where: str = "") -> list[Tensor]:
    """Row indices of each of ``min(K, d_out)`` clusters of ``u``'s rows (the output channels' coordinates in
    the SVD basis): scikit-learn's KMeans (random init, one run, 10 iterations, PEFT's seed), cluster k the
    rows labelled k, in increasing order."""
    try:
        from sklearn import config_context
        from sklearn.cluster import KMeans
    except ImportError:  # an optional dependency (the "adamss" extra)
        raise ImportError('AdaMSS clusters the SVD basis with scikit-learn: pip install "peftkit[adamss]"') from None
    points = u.detach().cpu().numpy().astype("float32")
    k = min(num_subspaces, points.shape[0])
    kmeans = KMeans(n_clusters=k, init="random", n_init=1, max_iter=KMEANS_ITERATIONS, random_state=KMEANS_SEED)
    # the same fit without re-validating constant arguments and finite SVD output (half its cost on small layers)
    with config_context(skip_parameter_validation=True, assume_finite=True):
        labels = torch.from_numpy(kmeans.fit_predict(points)).long()
    clusters = [torch.where(labels == i)[0] for i in range(k)]
    empty = [i for i, c in enumerate(clusters) if c.numel() == 0]
    if empty:
        raise ValueError(f"{where}: AdaMSS's KMeans left subspace(s) {empty} of num_subspaces={k} empty (the layer's "
                         f"rows have fewer than {k} distinct SVD coordinates); allowed: a smaller num_subspaces")
    return clusters


def placeholder_layout(d_out: int, bound: int, config) -> tuple[Tensor, list[Tensor], list[tuple[Tensor, Tensor]]]:
    """(V^T, clusters, factors) on the meta device for a layer without weights (parameter counts): K equal
    blocks of consecutive rows, each at rank min(n_k, subspace_rank). No values: a real build replaces them."""
    rank, k = min(config.r, d_out, bound), min(config.num_subspaces, d_out)
    clusters = list(torch.tensor_split(torch.arange(d_out), k))
    meta = torch.device("meta")
    factors = [(torch.empty(r, rank, device=meta), torch.empty(rows.numel(), r, device=meta))
               for rows in clusters for r in [min(rows.numel(), config.subspace_rank)]]
    return torch.empty(rank, bound, device=meta), clusters, factors


def subspace_rank(data: Tensor, subspace_rank: int, dynamic: bool, threshold: float) -> int:
    """The rank r_k of one subspace (``data``: its rows of U, (n_k, R)).

    Fixed: ``min(n_k, subspace_rank)``. Dynamic: the Gram matrix's singular values above ``threshold`` times
    the largest (a randomized SVD on the global RNG, as PEFT), at most ``subspace_rank``. At least 1."""
    if dynamic:
        gram = data @ data.T
        _, s, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)
        rank = min(int((s > threshold * s[0]).sum().item()), subspace_rank, len(s))
    else:
        rank = min(data.shape[0], subspace_rank)
    return max(rank, 1)


def subspace_A(data: Tensor, rank: int) -> Tensor:
    """A_k (r_k, R): the orthonormal basis of ``data^T P_k``, ``P_k`` the top-r_k left singular vectors of the
    Gram matrix ``data data^T`` (randomized SVD on the global RNG), as ``Q^T`` of a reduced QR."""
    gram = data @ data.T
    u, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)
    q, _ = torch.linalg.qr(data.T @ u[:, :rank], mode="reduced")
    return q.T.contiguous()


def init_subspaces(u: Tensor, clusters: list[Tensor], subspace_rank_: int, dynamic: bool, threshold: float,
                   zero_B: bool, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """(A_k (r_k, R), B_k (n_k, r_k)) per subspace, drawn in PEFT's order: per subspace the rank (dynamic: one
    randomized SVD), A_k (one randomized SVD), then B_k (zero, or N(0, 0.01^2) in ``dtype`` when not ``zero_B``)."""
    out = []
    for rows in clusters:
        data = u[rows]
        rank = subspace_rank(data, subspace_rank_, dynamic, threshold)
        a = subspace_A(data, rank)
        if zero_B:
            b = torch.zeros(rows.numel(), rank, dtype=dtype, device=u.device)
        else:
            b = torch.randn(rows.numel(), rank, dtype=dtype, device=u.device) * 0.01
        out.append((a, b))
    return out


def b_positions(clusters: list[Tensor], ranks: list[int]) -> tuple[Tensor, int]:
    """Flat positions in the (d_out, sum r_k) block matrix ``B`` of every ``B_k`` entry, in the order of
    ``cat(B_k.flatten())``: B_k's rows sit at its cluster's output rows, its columns after the previous ranks."""
    total = sum(ranks)
    pos, offset = [], 0
    for rows, rank in zip(clusters, ranks):
        cols = torch.arange(offset, offset + rank)
        pos.append((rows[:, None] * total + cols[None, :]).reshape(-1))
        offset += rank
    return torch.cat(pos), total


def block_B(bs: list[Tensor], positions: Tensor, d_out: int, total_rank: int) -> Tensor:
    """The (d_out, sum r_k) matrix holding each ``B_k`` at its cluster's rows and its own rank columns."""
    flat = torch.cat([b.reshape(-1) for b in bs])
    full = flat.new_zeros(d_out * total_rank).index_put((positions,), flat)
    return full.view(d_out, total_rank)


def stacked_projection(as_: list[Tensor], new_b: Tensor) -> Tensor:
    """``M = [A_1; ...; A_K] V^T`` (sum r_k, d_in'): the input side of every subspace in one matrix."""
    return torch.cat(list(as_), dim=0) @ new_b


def adamss_apply(x: Tensor, m: Tensor, b_full: Tensor, d_in: int) -> Tensor:
    """The update ``B M [x; 1]`` (..., d_out): ``M``'s last column (when it has d_in + 1) acts on the constant 1."""
    h = torch.nn.functional.linear(x, m[:, :d_in], m[:, d_in] if m.shape[1] > d_in else None)
    return torch.nn.functional.linear(h, b_full)


def adamss_delta(as_: list[Tensor], bs: list[Tensor], new_b: Tensor, clusters: list[Tensor], d_out: int) -> Tensor:
    """The dense update (d_out, d_in') in PEFT's order: rows of cluster k are ``(B_k A_k) V^T``, the others 0.

    Its first d_in columns are the weight's delta, the last (when the base has a bias) the bias's."""
    chunks = [(b @ a) @ new_b for a, b in zip(as_, bs)]
    delta = new_b.new_zeros(d_out, new_b.shape[1])
    delta[torch.cat(clusters)] = torch.cat(chunks, dim=0)
    return delta
