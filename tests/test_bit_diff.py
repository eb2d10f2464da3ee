"""The change-detection kernels (interpreted on the CPU) against torch's compare + nonzero."""

from __future__ import annotations

import pytest
import torch

from sparsetron.kernels.bit_diff import BLOCK, changed_counts, changed_elements


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8, torch.int64])
@pytest.mark.parametrize("numel", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 17])
def test_kernels_find_exactly_the_differing_positions_in_order(dtype, numel):
    generator = torch.Generator().manual_seed(numel)
    published = torch.randint(0, 100, (numel,), generator=generator).to(dtype)
    current = published.clone()
    where = torch.randint(0, numel, (max(1, numel // 30),), generator=generator)
    current[where] += 1
    counts = changed_counts(current, published)
    assert counts.shape == ((numel + BLOCK - 1) // BLOCK,)
    expected = (current != published).nonzero().squeeze(1)
    assert int(counts.sum()) == expected.numel()
    positions, new, old = changed_elements(current, published, counts, int(counts.sum()))
    assert torch.equal(positions, expected)
    assert torch.equal(new, current[expected]) and torch.equal(old, published[expected])


def test_no_change_gives_empty_results():
    same = torch.arange(5000, dtype=torch.int16)
    counts = changed_counts(same, same.clone())
    assert int(counts.sum()) == 0
    positions, new, old = changed_elements(same, same, counts, 0)
    assert positions.numel() == new.numel() == old.numel() == 0
