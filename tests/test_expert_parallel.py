"""Expert parallelism against the same MoE on one process with the full expert set (tier 2, gloo ranks).

Every rank routes its own tokens; with EP the token copies travel by all-to-all to the ranks owning their
experts and back. The oracle is, on every rank, a full unsharded MoE built from the same seed applied to
each rank's tokens in turn: outputs, input gradients, router/shared gradients (summed over ranks) and each
rank's slice of the expert gradients must agree to 1e-5 relative in fp32 — for every router, with and
without a shared expert, dropless, with capacity (the same drops) and with token rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from sparsetron.dist.layout import ParallelDims
from sparsetron.parallel.context import shard_sequence
from sparsetron.parallel.expert import MoE
from sparsetron.parallel.expert.router import ROUTERS

DIM, FFN, EXPERTS, TOP_K = 16, 24, 8, 2
BATCH, SEQ = 2, 16
MODES = {
    "dropless": {},
    "capacity": {"capacity_factor": 0.75, "drop_policy": "score"},
    "capacity-position": {"capacity_factor": 0.5, "drop_policy": "position"},
    "rounding": {"token_rounding": "nearest", "rounding_tile": 4},
}
ROUTER_OPTIONS = {"sinkhorn": {"ssr_prob": 0.5}, "expert_choice": {"capacity_factor": 1.0}}


def _moe(router: str, shared: bool, mode: str, aux_loss: str = "switch") -> MoE:
    torch.manual_seed(7)
    moe = MoE(
        DIM,
        FFN,
        EXPERTS,
        TOP_K,
        router=router,
        shared_ffn_dim=FFN if shared else 0,
        aux_loss=aux_loss,
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        expert_backend="loop",
        router_options=ROUTER_OPTIONS.get(router, {}),
        **MODES[mode],
    )
    if router == "sigmoid_bias":
        # A non-zero bias, so selection and weights differ as they do after training.
        for _ in range(5):
            moe.router.update_balance(torch.linspace(0.0, 2.0, EXPERTS))
    return moe


def _tokens(source: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + source)
    return torch.randn(BATCH, SEQ, DIM, generator=generator)


def _objective(y_BSD: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(y_BSD.shape[-1], generator=generator)
    return (y_BSD * weights).sum() + aux


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-12)
    return float((got - want).abs().max() / scale)


def _compare_case(mesh, router: str, shared: bool, mode: str, chunks: int) -> dict[str, float]:
    """One case on this rank: the EP MoE vs the full MoE applied to every rank's tokens."""
    ep_mesh = mesh.submesh("ep")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = _moe(router, shared, mode)
    ep_moe = copy.deepcopy(base)
    ep_moe.enable_expert_parallel(ep_mesh, overlap_chunks=chunks)

    x_BSD = _tokens(rank).requires_grad_()
    y_BSD, stats = ep_moe(x_BSD)
    _objective(y_BSD, stats.aux_loss).backward()

    # The oracle: fresh full copies (routers with state, e.g. the Selective Sinkhorn draw, start equal).
    reference = [copy.deepcopy(base) for _ in range(world)]
    inputs = [_tokens(source).requires_grad_() for source in range(world)]
    outputs = [moe(x) for moe, x in zip(reference, inputs, strict=True)]
    sum(_objective(y, s.aux_loss) for y, s in outputs).backward()

    errors = {
        "y": _rel(y_BSD, outputs[rank][0]),
        "dx": _rel(x_BSD.grad, inputs[rank].grad),
        "tokens_per_expert": _rel(stats.tokens_per_expert_E, outputs[rank][1].tokens_per_expert_E),
        "dropped": abs(float(stats.dropped - outputs[rank][1].dropped)),
    }
    ep_rank, local = mesh.coordinate("ep"), EXPERTS // mesh.dims.ep
    experts = slice(ep_rank * local, (ep_rank + 1) * local)
    for name in ("w_gate_up", "w_down"):
        got = getattr(ep_moe.experts, name).grad.to_local().clone()
        if mesh.dims.edp > 1:
            # Other EP groups hold the same experts for their own tokens (FSDP reduces over edp in training).
            dist.all_reduce(got, group=mesh.group("edp"))
        want = sum(getattr(moe.experts, name).grad for moe in reference)[experts]
        errors[f"experts.{name}"] = _rel(got, want)
    for name, param in ep_moe.named_parameters():
        if name.startswith("experts."):
            continue
        grad = param.grad.clone()
        dist.all_reduce(grad)  # non-expert gradients are per rank; the oracle summed all ranks' tokens
        want = sum(dict(moe.named_parameters())[name].grad for moe in reference)
        errors[name] = _rel(grad, want)
    return errors


def _all_cases(world: int, layout: dict, routers: list[str]) -> dict[str, dict[str, float]]:
    layout = dict(layout)
    chunks = layout.pop("chunks", 1)
    mesh = ParallelDims(world, **layout).build_mesh("cpu")
    results = {}
    for router in routers:
        for shared in (False, True):
            for mode in MODES:
                results[f"{router}/shared={shared}/{mode}"] = _compare_case(
                    mesh, router, shared, mode, chunks
                )
    return results


# Token chunks pipelined through the all-to-alls (parallel.ep_overlap_chunks): 1 by default, 2 and 3 too.
LAYOUTS = {
    "ep2": (2, {"dp_shard": 2, "ep": 2}),
    "ep2-2chunks": (2, {"dp_shard": 2, "ep": 2, "chunks": 2}),
    "ep2-3chunks": (2, {"dp_shard": 2, "ep": 2, "chunks": 3}),
    "ep4-2chunks": (4, {"dp_shard": 4, "ep": 4, "chunks": 2}),
    "ep4": (4, {"dp_shard": 4, "ep": 4}),
    "ep2-edp2": (4, {"dp_shard": 4, "ep": 2}),
    "ep2-cp2": (4, {"dp_shard": 2, "cp": 2, "ep": 2}),
    "ep4-cp2": (4, {"dp_shard": 2, "cp": 2, "ep": 4}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_matches_single_process(ranks, layout):
    world, degrees = LAYOUTS[layout]
    results = ranks.run(world, _all_cases, world, degrees, sorted(ROUTERS), timeout=600)
    assert len(results[0]) == len(ROUTERS) * 2 * len(MODES)
    worst = {
        f"rank{rank}:{case}:{what}": error
        for rank, cases in enumerate(results)
        for case, errors in cases.items()
        for what, error in errors.items()
        if error > 1e-5
    }
    assert not worst, worst


def _sharded_sequence_case(router: str) -> dict[str, float]:
    """EP folded with CP=2: sequences sharded over cp (zigzag), the sequence aux loss combined over cp."""
    dims = ParallelDims(4, dp_shard=2, cp=2, ep=2)
    mesh = dims.build_mesh("cpu")
    cp_group = mesh.group("cp")
    base = _moe(router, shared=True, mode="dropless", aux_loss="sequence")
    ep_moe = copy.deepcopy(base)
    ep_moe.enable_expert_parallel(mesh.submesh("ep"))
    ep_moe.seq_group = cp_group

    source = mesh.coordinate("dp_shard")
    full_BSD = _tokens(source).requires_grad_()
    local_BSD = shard_sequence(full_BSD, 1, cp_group, "zigzag").detach().requires_grad_()
    y_BSD, stats = ep_moe(local_BSD)
    _objective(y_BSD, stats.aux_loss).backward()

    reference = [copy.deepcopy(base) for _ in range(dims.dp_shard)]
    inputs = [_tokens(s).requires_grad_() for s in range(dims.dp_shard)]
    outputs = [moe(x) for moe, x in zip(reference, inputs, strict=True)]
    sum(_objective(y, s.aux_loss) for y, s in outputs).backward()

    errors = {
        "y": _rel(y_BSD, shard_sequence(outputs[source][0], 1, cp_group, "zigzag")),
        "dx": _rel(local_BSD.grad, shard_sequence(inputs[source].grad, 1, cp_group, "zigzag")),
    }
    aux = stats.aux_loss.detach().clone()
    dist.all_reduce(aux)
    errors["aux_loss"] = _rel(aux, sum(s.aux_loss.detach() for _, s in outputs))
    for name, param in ep_moe.named_parameters():
        if name.startswith("experts."):
            continue
        grad = param.grad.clone()
        dist.all_reduce(grad)
        errors[name] = _rel(grad, sum(dict(moe.named_parameters())[name].grad for moe in reference))
    return errors


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias", "cosine"])
def test_expert_parallel_with_sharded_sequences_matches_full_sequences(ranks, router):
    """Token-local routers give the full-sequence result, balance loss included, when cp shards sequences."""
    results = ranks.run(4, _sharded_sequence_case, router, timeout=300)
    worst = {f"rank{r}:{k}": v for r, errors in enumerate(results) for k, v in errors.items() if v > 1e-5}
    assert not worst, worst


def _adversarial(mode: str) -> dict:
    """Every token prefers experts 0 and 1 (of 8) on 2 EP ranks: all copies go to EP rank 0."""
    mesh = ParallelDims(2, dp_shard=2, ep=2).build_mesh("cpu")
    moe = _moe("softmax_topk", shared=False, mode=mode)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # expert 0 scores highest, then 1 (ties broken by index)
        moe.router.weight[1] = 0.5
    moe.enable_expert_parallel(mesh.submesh("ep"))
    x_BSD = _tokens(dist.get_rank()).abs() + 0.1  # positive features: expert 0 > 1 > the rest for every token
    y_BSD, stats = moe(x_BSD)
    y_BSD.sum().backward()
    return {
        "finite": bool(torch.isfinite(y_BSD).all()),
        "tokens_per_expert": stats.tokens_per_expert_E.tolist(),
        "dropped": float(stats.dropped),
    }


def test_adversarial_routing_dropless_keeps_everything(ranks):
    results = ranks.run(2, _adversarial, "dropless", timeout=120)
    tokens = BATCH * SEQ
    for result in results:
        assert result["finite"]
        assert result["tokens_per_expert"] == [tokens, tokens] + [0] * (EXPERTS - 2)
        assert result["dropped"] == 0


def test_adversarial_routing_with_capacity_drops_exactly_the_overflow(ranks):
    """Capacity ceil(T·k/E·0.75) = 6 slots per expert: experts 0 and 1 keep 6 each, the other 2T−12 drop."""
    results = ranks.run(2, _adversarial, "capacity", timeout=120)
    tokens = BATCH * SEQ
    capacity = -(-tokens * TOP_K * 3 // (EXPERTS * 4))
    for result in results:
        assert result["finite"]
        assert result["tokens_per_expert"] == [capacity, capacity] + [0] * (EXPERTS - 2)
        assert result["dropped"] == 2 * tokens - 2 * capacity
