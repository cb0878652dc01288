"""Context-aware prompt tuning, CPT (Blau et al. 2024, "Context-aware Prompt Tuning: Advancing In-Context
Learning with Adversarial Methods", arXiv 2410.17222): the prompt is the in-context examples themselves.

The n tokens of the examples (``cpt_token_ids``, each with a type in ``cpt_tokens_type_mask``: per example
``4k+1`` input template, ``4k+2`` input, ``4k+3`` output template, ``4k+4`` label; 0 none) give a frozen
prompt ``P0 = E[cpt_token_ids]`` (n, d); a perturbation ``D`` (n, d) is learned, and the model reads
``[P0 + Pi(D); E(x)]``. Trained: ``D`` only (n d parameters); ``P0`` and the model are frozen.

- Only template and input tokens move: the gradient of ``D`` is zero on the rows whose type is 0 mod 4 (labels,
  and type 0).
- Projection (bounded perturbation, as adversarial training): before every use ``D`` is projected, in place,
  onto a per-token L2 ball, ``D_i <- D_i * eps_i / max(||D_i||, eps_i)``, with ``eps_i = opt_projection_epsilon
  sqrt(d / 2048)`` on input tokens, ``opt_projection_format_epsilon sqrt(d / 2048)`` on template tokens and 1e-10
  on the others.
- Loss over the examples: with labels, the examples' label tokens are targets too. The call's tokens take the
  types ``input_type_mask`` (default 4 everywhere) shifted by ``max(cpt_tokens_type_mask)``; a position is a
  target when its type is > 0 and 0 mod 4 (others -> -100). The loss is the mean over the targets of the
  next-token cross entropy times ``w``: with ``opt_weighted_loss_type='decay'`` the label ids of a row, from the
  last (the query) back, weigh ``1, g, g^2, ...`` (``g = opt_loss_decay_factor``); else 1.

File as Hugging Face PEFT: ``prompt_embeddings`` (n, d) = ``P0 + Pi(D)``; it loads into ``P0`` (``D`` is left
as it is, as in PEFT). PEFT 0.21.2 is for causal LMs only (``task_type='CAUSAL_LM'``). Differences from PEFT:
``task_type=None`` is accepted and the model is checked instead (a decoder-only LM); the base model is not
asked for its own loss (PEFT computes it and throws it away); the caller's ``input_type_mask`` is not changed
in place; a bad ``opt_weighted_loss_type`` / token id is a ConfigError.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError, check_number
from ...registry import register_method
from ...targeting import NotApplicableError
from .base import EmbeddingPrompt, PromptLearningConfig, fill_config
from .hook import install, uninstall
from .inputs import embed_prompts, is_encoder_decoder

MIN_EPSILON = 1e-10  # PEFT's bound for the tokens that never move (labels, type 0)


class CPTTaskTypeError(ConfigError, NotApplicableError):
    """CPT is for causal LMs: another task type is a config error, and the method does not apply to such a model."""


@dataclasses.dataclass
class CPTConfig(PromptLearningConfig):
    """CPT configuration (field names and defaults as in Hugging Face PEFT).

    Args:
        cpt_token_ids: the in-context examples' token ids (default ``[0]``); ``num_virtual_tokens`` is their count.
        cpt_mask: one entry per token (default all 1; kept for PEFT's files).
        cpt_tokens_type_mask: per token its type (see the module docstring; default all 1).
        opt_weighted_loss_type: ``'none'`` or ``'decay'`` (exponential decay over the examples' labels).
        opt_loss_decay_factor: ``g`` of the decay.
        opt_projection_epsilon: the L2 bound of input tokens (times sqrt(d / 2048)).
        opt_projection_format_epsilon: the L2 bound of template tokens (times sqrt(d / 2048)).
        tokenizer_name_or_path: kept for PEFT's files.
    """

    PEFT_TYPE: ClassVar[str] = "CPT"

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # PEFT's static attributes: the model fills token_dim; one stack
        self.num_layers = self.token_dim = self.num_attention_heads = None
        self.num_transformer_submodules = 1
        task = getattr(self.task_type, "value", self.task_type)
        if task not in (None, "CAUSAL_LM"):
            raise CPTTaskTypeError(f"CPTConfig.task_type: expected 'CAUSAL_LM' (CPT is for causal language "
                                   f"models only), got {task!r}")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self._check_ints("cpt_token_ids", minimum=0)
        self._check(len(self.cpt_token_ids) > 0, "cpt_token_ids", "a non-empty list of token ids")
        n = self.num_virtual_tokens = len(self.cpt_token_ids)
        for name in ("cpt_mask", "cpt_tokens_type_mask"):
            if getattr(self, name) is None:
                setattr(self, name, [1] * n)
            self._check_ints(name)
            got = len(getattr(self, name))
            if got != n:
                raise ConfigError(f"CPTConfig.{name}: expected a list of length {n} (one entry per token of "
                                  f"cpt_token_ids), got length {got}")
        self._check(self.opt_weighted_loss_type in ("none", "decay"), "opt_weighted_loss_type", "'none' or 'decay'")
        check_number(self, "opt_loss_decay_factor")
        check_number(self, "opt_projection_epsilon", minimum=0)
        check_number(self, "opt_projection_format_epsilon", minimum=0)

    def _check_ints(self, name: str, minimum: int | None = None) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum) for v in value)
        self._check(ok, name, "a list of integers" + ("" if minimum is None else f" >= {minimum}"))


# -- the math, as pure functions ----------------------------------------------------------------------------
def cpt_epsilon(types: Tensor, token_dim: int, eps: float, format_eps: float) -> Tensor:
    """Per token its L2 bound (n,) float32 (PEFT's ``get_epsilon``, the same float32 arithmetic)."""
    scale = torch.sqrt(torch.tensor([token_dim / 2048], dtype=torch.float32))
    out = torch.full(types.shape, MIN_EPSILON, dtype=torch.float32)
    r, pos = torch.remainder(types, 4), types > 0
    out[pos & ((r == 1) | (r == 3))] = (format_eps * scale).item()
    out[pos & (r == 2)] = (eps * scale).item()
    return out


def project(delta: Tensor, epsilon: Tensor) -> Tensor:
    """``D_i * eps_i / max(||D_i||, eps_i)`` row by row (a zero row stays zero)."""
    norm = torch.norm(delta, p=2, dim=1)
    return delta * (epsilon / norm.clamp(min=epsilon)).view(-1, 1)


def movable(types: Tensor) -> Tensor:
    """(n, 1) float: 1 on the rows that train (types 1, 2, 3 mod 4), 0 on labels and type 0."""
    r = torch.remainder(types, 4)
    return ((r == 1) | (r == 2) | (r == 3)).float().view(-1, 1)


class _MaskGrad(torch.autograd.Function):
    """Identity forward; the backward keeps the gradient of the rows that train (PEFT's tensor hook)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


def cpt_targets(labels: Tensor, input_types: Tensor | None, token_ids: Tensor, types: Tensor) -> tuple[Tensor, Tensor]:
    """(labels, types) over ``[prompt; call]`` (rows, n + L): the examples' ids as labels in front, the call's types
    shifted by ``max(types)``; positions that are not labels (type > 0 and 0 mod 4) get -100."""
    rows, length = labels.shape[0], labels.shape[1]
    if input_types is None:
        input_types = torch.full((rows, length), 4, dtype=torch.long, device=labels.device)
    input_types = input_types.to(labels.device).long()
    shifted = torch.where(input_types > 0, input_types + types.max().to(labels.device), input_types)
    all_types = torch.cat([types.to(labels.device).view(1, -1).expand(rows, -1), shifted], dim=1)
    all_labels = torch.cat([token_ids.to(labels.device).view(1, -1).expand(rows, -1).to(labels.dtype), labels], 1)
    keep = (all_types > 0) & (all_types % 4 == 0)
    return all_labels.masked_fill(~keep, -100), all_types


def cpt_loss(logits: Tensor, labels: Tensor, types: Tensor, weighted: str, decay: float) -> Tensor:
    """PEFT's ``calculate_loss``: the mean over the targets of the next-token cross entropy times its weight.
    With ``'decay'`` a target whose type is a row's k-th label id from the last weighs ``decay^k``.
    The cross entropy runs on the target positions only (the same values, fewer rows)."""
    labels = labels.to(logits.device)
    shift_labels, shift_types = labels[:, 1:], types.to(logits.device)[:, 1:]
    valid = shift_labels != -100
    loss = F.cross_entropy(logits[:, :-1][valid], shift_labels[valid], reduction="none")
    if weighted != "decay":
        return loss.mean()
    is_label = (shift_types > 0) & (shift_types % 4 == 0)
    ids = torch.unique(shift_types[is_label])  # ascending
    present = ((shift_types.unsqueeze(-1) == ids) & is_label.unsqueeze(-1)).any(1).long()  # (rows, U)
    later = present.flip(-1).cumsum(-1).flip(-1) - present  # label ids of the row above each one
    powers, value = [], 1.0
    for _ in range(ids.numel() + 1):  # decay^k as PEFT multiplies it up, in Python floats
        powers.append(value)
        value *= decay
    row = torch.nonzero(valid)[:, 0]
    at = torch.searchsorted(ids, shift_types[valid]).clamp(max=max(ids.numel() - 1, 0))
    k = later[row, at] if ids.numel() else torch.zeros_like(row)
    weight = torch.tensor(powers, dtype=torch.float32, device=logits.device)[k]
    weight = torch.where(is_label[valid], weight, torch.ones_like(weight))
    return (loss * weight).mean()


# -- the call -----------------------------------------------------------------------------------------------
class _Local(threading.local):
    pending: tuple | None = None  # (labels, types, weighted, decay) of the running call


_LOCAL = _Local()


def _loss_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    """After the model: the call's CPT loss in front of its output (only when ``rewrite`` set one up)."""
    pending, _LOCAL.pending = _LOCAL.pending, None
    if pending is None or output is None:  # no labels, or the forward failed (the hook always runs)
        return None
    logits = output[0] if isinstance(output, tuple) else output.logits
    loss = cpt_loss(logits, *pending)
    if isinstance(output, tuple):
        return (loss, *output)
    return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})


@register_method(
    "cpt",
    config=CPTConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="n * d (n in-context tokens; their embeddings are frozen, a bounded perturbation trains)",
    position="in-context example tokens (embeddings + projected perturbation) prepended to the input embeddings",
    paper="arXiv 2410.17222 (Blau et al. 2024, context-aware prompt tuning)",
    examples={"cpt": {"cpt_token_ids": [5, 6, 7, 8, 9], "cpt_mask": [1, 1, 1, 1, 1],
                      "cpt_tokens_type_mask": [1, 2, 3, 4, 0]}},
)
class CPTEmbedding(EmbeddingPrompt):
    method = "cpt"
    supports_routing = False  # the loss is the call's, not a row's

    def __init__(self, base: nn.Embedding, config: CPTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        n, d, dev = config.num_virtual_tokens, config.token_dim, base.weight.device
        self.num_virtual_tokens = n
        self.weighted, self.decay = config.opt_weighted_loss_type, config.opt_loss_decay_factor
        self.embedding = nn.Embedding(n, d, device=dev)  # P0: frozen
        if init and not config.inference_mode:
            with torch.no_grad():
                self.embedding.weight.copy_(base.weight[torch.tensor(config.cpt_token_ids, device=dev)].float())
        self.embedding.requires_grad_(False)
        self.delta_embedding = nn.Embedding(n, d, device=dev)  # D: trains
        nn.init.zeros_(self.delta_embedding.weight)
        self._projected: tuple[int, int] | None = None  # (tensor, version) of D when last projected
        types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
        self.register_buffer("token_ids", torch.tensor(config.cpt_token_ids, dtype=torch.long, device=dev),
                             persistent=False)
        self.register_buffer("types", types.to(dev), persistent=False)
        self.register_buffer("epsilon", cpt_epsilon(types, d, config.opt_projection_epsilon,
                                                    config.opt_projection_format_epsilon).to(dev), persistent=False)
        self.register_buffer("grad_mask", movable(types).to(dev), persistent=False)

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: CPTConfig) -> None:
        cls.select_targets(model, named, config)
        fill_config(model, config)
        vocab = model.get_input_embeddings().weight.shape[0]
        bad = [t for t in config.cpt_token_ids if t >= vocab]
        if bad:
            raise ConfigError(f"CPTConfig.cpt_token_ids: expected token ids in [0, {vocab}) (the model's "
                              f"vocabulary), got {bad}")

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        path = super().select_targets(model, named, config)
        get_out = getattr(model, "get_output_embeddings", None)
        if is_encoder_decoder(model) or not callable(get_out) or get_out() is None:
            raise NotApplicableError(f"cpt is for causal language models (a decoder with an LM head, "
                                     f"task_type='CAUSAL_LM'), and {type(model).__name__} is not one; prompt_tuning "
                                     f"prepends virtual tokens to any model that takes inputs_embeds")
        return path

    @classmethod
    def param_count(cls, base: nn.Module, config: CPTConfig, key: str = "") -> int:
        return config.num_virtual_tokens * config.token_dim

    def requires_grad_(self, requires_grad: bool = True) -> "CPTEmbedding":
        self.delta_embedding.requires_grad_(requires_grad)
        self.embedding.requires_grad_(False)  # P0 never trains
        return self

    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        install(model)
        if getattr(model, "_peftkit_cpt_hook", None) is None:
            model._peftkit_cpt_hook = model.register_forward_hook(_loss_hook, always_call=True)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        handle = getattr(model, "_peftkit_cpt_hook", None)
        if handle is not None:
            handle.remove()
            del model._peftkit_cpt_hook
        uninstall(model)

    def prompts(self) -> Tensor:
        """``P0 + Pi(D)`` (n, d); ``D`` is projected in place first, as PEFT does at every use (here only when it
        changed since the last projection: projecting again would only move it by rounding)."""
        weight = self.delta_embedding.weight
        if self._projected != (id(weight), weight._version):
            with torch.no_grad():
                weight.copy_(project(weight, self.epsilon))
            self._projected = (id(weight), weight._version)
        return self.embedding.weight + _MaskGrad.apply(weight, self.grad_mask)

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        input_types, labels = kwargs.pop("input_type_mask", None), kwargs.pop("labels", None)
        _LOCAL.pending = None
        kwargs = embed_prompts(model, kwargs, self.num_virtual_tokens, self.prompts)
        if labels is not None:
            all_labels, all_types = cpt_targets(labels, input_types, self.token_ids, self.types)
            _LOCAL.pending = (all_labels, all_types, self.weighted, self.decay)
        return kwargs

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        if for_save:
            with torch.no_grad():
                return {"prompt_embeddings": self.prompts().detach()}
        return {"prompt_embeddings": self.embedding.weight}
