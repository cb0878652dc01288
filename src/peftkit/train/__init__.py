"""``peftkit train``: recipes, data, tasks and the training loop."""

from .loop import Trainer, TrainingError, train
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "Trainer", "TrainingError", "load_recipe", "train"]
