"""AdaMSS: adaptive multi-subspaces of the pre-trained weight's SVD (OpenReview 8ZdWmpYxT0)."""

from .. import import_submodules

import_submodules(__name__, __path__)  # importing registers the method

from .config import AdamssConfig  # noqa: E402
from .layer import AdamssAdapter  # noqa: E402

__all__ = ["AdamssConfig", "AdamssAdapter"]
