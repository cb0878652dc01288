"""Role-table lookups shared by the vision methods (whole-module roles, not Linear targets)."""

from __future__ import annotations

from torch import nn

from ...targeting import NotApplicableError, role_names

# what each family can use, for NotApplicableError messages
APPLIES = ("vpt: ViT (transformers ViTModel / ViTForImageClassification) and CLIP's vision tower; "
           "coop, cocoop, clip_adapter, tip_adapter: CLIP (transformers CLIPModel)")


def find_path(model: nn.Module, named: list[tuple[str, nn.Module]], role: str, explicit: str | None) -> str | None:
    """The one path playing ``role`` (or matching ``explicit``, a path or dotted suffix); None when absent."""
    names = [explicit] if explicit else role_names(model, named, (role,))
    for name in names:
        hits = [p for p, _ in named if p and (p == name or p.endswith("." + name))]
        if hits:
            return hits[0]
    return None


def not_applicable(method: str, model: nn.Module, why: str) -> NotApplicableError:
    return NotApplicableError(f"{method}: not applicable to {type(model).__name__}: {why}. Applies to: {APPLIES}")
