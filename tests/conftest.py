"""Fixtures shared by several test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Small convolutions run far faster on one thread when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for each test (tiny ops; robust when other processes share the CPU).

    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    with _single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for a whole module, module-scoped fixtures included.

    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread_module")``.
    """
    with _single_thread():
        yield
