"""Routers and balance losses against direct reimplementations, hand computations and the share convention.

Sections: 1. the Routing contract for every router; 2. each router's own semantics; 3. group-limited
routing; 4. build_router and initialisation; 5. losses (single process, then shares on 2 gloo ranks);
6. the balance test: on a token distribution that collapses plain softmax top-k, the aux-loss-free bias and
Sinkhorn routing reach a max/mean expert load of at most 1.10.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsetron.parallel.expert.balance import (
    global_batch_aux_loss,
    router_z_loss,
    routing_entropy,
    sequence_aux_loss,
    sinkhorn,
    switch_aux_loss,
)
from sparsetron.parallel.expert.router import (
    ROUTERS,
    ExpertChoiceRouter,
    Router,
    Routing,
    SinkhornRouter,
    build_router,
)

DIM, EXPERTS, TOP_K, TOKENS = 16, 8, 2, 40
TOPK_ROUTERS = sorted(set(ROUTERS) - {"expert_choice"})


def make(name: str, **options) -> Router:
    """The router ``name`` (DIM → EXPERTS, top TOP_K) built after seed 0, in training mode."""
    torch.manual_seed(0)
    return build_router(name, DIM, EXPERTS, TOP_K, init_std=0.5, **options).train()


def tokens(seed: int = 1, count: int = TOKENS, dtype=torch.float32) -> torch.Tensor:
    """Standard-normal ``x_TD [count, DIM]`` from its own generator."""
    return torch.randn(count, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


def load_of(route: Routing, num_experts: int = EXPERTS) -> torch.Tensor:
    """fp32 ``[E]`` assignments per expert."""
    return torch.bincount(route.expert_N, minlength=num_experts).float()


def max_over_mean(load_E: torch.Tensor) -> float:
    """The load-imbalance figure the balance tests assert on: 1 when uniform."""
    return (load_E.max() / load_E.mean()).item()


# --------------------------------------------------------------------------------------------------------
# 1. The Routing contract, for every router
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_routing_shapes_dtypes_and_layout(name, dtype):
    router = make(name).to(dtype)  # bf16 parameters, as under FSDP mixed precision
    route = router(tokens(dtype=dtype))
    if name == "expert_choice":
        capacity = math.ceil(TOKENS * TOP_K / EXPERTS)
        count = EXPERTS * capacity
        assert torch.equal(route.expert_N, torch.arange(EXPERTS).repeat_interleave(capacity))
    else:
        count = TOKENS * TOP_K
        assert torch.equal(route.token_N, torch.arange(TOKENS).repeat_interleave(TOP_K))
        chosen_TK = route.expert_N.view(TOKENS, TOP_K)
        # Distinct experts per token, in descending selection score.
        assert (chosen_TK.sort(dim=1).values.diff(dim=1) > 0).all()
        assert (route.scores_TE.gather(1, chosen_TK).diff(dim=1) <= 0).all()
    for field in ("token_N", "expert_N", "weight_N"):
        assert getattr(route, field).shape == (count,), field
    assert route.token_N.dtype == route.expert_N.dtype == torch.int64
    assert route.token_N.min() >= 0 and route.token_N.max() < TOKENS
    assert route.expert_N.min() >= 0 and route.expert_N.max() < EXPERTS
    assert route.weight_N.dtype == dtype
    for field in ("probs_TE", "logits_TE", "scores_TE"):
        tensor = getattr(route, field)
        assert tensor.shape == (TOKENS, EXPERTS) and tensor.dtype == torch.float32, field
    assert not route.scores_TE.requires_grad
    torch.testing.assert_close(route.probs_TE.sum(dim=1), torch.ones(TOKENS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_weights_and_probs_are_differentiable_wrt_router_params_and_x(name):
    router = make(name)
    x = tokens().requires_grad_()
    route = router(x)
    probe = torch.randn(route.weight_N.shape, generator=torch.Generator().manual_seed(5))
    (route.weight_N * probe).sum().backward()
    grads = {n: p.grad for n, p in router.named_parameters()} | {"x": x.grad}
    for field, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, field
    router.zero_grad()
    router(tokens()).probs_TE[:, 0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters() if p.ndim == 2)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_same_input_same_routing(name):
    first, second = make(name), make(name)
    for _ in range(3):
        a, again, b = first(tokens()), first(tokens()), second(tokens())
        for field in Routing.__dataclass_fields__:
            assert torch.equal(getattr(a, field), getattr(again, field)), field
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        load = load_of(a)
        first.update_balance(load)
        second.update_balance(load)


def test_ssr_decisions_are_a_deterministic_per_step_sequence():
    """The Sinkhorn draw depends on (seed, step) only: two routers (two ranks, or a rank and its
    single-process reference) agree step by step, every forward of a step agrees, and the rate is ssr_prob."""

    def decisions(seed: int, steps: int = 200) -> list[bool]:
        router = make("sinkhorn", ssr_prob=0.3, seed=seed)
        out = []
        for _ in range(steps):
            out.append(router.uses_sinkhorn())
            assert router.uses_sinkhorn() == out[-1]  # a second micro-batch, or a recompute
            router.update_balance(torch.ones(EXPERTS))
        return out

    first = decisions(seed=7)
    assert decisions(seed=7) == first
    assert decisions(seed=8) != first
    assert 0.2 <= sum(first) / len(first) <= 0.4
    router = make("sinkhorn", ssr_prob=0.3, seed=7)
    router.step.fill_(first.index(True))
    assert router.uses_sinkhorn() and not router.eval().uses_sinkhorn()
    assert not make("sinkhorn", ssr_prob=0.0).uses_sinkhorn()
    assert make("sinkhorn").uses_sinkhorn()


# --------------------------------------------------------------------------------------------------------
# 2. Each router's semantics
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_topk_is_bit_identical_to_the_hf_recipe(normalize, dtype):
    router = make("softmax_topk", normalize_topk=normalize).to(dtype)
    x = tokens(dtype=dtype)
    logits = F.linear(x, router.weight).float()
    probs = torch.softmax(logits, dim=-1)
    top_probs, top_experts = torch.topk(probs, TOP_K, dim=-1)
    if normalize:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    route = router(x)
    assert torch.equal(route.expert_N, top_experts.reshape(-1))
    assert torch.equal(route.weight_N, top_probs.to(dtype).reshape(-1))
    assert torch.equal(route.probs_TE, probs) and torch.equal(route.logits_TE, logits)


def test_sigmoid_bias_steers_the_choice_but_not_the_weights():
    router = make("sigmoid_bias", routed_scaling=2.5)
    x = tokens()
    scores = torch.sigmoid(F.linear(x, router.weight))
    unbiased = router(x)
    expected_experts = scores.topk(TOP_K, dim=-1).indices
    assert torch.equal(unbiased.expert_N, expected_experts.reshape(-1))

    favourite = 5
    router.expert_bias[favourite] = 10.0
    biased = router(x)
    chosen_TK = biased.expert_N.view(TOKENS, TOP_K)
    assert (chosen_TK[:, 0] == favourite).all()
    picked = scores.gather(1, chosen_TK)
    torch.testing.assert_close(
        biased.weight_N.view(TOKENS, TOP_K), 2.5 * picked / picked.sum(1, keepdim=True)
    )
    torch.testing.assert_close(biased.probs_TE, scores / scores.sum(1, keepdim=True))
    # The bias is steering only: it appears in the selection scores, not in the probabilities.
    torch.testing.assert_close(biased.scores_TE - unbiased.scores_TE, router.expert_bias.expand(TOKENS, -1))
    torch.testing.assert_close(biased.probs_TE, unbiased.probs_TE)


def test_update_balance_moves_the_bias_towards_underloaded_experts():
    router = make("sigmoid_bias", bias_update_speed=0.01)
    load = torch.tensor([10.0, 30.0, 20.0, 20.0, 5.0, 35.0, 20.0, 20.0])  # mean 20
    router.update_balance(load)
    router.update_balance(load)
    expected = 0.02 * torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    torch.testing.assert_close(router.expert_bias, expected)
    assert router.expert_bias.dtype == torch.float32 and not router.expert_bias.requires_grad
    assert "expert_bias" in router.state_dict()
    router.expert_bias.data = router.expert_bias.bfloat16()
    with pytest.raises(ValueError, match=r"expert_bias is torch.bfloat16, but the balancing bias must stay"):
        router.update_balance(load)


def test_sinkhorn_map_has_uniform_expert_mass_and_exact_implicit_gradient():
    generator = torch.Generator().manual_seed(3)
    skew_E = torch.linspace(0.0, 4.0, EXPERTS)  # a collapsing router: expert 7 is e^4 times more likely
    logits = (2 * torch.randn(300, EXPERTS, generator=generator) + skew_E).requires_grad_()
    shift = sinkhorn(logits, iters=200, tol=1e-6)
    plan = torch.softmax(logits + shift, dim=-1)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(300))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((EXPERTS,), 300 / EXPERTS), rtol=1e-4, atol=0)
    assert torch.softmax(logits, dim=-1).sum(dim=0).max() > 2 * 300 / EXPERTS

    # Implicit gradient == differentiating through fully converged fp64 iterations.
    probe = torch.randn(300, EXPERTS, generator=generator)
    (grad,) = torch.autograd.grad((plan * probe).sum(), logits)
    reference_logits = logits.detach().double().requires_grad_()
    shift64 = torch.zeros(EXPERTS, dtype=torch.float64)
    for _ in range(500):
        row = -torch.logsumexp(reference_logits + shift64, dim=1, keepdim=True)
        shift64 = math.log(300 / EXPERTS) - torch.logsumexp(reference_logits + row, dim=0)
    reference_plan = torch.softmax(reference_logits + shift64, dim=-1)
    (reference,) = torch.autograd.grad((reference_plan * probe.double()).sum(), reference_logits)
    torch.testing.assert_close(grad, reference.float(), atol=2e-5, rtol=0)


def test_sinkhorn_router_balances_in_training_and_is_softmax_topk_in_eval():
    sinkhorn_router = make("sinkhorn")
    softmax_router = make("softmax_topk")
    with torch.no_grad():
        softmax_router.weight[0] += 0.4  # with the tokens' common offset, expert 0 wins almost everywhere
        sinkhorn_router.weight.copy_(softmax_router.weight)
    x = tokens(count=800) + 1.0
    assert max_over_mean(load_of(softmax_router(x))) > 2
    route = sinkhorn_router(x)
    assert max_over_mean(load_of(route)) < 1.2
    gates = torch.softmax(route.logits_TE + sinkhorn(route.logits_TE, 50, 1e-3), dim=-1)
    picked = gates.gather(1, route.expert_N.view(-1, TOP_K))
    torch.testing.assert_close(route.weight_N.view(-1, TOP_K), picked / picked.sum(1, keepdim=True))
    sinkhorn_router.eval()
    for a, b in zip(vars(sinkhorn_router(x)).values(), vars(softmax_router(x)).values(), strict=True):
        torch.testing.assert_close(a, b)


def test_expert_choice_gives_each_expert_exactly_capacity_tokens():
    router = make("expert_choice", capacity_factor=1.5)
    x = tokens()
    route = router(x)
    capacity = math.ceil(TOKENS * TOP_K * 1.5 / EXPERTS)
    assert route.expert_N.numel() == EXPERTS * capacity
    assert torch.equal(load_of(route), torch.full((EXPERTS,), float(capacity)))
    token_EC = route.token_N.view(EXPERTS, capacity)
    assert (token_EC.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct tokens per expert
    probs = torch.softmax(F.linear(x, router.weight), dim=-1)
    expected_weight, expected_token = probs.T.topk(capacity, dim=1)
    assert torch.equal(token_EC, expected_token)
    torch.testing.assert_close(route.weight_N.view(EXPERTS, capacity), expected_weight)
    assert make("expert_choice", capacity_factor=100.0)(x).token_N.numel() == EXPERTS * TOKENS


def test_quantile_routing_is_near_uniform_on_random_input():
    x = tokens(count=2000) + 1.0
    plain = make("quantile", refine_rounds=0)
    with torch.no_grad():
        plain.weight[0] += 0.4  # with the tokens' common offset, expert 0 wins almost everywhere
    assert max_over_mean(load_of(plain.eval()(x))) > 2  # eval mode is plain softmax top-k
    route = plain.train()(x)
    # The plain quantile rule: each expert's threshold admits exactly T·k/E tokens; top-k then lands
    # within 20% of uniform (measured 1.15), and the default two refinement rounds within 5% (1.004).
    assert torch.equal((route.scores_TE > 0).sum(dim=0), torch.full((EXPERTS,), 2000 * TOP_K // EXPERTS))
    assert max_over_mean(load_of(route)) <= 1.20
    refined = make("quantile")
    refined.weight.data.copy_(plain.weight)
    route = refined(x)
    assert max_over_mean(load_of(route)) <= 1.05
    picked = route.probs_TE.gather(1, route.expert_N.view(-1, TOP_K))
    torch.testing.assert_close(route.weight_N.view(-1, TOP_K), picked / picked.sum(1, keepdim=True))


def test_cosine_router_temperature_is_clamped_and_learnable():
    router = make("cosine", cosine_dim=8, temperature=0.1)
    x = tokens()
    route = router(x)
    cosine = F.normalize(x @ router.proj.T, dim=-1) @ F.normalize(router.centroids, dim=-1).T
    torch.testing.assert_close(route.logits_TE, cosine / 0.1)
    assert route.logits_TE.abs().max() <= 10.0 + 1e-4
    with torch.no_grad():
        router.temperature.fill_(1e-4)
    torch.testing.assert_close(router(x).logits_TE, cosine / 0.01)
    with pytest.raises(ValueError, match=r"temperature=2.0 is outside the clamp range \[0.01, 1.0\]"):
        make("cosine", temperature=2.0)


# --------------------------------------------------------------------------------------------------------
# 3. Group-limited routing
# --------------------------------------------------------------------------------------------------------


def reference_group_choice(select_E: torch.Tensor, n_groups: int, topk_groups: int, top_k: int) -> list[int]:
    """One token: groups ranked by the sum of their two best scores, then top-k inside the kept groups."""
    size = select_E.numel() // n_groups
    group_scores = [sorted(select_E[g * size : (g + 1) * size].tolist())[-2:] for g in range(n_groups)]
    kept = sorted(range(n_groups), key=lambda g: -sum(group_scores[g]))[:topk_groups]
    allowed = [e for e in range(select_E.numel()) if e // size in kept]
    return sorted(allowed, key=lambda e: -select_E[e].item())[:top_k]


@pytest.mark.parametrize("name", TOPK_ROUTERS)
def test_group_limited_choice_stays_in_the_best_groups(name):
    experts, n_groups, topk_groups, top_k = 16, 4, 2, 3
    torch.manual_seed(0)
    router = build_router(
        name, DIM, experts, top_k, init_std=0.5, n_groups=n_groups, topk_groups=topk_groups
    ).train()
    x = tokens(count=64)
    route = router(x)
    chosen_TK = route.expert_N.view(64, top_k)
    assert all(len(set((row // (experts // n_groups)).tolist())) <= topk_groups for row in chosen_TK)
    # The unmasked selection scores are the masked ones where finite; recover them by routing ungrouped.
    router.n_groups, router.topk_groups = 1, 1
    select_TE = router(x).scores_TE
    for t in range(64):
        assert chosen_TK[t].tolist() == reference_group_choice(select_TE[t], n_groups, topk_groups, top_k)
    assert torch.isinf(route.scores_TE).sum() == 64 * (experts - topk_groups * experts // n_groups)


def test_one_expert_groups_rank_by_the_single_score():
    """With one expert per group the group score is that expert's score: keeping the best k groups is
    plain top-k."""
    torch.manual_seed(0)
    grouped = build_router("softmax_topk", DIM, 4, 2, n_groups=4, topk_groups=2)
    torch.manual_seed(0)
    plain = build_router("softmax_topk", DIM, 4, 2)
    x = tokens()
    assert torch.equal(grouped(x).expert_N, plain(x).expert_N)


@pytest.mark.parametrize(
    ("experts", "top_k", "options", "message"),
    [
        (4, 5, {}, r"top_k=5 must be between 1 and num_experts=4; lower top_k or add experts"),
        (8, 0, {}, r"top_k=0 must be between 1 and num_experts=8"),
        (8, 2, {"n_groups": 3}, r"n_groups=3 must be a positive divisor of num_experts=8"),
        (8, 2, {"n_groups": 4, "topk_groups": 5}, r"topk_groups=5 must be between 1 and n_groups=4"),
        (
            8,
            5,
            {"n_groups": 4, "topk_groups": 2},
            r"top_k=5 exceeds the 4 experts reachable in topk_groups=2",
        ),
    ],
)
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_impossible_shapes_are_rejected(name, experts, top_k, options, message):
    with pytest.raises(ValueError, match=message):
        build_router(name, DIM, experts, top_k, **options)


def test_expert_choice_rejects_groups():
    with pytest.raises(ValueError, match=r"n_groups=2: expert_choice has no per-token group limit"):
        ExpertChoiceRouter(DIM, 8, 2, n_groups=2, topk_groups=2)


# --------------------------------------------------------------------------------------------------------
# 4. build_router and initialisation
# --------------------------------------------------------------------------------------------------------


def test_build_router_names_unknown_routers_and_options():
    with pytest.raises(
        ValueError, match=r"unknown router 'top1'; known routers: cosine, expert_choice, quantile"
    ):
        build_router("top1", DIM, EXPERTS, TOP_K)
    with pytest.raises(
        ValueError, match=r"router 'expert_choice' has no option normalize_topk; its options are"
    ):
        build_router("expert_choice", DIM, EXPERTS, TOP_K, normalize_topk=True)
    with pytest.raises(ValueError, match=r"router 'softmax_topk' has no option ssr_prob"):
        build_router("softmax_topk", DIM, EXPERTS, TOP_K, ssr_prob=0.5)
    router = build_router("sinkhorn", DIM, EXPERTS, TOP_K, ssr_prob=0.25, seed=3, n_groups=2, topk_groups=1)
    assert isinstance(router, SinkhornRouter) and router.ssr_prob == 0.25 and router.n_groups == 2


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_meta_build_then_init_equals_direct_build(name):
    """The model builds on the meta device and materialises with to_empty + init_weights; every parameter
    and buffer (bias, step counter, temperature) must come out as a direct build after the same seed."""
    direct = make(name)
    with torch.device("meta"):
        meta = build_router(name, DIM, EXPERTS, TOP_K, init_std=0.5)
    meta.to_empty(device="cpu")
    for tensor in meta.state_dict().values():
        tensor.fill_(7)  # to_empty leaves garbage; make it visible
    torch.manual_seed(0)
    meta.init_weights()
    assert direct.state_dict().keys() == meta.state_dict().keys()
    for key, value in direct.state_dict().items():
        assert torch.equal(value, meta.state_dict()[key]), key


def test_softmax_topk_draws_exactly_one_normal_for_its_weight():
    torch.manual_seed(0)
    router = build_router("softmax_topk", DIM, EXPERTS, TOP_K, init_std=0.3)
    torch.manual_seed(0)
    assert torch.equal(router.weight, torch.randn(EXPERTS, DIM) * 0.3)


# --------------------------------------------------------------------------------------------------------
# 5. Losses
# --------------------------------------------------------------------------------------------------------


def random_routing(batch: int, seq: int, experts: int, top_k: int, seed: int = 0, dtype=torch.float64):
    """fp64 ``logits [B, S, E]`` and ``counts [B, E]`` of a random top-k choice."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, experts, generator=generator, dtype=dtype)
    chosen = torch.randn(batch, seq, experts, generator=generator).topk(top_k, dim=-1).indices
    counts = torch.zeros(batch, experts, dtype=dtype).scatter_add_(
        1, chosen.reshape(batch, -1), torch.ones(batch, seq * top_k, dtype=dtype)
    )
    return logits, counts


def test_switch_and_global_losses_match_hand_computation():
    logits, counts = random_routing(1, 30, 6, 2)
    probs = torch.softmax(logits[0], dim=-1)
    hand = sum(6 * (counts[0, e] / (30 * 2)) * probs[:, e].mean() for e in range(6))
    torch.testing.assert_close(switch_aux_loss(probs, counts[0], 2), hand)
    torch.testing.assert_close(global_batch_aux_loss(probs, counts[0], 2), hand)
    uniform = torch.full((30, 6), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(switch_aux_loss(uniform, counts[0], 2), torch.tensor(1.0, dtype=torch.float64))


def test_sequence_loss_and_z_loss_match_hand_computation():
    logits, counts = random_routing(3, 10, 5, 2)
    probs = torch.softmax(logits, dim=-1)
    hand = sum(5 * sum((counts[b, e] / 20) * probs[b, :, e].mean() for e in range(5)) for b in range(3)) / 3
    torch.testing.assert_close(sequence_aux_loss(probs, counts, 2), hand)
    hand_z = (
        sum(sum(torch.log(torch.exp(logits[b, s]).sum()) ** 2 for s in range(10)) / 10 for b in range(3)) / 3
    )
    torch.testing.assert_close(router_z_loss(logits), hand_z)


def test_routing_entropy():
    uniform = torch.full((4, 8), 1 / 8)
    torch.testing.assert_close(routing_entropy(uniform), torch.tensor(math.log(8)))
    assert routing_entropy(F.one_hot(torch.arange(4), 8).float()) == 0
    probs = torch.softmax(torch.randn(4, 8, requires_grad=True), dim=-1)
    entropy = routing_entropy(probs)
    assert entropy.dtype == torch.float32 and not entropy.requires_grad


def _shares_on_ranks(logits_BSE, counts_BSE_onehot, top_k, tokens_per_rank):
    """On each rank: this rank's shard of every sequence (CP) and its own slice of the batch (DP); returns
    the three loss shares and their gradients w.r.t. this rank's logits."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seq = logits_BSE.shape[1] // world
    shard = logits_BSE[:, rank * seq : (rank + 1) * seq].clone().requires_grad_()
    probs = torch.softmax(shard, dim=-1)
    counts_BE = counts_BSE_onehot[:, rank * seq : (rank + 1) * seq].sum(dim=1)
    sequence = sequence_aux_loss(probs, counts_BE, top_k, dist.group.WORLD)
    z = router_z_loss(shard, dist.group.WORLD)
    (sequence_grad, z_grad) = (torch.autograd.grad(loss, shard)[0] for loss in (sequence, z))

    start = sum(tokens_per_rank[:rank])
    flat = logits_BSE.reshape(-1, logits_BSE.shape[-1])
    mine = flat[start : start + tokens_per_rank[rank]].clone().requires_grad_()
    mine_counts = counts_BSE_onehot.reshape(flat.shape)[start : start + tokens_per_rank[rank]].sum(dim=0)
    global_share = global_batch_aux_loss(torch.softmax(mine, dim=-1), mine_counts, top_k, dist.group.WORLD)
    (global_grad,) = torch.autograd.grad(global_share, mine)
    return sequence.detach(), sequence_grad, z.detach(), z_grad, global_share.detach(), global_grad


def test_loss_shares_sum_to_the_unsharded_loss_with_gradients(ranks):
    batch, seq, experts, top_k = 3, 8, 5, 2
    logits, _ = random_routing(batch, seq, experts, top_k, seed=4)
    chosen = (
        torch.randn(batch, seq, experts, generator=torch.Generator().manual_seed(5)).topk(top_k, -1).indices
    )
    onehot = torch.zeros(batch, seq, experts, dtype=torch.float64).scatter_(2, chosen, 1.0)
    tokens_per_rank = [7, batch * seq - 7]  # unequal data-parallel slices
    results = ranks.run(2, _shares_on_ranks, logits, onehot, top_k, tokens_per_rank)

    whole = logits.clone().requires_grad_()
    probs = torch.softmax(whole, dim=-1)
    expected = {
        "sequence": sequence_aux_loss(probs, onehot.sum(dim=1), top_k),
        "z": router_z_loss(whole),
        "global": switch_aux_loss(probs.reshape(-1, experts), onehot.sum(dim=(0, 1)), top_k),
    }
    for index, (name, loss) in enumerate(expected.items()):
        (grad,) = torch.autograd.grad(loss, whole, retain_graph=True)
        shares = [r[2 * index] for r in results]
        torch.testing.assert_close(sum(shares), loss.detach(), atol=1e-12, rtol=0, msg=name)
        grads = [r[2 * index + 1] for r in results]
        # Global-loss ranks hold slices of the flattened batch; the others hold sequence shards.
        got = torch.cat(grads).view_as(grad) if name == "global" else torch.cat(grads, dim=1)
        torch.testing.assert_close(got, grad, atol=1e-12, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------------------
# 6. Balance: routers that must undo a collapse
# --------------------------------------------------------------------------------------------------------

BAL_DIM, BAL_EXPERTS, BAL_TOP_K, BAL_TOKENS = 32, 8, 2, 4096
CLUSTER_WEIGHTS = torch.tensor([0.55, 0.25, 0.15, 0.05])


def skewed_tokens(generator: torch.Generator, count: int = BAL_TOKENS) -> torch.Tensor:
    """Tokens from four clusters of unequal size that share a large common offset along dimension 0."""
    centers = torch.randn(4, BAL_DIM, generator=torch.Generator().manual_seed(1))
    cluster = torch.multinomial(CLUSTER_WEIGHTS, count, replacement=True, generator=generator)
    offset = torch.zeros(BAL_DIM)
    offset[0] = 3.0
    return offset + centers[cluster] + torch.randn(count, BAL_DIM, generator=generator)


def collapsing_router(name: str, **options) -> Router:
    """A router whose gate puts experts 0 and 1 along the common offset, so they win for almost every token."""
    router = build_router(name, BAL_DIM, BAL_EXPERTS, BAL_TOP_K, **options).train()
    with torch.no_grad():
        weight = 0.3 * torch.randn(BAL_EXPERTS, BAL_DIM, generator=torch.Generator().manual_seed(2))
        weight[0, 0] += 1.5
        weight[1, 0] += 1.2
        router.weight.copy_(weight)
    return router


def balance_trajectory(router: Router, steps: int, lr: float) -> list[float]:
    """max/mean expert load of each step's fresh batch while the router trains (lr > 0) and updates its
    balance state. The objective, −log of the routed gate mass, rewards confident routing: it reinforces
    whatever the router already prefers, the dynamics that collapse unbalanced routers."""
    generator = torch.Generator().manual_seed(3)
    optimizer = torch.optim.SGD(router.parameters(), lr=lr) if lr else None
    ratios = []
    for _ in range(steps):
        with torch.set_grad_enabled(optimizer is not None):
            route = router(skewed_tokens(generator))
        load_E = load_of(route, BAL_EXPERTS)
        ratios.append(max_over_mean(load_E))
        if optimizer is not None:
            loss = -torch.log(route.weight_N.view(-1, BAL_TOP_K).sum(dim=-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        router.update_balance(load_E)
    return ratios


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[Router, list[float]]]:
    """Each balanced router after its run, with its per-step max/mean trajectory (computed once)."""
    runs = {
        "softmax_topk": (collapsing_router("softmax_topk", normalize_topk=False), 200, 0.01),
        "sigmoid_bias": (collapsing_router("sigmoid_bias"), 300, 0.0),
        "sinkhorn": (collapsing_router("sinkhorn", normalize_topk=False), 200, 0.01),
    }
    return {
        name: (router, balance_trajectory(router, steps, lr)) for name, (router, steps, lr) in runs.items()
    }


def window_means(ratios: list[float], width: int = 50) -> list[float]:
    """Means of consecutive ``width``-step windows: per-batch figures with the batch noise averaged out."""
    return [sum(ratios[i : i + width]) / width for i in range(0, len(ratios), width)]


def test_plain_softmax_topk_collapses(trained):
    """Plain softmax top-k stays collapsed: max/mean load ≥ 2 at every one of 200 SGD steps (measured 2.86
    at the start, rising to 3.7 as the objective reinforces the favourites)."""
    ratios = trained["softmax_topk"][1]
    assert min(ratios) >= 2.0, ratios[::20]


def test_aux_loss_free_bias_balances_within_200_steps(trained):
    """sigmoid_bias with only its bias updates (default speed 1e-3, 4096 tokens a step), from max/mean 2.86:
    the per-batch max/mean averaged over 50 steps is ≤ 1.10 from step 150 on (measured 1.08, 1.05, 1.05
    for steps 150-200, 200-250, 250-300), and the bias reached after 300 steps routes a 65,536-token
    held-out batch at ≤ 1.10 (measured 1.04). Single 4096-token batches still reach 1.12 now and then:
    their cluster mix varies and the sign update oscillates by ±1e-3."""
    router, ratios = trained["sigmoid_bias"]
    assert ratios[0] >= 2.0
    assert max(window_means(ratios)[3:]) <= 1.10, window_means(ratios)
    with torch.no_grad():
        held_out = router(skewed_tokens(torch.Generator().manual_seed(99), 65536))
    assert max_over_mean(load_of(held_out, BAL_EXPERTS)) <= 1.10


def test_sinkhorn_balances_from_the_first_step_and_stays_balanced(trained):
    """sinkhorn (ssr_prob=1) under SGD (lr 0.01) on the confidence objective: max/mean load ≤ 1.10 on every
    one of 200 batches, from the first (measured mean 1.06, worst 1.094), where plain softmax routes 2.86.
    With lr 0.1 the logits sharpen and the second choices drift: 1.13-1.15 after 150 steps (see
    SinkhornRouter)."""
    ratios = trained["sinkhorn"][1]
    assert max(ratios) <= 1.10, ratios[::20]
