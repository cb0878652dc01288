"""CoOp (Zhou et al. 2022, arXiv 2109.01134) and CoCoOp (Zhou et al. 2022, arXiv 2203.05557) for CLIP.

CoOp learns M context vectors [V]_1..[V]_M (each d_t wide, CLIP's text width) that replace the words of a
hand-made prompt; the text encoder g reads t_c = [SOS][V]_1..[V]_M[CLASS_c][.][EOS] ("end" class-token
position) and

    p(y = c | x) = exp(cos(f(x), g(t_c)) / tau) / sum_j exp(cos(f(x), g(t_j)) / tau),   1 / tau = logit_scale.exp()

Context: unified (M, d_t), or class-specific (CSC, N x M x d_t). Init: the token embeddings of a text such as
"a photo of a" (``ctx_init``, token ids; M = its length) or N(0, 0.02^2) as the paper's code.
CoCoOp adds an image-conditioned shift pi = h(f(x)) to every context vector, [V]_m(x) = [V]_m + pi, with the
meta-net h = Linear(d_v, d_v / 16) - ReLU - Linear(d_v / 16, d_t) on the normalised image feature (d_v =
CLIP's projection width, as in the paper's code); M = 4, unified context.

As in the paper's code the prompt holds M placeholder tokens after the start token (``clip.prompt_ids``
builds it) and the adapter, wrapping the text token embedding (role ``text_token_embedding``), overwrites
their embeddings (T, L, d_t) at positions 1..M with the context; position embeddings are added afterwards,
as in CLIP. The plain forward thus works for CoOp on any input_ids shaped that way; CSC needs the rows to be
the N classes in order. CoCoOp's prompts depend on each image, so it acts through ``classify`` only (the plain
forward, one text feature per text row shared by all images, cannot express it, and raises).
CoOp caches its text classifier for inference (eval mode, no autograd); any parameter change, train mode,
or a change of the active / disabled adapters recomputes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import PeftConfig, check_int, check_number
from ...kernel_helpers import adapter_dtype
from ...layers import AdapterLayer
from ...registry import register_method
from . import clip as clip_api
from ._roles import find_path, not_applicable


@dataclasses.dataclass
class CoOpConfig(PeftConfig):
    """CoOp configuration.

    Args:
        num_virtual_tokens: M, the number of context vectors (paper: 16); None takes 16, or the length of
            ``ctx_init`` when given.
        ctx_init: token ids (no special tokens) whose embeddings initialise the context, e.g. the ids of
            "a photo of a"; None draws N(0, ``init_std``^2).
        init_std: std of the random init (paper's code: 0.02).
        class_specific: one context per class (CSC, needs ``num_classes``) instead of one shared context.
        num_classes: N, for ``class_specific``.
        class_token_position: where [CLASS] sits; "end" (the paper's default) is supported.
    """

    PEFT_TYPE: ClassVar[str] = "COOP"
    DEFAULT_M: ClassVar[int] = 16

    num_virtual_tokens: int | None = None
    ctx_init: list[int] | None = None
    init_std: float = 0.02
    class_specific: bool = False
    num_classes: int | None = None
    class_token_position: str = "end"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctx_init is not None:
            ids = self.ctx_init
            self._check(isinstance(ids, (list, tuple)) and len(ids) > 0 and all(
                isinstance(i, int) and i >= 0 for i in ids), "ctx_init", "a non-empty list of token ids")
            self.ctx_init = list(ids)
            if self.num_virtual_tokens is None:
                self.num_virtual_tokens = len(ids)
            self._check(self.num_virtual_tokens == len(ids), "num_virtual_tokens",
                        f"len(ctx_init) = {len(ids)} (the context is initialised from those tokens)")
        if self.num_virtual_tokens is None:
            self.num_virtual_tokens = self.DEFAULT_M
        check_int(self, "num_virtual_tokens", 1, expected="an int >= 1")
        self._check(self.class_token_position == "end", "class_token_position", '"end"')
        check_number(self, "init_std", above=0, expected="a positive float")
        if self.class_specific:
            check_int(self, "num_classes", 1, expected="an int >= 1 (class_specific=True)")


@register_method(
    "coop",
    config=CoOpConfig,
    category="prompt",
    modalities=("vision-language",),
    mergeable=False,
    param_formula="M x d_t (unified); N x M x d_t (class-specific)",
    position="M context vectors after [SOS] in CLIP's text encoder input",
    starts_at_base=False,
    paper="arXiv 2109.01134 (CoOp, Zhou et al. 2022)",
    examples={"coop": {"num_virtual_tokens": 3}},
)
class CoOpContext(clip_api.ClassPrompts):
    """The learned context on CLIP's text token embedding; ``coop_ctx``: (M, d_t) or (N, M, d_t)."""

    checkpoint_keys: ClassVar[dict[str, str]] = {"coop_ctx": "coop_ctx"}
    supported_layers = (nn.Module,)  # chosen by role (text_token_embedding), not by layer type
    method = "coop"

    def __init__(self, base: nn.Module, config: CoOpConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.n_ctx = config.num_virtual_tokens
        self.num_classes = config.num_classes if config.class_specific else None
        w = base.weight  # (V, d_t)
        shape = (self.n_ctx, w.shape[1]) if self.num_classes is None else (self.num_classes, self.n_ctx, w.shape[1])
        self.coop_ctx = nn.Parameter(torch.zeros(shape, dtype=adapter_dtype(base, keep_half=True), device=w.device))
        if init:
            with torch.no_grad():
                if config.ctx_init is not None:
                    if max(config.ctx_init) >= w.shape[0]:
                        raise ValueError(f"CoOpConfig.ctx_init: token id {max(config.ctx_init)} is outside the "
                                         f"vocabulary (size {w.shape[0]})")
                    self.coop_ctx.copy_(w[torch.tensor(config.ctx_init, device=w.device)].expand(shape))
                else:
                    nn.init.normal_(self.coop_ctx, std=config.init_std)
        self._rows: Tensor | None = None  # class index of each text row (CSC), set by classify
        self._cache: tuple[Any, Tensor] | None = None

    # -- targeting -------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: CoOpConfig) -> None:
        if find_path(model, named, "text_token_embedding", None) is None:
            raise not_applicable(cls.method, model, "no CLIP text token embedding (role 'text_token_embedding')")
        problem = clip_api.pooling_problem(model)
        if problem:
            raise not_applicable(cls.method, model, problem)

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: CoOpConfig) -> list[str]:
        clip_api.bind_api(model)
        return [find_path(model, named, "text_token_embedding", None)]

    @classmethod
    def param_count(cls, base: nn.Module, config: CoOpConfig, key: str = "") -> int:
        """Closed form: M x d_t, times N for class-specific context."""
        return config.num_virtual_tokens * base.weight.shape[1] * (config.num_classes if config.class_specific else 1)

    # -- forward ---------------------------------------------------------------------------------------
    def context(self, rows: int) -> Tensor:
        """The context of each of ``rows`` text rows: (rows, M, d_t)."""
        if self.num_classes is None:
            return self.coop_ctx.expand(rows, -1, -1)
        index = self._rows
        if index is None:
            if rows != self.num_classes:
                raise ValueError(f"class-specific CoOp: the {rows} text rows must be the {self.num_classes} "
                                 "classes in order (CoOpConfig.num_classes), or use classify")
            index = torch.arange(rows, device=self.coop_ctx.device)
        return self.coop_ctx[index]

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        rows, length = out.shape[0], out.shape[1]  # out: (T, L, d_t) token embeddings
        if length < self.n_ctx + 2:
            raise ValueError(f"{self.method}: input_ids of length {length} cannot hold [SOS], "
                             f"{self.n_ctx} context tokens (num_virtual_tokens) and [EOS]")
        ctx = self.context(rows).to(out.dtype)
        return torch.cat([out[:, :1], ctx, out[:, 1 + self.n_ctx:]], dim=1)

    # -- classification --------------------------------------------------------------------------------
    def class_logits(self, clip: nn.Module, f: Tensor, ids: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
        """logit_scale.exp() * f W^T with W the (cached, in inference) text features of the class prompts."""
        if self.num_classes is not None and ids.shape[0] != self.num_classes:
            raise ValueError(f"class-specific CoOp was built for {self.num_classes} classes "
                             f"(CoOpConfig.num_classes); got {ids.shape[0]} class names")
        cacheable = not self.training and not torch.is_grad_enabled()
        key = _cache_key(clip, ids, mask) if cacheable else None
        if key is not None and self._cache is not None and self._cache[0] == key:
            weights = self._cache[1]
        else:
            self._rows = None if self.num_classes is None else torch.arange(ids.shape[0], device=ids.device)
            try:
                weights = clip_api.encode_texts(clip, ids, mask)  # (N, D)
            finally:
                self._rows = None
            self._cache = (key, weights) if key is not None else None
        return scale * f @ weights.t()


def _cache_key(clip: nn.Module, ids: Tensor, mask: Tensor) -> tuple:
    """Everything the text classifier depends on: the prompts, every parameter's version, adapter states."""
    params = tuple((id(p), p._version) for p in clip.parameters())
    layers = tuple((id(m), m.disable_adapters, tuple(m.active_adapters), tuple(m.merged_adapters))
                   for m in clip.modules() if isinstance(m, AdapterLayer))
    return (tuple(ids.flatten().tolist()), tuple(ids.shape), tuple(mask.flatten().tolist()), params, layers)


@dataclasses.dataclass
class CoCoOpConfig(CoOpConfig):
    """CoCoOp configuration: CoOp's fields (unified context only, M = 4 by default) plus the meta-net.

    Args:
        meta_hidden: the meta-net's hidden width; None takes d_v // 16 (at least 1), as the paper.
        vision_dim: d_v, CLIP's projected image width (filled from the model).
    """

    PEFT_TYPE: ClassVar[str] = "COCOOP"
    DEFAULT_M: ClassVar[int] = 4

    meta_hidden: int | None = None
    vision_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(not self.class_specific, "class_specific", "False (CoCoOp's context is unified)")
        if self.meta_hidden is not None:
            check_int(self, "meta_hidden", 1, expected="an int >= 1")


@register_method(
    "cocoop",
    config=CoCoOpConfig,
    category="prompt",
    modalities=("vision-language",),
    mergeable=False,
    param_formula="M x d_t + d_v h + h + h d_t + d_t (h = d_v / 16)",
    position="M image-conditioned context vectors after [SOS] in CLIP's text encoder input",
    starts_at_base=False,
    paper="arXiv 2203.05557 (CoCoOp, Zhou et al. 2022)",
    examples={"cocoop": {"num_virtual_tokens": 2}},
)
class CoCoOpContext(CoOpContext):
    """CoOp's context plus the meta-net: ``meta_linear1`` (h, d_v) + bias, ``meta_linear2`` (d_t, h) + bias."""

    checkpoint_keys: ClassVar[dict[str, str]] = {
        "coop_ctx": "coop_ctx", "meta_w1": "meta_net.linear1.weight", "meta_b1": "meta_net.linear1.bias",
        "meta_w2": "meta_net.linear2.weight", "meta_b2": "meta_net.linear2.bias"}
    method = "cocoop"

    def __init__(self, base: nn.Module, config: CoCoOpConfig, key: str = "", init: bool = True) -> None:
        super().__init__(base, config, key, init)
        d_t, d_v = base.weight.shape[1], config.vision_dim
        hidden = _hidden(config)
        lin1, lin2 = nn.Linear(d_v, hidden), nn.Linear(hidden, d_t)  # PyTorch's default init, as the paper's code
        w = base.weight
        self.meta_w1 = nn.Parameter(lin1.weight.detach().to(w.device, w.dtype))
        self.meta_b1 = nn.Parameter(lin1.bias.detach().to(w.device, w.dtype))
        self.meta_w2 = nn.Parameter(lin2.weight.detach().to(w.device, w.dtype))
        self.meta_b2 = nn.Parameter(lin2.bias.detach().to(w.device, w.dtype))
        self._shift: Tensor | None = None  # (T, d_t) per text row, set by classify

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: CoCoOpConfig) -> None:
        super().prepare_config(model, named, config)
        proj = find_path(model, named, "image_features", None)
        if proj is None:
            raise not_applicable(cls.method, model, "no CLIP image projection (role 'image_features') to condition on")
        config.vision_dim = dict(named)[proj].out_features

    @classmethod
    def param_count(cls, base: nn.Module, config: CoCoOpConfig, key: str = "") -> int:
        d_t, d_v, h = base.weight.shape[1], config.vision_dim, _hidden(config)
        return config.num_virtual_tokens * d_t + d_v * h + h + h * d_t + d_t

    def meta_net(self, f: Tensor) -> Tensor:
        """pi = Linear2(ReLU(Linear1(f))): (B, d_v) -> (B, d_t)."""
        h = torch.relu(nn.functional.linear(f, self.meta_w1, self.meta_b1))
        return nn.functional.linear(h, self.meta_w2, self.meta_b2)

    def context(self, rows: int) -> Tensor:
        if self._shift is None:
            raise RuntimeError("cocoop: the context depends on each image; call classify(model, pixel_values, "
                               "class_names, ...) instead of the plain forward")
        return self.coop_ctx.unsqueeze(0) + self._shift.unsqueeze(1)  # (T, M, d_t)

    def class_logits(self, clip: nn.Module, f: Tensor, ids: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
        """Per image i: w_ic = g(t_c(f_i)); logits[i, c] = scale * cos(f_i, w_ic). Runs the text tower on B x N rows."""
        b, n = f.shape[0], ids.shape[0]
        self._shift = self.meta_net(f.to(self.meta_w1.dtype)).repeat_interleave(n, dim=0)  # (B*N, d_t)
        try:
            w = clip_api.encode_texts(clip, ids.repeat(b, 1), mask.repeat(b, 1)).reshape(b, n, -1)
        finally:
            self._shift = None
        return scale * torch.einsum("bd,bnd->bn", f, w.to(f.dtype))


def _hidden(config: CoCoOpConfig) -> int:
    return config.meta_hidden if config.meta_hidden is not None else max(1, config.vision_dim // 16)
