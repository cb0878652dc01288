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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``make test`` runs ``--dist loadgroup``: every file stays whole on one worker (its module fixtures are
    built once), except the suites parametrized over the whole registry, whose hundreds of independent cases
    spread over both workers (whole, each would be a long unit of work that keeps one worker busy after the
    other is done). Those files have no module-scoped fixtures."""
    for item in items:
        if item.path.name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


# registry-wide suites whose cases the two workers share (tests/test_house.py checks they have no module fixtures)
SPREAD = {"test_contract.py", "test_gradient_checkpointing.py", "test_peft_parity.py"}
