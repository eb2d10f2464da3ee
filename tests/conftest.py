"""Shared fixtures: the multi-rank pools (tier 1) and hermetic environment defaults."""

from __future__ import annotations

import os

import pytest
from multirank import RankPools

# Kernels defined under pytest must be interpretable on the CPU (DESIGN: tier 2); set before any import of triton.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the lent GPU machine only; on a CPU-only machine (CI) they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ranks():
    """``ranks.run(world_size, fn, *args, timeout=..., **kwargs)`` runs ``fn`` on that many gloo ranks."""
    pools = RankPools()
    yield pools
    pools.close()
