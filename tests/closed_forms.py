"""Closed-form trainable-parameter counts of every registry example (used by tests/test_contract.py).

Written from each method's math (the paper, and Hugging Face PEFT's tensor shapes where PEFT has the method),
never from peftkit's own ``param_count`` nor from the built tensors' shapes: only the adapted layers' own
dimensions (``Site``), the example's config (as injection filled it in) and, for the selective methods, the
plain model's parameters. ``CLOSED_FORM[example](a)`` is the trainable count of one adapter ``a``
(``Adapted``); most are a sum over its layers (``each``), some add adapter-level state once (VB-LoRA's
vector bank, Uni-LoRA's theta_d, Compacter's shared rules). The test adds the trained copies of saved
modules (task heads).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

from .closed_form_parts import (
    Adapted,
    _named,
    _named_ff,
    _oft,
    _own,
    adamss,
    bottleneck,
    cocoop,
    compacter,
    each,
    glora,
    hybrid,
    lily,
    lokr,
    lora,
    p_tuning,
    prefix_projection,
    selectable,
    ssf,
    tinylora,
    trainable_tokens,
    xlora,
)

def _shadow(a: Adapted) -> int:
    """ShadowPEFT: per block W_down (r x d), W_up (d x r) and the update MLPs T, G (d -> u -> d, biases; u =
    update_hidden_size or r); once, the mirror backbone: the decoder stack with one block (its own embeddings, as
    share_embeddings=False)."""
    plain = a.plain()
    if not hasattr(plain, "model") and not hasattr(plain, "transformer"):  # a diffusers transformer: _shadow_dit
        return _shadow_dit(a, plain.config)
    stack = getattr(plain, "model", None) or plain.transformer
    blocks = getattr(stack, "layers", None) or stack.h
    d, r = plain.config.hidden_size, a.cfg.r
    u = a.cfg.update_hidden_size or r
    backbone = sum(p.numel() for p in stack.parameters()) - sum(p.numel() for b in blocks[1:] for p in b.parameters())
    return len(a.sites) * (2 * d * r + 2 * (2 * d * u + u + d)) + backbone


def _shadow_dit(a: Adapted, cfg) -> int:
    """ShadowPEFT on a diffusers transformer (width d = heads x head width): the per-block parts as on a decoder; once,
    the token MLP backbone: d -> d_s (with bias), then per layer LayerNorm(d_s) and d_s -> i -> d_s (biases; d_s =
    shadow_hidden_size or d, i = shadow_intermediate_size or d_s), and a bias-free d_s -> d projection when d_s != d."""
    d, r = cfg.num_attention_heads * cfg.attention_head_dim, a.cfg.r
    u = a.cfg.update_hidden_size or r
    ds = a.cfg.shadow_hidden_size or d
    i = a.cfg.shadow_intermediate_size or ds
    backbone = d * ds + ds + (a.cfg.shadow_num_hidden_layers or 1) * (2 * ds + 2 * ds * i + i + ds)
    return len(a.sites) * (2 * d * r + 2 * (2 * d * u + u + d)) + backbone + (ds * d if ds != d else 0)


def _lst(a: Adapted) -> int:
    """LST (arXiv 2206.06522): side width d_s = d / r over N backbone blocks: N + 1 down-projections d -> d_s (with
    bias), N gate logits, N BERT blocks of width d_s (Q, K, V, O: d_s x d_s + bias; FFN d_s -> f -> d_s with biases,
    f = intermediate_size // r; two LayerNorms), the up-projection d_s -> d (with bias)."""
    cfg = a.plain().config
    d, n, r = cfg.hidden_size, cfg.num_hidden_layers, a.cfg.reduction_factor
    ds, f = d // r, a.cfg.side_intermediate_size or cfg.intermediate_size // r
    block = 4 * ds * (ds + 1) + 2 * ds * f + f + ds + 4 * ds
    return (n + 1) * ds * (d + 1) + n + n * block + d * (ds + 1)


def _ip_adapter(a: Adapted) -> int:
    """IP-Adapter (arXiv 2308.06721): per cross-attention W'_k, W'_v, bias-free c -> d as its to_k / to_v; once, the
    image projection D -> N c (with bias) and its LayerNorm over c (c: the text width every adapted layer reads)."""
    if getattr(a.sites[0].base, "add_k_proj", None) is not None:  # SD3's joint attention (its own text projections)
        return _ip_adapter_sd3(a)
    c = a.sites[0].base.to_k.in_features
    per_layer = sum(2 * s.base.to_k.in_features * s.base.to_k.out_features for s in a.sites)
    return per_layer + a.cfg.image_embed_dim * a.cfg.num_tokens * c + a.cfg.num_tokens * c + 2 * c


def _ip_adapter_sd3(a: Adapted) -> int:
    """IP-Adapter on SD3 (diffusers' SD3IPAdapterJointAttnProcessor2_0 and IPAdapterTimeImageProjection): per joint
    attention of width d and head width h, the AdaLN of the image tokens W -> 2 d (with bias), bias-free d -> d
    to_k_ip / to_v_ip and three RMSNorm scales of h (q, k, image k); once, the resampler of width W: N W latents,
    D -> W in and W -> d out (biases), a LayerNorm over d, the timestep MLP t -> W -> W (biases), and per block two
    LayerNorms, a bias-free attention of inner width I = 64 x heads (q: W I, fused kv: 2 W I, out: I W), a bias-free
    4x FFN (8 W^2), the AdaLN projection W -> 4 W (with bias) and its LayerNorm."""
    cfg, w = a.cfg, a.cfg.resampler_dim
    widths = [(s.base.to_k.out_features, s.base.to_k.out_features // s.base.heads) for s in a.sites]  # (d, h)
    per_layer = sum(2 * w * d + 2 * d + 2 * d * d + 3 * h for d, h in widths)
    d, inner = widths[0][0], 64 * cfg.resampler_heads
    block = 2 * 2 * w + 4 * w * inner + 8 * w * w + 4 * w * w + 4 * w + 2 * w
    resampler = (cfg.num_tokens * w + cfg.image_embed_dim * w + w + w * d + d + 2 * d
                 + cfg.timestep_in_dim * w + w + w * w + w + cfg.resampler_depth * block)
    return per_layer + resampler


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def _controlnet(a: Adapted) -> int:
    """ControlNet (arXiv 2302.05543): a trainable copy of the UNet's encoder (its conv_in, time embedding, down blocks
    and mid block: the plain UNet's own parts); the conditioning encoder (c -> o_0 3x3; per further width o_i -> o_i
    3x3 and o_i -> o_{i+1} 3x3 stride 2; o_last -> b_0 3x3, zero); one zero 1x1 conv (b x b + b) per skip state
    (conv_in's output, every resnet of every down block, every downsampler: all blocks but the last) and on the
    mid block's output."""
    unet = a.plain()
    if hasattr(unet, "transformer_blocks"):  # SD3's transformer: _controlnet_sd3
        return _controlnet_sd3(a, unet)
    cfg, o = unet.config, a.cfg.conditioning_embedding_out_channels
    b = list(cfg.block_out_channels)
    copy = sum(p.numel() for n in ("conv_in", "time_embedding", "down_blocks", "mid_block")
               for p in getattr(unet, n).parameters())
    embed = (_conv(a.cfg.conditioning_channels, o[0], 3) + _conv(o[-1], b[0], 3)
             + sum(_conv(o[i], o[i], 3) + _conv(o[i], o[i + 1], 3) for i in range(len(o) - 1)))
    skips = [b[0]] + [w for w in b for _ in range(cfg.layers_per_block)] + b[:-1]
    return copy + embed + sum(_conv(w, w, 1) for w in skips) + _conv(b[-1], b[-1], 1)


def _controlnet_sd3(a: Adapted, transformer) -> int:
    """ControlNet on SD3 (diffusers' SD3ControlNetModel.from_transformer): a trainable copy of the patch embedding, the
    time / pooled-text embedding, the caption projection and the first n joint blocks (n = num_layers, default
    min(12, N - 1): the last block is context-pre-only); one zero Linear d -> d (with bias) per copied block; the zero
    patch embedding of the conditioning latent, a p x p conv of (c + extra) -> d channels (with bias)."""
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    n = a.cfg.num_layers or min(12, cfg.num_layers - 1)
    copy = sum(p.numel() for part in (transformer.pos_embed, transformer.time_text_embed, transformer.context_embedder,
                                      *transformer.transformer_blocks[:n]) for p in part.parameters())
    return copy + n * (d * d + d) + (cfg.in_channels + a.cfg.extra_conditioning_channels) * d * cfg.patch_size ** 2 + d


def _t2i_adapter(a: Adapted) -> int:
    """T2I-Adapter (arXiv 2302.08453, diffusers' full_adapter): widths w_i = the UNet's block_out_channels; conv_in
    (c f^2 -> w_0, 3x3) after a pixel-unshuffle by f; per level i: a 1x1 conv w_{i-1} -> w_i where the width changes,
    then n residual blocks (3x3 and 1x1 convs, w_i -> w_i)."""
    w, n = list(a.plain().config.block_out_channels), a.cfg.num_res_blocks
    total = _conv(a.cfg.conditioning_channels * a.cfg.downscale_factor ** 2, w[0], 3)
    for i, width in enumerate(w):
        total += (_conv(w[i - 1], width, 1) if i and w[i - 1] != width else 0)
        total += n * (_conv(width, width, 3) + _conv(width, width, 1))
    return total


def _fact_slices(s) -> int:
    """FacT: the d x d slices of one weight (a width d does not divide takes one more, cropped)."""
    d = s.cfg.hidden_size
    return -(-s.d_out // d) * -(-s.d_in // d)


def _difffit(s) -> int:
    """DiffFit on one layer: a norm layer's own weight and bias (train_norm), another layer's bias (train_bias),
    when the layer is among target_modules (None: all); plus gamma, one factor per output channel, on each
    residual-branch output (scale_modules, resolved to paths)."""
    cfg, base = s.cfg, s.base
    targeted = cfg.target_modules is None or _named(s.path, cfg.target_modules)
    norm = type(base).__name__.lower().endswith("norm")  # LayerNorm, GroupNorm, RMSNorm, a model's own *Norm
    if norm:
        own = _own(base) if targeted and cfg.train_norm else 0
    else:
        bias = getattr(base, "bias", None)
        own = bias.numel() if targeted and cfg.train_bias and bias is not None else 0
    gamma = s.c_out if cfg.scale_modules and _named(s.path, cfg.scale_modules) else 0
    return own + gamma


def _madx(s) -> int:
    """MAD-X: the NICE coupling on the input embeddings (d = the embedding / LayerNorm width, d1 = d // 2, d2 = d - d1;
    F: d2 -> d2 // r -> d1, G: d1 -> d1 // r -> d2, each Linear with bias), nothing on the LM head (it reuses F, G),
    Pfeiffer's bottleneck elsewhere."""
    inp, out = s.cfg.inv_adapter_modules
    if s.path == out:
        return 0
    if s.path != inp:
        return bottleneck(s)
    d = s.base.normalized_shape[-1] if hasattr(s.base, "normalized_shape") else s.base.embedding_dim
    d1, d2, r = d // 2, d - d // 2, s.cfg.inv_adapter_reduction_factor
    h_f, h_g = int(d2 // r), int(d1 // r)
    return (d2 + 1) * h_f + (h_f + 1) * d1 + (d1 + 1) * h_g + (h_g + 1) * d2


def _llama_adapter_v2(s) -> int:
    """LLaMA-Adapter V2: a bias and a scale per output channel of each linear layer (2 d_out); a scale per feature
    of each norm (and a bias where the norm has one); K x d prompts and one gate per prompted attention layer."""
    if isinstance(s.base, (nn.Linear, Conv1D)):
        return 2 * s.d_out
    if hasattr(s.base, "variance_epsilon") or isinstance(s.base, nn.LayerNorm):  # RMSNorm / LayerNorm
        width = s.base.weight.shape[-1]
        return width * (2 if getattr(s.base, "bias", None) is not None else 1)
    return s.cfg.adapter_len * s.base.config.hidden_size + 1


CLOSED_FORM: dict[str, Callable[[Adapted], int]] = {
    # -- LoRA family ------------------------------------------------------------------------------------------
    "lora": each(lora),
    "rslora": each(lora),
    "pissa": each(lora),
    "dora": each(lambda s: lora(s) + s.d_out),  # + the magnitude vector
    "adalora": each(lambda s: s.cfg.init_r * (s.d_in + s.d_out + 1)),  # P, Q and the init_r singular values
    "hira": each(lora),  # A: r x d_in, B: d_out x r (the update W0 * BA is of high rank)
    "shira": each(lora),  # r (d_in + d_out) entries of the weight, LoRA's count
    "delora": each(lambda s: lora(s) + 1),  # A, B and the boundary lambda (the weight norms are frozen)
    "lorafa": each(lambda s: s.cfg.r * s.d_out),  # LoRA-FA: B (d_out, r) only; A (r, d_in) frozen at its init
    "deltalora": each(lora),  # A and B; W's update follows from them (the start factors are frozen)
    "dylora": each(lora),  # A and B at the largest rank r (every rank k <= r uses their first k rows / columns)
    # k blocks A_i (r, d_in / k) and B_i (d_out / k, r), plus a rank-hybrid_r LoRA beside them
    "gralora": each(lambda s: (s.cfg.r + s.cfg.hybrid_r) * (s.d_in + s.d_out)),
    "loha": each(lambda s: 2 * lora(s)),  # two rank-r pairs, Hadamard product
    "lokr": each(lokr),  # Kronecker factors (see lokr)
    "glora": each(glora),  # A, B, C (D, E off in the example)
    # lambda (r, N) and gamma (N, m) for the N = ceil(m / r) frozen random bases, m = min(d_in, d_out)
    "randlora": each(lambda s: -(-min(s.d_in, s.d_out) // s.cfg.r) * (s.cfg.r + min(s.d_in, s.d_out))),
    # k = int(d_out d_in (1 - sparsity)) chosen entries of the weight, plus a LoRA pair when r is set (Supra)
    "supertuning": each(lambda s: int(s.d_out * s.d_in * (1 - s.cfg.sparsity)) + (s.cfg.r or 0) * (s.d_in + s.d_out)),
    "vblora": each(lambda s: s.cfg.r * (s.d_in + s.d_out) // s.cfg.vector_length * s.cfg.num_vectors,  # logits
                   once=lambda cfg: cfg.num_vectors * cfg.vector_length),  # + the vector bank, once per adapter
    "unilora": each(lambda s: 0, once=lambda cfg: cfg.theta_d_length),  # theta_d only; indices, scales frozen
    "lily": lily,  # routers per layer, A per stride_A layers, experts per group
    "miss": each(lambda s: s.cfg.r * s.d_out),  # one (r, d_out) block shared by the r-wide shards
    "vera": each(lambda s: s.cfg.r + s.d_out),  # lambda_d (r) and lambda_b; A and B frozen, shared
    "vera-seed": each(lambda s: s.cfg.r + s.d_out),
    "pvera": each(lambda s: 2 * s.cfg.r + s.d_out),  # lambda_d (2r) and lambda_b; A and B frozen, shared
    "pvera-seed": each(lambda s: 2 * s.cfg.r + s.d_out),
    "tinylora": tinylora,  # one u-vector per group of tied layers; A, B, P frozen
    # lambda_l (d_in) + the int(d_in^2 rate) off-diagonal sparse values of S (>= 1 when rate > 0); V, U frozen
    "frod": each(lambda s: s.d_in + (s.cfg.sparse_rate > 0) * max(1, min(int(s.d_in ** 2 * s.cfg.sparse_rate),
                                                                     s.d_in * (s.d_in - 1)))),
    # an inventory of n_skills LoRA pairs per layer + the (n_tasks, n_splits x n_skills) routing logits
    "poly": each(lambda s: s.cfg.n_skills * lora(s) + s.cfg.n_tasks * s.cfg.n_splits * s.cfg.n_skills),
    "xlora": xlora,  # the scaling head
    "shadow": _shadow,  # injection + update per block, the one-block mirror backbone once
    "lst": _lst,  # the side network: ladders, gates, narrow blocks, up-projection
    "controlnet": _controlnet,  # encoder copy + conditioning encoder + zero convs
    "t2i_adapter": _t2i_adapter,  # the conditioning-image encoder
    # MoLE: per layer a gate W_g (N, d_in) + b_g (N) over the N frozen LoRA experts
    "mole": each(lambda s: s.cfg.num_experts * (s.d_in + 1)),
    "adamss": each(adamss),  # K subspaces' A_k (1, R), B_k (n_k, 1)
    "fourierft": each(lambda s: s.cfg.n_frequency),  # n_frequency spectral coefficients
    "svdiff": each(lambda s: min(s.d_out, s.d_in)),  # one shift per singular value of the (d_out, d_in k^2) matrix
    "waveft": each(lambda s: s.cfg.n_frequency),  # n_frequency wavelet coefficients
    "c3a": each(lambda s: s.d_in * s.d_out // s.cfg.block_size),  # (d_out / b) x (d_in / b) circulant blocks of b
    "ia3": each(lambda s: s.c_in if _named_ff(s) else s.c_out),  # one scale per input / output channel
    "beft": each(lambda s: s.c_out),  # one bias shift (1, d_out) per layer
    # -- orthogonal ------------------------------------------------------------------------------------------
    "oft": each(_oft),
    "coft": each(_oft),
    # one butterfly factor, one block of size d_in (the full d_in x d_in matrix, Cayley of its skew part)
    # and one output scale per output
    "boft": each(lambda s: s.d_in * s.d_in + s.d_out),
    # RoAd: an angle and a scale per 2 x 2 rotation: d_out / 2, d_out or 2 d_out of each (road_1 / _2 / _4)
    "road": each(lambda s: 2 * {"road_1": s.d_out // 2, "road_2": s.d_out, "road_4": 2 * s.d_out}[s.cfg.variant]),
    "hra": each(lambda s: s.cfg.r * s.d_in),  # r Householder vectors of the fan-in
    # PEANuT: the tweaker network on W: A (r, d_out), B (d_out, r) and 2 depth hidden (r, r) layers
    "peanut": each(lambda s: 2 * s.cfg.r * s.d_out + 2 * s.cfg.depth * s.cfg.r ** 2),
    # DeFT: the projection P (d_out, r) and the injection R (r, d_in), r at most d_out
    "deft": each(lambda s: min(s.cfg.r, s.d_out) * (s.d_out + s.d_in)),
    # OSF: U, S, V of the r = m - k lowest singular directions train (m = min(d_in, d_out), k = int(m x the
    # example's fractional effective_rank) kept frozen): r (d_out + 1 + d_in)
    "osf": each(lambda s: (min(s.d_in, s.d_out) - int(min(s.d_in, s.d_out) * s.cfg.effective_rank))
                * (s.d_in + s.d_out + 1)),
    # R: r (r - 1) / 2 skew entries (r^2 when free) + r per magnitude vector; A, B (the SVD) frozen
    "psoft": each(lambda s: (s.cfg.r * (s.cfg.r - 1) // 2 if s.cfg.psoft_orth else s.cfg.r ** 2)
                  + s.cfg.r * (s.cfg.psoft_mag_a + s.cfg.psoft_mag_b)),
    # -- bottleneck adapters and hybrids ------------------------------------------------------------------------
    "houlsby": each(bottleneck),  # m (d_in + 1) + d (m + 1) per adapter
    "pfeiffer": each(bottleneck),
    "pfeiffer_inv": each(_madx),  # Pfeiffer + MAD-X's invertible adapter
    "adapterdrop": each(bottleneck),  # a Pfeiffer adapter on every layer not dropped (fixed n: none below n)
    "adapterdrop-robust": each(bottleneck),  # robust AdapterDrop: an adapter on every layer
    "parallel_adapter": each(bottleneck),
    "adaptformer": each(bottleneck),
    "compacter": each(compacter, once=lambda cfg: cfg.phm_dim ** 3),  # + the n rules A_i (n, n), shared
    "compacter_pp": each(compacter, once=lambda cfg: cfg.phm_dim ** 3),
    "mam-no-prefix": hybrid,  # the parallel adapter part
    "unipelt-no-prefix": hybrid,  # gated Pfeiffer adapter + gated LoRA: + d + 1 per gate
    # -- selective and existing-parameter tuning -------------------------------------------------------------
    "ssf": each(ssf),
    "ln_tuning": each(lambda s: _own(s.base)),  # a trained copy of the norm layer's weight and bias
    "bitfit": each(lambda s: s.base.bias.numel()),  # each targeted layer's bias
    "difffit": each(_difffit),  # biases, norm affines, and gamma (d_out) per residual-branch output
    "last_k": each(lambda s: _own(s.base)),  # every layer of the last k blocks: all its own parameters
    "trainable_tokens": trainable_tokens,
    # n placeholder vectors of width d, one per distinct embedding weight (a tied LM head shares the rows)
    "textual_inversion": lambda a: a.cfg.num_vectors * sum({id(s.base.weight): s.base.weight.shape[1] for s in a.sites}.values()),
    "child_tuning_f": selectable,  # every selectable entry (the Bernoulli mask acts on gradients)
    "child_tuning_d_random": lambda a: round(a.cfg.reserve_p * selectable(a)),  # round(p_D N) entries
    "fish_mask_random": lambda a: round(a.cfg.density * selectable(a)),  # round(density N) entries
    "diff_pruning": lambda a: 2 * selectable(a),  # the diff w and a gate logit log_alpha per entry
    # -- prompts --------------------------------------------------------------------------------------------
    # n virtual tokens x the embedding width (x 2 for an encoder-decoder's two stacks)
    "prompt_tuning": each(lambda s: s.cfg.num_virtual_tokens * (s.cfg.num_transformer_submodules or 1)
                          * s.base.embedding_dim),
    # the shared prompt (n x d) + per task a rank-k multiplicative update u v^T: k (n + d) per task
    "multitask_prompt_tuning": each(lambda s: s.cfg.total_virtual_tokens * s.cfg.token_dim + s.cfg.num_tasks
                                    * s.cfg.num_ranks * (s.cfg.total_virtual_tokens + s.cfg.token_dim)),
    "cpt": each(lambda s: s.cfg.num_virtual_tokens * s.cfg.token_dim),  # the perturbation D (n x d); P0 frozen
    "p_tuning": each(p_tuning),  # embeddings + MLP encoder
    "p_tuning-lstm": each(p_tuning),  # embeddings + LSTM encoder
    # prefix tuning: n x 2 L d (a key and a value vector per token and layer); with the projection, see above
    "prefix": each(lambda s: s.cfg.num_virtual_tokens * 2 * s.cfg.num_layers * s.cfg.token_dim),
    "prefix-projection": each(prefix_projection),
    "p_tuning_v2": each(lambda s: s.cfg.num_virtual_tokens * 2 * s.cfg.num_layers * s.cfg.token_dim),
    # Cartridges: prefix tuning's n x 2 L d KV prefix, learned directly, its first f = num_frozen_tokens rows frozen
    "cartridge": each(lambda s: (s.cfg.num_virtual_tokens - s.cfg.num_frozen_tokens) * 2 * s.cfg.num_layers
                      * s.cfg.token_dim),
    "cartridge-unfrozen": each(lambda s: (s.cfg.num_virtual_tokens - s.cfg.num_frozen_tokens) * 2 * s.cfg.num_layers
                               * s.cfg.token_dim),
    # per adapted attention: adapter_len x hidden prompts and one gate
    "adaption_prompt": each(lambda s: s.cfg.adapter_len * s.base.config.hidden_size + 1),
    "llama_adapter_v2": each(_llama_adapter_v2),  # bias / scale on linears and norms + gated prompts
    # -- vision ---------------------------------------------------------------------------------------------
    "coop": each(lambda s: s.cfg.num_virtual_tokens * s.base.embedding_dim),  # M x d_t, one context for all classes
    "cocoop": each(cocoop),  # + the meta-net
    "vpt-deep": each(lambda s: s.cfg.num_virtual_tokens * s.cfg.token_dim),  # per block: p prompts x the width
    "tip_adapter": each(lambda s: s.cfg.cache_size * s.base.out_features),  # Tip-Adapter-F: N K keys x the width
    # per adapted feature: a D -> D / r -> D bottleneck without biases (r = 4)
    "clip_adapter": each(lambda s: 2 * s.base.out_features * max(1, s.base.out_features // 4)),
    # per bypass (ViT attention / MLP of width d = the hidden size): down c (d + 1), 3x3 conv c (9c + 1), up d (c + 1)
    "convpass": lambda a: len(a.sites) * (2 * a.plain().config.hidden_size * a.cfg.dim + 9 * a.cfg.dim ** 2
                                          + 2 * a.cfg.dim + a.plain().config.hidden_size),
    # -- FacT: per weight, a x b slices of d x d (a = ceil(d_out / d), b = ceil(d_in / d)), d = cfg.hidden_size --
    "fact_tt": each(lambda s: _fact_slices(s) * s.cfg.r ** 2, once=lambda cfg: 2 * cfg.hidden_size * cfg.r),
    "fact_tk": each(lambda s: _fact_slices(s) * s.cfg.r, once=lambda cfg: 2 * cfg.hidden_size * cfg.r + cfg.r ** 3),
    # -- generation -----------------------------------------------------------------------------------------
    "ip_adapter": _ip_adapter,  # to_k_ip / to_v_ip per cross-attention + the image projection once
}
