"""Composition blocks as data: Stack, Parallel, Average and Fuse over adapters already on the model.

A composition is an adapter of its own (method "composition") whose config holds the block as a plain dict,
so it is saved in ``adapter_config.json`` and rebuilt on load (load its children first). At every layer that
holds one of its children it evaluates the block on the layer's input x and base output h:

- ``Stack(a, b)``: ``b(a(h))``, each child applied to the previous one's output (AdapterHub's Stack).
- ``Parallel(a, b)``: ``h + sum_k (c_k(h) - h)``, every child on the same input, contributions added.
  (AdapterHub's Parallel replicates the batch per adapter; peftkit's per-row routing, ``adapter_names=``,
  covers that use.)
- ``Average(a, b, weights=[w_a, w_b])``: ``sum_k w_k c_k(h)``, weights normalised to sum 1 (default equal).
- ``Fuse(a, b)``: AdapterFusion (Pfeiffer et al. 2021, arXiv 2005.00247), attention over the children's
  outputs o_k (d,) with the sublayer output h as query:
  ``alpha = softmax_k((Q h) . (K o_k) / T)``, ``out = sum_k alpha_k V o_k``; Q, K, V (d, d) with bias,
  Q and K ~ N(0, 0.02^2), V = identity (so ``out`` starts as a convex mix of the children). Parameters per
  layer 3 (d^2 + d). Activating the composition alone (``set_adapter("fusion")``) trains only Q, K, V: the
  children are frozen (AdapterFusion's second stage); ``mark_trainable(extra=[children])`` trains both.

Children absent at a layer are skipped there (Average renormalises over the present ones). Allowed nestings:
Stack of names / Parallel / Average / Fuse; Parallel and Average of names / Stack; Fuse of names only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError, PeftConfig
from ...layers import Adapter, AdapterLayer
from ...registry import register_method
from ...targeting import TargetError
from .bottleneck import adapter_factory, block_dims


def _kinds(kind: str) -> str:
    return ", ".join("names" if k == "str" else k for k in ALLOWED[kind])


ALLOWED = {"Stack": ("str", "Parallel", "Average", "Fuse"), "Parallel": ("str", "Stack"),
           "Average": ("str", "Stack"), "Fuse": ("str",)}


@dataclasses.dataclass
class Block:
    """A composition block: ``kind`` (Stack, Parallel, Average, Fuse) over children (names or blocks)."""

    kind: str
    children: list[str | Block]
    weights: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind,
                               "children": [c if isinstance(c, str) else c.to_dict() for c in self.children]}
        if self.weights is not None:
            out["weights"] = list(self.weights)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "block") -> "Block":
        if isinstance(data, Block):
            return data
        if not isinstance(data, dict) or data.get("type") not in ALLOWED:
            raise ConfigError(
                f"{where}: expected {{'type': one of {sorted(ALLOWED)}, 'children': [...]}}, got {data!r}")
        kids = data.get("children")
        if not isinstance(kids, list):
            raise ConfigError(f"{where}.children: expected a list, got {kids!r}")
        children = [c if isinstance(c, str) else cls.from_dict(c, f"{where}.children[{i}]") for i, c in enumerate(kids)]
        return cls(data["type"], children, data.get("weights"))

    def leaves(self) -> list[str]:
        return [n for c in self.children for n in ([c] if isinstance(c, str) else c.leaves())]

    def validate(self, where: str = "block") -> None:
        if len(self.children) < 2:
            raise ConfigError(f"{where}: {self.kind} needs at least two children, got {len(self.children)}")
        for i, c in enumerate(self.children):
            kind = "str" if isinstance(c, str) else c.kind
            if kind not in ALLOWED[self.kind]:
                raise ConfigError(f"{where}.children[{i}]: a {kind} inside a {self.kind} is not a valid composition "
                                  f"(a {self.kind} holds {_kinds(self.kind)})")
            if not isinstance(c, str):
                c.validate(f"{where}.children[{i}]")
        dup = sorted({n for n in self.leaves() if self.leaves().count(n) > 1})
        if dup:
            raise ConfigError(f"{where}: adapter(s) {dup} appear more than once")
        if self.weights is not None:
            if self.kind != "Average":
                raise ConfigError(f"{where}.weights: only an Average has weights")
            if len(self.weights) != len(self.children) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"{where}.weights: expected {len(self.children)} non-negative weights with a "
                                  f"positive sum, got {self.weights!r}")


def Stack(*children: str | Block) -> Block:  # noqa: N802  (AdapterHub's spelling)
    return Block("Stack", list(children))


def Parallel(*children: str | Block) -> Block:  # noqa: N802
    return Block("Parallel", list(children))


def Average(*children: str | Block, weights: list[float] | None = None) -> Block:  # noqa: N802
    return Block("Average", list(children), None if weights is None else list(weights))


def Fuse(*children: str) -> Block:  # noqa: N802
    return Block("Fuse", list(children))


@dataclasses.dataclass
class CompositionConfig(PeftConfig):
    """A composition of adapters already on the model (see the module doc).

    Args:
        block: a ``Block`` (``Stack("a", "b")``, ``Fuse("a", "b")``...) or its dict form; stored as the dict.
        temperature: T of the Fuse softmax.
    """

    PEFT_TYPE: ClassVar[str] = "COMPOSITION"

    block: dict[str, Any] | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block is None:
            raise ConfigError("CompositionConfig.block: required, e.g. Stack('a', 'b') or Fuse('a', 'b')")
        tree = Block.from_dict(self.block, "CompositionConfig.block")
        tree.validate("CompositionConfig.block")
        self.block = tree.to_dict()
        self._check(self.temperature > 0, "temperature", "a positive number")

    @property
    def tree(self) -> Block:
        return Block.from_dict(self.block)


# children found by select_targets for each layer, handed to the constructor: (config id, path) -> adapters
_CHILDREN: dict[tuple[int, str], dict[str, Adapter]] = {}


@register_method(
    "composition", config=CompositionConfig, category="hybrid",
    modalities=("text", "vision", "vision-language", "generation"), mergeable=False,
    param_formula="Fuse: 3 (d^2 + d) per layer; Stack / Parallel / Average: 0",
    position="blocks over other adapters' outputs", changes_structure=True, starts_at_base=False,
    paper="arXiv 2005.00247 (AdapterFusion); AdapterHub composition blocks",
)
class CompositionAdapter(Adapter):
    """Evaluates a composition block over the child adapters of one layer."""

    supported_layers = (nn.Module,)
    checkpoint_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, base: nn.Module, config: CompositionConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.tree = config.tree
        self.temperature = config.temperature
        self.kids = _CHILDREN.pop((id(config), key))  # plain dict: the children stay owned by their layer
        if self.tree.kind == "Fuse":
            d = block_dims(base)[0]
            kw = adapter_factory(base)
            self.fusion_query = nn.Linear(d, d, **kw)
            self.fusion_key = nn.Linear(d, d, **kw)
            self.fusion_value = nn.Linear(d, d, **kw)
            with torch.no_grad():
                for lin in (self.fusion_query, self.fusion_key):
                    lin.weight.normal_(0.0, 0.02)
                    lin.bias.zero_()
                self.fusion_value.weight.copy_(torch.eye(d))
                self.fusion_value.bias.zero_()
            self.checkpoint_keys = {f"fusion_{k}_{w}": f"adapter_fusion.{k}.{w}" for k in ("query", "key", "value")
                                    for w in ("weight", "bias")}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("fusion_") and name.endswith(("_weight", "_bias")):  # checkpoint access
            lin, _, w = name.rpartition("_")
            return getattr(super().__getattr__(lin), w)
        return super().__getattr__(name)

    @classmethod
    def param_count(cls, base: nn.Module, config: CompositionConfig, key: str = "") -> int:
        if config.tree.kind != "Fuse":
            return 0
        d = block_dims(base)[0]
        return 3 * (d * d + d)

    @classmethod
    def select_targets(
        cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: CompositionConfig
    ) -> list[str]:
        leaves = config.tree.leaves()
        layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
        present = {a for layer in layers.values() for a in layer.adapters}
        missing = [n for n in leaves if n not in present]
        if missing:
            raise TargetError(f"CompositionConfig.block: adapter(s) {missing} do not exist on the model "
                              f"(adapters: {sorted(present)}); add or load them first")
        paths = []
        for path, layer in layers.items():
            kids = {n: layer.adapters[n] for n in leaves if n in layer.adapters}
            if not kids:
                continue
            bad = [n for n, a in kids.items()
                   if isinstance(a, CompositionAdapter) or getattr(a, "piece", "") in ("tap", "add")]
            if bad:
                raise TargetError(f"CompositionConfig.block: {bad} at {path!r} cannot be composed (a composition, or a "
                                  "parallel adapter on a split FFN, whose two pieces share state)")
            _CHILDREN[(id(config), path)] = kids
            paths.append(path)
        return paths

    # -- forward -----------------------------------------------------------------------------------------
    def _eval(self, block: Block | str, base: nn.Module, x: Tensor, h: Tensor) -> Tensor | None:
        """The block's output on a layer whose running output is h; None when none of its children is here."""
        if isinstance(block, str):
            return self.kids[block](base, x, h) if block in self.kids else None
        if block.kind == "Stack":
            out, hit = h, False
            for c in block.children:
                nxt = self._eval(c, base, x, out)
                if nxt is not None:
                    out, hit = nxt, True
            return out if hit else None
        # each child gets its own copy: an adapter may accumulate into the running output in place (LoRA
        # does when autograd is off), and h is read again below
        outs = [(i, self._eval(c, base, x, h.clone())) for i, c in enumerate(block.children)]
        outs = [(i, o) for i, o in outs if o is not None]
        if not outs:
            return None
        if block.kind == "Parallel":
            return h + sum(o - h for _, o in outs)
        if block.kind == "Average":
            w = block.weights or [1.0] * len(block.children)
            total = sum(w[i] for i, _ in outs)
            return sum((w[i] / total) * o for i, o in outs)
        return self._fuse(h, torch.stack([o for _, o in outs], dim=-2))  # (..., k, d)

    def _fuse(self, h: Tensor, o: Tensor) -> Tensor:
        """AdapterFusion: h (..., d), o (..., k, d) -> (..., d)."""
        dt = self.fusion_query.weight.dtype
        q = self.fusion_query(h.to(dt)).unsqueeze(-2)  # (..., 1, d)
        k = self.fusion_key(o.to(dt))  # (..., k, d)
        alpha = torch.softmax((q * k).sum(-1) / self.temperature, dim=-1)  # (..., k)
        return (alpha.unsqueeze(-1) * self.fusion_value(o.to(dt))).sum(-2).to(h.dtype)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        result = self._eval(self.tree, base, x, out)
        return out if result is None else result
