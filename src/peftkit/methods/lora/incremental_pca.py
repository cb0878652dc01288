"""Incremental PCA on torch tensors, the part EVA uses (``partial_fit``), with the numerics of Hugging Face PEFT's
``peft.utils.incremental_pca.IncrementalPCA`` (after scikit-learn's ``IncrementalPCA``): per-batch mean / variance
updates in float64, the previous components stacked over the centred batch and a mean correction row, a
(randomised, seeded) SVD of that, signs fixed by the largest entry of each right-singular vector."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def incremental_mean_and_var(X: Tensor, last_mean: Optional[Tensor], last_variance: Optional[Tensor],
                             last_sample_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and count of everything seen so far plus the batch ``X`` (n, d)."""
    if X.shape[0] == 0:
        return last_mean, last_variance, last_sample_count
    new_sample_count = torch.tensor([X.shape[0]], device=X.device)
    updated_sample_count = last_sample_count + new_sample_count
    last_sum = (torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None
                else last_mean * last_sample_count)
    new_sum = X.sum(dim=0, dtype=torch.float64)
    updated_mean = (last_sum + new_sum) / updated_sample_count
    temp = X - new_sum / new_sample_count
    correction = temp.sum(dim=0, dtype=torch.float64).square()
    temp.square_()
    new_unnormalized_variance = temp.sum(dim=0, dtype=torch.float64)
    new_unnormalized_variance -= correction / new_sample_count
    if last_variance is None:
        updated_variance = new_unnormalized_variance / updated_sample_count
    else:
        last_unnormalized_variance = last_variance * last_sample_count
        last_over_new_count = last_sample_count.double() / new_sample_count
        updated_unnormalized_variance = (
            last_unnormalized_variance + new_unnormalized_variance
            + last_over_new_count / updated_sample_count * (last_sum / last_over_new_count - new_sum).square()
        )
        updated_variance = updated_unnormalized_variance / updated_sample_count
    return updated_mean, updated_variance, updated_sample_count


def svd_flip_rows(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Signs such that each row of ``v`` has its largest-magnitude entry positive (``u``'s columns follow)."""
    signs = torch.sign(v[range(v.shape[0]), torch.argmax(torch.abs(v), dim=1)])
    u *= signs[: u.shape[1]].view(1, -1)
    v *= signs.view(-1, 1)
    return u, v


class IncrementalPCA:
    """``partial_fit`` batch after batch; ``components_`` (n_components, d), ``singular_values_``,
    ``explained_variance_ratio_``. ``lowrank``: ``torch.svd_lowrank`` with q = ``lowrank_q`` (2 n_components),
    ``lowrank_niter`` iterations, under ``torch.manual_seed(lowrank_seed)`` in a forked generator state."""

    def __init__(self, n_components: Optional[int] = None, copy: bool = True, lowrank: bool = False,
                 lowrank_q: Optional[int] = None, lowrank_niter: int = 4, lowrank_seed: Optional[int] = None) -> None:
        self.n_components, self.copy, self.lowrank = n_components, copy, lowrank
        self.lowrank_niter, self.lowrank_seed = lowrank_niter, lowrank_seed
        if lowrank and lowrank_q is None:
            if n_components is None:
                raise ValueError("n_components must be specified when using lowrank mode with lowrank_q=None.")
            lowrank_q = n_components * 2
        elif lowrank and lowrank_q < n_components:
            raise ValueError("lowrank_q must be greater than or equal to n_components.")
        self.lowrank_q = lowrank_q
        self.n_features_: Optional[int] = None

    def _svd(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.lowrank:
            return torch.linalg.svd(X, full_matrices=False)
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(enabled=seeded):
            if seeded:
                torch.manual_seed(self.lowrank_seed)
            U, S, V = torch.svd_lowrank(X, q=self.lowrank_q, niter=self.lowrank_niter)
            return U, S, V.mH

    def _validate(self, X: Tensor) -> Tensor:
        X = X.clone() if self.copy else X
        n_samples, n_features = X.shape
        if self.n_components is not None and self.n_components > n_features:
            raise ValueError(f"n_components={self.n_components} invalid for n_features={n_features}, "
                             "need more rows than columns for IncrementalPCA processing.")
        if self.n_components is not None and self.n_components > n_samples:
            raise ValueError(f"n_components={self.n_components} must be less or equal to the batch number of "
                             f"samples {n_samples}")
        return X if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)

    def partial_fit(self, X: Tensor) -> "IncrementalPCA":
        first_pass = not hasattr(self, "components_")
        X = self._validate(X)
        n_samples, n_features = X.shape
        if first_pass:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
            self.n_features_ = n_features
            if not self.n_components:
                self.n_components = min(n_samples, n_features)
        if n_features != self.n_features_:
            raise ValueError("Number of features of the new batch does not match the number of features of the "
                             "first batch.")
        col_mean, col_var, n_total_samples = incremental_mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
        if first_pass:
            X -= col_mean
        else:
            col_batch_mean = torch.mean(X, dim=0)
            X -= col_batch_mean
            mean_correction_factor = torch.sqrt((self.n_samples_seen_.double() / n_total_samples) * n_samples)
            mean_correction = mean_correction_factor * (self.mean_ - col_batch_mean)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, mean_correction))
        U, S, Vt = self._svd(X)
        U, Vt = svd_flip_rows(U, Vt)
        explained_variance = S**2 / (n_total_samples - 1)
        explained_variance_ratio = S**2 / torch.sum(col_var * n_total_samples)
        self.n_samples_seen_ = n_total_samples
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_, self.var_ = col_mean, col_var
        self.explained_variance_ = explained_variance[: self.n_components]
        self.explained_variance_ratio_ = explained_variance_ratio[: self.n_components]
        return self
