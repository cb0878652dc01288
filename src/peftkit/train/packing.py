"""Sequence packing for causal-LM instruction tuning (``data.packing: true``).

A padded batch of instruction examples spends most of its rows on padding when lengths vary. Packing puts
several examples into one row, one after another, and keeps them apart through transformers' packed-sequence
support: every example's ``position_ids`` restart at 0, the batch carries no 2-D ``attention_mask`` and
the model runs without a KV cache. From these ``transformers.masking_utils.create_causal_mask`` finds the
example boundaries (a position that does not follow its left neighbour by one starts a new example,
``find_packed_sequence_indices``) and builds a causal mask that is also block-diagonal over the examples, for
the ``sdpa``, ``eager`` and ``flex_attention`` implementations; the rotary / learned position embeddings
see each example's own positions. The ``flash_attention_*`` implementations take the same position ids and
run the variable-length kernel (``cu_seqlens`` from the restarts), which transformers does only for a
single flattened row: for those the whole batch becomes one row, as ``DataCollatorWithFlattening`` does.

What each token computes is therefore what it computes in its own padded row, and the loss is the same: an
example's first label is set to -100 in the packed row (its first token is predicted by nothing; in the
padded row that label is never a target either, since targets are the labels shifted by one). The batch
holds the same examples as the unpacked one, so data order, resuming and data-parallel splits are unchanged;
only the number of rows (and the padding) shrinks.

Examples go into rows first-fit in decreasing length, rows of at most ``capacity`` tokens
(``data.pack_length``, default ``data.max_length``); the tail of a row that is not full holds padding with
its own restarting positions and label -100, so no example can attend to it.

Whether a model honours this is checked, not assumed (:func:`check_packed_attention`): an example is run
alone and after another example in one row, and the logits must agree. A model whose attention ignores the
restarts (a custom attention, a model that builds its own mask) fails here, before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .packages import ModelError


@dataclass
class PackedLayout:
    """Which examples each packed row holds, in order, and where each starts: ``rows[r]`` is a list of
    ``(example index, start column, length)``."""

    rows: list[list[tuple[int, int, int]]]
    width: int


def pack_layout(lengths: list[int], capacity: int | None) -> PackedLayout:
    """First-fit decreasing: examples (by ``lengths``) into rows of at most ``capacity`` tokens
    (None: one row for the whole batch). Ties keep the batch order, so the layout is a pure function of it."""
    if capacity is not None and max(lengths, default=0) > capacity:
        raise ValueError(f"pack_layout: an example of {max(lengths)} tokens does not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[tuple[int, int, int]]] = []
    fill: list[int] = []
    for i in order:
        n = lengths[i]
        for r, used in enumerate(fill):
            if capacity is None or used + n <= capacity:
                rows[r].append((i, used, n))
                fill[r] += n
                break
        else:
            rows.append([(i, 0, n)])
            fill.append(n)
    return PackedLayout(rows, max(fill, default=0))


def pack_examples(seqs: list[list[int]], labels: list[list[int]], capacity: int | None,
                  pad_id: int) -> tuple[dict[str, object], PackedLayout]:
    """The packed batch (``input_ids``, ``position_ids``, ``labels``, ``use_cache=False``) of tokenised
    examples with their per-token labels (-100: not supervised), and its layout."""
    layout = pack_layout([len(s) for s in seqs], capacity)
    n_rows, width = len(layout.rows), layout.width
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    lab = torch.full((n_rows, width), -100, dtype=torch.long)
    for r, row in enumerate(layout.rows):
        end = 0
        for i, start, n in row:
            input_ids[r, start : start + n] = torch.tensor(seqs[i], dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            y = torch.tensor(labels[i][:n], dtype=torch.long)
            y[0] = -100  # predicted by the previous example's last token otherwise
            lab[r, start : start + len(y)] = y
            end = start + n
        position_ids[r, end:] = torch.arange(width - end)  # padding: a segment of its own
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": lab, "use_cache": False}
    return batch, layout


def flattens(model: nn.Module) -> bool:
    """Whether the model's attention takes packed rows only as one flattened row (flash attention)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in str(impl)


@torch.no_grad()
def check_packed_attention(model: nn.Module, tol: float = 1e-4) -> None:
    """Raise ``ModelError`` unless an example's logits are the same alone and packed after another example.

    Runs on the model's device in eval mode (restored afterwards); skipped for flash attention, whose
    variable-length path needs the accelerator the run moves to later."""
    if flattens(model):
        return
    first = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 5), generator=g), torch.randint(0, vocab, (1, 4), generator=g)
    ids = torch.cat([a, b], 1).to(first.device)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=first.device)
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, 5:].float()
        alone = model(input_ids=b.to(first.device), use_cache=False).logits.float()
    finally:
        model.train(was_training)
    err = float((packed - alone).abs().max())
    if not err <= tol * max(1.0, float(alone.abs().max())):
        kind = type(model).__name__
        impl = getattr(model.config, "_attn_implementation", None)
        raise ModelError(f"data.packing: {kind} (attention {impl}) lets packed examples see each other "
                         f"(logits differ by {err:.3g} when an example follows another in a row); set "
                         "data.packing=false for this model")


def causal_lm_options_problem(recipe: Any) -> str | None:
    """What is wrong with ``data.packing``, ``data.pack_length`` and ``train.ce_chunk_size`` (causal_lm options, in
    range), led by the dotted YAML path; None when nothing is (``recipe.py`` raises it as a RecipeError)."""
    d, t = recipe.data, recipe.train
    for dotted, on in (("data.packing", d.packing), ("train.ce_chunk_size", t.ce_chunk_size is not None)):
        if on and recipe.task != "causal_lm":
            return f"{dotted}: only task causal_lm reads it (task {recipe.task})"
    if t.ce_chunk_size is not None and t.ce_chunk_size <= 0:
        return f"train.ce_chunk_size: expected a positive integer or null, got {t.ce_chunk_size}"
    if d.pack_length is not None:
        if not d.packing:
            return "data.pack_length: only read with data.packing: true"
        if d.pack_length < d.max_length:
            return f"data.pack_length: expected an integer >= data.max_length ({d.max_length}) or null, got {d.pack_length}"
    return None
