"""Built-in methods. Importing a method module registers it; add new methods to this list."""

from . import lora  # noqa: F401
