"""Textual inversion (Gal et al. 2022, arXiv 2208.01618): a new word's embedding, learned; everything else frozen.

``config.py``: ``TextualInversionConfig``; ``functional.py``: the prompt spelled out for multi-vector words, the
initial rows, diffusers' file entry; ``layer.py``: the adapter (the trainable-tokens rows, plus growing the
embedding); ``tokens.py``: the tokenizer side (``add_textual_inversion``) and diffusers' file
(``save_textual_inversion``).
"""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import TextualInversionConfig, placeholder_names  # noqa: E402
from .functional import multi_vector_prompt  # noqa: E402
from .layer import TextualInversionAdapter  # noqa: E402
from .tokens import add_textual_inversion, save_textual_inversion  # noqa: E402

__all__ = ["TextualInversionAdapter", "TextualInversionConfig", "add_textual_inversion", "multi_vector_prompt",
           "placeholder_names", "save_textual_inversion"]
