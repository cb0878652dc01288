"""The trainable-tokens adapter: the rows ``token_indices`` of an embedding (or of a tied LM head) replaced by
trained values, every other row left as it is (Hugging Face PEFT's ``TrainableTokensLayer``).

Numerics as PEFT's: the layer computes with ``W'`` = ``W`` whose rows ``token_indices`` are the adapter's
``trainable_tokens_delta`` (despite the name, the new values, not a difference); merging writes those rows into
``W`` and unmerging writes the originals back (bit for bit). PEFT builds the whole ``W'`` (a copy of the
vocabulary) on every call, and its backward a dense vocabulary-sized gradient; here the base layer runs as
usual and only the positions that hold a chosen token (an embedding) or the chosen output columns (an LM head)
are replaced, so a step costs the tokens' rows, not the vocabulary.

Where the adapters sit (``select_targets``): PEFT's rules. ``TrainableTokensConfig``: its ``target_modules``
(default: the input embedding); ``LoraConfig.trainable_token_indices`` (this method's ``auxiliary_field``): a
list for the input embedding, or {module name suffix: indices}. When the model ties its input embedding to
other layers (``tie_word_embeddings``: an LM head, T5's encoder / decoder embeddings) those layers get an
adapter that reads the embedding adapter's tensor (``after_inject`` links them): one trained tensor, the rows
change in every tied layer, and the tied layers do not merge on their own (the weight is shared).

File keys (PEFT's): ``<path>.trainable_tokens_delta`` (also for each tied layer) for the method on its own;
``<path>.token_adapter.trainable_tokens_delta`` beside LoRA, whose tied layers save nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError
from ...kernel_helpers import adapter_dtype, embed_scale
from ...layers import Adapter, AdapterLayer, adapter_layers
from ...registry import register_method
from ...targeting import NotApplicableError, find_targets, is_target
from .config import TrainableTokensConfig, check_in_vocabulary

FIELD = "trainable_token_indices"  # LoraConfig's field
PREFIX = "base_model.model."  # the file keys' prefix (checkpoint.PREFIX)


# -- which layers -------------------------------------------------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def input_embedding_path(model: nn.Module) -> str | None:
    """Path of the model's input embedding (``get_input_embeddings``), None when it has none it can name."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return None
    return next((name for name, m in model.named_modules() if m is emb), None)


def _ties(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def tied_paths(model: nn.Module, embedding_path: str) -> list[str]:
    """Paths (all aliases, PEFT's ``remove_duplicate=False``) of the layers whose weight is the input embedding's
    weight, the embedding's own path excluded; empty unless the model ties them (``tie_word_embeddings``)."""
    if not _ties(model):
        return []
    weight = _unwrap(model.get_submodule(embedding_path)).weight
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or name == embedding_path or ".base_layer" in name or ".adapters." in name:
            continue
        if isinstance(module, (nn.Embedding, nn.Linear, AdapterLayer)) and getattr(_unwrap(module), "weight", None) is weight:
            out.append(name)
    return out


def _owner(config: Any) -> tuple[str, str]:
    if isinstance(config, TrainableTokensConfig):
        return "TrainableTokensConfig", "token_indices"
    return type(config).__name__, FIELD


def token_plan(model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> dict[str, list[int] | None]:
    """Path -> the token indices of its adapter (None: a tied layer that follows the input embedding's adapter),
    checked against each layer's rows. Raises before anything changes."""
    owner, name = _owner(config)
    modules = dict(named)
    all_paths = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    emb = input_embedding_path(model)
    plan: dict[str, list[int] | None] = {}
    if isinstance(config, TrainableTokensConfig):
        if not config.token_indices:
            raise ConfigError(f"{owner}.{name}: expected at least one token index, got []")
        paths = find_targets(model, named, config, (), (nn.Embedding, nn.Linear))
        plan = {p: list(config.token_indices) for p in paths}
        if emb in plan:  # PEFT: layers tied to a targeted input embedding follow it (also when targeted too)
            plan.update({p: None for p in tied_paths(model, emb)})
    else:
        spec = getattr(config, FIELD)
        if isinstance(spec, dict):
            layers = dict(spec)
        else:
            if emb is None:
                raise NotApplicableError(f"{owner}.{name}: {type(model).__name__} has no input embedding "
                                         "(get_input_embeddings); give {module name: indices} instead")
            layers = {emb: list(spec)}
        saved = getattr(config, "modules_to_save", None) or []
        for key in layers:
            if key in saved:
                raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                                 f'`modules_to_save=[..., "{key}", ...]` or `trainable_tokens={{\'{key}\': x}}` but not '
                                 "both.")
        tied = tied_paths(model, emb) if emb is not None else []
        emb_indices = next((v for k, v in layers.items() if emb is not None and emb.endswith(k)), None)
        # PEFT: layers tied to the embedding with the same indices (or none of their own) follow it
        follow = emb_indices is not None and all(
            list(v) == list(emb_indices) for k, v in layers.items() if any(t.endswith(k) for t in tied))
        for key, indices in layers.items():
            found = [p for p in all_paths if p.endswith(key) and not (follow and p in tied)]
            if not found and not (follow and any(t.endswith(key) for t in tied)):
                raise ValueError(f"{owner}.{name}: module {key!r} not found in {type(model).__name__} (names are "
                                 "matched as suffixes of module paths)")
            plan.update({p: list(indices) for p in found})
        if follow and emb in plan:
            plan.update({p: None for p in tied})
    if not plan:
        raise NotApplicableError(f"{owner}: no layer to train tokens of in {type(model).__name__}")
    for path, indices in plan.items():
        base = _unwrap(modules[path] if path in modules else model.get_submodule(path))
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise NotApplicableError(f"{owner}.{name}: {path!r} is a {type(base).__name__}; trainable tokens need an "
                                     "nn.Embedding (or a tied nn.Linear LM head)")
        if indices is not None:
            check_in_vocabulary(owner, name, indices, path, base.weight.shape[0])
    return plan


def _indices_for(config: Any, key: str) -> list[int] | None:
    """The indices of the adapter at ``key`` as the config alone gives them (None: a tied layer, linked later)."""
    if isinstance(config, TrainableTokensConfig):
        return list(config.token_indices)
    spec = getattr(config, FIELD)
    if not isinstance(spec, dict):
        return list(spec)
    return next((list(v) for k, v in spec.items() if key.endswith(k)), None)


# -- the adapter ----------------------------------------------------------------------------------------------
@register_method(
    "trainable_tokens",
    config=TrainableTokensConfig,
    category="selective",
    modalities=("text", "vision-language", "generation"),
    mergeable=True,
    param_formula="k d (k chosen tokens, embedding width d)",
    position="chosen rows of the input embedding (and of the layers tied to it)",
    paper="Hugging Face PEFT's TrainableTokens",
    examples={"trainable_tokens": {"token_indices": list(range(0, 96, 3))}},
)
class TrainableTokensAdapter(Adapter):
    supported_layers = (nn.Embedding, nn.Linear)
    default_roles = ()
    auxiliary_field = FIELD
    checkpoint_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, base: nn.Module, config: Any, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.key = key
        self.beside = not isinstance(config, TrainableTokensConfig)  # LoRA's trainable_token_indices: PEFT's wrapper
        self._source: list[TrainableTokensAdapter] = []  # the input embedding's adapter, for a tied layer
        indices = _indices_for(config, key)
        self.token_indices: list[int] = indices or []
        w = base.weight
        self.register_parameter("trainable_tokens_delta", None)
        if indices is not None:
            check_in_vocabulary(*_owner(config), indices, key, w.shape[0])
            idx = torch.tensor(indices, dtype=torch.long, device=w.device)
            with torch.no_grad():
                if init and not self.beside and not config.init_weights:  # beside LoRA: always the rows (PEFT)
                    values = torch.randn(len(indices), w.shape[1], dtype=w.dtype, device=w.device)
                else:
                    values = w.detach().index_select(0, idx)
            self.trainable_tokens_delta = nn.Parameter(values.to(adapter_dtype(base)).clone())
            order = torch.argsort(idx)
            self.register_buffer("_idx", idx, persistent=False)
            self.register_buffer("_sorted", idx[order], persistent=False)  # lookup of a token's row: searchsorted
            self.register_buffer("_order", order, persistent=False)

    # -- tying ---------------------------------------------------------------------------------------------
    @property
    def tied(self) -> bool:
        return bool(self._source)

    def tie_to(self, source: "TrainableTokensAdapter") -> None:
        """Follow ``source`` (the input embedding's adapter): its tensor, its indices; nothing of its own, and no
        merge of its own (the weight is the embedding's, which the source merges)."""
        self._source = [source]  # a list: not a submodule (no second copy in state dicts, no double count)
        self.trainable_tokens_delta = None
        self.token_indices = source.token_indices
        for name in ("_idx", "_sorted", "_order"):
            self._buffers.pop(name, None)
        self.merged_params = ()

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        src = self._source[0] if self._source else self
        if src.trainable_tokens_delta is None:
            raise RuntimeError(f"{self.key}: trainable-tokens adapter tied to no embedding adapter")
        return src.trainable_tokens_delta, src._idx, src._sorted, src._order

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        return list(token_plan(model, named, config))

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        """``target_modules=None``: the input embedding's path, written into the config as PEFT does."""
        if isinstance(config, TrainableTokensConfig) and config.target_modules is None:
            emb = input_embedding_path(model)
            if emb is None or not isinstance(_unwrap(model.get_submodule(emb)), nn.Embedding):
                raise NotApplicableError(f"TrainableTokensConfig.target_modules: {type(model).__name__} has no input "
                                         "token embedding (get_input_embeddings); name the layer in target_modules")
            config.target_modules = emb

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """Tied layers follow the input embedding's adapter (one tensor, as PEFT's ``tied_adapter``)."""
        emb = input_embedding_path(model)
        layers = dict(adapter_layers(model))
        adapters = layers[emb].adapters if emb in layers else {}
        source = adapters[adapter_name] if adapter_name in adapters else None
        if not isinstance(source, TrainableTokensAdapter) or source.tied:
            return
        for path in tied_paths(model, emb):
            adapter = layers[path].adapters[adapter_name] if path in layers and adapter_name in layers[path].adapters \
                else None
            if isinstance(adapter, TrainableTokensAdapter) and not adapter.tied and (
                    adapter.trainable_tokens_delta is None or adapter.token_indices == source.token_indices):
                adapter.tie_to(source)

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """k d on a targeted layer; 0 on a layer tied to the input embedding (it holds no tensor of its own)."""
        targets = getattr(config, "target_modules", None)
        if isinstance(config, TrainableTokensConfig) and targets is not None and not is_target(config, key, targets):
            return 0
        indices = _indices_for(config, key)
        return len(indices or []) * base.weight.shape[1]

    # -- the file ------------------------------------------------------------------------------------------
    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        if self.beside:  # PEFT's TrainableTokensWrapper: tied layers leave their tensor to the embedding's
            return {} if self.tied else {f"{PREFIX}{self.key}.token_adapter.trainable_tokens_delta": self._tensors()[0]}
        return {f"{PREFIX}{self.key}.trainable_tokens_delta": self._tensors()[0]}

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        delta, idx, sorted_idx, order = self._tensors()
        if isinstance(base, nn.Embedding):
            if base.max_norm is not None or base.sparse or base.scale_grad_by_freq:  # PEFT's computation, whole
                return self._embedding_whole(base, x, delta, idx)
            x = x if x.dtype == sorted_idx.dtype else x.to(sorted_idx.dtype)
            pos = torch.searchsorted(sorted_idx, x).clamp_(max=len(sorted_idx) - 1)
            hit = sorted_idx[pos] == x
            row = order[pos]
            pad = base.padding_idx
            pad_row = None
            if pad is not None and (idx == (pad % base.num_embeddings)).any():  # no gradient into the padding row
                pad_row = int((idx == (pad % base.num_embeddings)).nonzero()[0])
            rows = F.embedding(row, delta, padding_idx=pad_row)
            scale = embed_scale(base)
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            return torch.where(hit.unsqueeze(-1), rows.to(out.dtype), out)
        # nn.Linear (a tied LM head): the output columns of the chosen tokens, x . row (+ the bias)
        cols = F.linear(x, delta.to(x.dtype))
        bias = getattr(base, "bias", None)
        if bias is not None:
            cols = cols + bias.index_select(0, idx).to(cols.dtype)
        return out.index_copy(out.dim() - 1, idx, cols.to(out.dtype))

    @staticmethod
    def _embedding_whole(base: nn.Embedding, x: Tensor, delta: Tensor, idx: Tensor) -> Tensor:
        weight = base.weight.index_copy(0, idx, delta.to(base.weight.dtype))
        out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
        scale = embed_scale(base)
        return out if scale is None else out * scale.to(out.dtype)

    # -- merge ---------------------------------------------------------------------------------------------
    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        delta, idx, _, _ = self._tensors()
        idx = idx.to(weight.device)
        original = weight.index_select(0, idx).clone()
        return weight.index_copy(0, idx, delta.detach().to(weight)), original

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        idx = self._tensors()[1].to(weight.device)
        return weight.index_copy(0, idx, state.to(weight))

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        delta, idx, _, _ = self._tensors()
        return value.index_copy(0, idx.to(value.device), delta.to(value))
