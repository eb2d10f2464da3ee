"""DiLoCo and SparseLoCo outer steps on gloo replicas: the math against direct formulas, bit-identical replicas."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist

from sparsetron.parallel.data.outer import OuterStep

SHAPES = {"w1": (128, 192), "w2": (5000,), "bias": (64,)}


def _params(seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator))) for name, shape in SHAPES.items()
    ]


def _drift(params, seed: int) -> None:
    """Stand-in for H inner steps: each replica moves its parameters differently."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=generator))


def _digest(params) -> str:
    h = hashlib.sha256()
    for _, p in params:
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def _replicas_after_outer_steps(algorithm: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    params = _params(0)  # every replica starts from the same θ
    outer = OuterStep(params, algorithm, dist.group.WORLD, chunk=4096, topk=64, bits=2, dense_below=100)
    start = {name: p.detach().clone() for name, p in params}
    for step in range(3):
        _drift(params, seed=100 * step + rank)
        stats = outer.step()
    return {
        "digest": _digest(params),
        "sent": stats.sent_bytes,
        "dense_fp32": stats.dense_fp32_bytes,
        "moved": max(float((p.detach() - start[n]).abs().max()) for n, p in params),
        "world": world,
    }


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("algorithm", ["diloco", "sparseloco"])
def test_replicas_hold_bit_identical_parameters_after_every_outer_step(ranks, world, algorithm):
    results = ranks.run(world, _replicas_after_outer_steps, algorithm, timeout=120)
    assert len({r["digest"] for r in results}) == 1
    assert all(r["moved"] > 0 for r in results)
    if algorithm == "sparseloco":
        # 64 of 4096 per chunk: 2-byte index + 1-byte code per kept value, over the dense fp32 all-reduce size.
        assert results[0]["sent"] < results[0]["dense_fp32"] / 10


def test_diloco_on_one_replica_is_outer_nesterov_sgd_on_the_pseudo_gradient():
    params = _params(1)
    theta = {n: p.detach().clone() for n, p in params}
    outer = OuterStep(params, "diloco", None, lr=0.7, momentum=0.9)
    _drift(params, seed=5)
    delta = {n: theta[n] - p.detach() for n, p in params}
    outer.step()
    for name, p in params:
        velocity = delta[name]
        expected = theta[name] - 0.7 * (delta[name] + 0.9 * velocity)
        torch.testing.assert_close(p.detach(), expected)


def test_sparseloco_with_full_chunks_and_eight_bits_tracks_the_dense_update():
    """k = chunk keeps every entry; 8-bit values leave only quantisation error (no momentum, lr 1)."""
    params = _params(2)
    theta = {n: p.detach().clone() for n, p in params}
    outer = OuterStep(params, "sparseloco", None, chunk=256, topk=256, bits=8, error_decay=1.0, dense_below=1)
    _drift(params, seed=6)
    drifted = {n: p.detach().clone() for n, p in params}
    outer.step()
    for name, p in params:
        moved, wanted = p.detach() - theta[name], drifted[name] - theta[name]
        assert float((moved - wanted).norm() / wanted.norm()) < 0.05, name


def test_unknown_algorithm_is_named():
    with pytest.raises(ValueError, match=r"outer algorithm 'ddp' must be diloco or sparseloco"):
        OuterStep(_params(0), "ddp")
