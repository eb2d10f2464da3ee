"""The fused vertical-slash estimation passes (``sparsetron.kernels.attention_mass``) against the fp64 torch
path of ``patterns.vertical_slash``: log-normalisers and group-averaged probabilities on scattered key subsets
(a context-parallel rank's keys), key counts that do not fill a tile, and queries that see none of a subset.
On the CPU the kernels run in Triton's interpreter; on a GPU the whole bf16 estimate is compared."""

from __future__ import annotations

import pytest
import torch
from sparse_reference import needs_interpreter

from sparsetron.kernels import attention_mass
from sparsetron.parallel.context.patterns import (
    _chunk_logits,
    _grouped_queries,
    _key_chunks,
    _log_normalizer,
    _vertical_slash_scores,
    vertical_slash,
)

SEQ, LAST, HQ, HKV, D = 96, 16, 4, 2, 16


def _qk(seed: int, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(2, SEQ, HQ, D, generator=g, device=device)
    k = torch.randn(2, SEQ, HKV, D, generator=g, device=device)
    return q, k


#: A striped rank's keys, one that fills no whole tile, and one every early query precedes.
SUBSETS = {
    "striped": torch.cat([torch.arange(s, s + 8) for s in range(0, SEQ, 16)]),
    "ragged": torch.arange(0, SEQ, 5),
    "late": torch.arange(SEQ - 8, SEQ),
}


@needs_interpreter
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_fused_passes_equal_the_torch_path(subset):
    q, k = _qk(1)
    positions = SUBSETS[subset]
    q_BHGLD = _grouped_queries(q[:, -LAST:], HKV, None)
    k_sub = k[:, positions]
    expected_lse = _log_normalizer(q_BHGLD, k_sub, positions, SEQ, _key_chunks(positions, 32))
    lse = attention_mass.log_normalizer(q_BHGLD, k_sub, positions, SEQ)
    seen = torch.isfinite(expected_lse)
    assert torch.equal(seen, torch.isfinite(lse))  # same rows see nothing (the "late" subset has some)
    torch.testing.assert_close(lse[seen], expected_lse[seen], rtol=1e-6, atol=1e-6)
    # Probabilities against one global normaliser (any finite one: here the subset's own).
    norm = torch.where(seen, expected_lse, torch.zeros_like(expected_lse))
    logits = _chunk_logits(q_BHGLD, k_sub, positions, SEQ)
    expected = (logits - norm[..., None]).exp().mean(dim=2)
    probs = attention_mass.attention_probabilities(q_BHGLD, k_sub, positions, SEQ, norm)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-7)


def test_reasons_it_cannot_run():
    q_BHGLD = torch.zeros(1, 2, 2, 12, 16)
    assert "last_q 12 is not a power of two" in attention_mass.unsupported_reason(
        q_BHGLD, torch.zeros(1, 4, 2, 16)
    )
    q_BHGLD = torch.zeros(1, 2, 2, 16, 24)
    assert "head dim 24" in attention_mass.unsupported_reason(q_BHGLD, torch.zeros(1, 4, 2, 24))


@pytest.mark.skipif(not torch.cuda.is_available() or attention_mass.triton is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_estimate_matches_the_cpu_reference(dtype):
    """On CUDA the scores run fused: fp32 in IEEE fp32 (the pattern is the fp64 CPU path's), bf16 on tensor
    cores with the scaled queries rounded to bf16 (scores within 2e-2 of the CPU path's)."""
    q, k = (t.to(dtype).float() for t in _qk(2))  # the same values on both paths
    cpu = _vertical_slash_scores(q[:, -LAST:], k, None, None)
    gpu = _vertical_slash_scores(q[:, -LAST:].cuda().to(dtype), k.cuda().to(dtype), None, None)
    for got, expected in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(
            got.cpu(), expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6
        )
    if dtype == torch.float32:
        options = {"verticals": 6, "slashes": 4}
        on_cpu = vertical_slash(q[:, -LAST:], k, 16, **options)
        on_gpu = vertical_slash(q[:, -LAST:].cuda(), k.cuda(), 16, **options)
        assert torch.equal(on_cpu.active_BHQK, on_gpu.active_BHQK.cpu())
        assert torch.equal(on_cpu.bars_BHS, on_gpu.bars_BHS.cpu())
