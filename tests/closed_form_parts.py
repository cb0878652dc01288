"""The pieces of the closed-form counts (tests/closed_forms.py): one adapted layer (``Site``), one adapter
(``Adapted``), the sum over layers (``each``) and the counts that take more than a line (bottleneck adapters,
hybrids, selective masks, LoKr's factorisation, Lily's sharing, prompt encoders ...), each written from the
method's math."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D


def _dims(base: nn.Module) -> tuple[int, int, int, int]:
    """(d_in, d_out, c_in, c_out) of a base layer, read from its type's own fields; d_in of a convolution is its
    fan-in, in_channels / groups x kernel area."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, base.in_features, base.out_features
    if isinstance(base, Conv1D):  # GPT-2: weight stored (d_in, d_out)
        return base.weight.shape[0], base.weight.shape[1], base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, nn.modules.conv._ConvNd):
        fan_in = base.in_channels // base.groups * math.prod(base.kernel_size)
        return fan_in, base.out_channels, base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim, base.num_embeddings, base.embedding_dim
    raise AssertionError(f"no closed form for a {type(base).__name__}")


@dataclasses.dataclass
class Site:
    """One adapted layer: its path, its base layer and the adapter's config."""

    path: str
    base: nn.Module
    cfg: Any

    d_in = property(lambda self: _dims(self.base)[0])
    d_out = property(lambda self: _dims(self.base)[1])
    c_in = property(lambda self: _dims(self.base)[2])
    c_out = property(lambda self: _dims(self.base)[3])


@dataclasses.dataclass
class Adapted:
    """One adapter of a wrapped model: its config, its layers, a builder of the plain model, the saved modules."""

    cfg: Any
    sites: list[Site]
    plain: Callable[[], nn.Module]
    heads: list[str]


def each(per_layer: Callable[[Site], int], once: Callable[[Any], int] = lambda cfg: 0) -> Callable[[Adapted], int]:
    """A sum over the adapted layers, plus adapter-level trained state counted ``once`` from the config."""
    return lambda a: sum(per_layer(s) for s in a.sites) + once(a.cfg)


def _named(path: str, targets: Any) -> bool:
    """PEFT's matching: a string full-matches the path, a list entry is the path or a dotted suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _named_ff(s: Site) -> bool:
    """IA3's feedforward targets: ``feedforward_modules`` (PEFT's rule: a regex full-match, or a plain suffix)."""
    ff = s.cfg.feedforward_modules
    if ff is None:
        return False
    return re.fullmatch(ff, s.path) is not None if isinstance(ff, str) else any(s.path.endswith(t) for t in ff)


def _norm_width(base: nn.Module) -> int:
    return base.normalized_shape[-1] if hasattr(base, "normalized_shape") else base.weight.shape[-1]


def _own(base: nn.Module) -> int:
    return sum(p.numel() for p in base.parameters(recurse=False))


# -- bottleneck adapters (Houlsby, Pfeiffer, parallel, AdaptFormer, Compacter) --------------------------------
def _block_io(base: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a Linear, or of a block (an FFN: its first Linear's input, last one's output)."""
    if isinstance(base, (nn.Linear, Conv1D)):
        return _dims(base)[:2]
    linears = [m for m in base.modules() if isinstance(m, (nn.Linear, Conv1D))]
    return _dims(linears[0])[0], _dims(linears[-1])[1]


def _piece(s: Site) -> str:
    """Where the adapter of ``s`` sits: "seq" / "ln" (in sequence, on the output), "par" (parallel, on the input),
    or a split FFN's "tap" (its input Linear: holds the adapter) and "add" (its output Linear: holds nothing)."""
    if s.cfg.mode == "sequential":
        return "ln" if s.cfg.original_ln_before else "seq"
    if s.cfg.split_ffn:
        out_name, in_name = s.cfg.split_ffn
        if _named(s.path, [in_name]):
            return "tap"
        if _named(s.path, [out_name]):
            return "add"
    return "par"


def _bottleneck_io(s: Site) -> tuple[int, int]:
    """(d_in, d) of the adapter: in sequence it reads and writes the layer's output; in parallel it reads the
    block's input and writes its output; a split FFN's tap reads and writes the FFN's width."""
    piece = _piece(s)
    if piece == "ln":
        return _norm_width(s.base), _norm_width(s.base)
    d_in, d_out = _block_io(s.base)
    return {"seq": (d_out, d_out), "tap": (d_in, d_in)}.get(piece, (d_in, d_out))


def _bottleneck_m(cfg: Any, d: int) -> int:  # m, or d / reduction_factor
    return cfg.bottleneck_size if cfg.bottleneck_size is not None else max(1, int(d // cfg.reduction_factor))


def bottleneck(s: Site) -> int:
    """W_down (m, d_in) + b_d (m) and W_up (d, m) + b_u (d): m (d_in + 1) + d (m + 1)."""
    if _piece(s) == "add":
        return 0
    (d_in, d), m = _bottleneck_io(s), _bottleneck_m(s.cfg, _bottleneck_io(s)[1])
    return m * (d_in + 1) + d * (m + 1)


def compacter(s: Site) -> int:
    """PHM down and up: sum_i A_i (x) s_i t_i^T, rank-1 B_i: n (d/n + m/n) each, plus the biases: 3 (d + m)."""
    d = _bottleneck_io(s)[1]
    return 3 * (d + _bottleneck_m(s.cfg, d))


def _gate_width(s: Site) -> int:
    """A hybrid's gate reads its part's input: the layer's output in sequence, the layer's input otherwise."""
    if getattr(s.cfg, "original_ln_before", False):
        return _norm_width(s.base)
    d_in, d_out = _block_io(s.base)
    return d_out if getattr(s.cfg, "mode", None) == "sequential" else d_in


def hybrid(a: Adapted) -> int:
    """Each part's own count on the layers it targets, plus a gate ``Linear(d, 1)`` per part and layer where the
    part holds parameters (gated hybrids: UniPELT)."""
    total = 0
    for s in a.sites:
        for name in sorted(a.cfg.parts):
            if s.path not in a.cfg.parts[name]["_paths"]:
                continue
            part = Site(s.path, s.base, a.cfg.part_config(name))
            n = PARTS[name](part)
            total += n + (_gate_width(part) + 1 if a.cfg.gated and n else 0)
    return total


# -- selective methods: a share of the model's selectable entries ---------------------------------------------
def selectable(a: Adapted) -> int:
    """N: the entries of the leaf modules' own parameters (a module with parameter-holding children holds none
    that can be selected), outside the task head and ``modules_to_save``, not tied between modules."""
    model = a.plain()
    owners = Counter(id(p) for _, m in model.named_modules(remove_duplicate=False)
                     for p in m._parameters.values() if p is not None)
    targets, n = getattr(a.cfg, "target_modules", None), 0
    for path, m in model.named_modules():
        if not path or any(re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", path) for h in a.heads):
            continue
        if targets is not None and not _named(path, targets):
            continue
        if any(True for c in m.children() for _ in c.parameters()):
            continue
        n += sum(p.numel() for p in m._parameters.values() if p is not None and owners[id(p)] == 1)
    return n


# -- layer methods needing more than one line -----------------------------------------------------------------
def glora(s: Site) -> int:
    """A, B: r (d_in + d_out) each as LoRA paths, d_out as vectors, 1 as constants; on a layer with a bias
    also C (d_in -> 1 as a rank-r LoRA: r (d_in + 1), a vector: d_in) and D, E (vectors: d_out each, or 1)."""
    r, cfg, d_in, d_out = s.cfg.r, s.cfg, s.d_in, s.d_out
    ab = {"lora": r * (d_in + d_out), "vector": d_out, "constant": 1, "none": 0}[cfg.config_A_B]
    if getattr(s.base, "bias", None) is None:
        return 2 * ab
    c = {"lora": r * (d_in + 1), "vector": d_in, "none": 0}[cfg.config_C]
    de = {"vector": d_out, "constant": 1, "none": 0}[cfg.config_D_E]
    return 2 * ab + c + 2 * de


def _factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split dim = m n, m <= n: ``factor`` x the rest when it divides dim, else the divisor pair
    closest to the square root (divisors up to ``factor``)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    factor = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        new_m = next(k for k in range(m + 1, dim + 1) if dim % k == 0)
        if new_m > factor:
            break
        m, n = new_m, dim // new_m
    return min(m, n), max(m, n)


def lokr(s: Site) -> int:
    """dW = W1 (x) W2, d_out = a b, c_in = c d (each split near its square root): W1 (a, c) in full (or
    a r + r c with decompose_both and r < max(a, c) / 2), W2 (b, d k) in full unless r < max(b, d) / 2, then
    b r + r d k (with use_effective_conv2d on a k > 1 kernel: r r k + r b + r d)."""
    r, cfg = s.cfg.r, s.cfg
    conv = isinstance(s.base, nn.modules.conv._ConvNd)
    c_in = s.base.in_channels // s.base.groups if conv else s.d_in
    k = math.prod(s.base.kernel_size) if conv else 1
    a, b = _factorization(s.d_out, cfg.decompose_factor)
    c, d = _factorization(c_in, cfg.decompose_factor)
    w1 = a * r + r * c if cfg.decompose_both and r < max(a, c) / 2 else a * c
    if r >= max(b, d) / 2:
        return w1 + b * d * k
    if conv and cfg.use_effective_conv2d and k > 1:
        return w1 + r * r * k + r * b + r * d
    return w1 + b * r + r * d * k


def lily(a: Adapted) -> int:
    """Per layer its router (num_B, r); A (r, d_in) shared by each run of stride_A layers and the experts B
    (num_B r, d_out) by all layers of a group (same target suffix and weight shape, in module order; without
    target_modules the suffix is the module's own name)."""
    cfg, groups = a.cfg, Counter()
    targets = cfg.target_modules
    for s in a.sites:
        if targets is None or isinstance(targets, str):
            suffix = targets or s.path.rpartition(".")[2]
        else:
            suffix = max((t for t in targets if s.path.endswith(t)), key=len)
        groups[(suffix, s.d_in, s.d_out)] += 1
    return sum(n * cfg.num_B * cfg.r + math.ceil(n / cfg.stride_A) * cfg.r * d_in + cfg.num_B * cfg.r * d_out
               for (_, d_in, d_out), n in groups.items())


def trainable_tokens(a: Adapted) -> int:
    """k rows of width d for each distinct embedding weight (tied layers, an LM head, share the embedding's)."""
    weights = {id(s.base.weight): s.base.weight.shape[1] for s in a.sites}
    return len(a.cfg.token_indices) * sum(weights.values())


def p_tuning(s: Site) -> int:
    """n d embeddings (n per transformer stack) plus the encoder: MLP d -> h -> h -> d with biases, or a
    bidirectional LSTM (per layer and direction 4h (d_in + h) + 8h) and Linear(2h, 2h) - ReLU - Linear(2h, d)."""
    cfg = s.cfg
    n, d, h = cfg.num_virtual_tokens * (cfg.num_transformer_submodules or 1), cfg.token_dim, cfg.encoder_hidden_size
    if str(getattr(cfg.encoder_reparameterization_type, "value", cfg.encoder_reparameterization_type)) == "MLP":
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    lstm = sum(2 * (4 * h * (d if i == 0 else 2 * h) + 4 * h * h + 8 * h) for i in range(cfg.encoder_num_layers))
    return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


def cocoop(s: Site) -> int:
    """M context vectors of the text width d_t, plus the meta-net Linear(d_v, h) - ReLU - Linear(h, d_t),
    h = d_v / 16 (d_v: CLIP's projection width)."""
    d_t, d_v = s.base.embedding_dim, s.cfg.vision_dim
    h = s.cfg.meta_hidden or max(1, d_v // 16)
    return s.cfg.num_virtual_tokens * d_t + d_v * h + h + h * d_t + d_t


def ssf(s: Site) -> int:  # a scale and a shift per output channel (norm layers: per normalized feature)
    b = s.base
    return 2 * (b.normalized_shape[-1] if hasattr(b, "normalized_shape") else b.num_features
                if hasattr(b, "num_features") else b.num_channels if isinstance(b, nn.GroupNorm) else s.c_out)


def prefix_projection(s: Site) -> int:  # the n x d embedding and a two-layer MLP d -> h -> 2 L d with biases
    n, d, L, h = s.cfg.num_virtual_tokens, s.cfg.token_dim, s.cfg.num_layers, s.cfg.encoder_hidden_size
    return n * d + (d * h + h) + (h * 2 * L * d + 2 * L * d)


def lora(s: Site) -> int:  # A: r x d_in, B: d_out x r
    return s.cfg.r * (s.d_in + s.d_out)


def _oft(s: Site) -> int:  # r blocks of size b = d_in / r: the b (b - 1) / 2 skew-symmetric entries of each
    b = s.d_in // s.cfg.r
    return s.cfg.r * b * (b - 1) // 2


def adamss(s: Site) -> int:
    """K = min(num_subspaces, d_out) subspaces (k-means over the d_out rows of the top-R left singular vectors of
    [W | b], R = min(r, d_out, d_in (+ 1 with a bias))), each A_k (r_k, R) and B_k (n_k, r_k): K R + d_out at
    subspace_rank r_k = 1 (a larger r_k caps at each cluster's size n_k, which k-means decides)."""
    assert s.cfg.subspace_rank == 1, "adamss: closed form only for subspace_rank=1 (else it depends on clusters)"
    bias = getattr(s.base, "bias", None) is not None
    return min(s.cfg.num_subspaces, s.d_out) * min(s.cfg.r, s.d_out, s.d_in + bias) + s.d_out


def tinylora(a: Adapted) -> int:
    """One trained vector v (u,) per group of layers: max(1, round(L (1 - weight_tying))) groups of the L targets
    (A, B from the SVD and the projections P (u, r, r) are frozen)."""
    return a.cfg.u * max(1, round(len(a.sites) * (1.0 - a.cfg.weight_tying)))


def xlora(a: Adapted) -> int:
    """The scaling head only (the LoRA experts are frozen): xlora_depth Linear layers with biases, hidden_size ->
    xlora_size -> ... -> one scaling per expert (per expert and layer with layerwise_scalings)."""
    c = a.cfg
    out = len(c.adapters) * (len(a.sites) if c.layerwise_scalings else 1)
    widths = [c.hidden_size] + [c.xlora_size] * (c.xlora_depth - 1) + [out]
    return sum((w_in + 1) * w_out for w_in, w_out in zip(widths, widths[1:]))


# the parts a hybrid (MAM, UniPELT) may hold, by method name
PARTS: dict[str, Callable[[Site], int]] = {
    "lora": lora, "houlsby": bottleneck, "pfeiffer": bottleneck, "parallel_adapter": bottleneck,
    "adaptformer": bottleneck,
}
