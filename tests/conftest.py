"""Fixtures shared by several test modules, and the ``gpu`` marker's skip.

Helpers that are not fixtures live in ``tests/support.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason shown, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


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


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    """Run a test with the memory-efficient blocks' fused C kernels, and again with their
    PyTorch operations."""
    from densenets.efficient import dispatch

    if request.param == "torch":
        monkeypatch.setattr(dispatch.cpu_kernels, "usable", lambda t: False)
    elif dispatch.backend() != "native":
        pytest.skip("no C compiler: the fused CPU kernels cannot be built here")
    return request.param
