"""Fixtures every test file shares.

One OpenMP thread for torch, set before each module's fixtures and before each test: the suite runs on
shared cores (``make test``: two workers), tiny models gain nothing from more threads, and a test that
trains through ``peftkit.train`` may have set its recipe's thread count.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module() -> None:
    """Before a module's own module-scoped fixtures (autouse fixtures run first in their scope)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)
