"""The adapter folder's model card (``README.md``), written and updated as peft's ``save_pretrained`` does.

The card's metadata is what the Hugging Face Hub reads to list an adapter under its base model:
``library_name: peft`` (peftkit's folders are peft's format), tags (``transformers``, ``lora``,
``base_model:adapter:<base>``), ``base_model`` and, for a causal LM, ``pipeline_tag: text-generation``. An
existing card keeps its text and metadata; the "Framework versions" block gains this peftkit's version line
once. Built with ``huggingface_hub``'s ``ModelCard`` (a transformers dependency; nothing is downloaded).
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

FRAMEWORK_HEADING = "### Framework versions"
CARD_NAME = "README.md"


def card_tags(model: Any) -> list[str]:
    """peft's adapter tags for ``model`` (a PeftModel)."""
    import transformers

    tags = set(getattr(model.get_base_model(), "model_tags", None) or [])
    if isinstance(model.get_base_model(), transformers.PreTrainedModel):
        tags.add("transformers")
    if str(model.active_peft_config.peft_type).upper() == "LORA":
        tags.add("lora")
    name = getattr(model.get_base_model(), "name_or_path", None)
    if name:
        tags.add(f"base_model:adapter:{name}")
    return sorted(tags)


def update_model_card(model: Any, folder: str, version: str, causal_lm: bool) -> str:
    """The text of ``folder/README.md`` for ``model``'s adapter: the existing card updated, or a new one. The
    caller writes it with the adapter's other files."""
    path = os.path.join(folder, CARD_NAME)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = card_tags(model)
    if tags:
        card.data["tags"] = tags
    if not card.data.pipeline_tag and causal_lm:
        card.data.pipeline_tag = "text-generation"
    name = getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)
    if name:
        card.data["base_model"] = name
    lines = card.text.splitlines()
    line = f"- peftkit {version}"
    if line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, line)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{line}")
    card.text = "\n".join(lines)
    return str(card)
