"""Routers: which experts each token goes to, and with what weight.

A router maps the local tokens ``x_TD`` to a :class:`Routing`: a flat list of N (token, expert, weight)
assignments plus the dense ``[T, E]`` statistics the balance losses and the dispatcher need. Routers are
looked up by name in :data:`ROUTERS` through :func:`build_router`. Nothing in a router's forward
communicates: every decision is made from this rank's tokens alone, so a rank and a single-process run that
see the same tokens route them identically.

Top-k routers (every router but ``expert_choice``) share one selection path: a router computes selection
scores ``[T, E]``, :meth:`Router.restrict_to_groups` masks the experts outside each token's best groups
(DeepSeek-V3 node-limited routing), ``torch.topk`` picks k experts per token, and the combine weights are
gathered from the router's gate values (not necessarily the selection scores: bias, transport potentials
and quantile thresholds steer the choice but not the weight).

Routers other than ``softmax_topk`` compute their logits in fp32 whatever the activation dtype (as
DeepSeek-V3's gate does): balancing reacts to small score differences that bf16 would round away.
``softmax_topk`` keeps the HF Mixtral/Qwen order (matmul in the activation dtype, then fp32) so that it
matches HF logits bit for bit.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.parallel.expert.balance import sinkhorn

_MASK_64 = (1 << 64) - 1


@dataclass
class Routing:
    """What a router decided for ``T`` local tokens and ``E`` experts, as ``N`` assignments.

    - ``token_N``: int64, the row of ``x_TD`` each assignment routes.
    - ``expert_N``: int64 expert ids in ``[0, E)``.
    - ``weight_N``: combine weights in the activation dtype, differentiable w.r.t. the router's parameters
      and ``x``.
    - ``probs_TE``: fp32 differentiable probabilities over all experts, what the balance losses use.
    - ``logits_TE``: fp32 raw router logits (z-loss, entropy).
    - ``scores_TE``: fp32, no grad: the selection scores (bias, masks included; experts outside a token's
      groups hold ``-inf``) that ranked the assignments; capacity drops and token rounding use them to pick
      whom to drop or add.

    Top-k routers give ``N = T·K`` assignments, token-major (``token_N = arange(T).repeat_interleave(K)``),
    and within a token in descending selection score. Expert choice gives ``N = E·C``, expert-major.
    """

    token_N: torch.Tensor
    expert_N: torch.Tensor
    weight_N: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    scores_TE: torch.Tensor


def _check_shape(num_experts: int, top_k: int, n_groups: int, topk_groups: int) -> None:
    """Raise ValueError, naming the value, the rule and the fix, for an impossible routing shape."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k} must be between 1 and num_experts={num_experts}; lower top_k or add experts."
        )
    if n_groups < 1 or num_experts % n_groups:
        raise ValueError(
            f"n_groups={n_groups} must be a positive divisor of num_experts={num_experts} (experts are split "
            "into equal contiguous groups); pick a divisor, e.g. the number of expert-parallel ranks."
        )
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(
            f"topk_groups={topk_groups} must be between 1 and n_groups={n_groups}; "
            f"set topk_groups to at most {n_groups}."
        )
    reachable = topk_groups * (num_experts // n_groups)
    if top_k > reachable:
        raise ValueError(
            f"top_k={top_k} exceeds the {reachable} experts reachable in topk_groups={topk_groups} groups of "
            f"{num_experts // n_groups}; raise topk_groups or lower top_k."
        )


class Router(nn.Module, ABC):
    """Base of all routers: validation, group-limited top-k selection, the balance hook.

    ``forward(x_TD) -> Routing`` for ``x_TD [T, dim]`` in the activation dtype; local tokens only, nothing
    communicates. Linear-gate routers hold ``weight [E, dim]`` (no bias; HF ``gate.weight``).

    Group-limited routing (``n_groups > 1``): experts form ``n_groups`` contiguous groups; each token keeps
    the ``topk_groups`` groups with the highest group score and picks its k experts among them. With expert
    parallelism a group is an EP rank (or a node), so a token's copies travel to at most ``topk_groups``
    of them.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        init_std: float = 0.02,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        _check_shape(num_experts, top_k, n_groups, topk_groups)
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.init_std = init_std
        self.n_groups = n_groups
        self.topk_groups = topk_groups

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) for every weight matrix of this router, in registration order.

        Deterministic given the RNG state. Routers with other state (bias, counters, temperature) extend it
        to reset that state too, since a model built on the meta device gets its values only here.
        """
        for param in self.parameters(recurse=False):
            if param.ndim == 2:
                nn.init.normal_(param, mean=0.0, std=self.init_std)

    @abstractmethod
    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Route ``x_TD [T, dim]`` (activation dtype) over this rank's tokens; nothing communicates."""

    def update_balance(self, load_E: torch.Tensor) -> None:
        """Adapt balancing state once per optimizer step, after the step; this router has none.

        ``load_E``: fp32 ``[E]`` tokens per expert over the whole global batch, already all-reduced and
        identical on every rank, so every rank's router state stays identical without communicating.
        """

    def restrict_to_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        """``select_TE [T, E]`` (fp32) with the experts outside each token's best groups set to ``-inf``.

        The group score is the sum of the group's top-2 selection scores (top-1 for one-expert groups),
        exactly DeepSeek-V3's rule, so its checkpoints route identically: unlike the group maximum, it
        rewards a group that can serve a token with more than one good expert. Identity for one group.
        """
        if self.n_groups == 1:
            return select_TE
        tokens = select_TE.shape[0]
        group_size = self.num_experts // self.n_groups
        grouped_TGX = select_TE.view(tokens, self.n_groups, group_size)
        group_score_TG = grouped_TGX.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
        kept_TM = group_score_TG.topk(self.topk_groups, dim=-1).indices
        allowed_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_TM, True)
        allowed_TE = allowed_TG.repeat_interleave(group_size, dim=1)
        return select_TE.masked_fill(~allowed_TE, float("-inf"))

    def select_topk(
        self,
        select_TE: torch.Tensor,
        gates_TE: torch.Tensor,
        *,
        normalize: bool,
        dtype: torch.dtype,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group-limited top-k of ``select_TE`` (fp32, no grad), weighted by ``gates_TE`` (fp32, with grad).

        Returns ``(token_N, expert_N, weight_N, scores_TE)``, token-major with ``N = T·K``: each token's
        experts in descending selection score, their gates (divided by their sum when ``normalize``, then
        times ``scale``) cast to ``dtype``, and the masked selection scores.
        """
        scores_TE = self.restrict_to_groups(select_TE.detach())
        expert_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weight_TK = gates_TE.gather(1, expert_TK)
        if normalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        if scale != 1.0:
            weight_TK = weight_TK * scale
        token_N = torch.arange(expert_TK.shape[0], device=expert_TK.device).repeat_interleave(self.top_k)
        return token_N, expert_TK.reshape(-1), weight_TK.reshape(-1).to(dtype), scores_TE

    def extra_repr(self) -> str:
        groups = f", n_groups={self.n_groups}, topk_groups={self.topk_groups}" if self.n_groups > 1 else ""
        return f"experts={self.num_experts}, top_k={self.top_k}{groups}"


class LinearGateRouter(Router):
    """A router whose logits are a linear map of the token: ``weight [E, dim]`` (no bias)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, **base_options) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))

    def fp32_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``x_TD @ weight.T`` computed in fp32: ``[T, E]`` fp32, differentiable."""
        return F.linear(x_TD.float(), self.weight.float())


class SoftmaxTopKRouter(LinearGateRouter):
    """Softmax over all experts, keep the top k, optionally renormalise them (HF Mixtral / Qwen-MoE).

    As HF: logits ``x_TD @ weight.T`` in the activation dtype then fp32, softmax in fp32, top-k of the
    probabilities, the k weights divided by their sum when ``normalize_topk`` (Mixtral always; Qwen
    ``norm_topk_prob``), then cast to the activation dtype. ``probs_TE`` = ``scores_TE`` = the softmax.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, normalize_topk: bool = True, **base_options
    ) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        self.normalize_topk = normalize_topk
        self.init_weights()

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD, self.weight).float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        token_N, expert_N, weight_N, scores_TE = self.select_topk(
            probs_TE, probs_TE, normalize=self.normalize_topk, dtype=x_TD.dtype
        )
        return Routing(token_N, expert_N, weight_N, probs_TE, logits_TE, scores_TE)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize_topk={self.normalize_topk}"


class SigmoidBiasRouter(LinearGateRouter):
    """DeepSeek-V3 auxiliary-loss-free routing: sigmoid scores, a balancing bias that steers only the choice.

    ``scores = sigmoid(logits)`` (fp32). Experts are chosen by ``scores + expert_bias``; their weights are
    the unbiased scores, divided by their sum when ``normalize_topk``, times ``routed_scaling``.
    ``probs_TE`` is the scores normalised per token (DeepSeek-V3's sequence-wise complementary loss).

    ``expert_bias``: fp32 ``[E]`` persistent buffer (DeepSeek's ``e_score_correction_bias``), zeros at init,
    no gradient; :meth:`update_balance` moves it ``bias_update_speed`` per step towards under-loaded
    experts (Wang et al. 2024). Keep it fp32: cast parameters with FSDP's ``param_dtype`` (buffers are left
    alone), not ``module.to(bf16)``, whose rounding would swallow a 1e-3 step.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        normalize_topk: bool = True,
        routed_scaling: float = 1.0,
        bias_update_speed: float = 1e-3,
        **base_options,
    ) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        self.normalize_topk = normalize_topk
        self.routed_scaling = routed_scaling
        self.bias_update_speed = bias_update_speed
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) ``weight``; zero ``expert_bias``."""
        super().init_weights()
        self.expert_bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.fp32_logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        token_N, expert_N, weight_N, select_TE = self.select_topk(
            scores_TE.detach() + self.expert_bias.float(),
            scores_TE,
            normalize=self.normalize_topk,
            dtype=x_TD.dtype,
            scale=self.routed_scaling,
        )
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return Routing(token_N, expert_N, weight_N, probs_TE, logits_TE, select_TE)

    @torch.no_grad()
    def update_balance(self, load_E: torch.Tensor) -> None:
        """``expert_bias += bias_update_speed · sign(mean(load_E) − load_E)``, in fp32, in place.

        ``load_E``: fp32 ``[E]`` global-batch tokens per expert, identical on every rank (no communication).
        """
        if self.expert_bias.dtype != torch.float32:
            raise ValueError(
                f"expert_bias is {self.expert_bias.dtype}, but the balancing bias must stay float32 (its "
                f"{self.bias_update_speed} steps vanish in low precision); cast the model's parameters with "
                "FSDP's param_dtype instead of module.to(dtype), or call router.expert_bias.data = "
                "router.expert_bias.float()."
            )
        load_E = load_E.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_(torch.sign(load_E.mean() - load_E), alpha=self.bias_update_speed)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalize_topk={self.normalize_topk}, "
            f"routed_scaling={self.routed_scaling}, bias_update_speed={self.bias_update_speed}"
        )


class CosineRouter(Router):
    """Cosine routing (X-MoE): cosine similarity in a low-dimensional space, over a learnable temperature.

    ``proj [cosine_dim, dim]`` maps the token down; the L2-normalised projection is compared with the
    L2-normalised ``centroids [E, cosine_dim]``; the cosine, divided by ``temperature`` (a learnable ``[1]``
    parameter: FSDP shards dim 0, which a 0-d tensor lacks), is the logit; then softmax top-k as
    ``softmax_topk``. Bounded logits keep the router from growing over-confident through weight norms, and
    the low dimension keeps the expert embeddings from collapsing into the token space.

    ``temperature`` starts at 0.07 (CLIP's and X-MoE's value: with random 64-d centroids the cosines are
    about ±0.13, so logits start about ±2) and is clamped to [0.01, 1] in forward: 0.01 caps the logit scale
    at 100 as CLIP does, 1 stops the router from flattening into a uniform mixture.
    """

    MIN_TEMPERATURE = 0.01
    MAX_TEMPERATURE = 1.0

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        cosine_dim: int = 64,
        temperature: float = 0.07,
        normalize_topk: bool = True,
        **base_options,
    ) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        if not self.MIN_TEMPERATURE <= temperature <= self.MAX_TEMPERATURE:
            raise ValueError(
                f"temperature={temperature} is outside the clamp range [{self.MIN_TEMPERATURE}, "
                f"{self.MAX_TEMPERATURE}]; pick an initial temperature inside it (default 0.07)."
            )
        self.cosine_dim = cosine_dim
        self.initial_temperature = temperature
        self.normalize_topk = normalize_topk
        self.proj = nn.Parameter(torch.empty(cosine_dim, dim))
        self.centroids = nn.Parameter(torch.empty(num_experts, cosine_dim))
        self.temperature = nn.Parameter(torch.empty(1))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) ``proj`` then ``centroids``; ``temperature`` = its initial value."""
        super().init_weights()
        self.temperature.fill_(self.initial_temperature)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        token_TC = F.normalize(F.linear(x_TD.float(), self.proj.float()), dim=-1)
        centroid_EC = F.normalize(self.centroids.float(), dim=-1)
        temperature = self.temperature.float().clamp(self.MIN_TEMPERATURE, self.MAX_TEMPERATURE)
        logits_TE = token_TC @ centroid_EC.T / temperature
        probs_TE = torch.softmax(logits_TE, dim=-1)
        token_N, expert_N, weight_N, scores_TE = self.select_topk(
            probs_TE, probs_TE, normalize=self.normalize_topk, dtype=x_TD.dtype
        )
        return Routing(token_N, expert_N, weight_N, probs_TE, logits_TE, scores_TE)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cosine_dim={self.cosine_dim}, normalize_topk={self.normalize_topk}"


def _unit_draw(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, counter)`` (splitmix64 mixing).

    Pure integer arithmetic on the host: identical on every rank and platform, and no RNG state is touched.
    """
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xD1B54A32D192ED03) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


class SinkhornRouter(LinearGateRouter):
    """Sinkhorn routing, and Selective Sinkhorn Routing (SSR) when ``ssr_prob < 1``.

    When Sinkhorn applies, the router solves the entropic transport problem between the local tokens (mass
    1 each) and the experts (mass T/E each) with kernel ``exp(logits)`` (:func:`balance.sinkhorn`: log
    space, fp32, at most ``sinkhorn_iters`` iterations, fewer once the column masses are within ``tol``).
    The transport map is ``softmax(logits + shift_E)`` per token, ``shift_E`` being the experts' transport
    potential. Following the SSR paper, which derives the gating scores from the transport map rather than
    from the router softmax, both the top-k selection and the combine weights come from the transport map
    (renormalised over the k when ``normalize_topk``). The weights are differentiated through the
    potential too (implicit differentiation at the solution): with ``shift_E`` treated as a constant the
    router is rewarded for inflating the logits of the experts it favours, which the next solve cancels,
    and on a toy task its logits grew without bound while the balance degraded. Otherwise (Sinkhorn not
    drawn, or eval mode) it is plain softmax top-k. ``probs_TE`` is always the router softmax.

    The transport map balances the experts' soft mass; hard top-k counts follow it closely but not exactly,
    since only a token's first choice is held to the experts' mass: for k=2 of 8 experts and 4096 tokens,
    max/mean load measured 1.02-1.10 with moderate logits and 1.12-1.20 once training had sharpened them.

    Whether Sinkhorn applies is drawn per optimizer step with probability ``ssr_prob`` from
    ``(seed, step)``, where ``step`` is a persistent int64 buffer advanced by :meth:`update_balance` (once
    per optimizer step). A per-step draw, rather than one per forward, keeps every micro-batch of a step,
    and activation checkpointing's recomputed forward, on the same decision; ranks agree without
    communicating. The draw reads ``step`` on the host (a scalar sync) only when ``0 < ssr_prob < 1``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        ssr_prob: float = 1.0,
        sinkhorn_iters: int = 50,
        tol: float = 1e-3,
        seed: int = 0,
        normalize_topk: bool = True,
        **base_options,
    ) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        if not 0.0 <= ssr_prob <= 1.0:
            raise ValueError(
                f"ssr_prob={ssr_prob} must lie in [0, 1] (the probability that a training step uses "
                "Sinkhorn); use 1 for plain Sinkhorn routing or e.g. 0.1 for selective routing."
            )
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters={sinkhorn_iters} must be at least 1; use e.g. 50.")
        self.ssr_prob = ssr_prob
        self.sinkhorn_iters = sinkhorn_iters
        self.tol = tol
        self.seed = seed
        self.normalize_topk = normalize_topk
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) ``weight``; ``step`` back to 0."""
        super().init_weights()
        self.step.zero_()

    def uses_sinkhorn(self) -> bool:
        """Whether a forward now routes by the transport map: training mode and this step's draw."""
        if not self.training or self.ssr_prob == 0.0:
            return False
        return self.ssr_prob == 1.0 or _unit_draw(self.seed, int(self.step)) < self.ssr_prob

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.fp32_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TE = probs_TE
        if self.uses_sinkhorn():
            shift_E = sinkhorn(logits_TE, self.sinkhorn_iters, self.tol)
            gates_TE = torch.softmax(logits_TE + shift_E, dim=-1)
        token_N, expert_N, weight_N, scores_TE = self.select_topk(
            gates_TE, gates_TE, normalize=self.normalize_topk, dtype=x_TD.dtype
        )
        return Routing(token_N, expert_N, weight_N, probs_TE, logits_TE, scores_TE)

    @torch.no_grad()
    def update_balance(self, load_E: torch.Tensor) -> None:
        """Advance ``step`` (the SSR draw's counter); the load itself is not needed, Sinkhorn balances
        each batch on its own. No communication."""
        self.step.add_(1)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ssr_prob={self.ssr_prob}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"tol={self.tol}, seed={self.seed}, normalize_topk={self.normalize_topk}"
        )


class ExpertChoiceRouter(LinearGateRouter):
    """Expert choice (Zhou et al. 2022): each expert takes its ``C`` most probable tokens.

    Softmax over experts per token (fp32); expert e takes the top ``C = min(T, ceil(T·top_k·capacity_factor
    / E))`` tokens by that probability, weighted by it. ``N = E·C`` assignments, expert-major, each
    expert's tokens in descending probability. Load is perfectly balanced by construction, but a token may
    get no expert at all (the residual stream, and the shared expert if any, carry it) or many. The choice
    depends on every local token, later ones included, so it is not causal: use it for training, not for
    token-by-token generation. Groups do not apply (experts choose, not tokens): ``n_groups`` must be 1.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, capacity_factor: float = 1.0, **base_options
    ) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        if self.n_groups != 1:
            raise ValueError(
                f"n_groups={self.n_groups}: expert_choice has no per-token group limit (experts pick tokens); "
                "use n_groups=1 with expert_choice, or a top-k router for group-limited routing."
            )
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be positive; use e.g. 1.0.")
        self.capacity_factor = capacity_factor
        self.init_weights()

    def capacity(self, tokens: int) -> int:
        """Tokens per expert for ``tokens`` local tokens: ``min(T, ceil(T·top_k·capacity_factor / E))``."""
        return min(tokens, math.ceil(tokens * self.top_k * self.capacity_factor / self.num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.fp32_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        capacity = self.capacity(x_TD.shape[0])
        weight_EC, token_EC = probs_TE.T.topk(capacity, dim=-1)
        expert_N = torch.arange(self.num_experts, device=x_TD.device).repeat_interleave(capacity)
        return Routing(
            token_EC.reshape(-1),
            expert_N,
            weight_EC.reshape(-1).to(x_TD.dtype),
            probs_TE,
            logits_TE,
            probs_TE.detach(),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"


def _midpoint_of_best(values_TE: torch.Tensor, count: int) -> torch.Tensor:
    """Per column of ``values_TE [T, E]``, a cut with exactly ``count`` values strictly above it: midway
    between the count-th and (count+1)-th largest (below the minimum when count = T). ``[E]``."""
    tokens = values_TE.shape[0]
    best_KE = values_TE.topk(min(tokens, count + 1), dim=0).values
    if count == tokens:
        return best_KE[-1] - 1.0
    return (best_KE[count - 1] + best_KE[count]) / 2


class QuantileRouter(LinearGateRouter):
    """Quantile balancing: each expert's logits are shifted by a per-expert batch threshold before top-k.

    Selection is top-k of ``logits − threshold_E`` (fp32, no grad); the threshold starts at each expert's
    ``1 − top_k/E`` quantile over the local tokens: midway between its ``C``-th and ``(C+1)``-th largest
    logit, ``C = round(T·top_k/E)``. Why this balances: exactly C tokens clear each expert's threshold, so
    if every token took just the experts it clears, every expert would get C = T·k/E tokens. Top-k departs
    from that for tokens that clear more or fewer than k thresholds (max/mean load ≈ 1.15 measured for
    k=2 of 8), so ``refine_rounds`` corrections follow: each moves every expert's threshold so that exactly
    C tokens would pick it given the others' current thresholds (one round: ≈ 1.02, two: ≈ 1.01; 0 gives
    the plain quantile rule). The shift is a per-expert offset of the logits, the batch-local analogue of
    the aux-loss-free bias; logits rather than log-probabilities, whose saturation near 0 for a dominant
    expert would compress its scores and hand it the second choices. Weights are the softmax probabilities
    of the chosen experts (renormalised when ``normalize_topk``).

    The thresholds are batch statistics, meaningless for a handful of tokens, so eval mode routes by plain
    softmax top-k. Group limits apply to the final selection, not to the threshold corrections.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        refine_rounds: int = 2,
        normalize_topk: bool = True,
        **base_options,
    ) -> None:
        super().__init__(dim, num_experts, top_k, **base_options)
        if refine_rounds < 0:
            raise ValueError(
                f"refine_rounds={refine_rounds} must be at least 0; use 0 (plain quantile) to 2."
            )
        self.refine_rounds = refine_rounds
        self.normalize_topk = normalize_topk
        self.init_weights()

    @torch.no_grad()
    def thresholds(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Per-expert thresholds (fp32 ``[E]``, no grad) for ``logits_TE [T, E]``; local, no communication."""
        tokens = logits_TE.shape[0]
        admitted = min(tokens, max(1, round(tokens * self.top_k / self.num_experts)))
        threshold_E = _midpoint_of_best(logits_TE, admitted)
        if self.top_k == self.num_experts:
            return threshold_E  # every token takes every expert: nothing to correct
        for _ in range(self.refine_rounds):
            adjusted_TE = logits_TE - threshold_E
            # Token t picks e iff e's adjusted score beats the k-th best of the other experts: the k-th
            # best overall when e is not among the top k, the (k+1)-th when it is.
            best_TK1 = adjusted_TE.topk(self.top_k + 1, dim=1).values
            kth_T1, next_T1 = best_TK1[:, -2:-1], best_TK1[:, -1:]
            bar_TE = torch.where(adjusted_TE >= kth_T1, next_T1, kth_T1)
            threshold_E = threshold_E + _midpoint_of_best(adjusted_TE - bar_TE, admitted)
        return threshold_E

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.fp32_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = logits_TE.detach()
        if self.training:
            select_TE = select_TE - self.thresholds(select_TE)
        token_N, expert_N, weight_N, scores_TE = self.select_topk(
            select_TE, probs_TE, normalize=self.normalize_topk, dtype=x_TD.dtype
        )
        return Routing(token_N, expert_N, weight_N, probs_TE, logits_TE, scores_TE)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, refine_rounds={self.refine_rounds}, normalize_topk={self.normalize_topk}"


#: Router classes by config name (``model.router``).
ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "sigmoid_bias": SigmoidBiasRouter,
    "cosine": CosineRouter,
    "sinkhorn": SinkhornRouter,
    "expert_choice": ExpertChoiceRouter,
    "quantile": QuantileRouter,
}


def router_options(cls: type[Router]) -> list[str]:
    """The keyword options ``cls`` accepts (its own and its bases'), sorted."""
    names = set()
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, Router) and "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters.values()
            names.update(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    return sorted(names)


def build_router(name: str, dim: int, num_experts: int, top_k: int, **options) -> Router:
    """The router registered as ``name`` in :data:`ROUTERS`, built with ``options`` (no communication).

    An unknown name lists the known routers; an option the router does not take is named with its options.
    """
    if name not in ROUTERS:
        raise ValueError(
            f"unknown router '{name}'; known routers: {', '.join(sorted(ROUTERS))}. Set model.router to one."
        )
    cls = ROUTERS[name]
    known = router_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"router '{name}' has no option {', '.join(unknown)}; its options are {', '.join(known)}. "
            "Remove the others."
        )
    return cls(dim, num_experts, top_k, **options)
