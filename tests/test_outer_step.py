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


def _global_digest(outer: OuterStep) -> str:
    h = hashlib.sha256()
    for name in SHAPES:
        h.update(outer.global_params[name].numpy().tobytes())
    return h.hexdigest()


def _replicas_after_outer_steps(algorithm: str, overlap: bool, coding: str) -> dict:
    rank = dist.get_rank()
    params = _params(0)  # every replica starts from the same θ
    outer = OuterStep(
        params, algorithm, dist.group.WORLD, chunk=4096, topk=64, bits=2, dense_below=100,
        index_coding=coding, overlap=overlap,
    )  # fmt: skip
    start = {name: p.detach().clone() for name, p in params}
    digests = []
    for step in range(3):
        _drift(params, seed=100 * step + rank)
        stats = outer.step()
        digests.append(_global_digest(outer))
    _drift(params, seed=1000 + rank)
    outer.finish()
    return {
        "digests": digests,
        "final": _digest(params),
        "final_global": _global_digest(outer),
        "payload": stats.payload_bytes,
        "sent": stats.sent_bytes,
        "dense_fp32": stats.dense_fp32_bytes,
        "moved": max(float((p.detach() - start[n]).abs().max()) for n, p in params),
    }


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    ("algorithm", "overlap", "coding"),
    [("diloco", False, "packed12"), ("sparseloco", False, "packed12"), ("sparseloco", True, "rice"),
     ("diloco", True, "packed12")],
)  # fmt: skip
def test_replicas_hold_bit_identical_parameters_after_every_outer_step(
    ranks, world, algorithm, overlap, coding
):
    results = ranks.run(world, _replicas_after_outer_steps, algorithm, overlap, coding, timeout=120)
    for step in range(3):
        assert len({r["digests"][step] for r in results}) == 1, step
    assert len({r["final"] for r in results}) == 1
    assert len({r["final_global"] for r in results}) == 1
    assert all(r["moved"] > 0 for r in results)
    if algorithm == "sparseloco":
        # 64 of 4096 per chunk: ≤ 12-bit index + 2-bit code per kept value (the 64-element bias goes dense).
        assert results[0]["payload"] < results[0]["dense_fp32"] / 30
        assert results[0]["sent"] >= results[0]["payload"] * (world - 1)


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


def _run(params, outer: OuterStep, steps: int, seed: int) -> None:
    for step in range(steps):
        _drift(params, seed=seed + step)
        outer.step()


def test_sparseloco_with_full_chunks_and_fp32_values_is_diloco_without_momentum():
    """1 replica, k = chunk, values sent as fp32: bit-identical to DiLoCo with μ = 0 (same lr)."""
    dense, sparse = _params(3), _params(3)
    diloco = OuterStep(dense, "diloco", None, lr=0.8, momentum=0.0)
    sparseloco = OuterStep(sparse, "sparseloco", None, lr=0.8, chunk=4096, topk=4096, bits=32, dense_below=1)
    _run(dense, diloco, 3, seed=10)
    _run(sparse, sparseloco, 3, seed=10)
    for (name, a), (_, b) in zip(dense, sparse, strict=True):
        assert torch.equal(a.detach(), b.detach()), name


def test_sparseloco_with_full_chunks_and_bf16_values_is_diloco_up_to_the_carried_rounding():
    """16-bit values: SparseLoCo's θ is DiLoCo's plus the error buffer, which holds only bf16 rounding."""
    dense, sparse = _params(4), _params(4)
    diloco = OuterStep(dense, "diloco", None, lr=1.0, momentum=0.0)
    sparseloco = OuterStep(
        sparse, "sparseloco", None, lr=1.0, chunk=4096, topk=4096, bits=16, error_decay=1.0, dense_below=1
    )
    _run(dense, diloco, 3, seed=20)
    _run(sparse, sparseloco, 3, seed=20)
    errors = sparseloco.compressor.state_dict()
    for (name, a), (_, b) in zip(dense, sparse, strict=True):
        torch.testing.assert_close(b.detach(), a.detach() + errors[name], atol=1e-6, rtol=0)
        assert float(errors[name].abs().max()) < 2**-8 * 0.1  # drifts are 0.01·N(0,1): bf16 ulp below 2^-14


@pytest.mark.parametrize("algorithm", ["diloco", "sparseloco"])
def test_overlap_on_one_replica_ends_where_the_synchronous_loop_ends(algorithm):
    """With one replica the delayed application reorders the same updates (lr 1, no momentum)."""
    plain, overlapped = _params(5), _params(5)
    options = {"lr": 1.0, "momentum": 0.0, "topk": 4096, "bits": 32, "dense_below": 1}
    sync = OuterStep(plain, algorithm, None, **options)
    lagged = OuterStep(overlapped, algorithm, None, overlap=True, **options)
    _run(plain, sync, 3, seed=30)
    _run(overlapped, lagged, 3, seed=30)
    sync.finish()
    lagged.finish()
    for (name, a), (_, b) in zip(plain, overlapped, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0, msg=name)


def test_state_dict_resumes_mid_pipeline_exactly():
    """Save with an exchange in flight (overlap), restore into a fresh OuterStep: both continue identically."""
    options = {"chunk": 4096, "topk": 64, "bits": 2, "dense_below": 100, "overlap": True}
    params = _params(6)
    outer = OuterStep(params, "sparseloco", None, **options)
    _run(params, outer, 2, seed=40)
    state = {key: value.clone() for key, value in outer.state_dict().items()}
    assert set(state) == set(outer.state_dict_keys()) and float(state["pending_valid"]) == 1.0
    copy = [(name, torch.nn.Parameter(p.detach().clone())) for name, p in params]
    restored = OuterStep(copy, "sparseloco", None, **options)
    restored.load_state_dict(state)
    for ps, o in ((params, outer), (copy, restored)):
        _run(ps, o, 2, seed=50)
        o.finish()
    for (name, a), (_, b) in zip(params, copy, strict=True):
        assert torch.equal(a.detach(), b.detach()), name
