"""Fixtures for the curvature-core tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run tiny float64 problems on one intra-op thread, restoring the previous setting afterwards.

    The test networks are a few dozen parameters wide: thread synchronisation dominates their cost, and on a
    shared machine two spinning threads can be an order of magnitude slower than one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
