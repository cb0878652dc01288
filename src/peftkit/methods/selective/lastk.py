"""Last-k layer tuning (partial fine-tuning; Lee et al. 2019, arXiv 1911.03090): only the top ``k`` blocks
train, with the task head; ``k = 0`` trains the head alone (linear probing).

Every parameter of the chosen blocks gets a dense delta (``W = W0 + delta``): the same optimizer state as
training those blocks in place, while the base stays untouched for ``disable_adapter`` and
``merge_and_unload`` writes the tuned values in.

Blocks are found in the model's block lists (``ModuleList`` named ``layer``, ``layers``, ``h``, ``block``,
``blocks`` or ``up_blocks``, outermost only; ``layers_pattern`` names others). An encoder-decoder or a
two-tower model has a list per stack; each trains its top ``k``. A model without any block list (a small
conv net, an MLP) counts its parameter-holding leaf modules, in order, as its layers.
"""

from __future__ import annotations


from torch import nn

from ...registry import register_method
from ...targeting import TargetError
from .adapter import SelectiveAdapter
from .config import LastKConfig, SelectionError
from .select import eligible, record, task_heads

BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks", "up_blocks")


def block_stacks(model: nn.Module, pattern: list[str] | str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """(path, block list) of the model's outermost block lists named by ``pattern`` (default ``BLOCK_LISTS``)."""
    names = BLOCK_LISTS if pattern is None else ((pattern,) if isinstance(pattern, str) else tuple(pattern))
    stacks: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or path.rpartition(".")[2] not in names:
            continue
        if any(path.startswith(p + ".") for p, _ in stacks):
            continue  # a list inside a block (T5's ``block.0.layer``) is not a stack of its own
        stacks.append((path, module))
    return stacks


def chosen_layers(config: LastKConfig, stack: str, n: int) -> list[int]:
    """The block indices of one stack to train, checked against its length."""
    if config.layers_to_transform is not None:
        bad = [i for i in config.layers_to_transform if i >= n]
        if bad:
            raise SelectionError(
                f"LastKConfig.layers_to_transform: layer index {bad[0]} does not exist; {stack or 'the model'} "
                f"has {n} layers (0-{n - 1})"
            )
        return sorted(set(config.layers_to_transform))
    if config.k > n:
        raise SelectionError(f"LastKConfig.k={config.k}: {stack or 'the model'} has only {n} layers")
    return list(range(n - config.k, n))


@register_method(
    "last_k",
    config=LastKConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="all parameters of the top k blocks (+ the head)",
    position="the top k blocks",
    paper="arXiv 1911.03090 (partial fine-tuning)",
    examples={"last_k": {"k": 1}},
)
class LastKAdapter(SelectiveAdapter):
    method = "last_k"

    @classmethod
    def select(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: LastKConfig) -> None:
        everything = eligible(model, named, config)
        stacks = block_stacks(model, config.layers_pattern)
        if config.layers_pattern is not None and not stacks:
            raise TargetError(f"LastKConfig.layers_pattern={config.layers_pattern!r} names no block list of "
                              f"{type(model).__name__}")
        prefixes: list[str] = []
        if stacks:
            for path, stack in stacks:
                prefixes += [f"{path}.{i}." for i in chosen_layers(config, path, len(stack))]
            chosen = [c for c in everything if any((c[0] + ".").startswith(p) for p in prefixes)]
        else:  # no block list: the leaf modules in order are the layers
            leaves = list(dict.fromkeys(path for path, _, _ in everything))
            keep = set(leaves[i] for i in chosen_layers(config, "", len(leaves)))
            chosen = [c for c in everything if c[0] in keep]
        if not chosen and not any(dict(named).get(h) is not None or any(p.endswith("." + h) for p, _ in named)
                                  for h in task_heads(config)):
            raise SelectionError(
                f"LastKConfig(k={config.k}) trains nothing on {type(model).__name__}: k = 0 (linear probing) "
                "trains only the head; set task_type or modules_to_save"
            )
        config.selected_params = record([(path, p, tuple(t.shape), t.numel(), "full") for path, p, t in chosen])
