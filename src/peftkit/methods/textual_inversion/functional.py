"""Pure functions of textual inversion: the prompt with a multi-vector placeholder spelled out, the rows a
placeholder starts from, and the diffusers file's one entry."""

from __future__ import annotations

from torch import Tensor

from .config import placeholder_names


def multi_vector_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """``prompt`` with ``token`` replaced by its ``num_vectors`` words ``<tok> <tok>_1 ...`` (diffusers'
    ``maybe_convert_prompt``: the same plain string replacement)."""
    return prompt if num_vectors == 1 else prompt.replace(token, " ".join(placeholder_names(token, num_vectors)))


def initializer_rows(weight: Tensor, initializer_index: int, n: int) -> Tensor:
    """(n, d): the initializer token's embedding row, once per vector (a copy, detached from ``weight``)."""
    return weight.detach()[initializer_index].unsqueeze(0).expand(n, -1).clone()


def diffusers_entry(token: str, rows: Tensor) -> dict[str, Tensor]:
    """diffusers' textual-inversion state dict: ``{placeholder: (n_vectors, d)}``, contiguous, on the CPU."""
    if rows.dim() != 2:
        raise ValueError(f"textual inversion rows: expected (n_vectors, d), got shape {tuple(rows.shape)}")
    return {token: rows.detach().to("cpu").contiguous().clone()}
