"""MonteCLoRA, Monte-Carlo low-rank adaptation (Sengupta et al. 2024, arXiv 2411.04358):
``LoraConfig(monteclora_config=MontecloraConfig(...))``.

LoRA, ``h = W0 x + s B A x``, whose A (r, d_in) is, in training, a mixture of ``N = num_samples`` perturbed copies:

    Σ = diag(max(diag(S Z_W S^T), 1e-3)),  S = diag(exp(std_prior)),  Z_W ~ Wishart(df=r, I_r)
    E_n = sample_scaler · Z_n Σ^{1/2},  Z_n ~ N(0, 1)^{d_in x r}       (n = 1..N)
    w = softmax(L z + μ),  z ~ N(0, I_N),  μ = log α - mean(log α),  α = exp(expert_weights_prior),
        L L^T = diag(1/α (1 - 2/N) + sum(1/α) / N^2) + 1e-6 I   (a Gaussian approximation of Dirichlet(α))
    A_train^T = Σ_n w_n (A^T + E_n)

At eval (and in merges) A itself is used: the mean, plain LoRA. A, B, ``std_prior`` (r,) and
``expert_weights_prior`` (N,) train; W0 is frozen. The last draw's Σ (``gaussian_var_prior``, r x r) and w
(``expert_weights``, N) are buffers saved in the file (peft's keys ``lora_monteclora_sampler.<name>``). The
variational loss is not part of the forward: ``monteclora_loss(model)`` (peft's ``LoraModel._get_monteclora_loss``)
returns, averaged over the MonteCLoRA layers, ``kl_loss_weight (KL_Dir + KL_Wishart + KL_Gauss) + [sum(w^2)]``
(the last with ``use_entropy``) in training mode, and 0 in eval mode, for the training loop to add.

As peft 0.21.2 (``MontecloraLinearVariant`` / ``MontecloraSampler``): Linear layers only (nn.Linear, GPT-2's Conv1D);
the same formulas, parameters, buffers and file keys; 0.21.2's KL terms as written there (the Wishart and Gaussian
ones on diagonals). Deliberate differences, same distribution: peft pre-draws ``buffer_size`` noise sets per layer
(``buffer_size x N x d_in x r`` numbers held in memory); peftkit draws each forward's set when it runs it
(``buffer_size`` is kept in the config and file only), so a training draw is not peft's draw for the same seed.
The Cholesky factors of the two diagonal matrices are their element-wise square roots (what Cholesky returns for
them) and a NaN draw falls back to A without a host sync (peft checks and warns).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions.wishart import Wishart

from ...kernel_helpers import CONV1D_TYPES
from ...layers import AdapterLayer
from ...targeting import pattern_value
from . import dispatch
from .layer import LoraAdapter

FIELD = "monteclora_config"
_EPS_VAR, _EPS_DIR = 1e-3, 1e-6


# -- the math (pure functions) ------------------------------------------------------------------------------------
def gaussian_var(std_prior: Tensor, z_wishart: Tensor) -> Tensor:
    """Σ (r, r): the clipped diagonal of ``S Z_W S^T``, ``S = diag(exp(std_prior))``."""
    std = torch.diag(torch.exp(std_prior))
    return torch.diag(torch.clip((std @ z_wishart @ std.T).diag(), min=_EPS_VAR))


def perturbations(z_mvn: Tensor, var: Tensor, sample_scaler: float) -> Tensor:
    """E (N, d_in, r) = ``sample_scaler Z Σ^{1/2}`` (Σ diagonal: its Cholesky factor is the square root)."""
    root = var.diagonal().float().sqrt().to(var.dtype)
    return sample_scaler * torch.nan_to_num(z_mvn * root, nan=_EPS_VAR)


def mixture_weights(expert_weights_prior: Tensor, z_dirichlet: Tensor) -> Tensor:
    """w (N,): softmax of the Gaussian approximation of a Dirichlet(exp(expert_weights_prior)) draw."""
    alpha = torch.clamp(torch.exp(expert_weights_prior), min=_EPS_DIR)
    n = alpha.shape[0]
    mu = torch.log(alpha) - torch.log(alpha).mean()
    diag = torch.clamp(1 / alpha * (1 - 2 / n) + 1 / (n ** 2) * (1 / alpha).sum(), min=_EPS_DIR) + _EPS_DIR
    return torch.softmax(diag.float().sqrt().to(alpha.dtype) * z_dirichlet + mu, dim=-1)


def mixed_factor(A: Tensor, noise: Tensor, weights: Tensor) -> Tensor:
    """``(Σ_n w_n (A^T + E_n))^T`` (r, d_in), in peft's order (so gradients reach w through A too)."""
    return torch.einsum("n,nij->ij", weights, A.t() + noise).t()


def dirichlet_kl(alpha2: Tensor, prior: float) -> Tensor:
    alpha1 = torch.full_like(alpha2, prior, dtype=torch.float32)
    gamma = lambda t: torch.lgamma(t).exp()  # noqa: E731 (peft's ``custom_gamma``)
    return (torch.log(gamma(alpha2.sum()) / gamma(alpha1.sum())) + torch.log(gamma(alpha2) / gamma(alpha1)).sum()
            + ((alpha2 - alpha1) * (torch.digamma(alpha2) - torch.digamma(alpha2.sum()))).sum())


def variational_loss(std_prior: Tensor, expert_weights_prior: Tensor, var: Tensor, weights: Tensor,
                     cfg: Any) -> tuple[Tensor, Tensor | float]:
    """(``kl_loss_weight (KL_Dir + KL_Wishart + KL_Gauss)``, ``sum(w^2)`` or 0): peft's ``get_variational_loss``."""
    r, n = std_prior.shape[0], expert_weights_prior.shape[0]
    kl1 = dirichlet_kl(torch.exp(expert_weights_prior), cfg.dirichlet_prior)
    v = torch.exp(std_prior) ** 2  # diag(S S^T)
    kl2 = 0.5 * (-torch.log(v).sum() * r + v.sum() * r - r ** 2)
    d = torch.clamp(var.diagonal(), min=1e-6)
    kl3 = n * 0.5 * (d.sum() - torch.log(d).sum() - r)
    entropy = (weights ** 2).sum() if cfg.use_entropy else 0
    return cfg.kl_loss_weight * (kl1 + kl2 + kl3), entropy


# -- the adapter -------------------------------------------------------------------------------------------------
class MontecloraAdapter(LoraAdapter):
    """LoRA whose lora_A is a learned Monte-Carlo mixture in training and itself at eval (see the module doc)."""

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        if not isinstance(base, (nn.Linear, *CONV1D_TYPES)):
            raise ValueError(f"LoraConfig.monteclora_config: MonteCLoRA adapts Linear layers only (nn.Linear, Conv1D; "
                             f"as peft); {key or 'a target'} is a {type(base).__name__}: leave it out of "
                             "target_modules")
        super().__init__(base, config, key, init=init)
        self.mc = cfg = config.monteclora_config
        A = self.lora_A
        r, n, factory = self.r, cfg.num_samples, {"device": A.device, "dtype": A.dtype}
        self.std_prior = nn.Parameter(torch.rand(r, **factory))
        self.expert_weights_prior = nn.Parameter(torch.rand(n, **factory))
        self.register_buffer("gaussian_var_prior", torch.eye(r, **factory))
        self.register_buffer("expert_weights", torch.ones(n, **factory) / n)
        self._draw: tuple[Tensor, Tensor] | None = None  # the last training draw (Σ, w), with its autograd graph
        self._wishart: Wishart | None = None

    @property
    def checkpoint_keys(self) -> dict[str, str]:  # type: ignore[override]
        sampler = {name: f"lora_monteclora_sampler.{name}"
                   for name in ("std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")}
        return {**super().checkpoint_keys, **sampler}

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """LoRA's ``r (d_in + d_out)`` (+ d_out with lora_bias), + r (``std_prior``) + num_samples."""
        r = pattern_value(config.rank_pattern, key, config.r)
        return super().param_count(base, config, key) + r + config.monteclora_config.num_samples

    def train(self, mode: bool = True) -> "MontecloraAdapter":
        if not mode:
            self._draw = None  # the loss is 0 in eval mode: release the last draw's graph
        return super().train(mode)

    # -- sampling --------------------------------------------------------------------------------------------
    def sample(self) -> tuple[Tensor, Tensor]:
        """One training draw: (E (N, d_in, r), w (N,)); Σ and w are kept as the buffers (and for the loss)."""
        p = self.std_prior
        r, n, d_in = self.r, self.mc.num_samples, self.lora_A.shape[1]
        if self._wishart is None or self._wishart.scale_tril.device != p.device:
            self._wishart = Wishart(df=r, scale_tril=torch.eye(r, device=p.device))
        z_mvn = torch.randn(n, d_in, r, device=p.device, dtype=p.dtype)
        z_dir = torch.randn(n, device=p.device, dtype=p.dtype)
        z_w = self._wishart._bartlett_sampling(torch.Size()).to(p.dtype)  # float32, as peft
        var = gaussian_var(p, z_w)
        weights = mixture_weights(self.expert_weights_prior, z_dir)
        with torch.no_grad():
            self.gaussian_var_prior.copy_(var)
            self.expert_weights.copy_(weights)
        self._draw = (var, weights)
        return perturbations(z_mvn, var, self.mc.sample_scaler), weights

    def loss(self) -> tuple[Tensor | float, Tensor | float]:
        """peft's ``get_variational_loss``: (weighted KL, entropy) in training mode, (0, 0) in eval mode."""
        if not self.training:
            return 0.0, 0.0
        var, weights = self._draw or (self.gaussian_var_prior, self.expert_weights)
        return variational_loss(self.std_prior, self.expert_weights_prior, var, weights, self.mc)

    # -- forward ---------------------------------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None if self.training else super().fused_forward(base, x)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if not self.training:
            return super().forward(base, x, out)
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        noise, weights = self.sample()
        mixed = mixed_factor(A, noise, weights)
        bad = torch.isnan(noise).any() | torch.isnan(weights).any()
        h = F.linear(x, torch.where(bad, A, mixed))
        if self.bias_B is not None or out.dtype != A.dtype:
            return out + (F.linear(h, self.lora_B, self.bias_B) * self.scaling).to(out.dtype)
        return self._accumulate(base, h, out)


def monteclora_loss(model: nn.Module, adapter_names: str | list[str] | None = None) -> Tensor | float:
    """peft's ``LoraModel._get_monteclora_loss``: the mean over the MonteCLoRA layers of the named adapters (default:
    the active ones) of ``MontecloraAdapter.loss`` (KL + entropy); 0.0 when there is none."""
    if adapter_names is None:
        adapter_names = list(model.active_adapters)
    elif isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    total: Tensor | float = 0.0
    count = 0
    for module in model.modules():
        if not isinstance(module, AdapterLayer):
            continue
        for name in adapter_names:
            adapter = module.adapters[name] if name in module.adapters else None
            if isinstance(adapter, MontecloraAdapter):
                kl, entropy = adapter.loss()
                total, count = total + kl + entropy, count + 1
    return total / count if count else 0.0


dispatch.BY_FIELD[FIELD] = MontecloraAdapter
