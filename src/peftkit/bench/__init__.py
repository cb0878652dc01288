"""``peftkit bench``: a method x model comparison harness, side by side with Hugging Face PEFT.

- :mod:`.grid`: the models and methods of the grid and each cell's config
- :mod:`.measure`: parameter counts, adapter size, step time, peak memory, latency, statistics
- :mod:`.run`: the interleaved per-cell loop and the ours / theirs ratios
- :mod:`.peft_side`: the lazily imported Hugging Face PEFT counterpart of a method
- :mod:`.report`: JSON, markdown, charts and the terminal table (``python -m peftkit.bench.report DIR``)
"""

from .grid import MODELS, BenchError, method_choices, resolve_methods, resolve_models
from .run import Options, run_grid

__all__ = ["MODELS", "BenchError", "Options", "method_choices", "resolve_methods", "resolve_models", "run_grid"]
