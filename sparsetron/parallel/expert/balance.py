"""Load-balancing losses, routing statistics and the Sinkhorn balancing solver; all fp32.

Share convention for sharded sequences: with context parallelism every rank holds a shard of every
sequence, and ``seq_group`` is that group (None = unsharded). A loss returns this rank's *share*: the sum of
the shares over the group equals the unsharded value, gradient included. Counts (no gradient) are
all-reduced over the group; each rank keeps its own tokens' share of the probability means. Shards are
assumed equal in length (as context parallelism makes them). The same holds for
:func:`global_batch_aux_loss` over ``batch_group``. A trainer therefore sums the shares (or, when gradients
are averaged over those ranks, scales each share by the group size) to get the loss it means.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or left in fp64 (so that fp64 references stay exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def switch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch / GShard load-balancing loss over one micro-batch: fp32 scalar, no coefficient.

    ``E · Σ_e f_e·P_e`` with ``f_e = counts_E / (T·k)`` (fraction of the T·k assignments, no grad) and
    ``P_e`` the mean of ``probs_TE [T, E]`` (fp32, differentiable) over tokens. 1 when balanced. Local: no
    communication.
    """
    tokens, num_experts = probs_TE.shape
    fraction_E = _at_least_fp32(counts_E) / (tokens * top_k)
    return num_experts * (fraction_E * _at_least_fp32(probs_TE).mean(dim=0)).sum()


def sequence_aux_loss(
    probs_BSE: torch.Tensor, counts_BE: torch.Tensor, top_k: int, seq_group: object | None = None
) -> torch.Tensor:
    """Switch load-balancing loss per sequence, averaged over sequences (fp32 scalar, no coefficient).

    For sequence b: ``f_be = counts_be / (S·k)``, ``P_be = mean_s probs_bse``, ``aux_b = E · Σ_e f_be·P_be``.
    ``probs_BSE`` fp32 ``[B, S_local, E]`` (differentiable), ``counts_BE`` fp32 ``[B, E]`` (no grad).
    Averaging per-sequence values makes the loss independent of how sequences are grouped into
    micro-batches or data-parallel ranks.

    With context parallelism each rank holds a shard of every sequence; ``seq_group`` is that group. The
    counts are all-reduced over it (the only communication), and each rank keeps only its own tokens' share
    of ``P_be``, so the ranks' values sum to the unsharded loss, gradient included.
    """
    _, local_len, num_experts = probs_BSE.shape
    seq_len = local_len
    if seq_group is not None:
        counts_BE = counts_BE.clone()
        dist.all_reduce(counts_BE, group=seq_group)
        seq_len = local_len * dist.get_world_size(seq_group)
    fraction_BE = counts_BE / (seq_len * top_k)
    mean_prob_BE = probs_BSE.sum(dim=1) / seq_len
    return (num_experts * (fraction_BE * mean_prob_BE).sum(dim=-1)).mean()


def global_batch_aux_loss(
    probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int, batch_group: object | None = None
) -> torch.Tensor:
    """Switch loss over the global micro-batch (Qiu et al. 2025): this rank's share, fp32 scalar.

    ``f_e`` comes from ``counts_E`` (fp32 ``[E]``, no grad) and the token count, both all-reduced over
    ``batch_group`` (every data- and context-parallel rank of this micro-step; one all-reduce); ``P_e`` is
    the global mean of ``probs_TE [T, E]``, of which this rank contributes its own tokens' sum. The shares
    sum over ``batch_group`` to ``E · Σ_e f_e·P_e``; gradient flows through the local probabilities only.
    Ranks may hold different token counts. None = this rank alone (then equal to :func:`switch_aux_loss`).
    """
    num_experts = probs_TE.shape[1]
    counts_E = _at_least_fp32(counts_E.detach())
    totals = torch.cat([counts_E, counts_E.new_tensor([probs_TE.shape[0]])])
    if batch_group is not None:
        dist.all_reduce(totals, group=batch_group)
    counts_E, tokens = totals[:num_experts], totals[num_experts]
    fraction_E = counts_E / (tokens * top_k)
    mean_prob_share_E = _at_least_fp32(probs_TE).sum(dim=0) / tokens
    return num_experts * (fraction_E * mean_prob_share_E).sum()


def router_z_loss(logits_BSE: torch.Tensor, seq_group: object | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_tokens logsumexp(logits)²``: this rank's share, fp32 scalar.

    ``logits_BSE`` ``[B, S_local, E]`` (differentiable). Mean over each sequence's tokens, then over
    sequences. With ``seq_group`` (context parallelism) the sequence length is ``S_local × group size`` and
    this rank sums only its own tokens, so the shares sum to the unsharded loss; nothing communicates.
    """
    _, local_len, _ = logits_BSE.shape
    seq_len = local_len if seq_group is None else local_len * dist.get_world_size(seq_group)
    lse_BS = torch.logsumexp(_at_least_fp32(logits_BSE), dim=-1)
    return (lse_BS.square().sum(dim=1) / seq_len).mean()


@torch.no_grad()
def routing_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of ``probs_TE [T, E]``: fp32 scalar, no grad, local.

    ``log E`` for uniform routing, 0 for one-hot routing.
    """
    probs_TE = _at_least_fp32(probs_TE)
    return -torch.xlogy(probs_TE, probs_TE).sum(dim=-1).mean()


#: How often (in iterations) :func:`sinkhorn` reads its convergence error on the host: each read is a
#: device sync, and one every few cheap iterations costs less than the iterations it saves.
SINKHORN_CHECK_EVERY = 5


def sinkhorn(logits_TE: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Expert potential ``shift_E`` (fp32 ``[E]``) that balances ``softmax(logits_TE + shift_E, dim=-1)``.

    Entropic optimal transport between T tokens of mass 1 and E experts of mass T/E with kernel
    ``exp(logits_TE)`` (``[T, E]``), solved by Sinkhorn iterations in log space (fp32, stable for any logit
    scale). The transport map is ``softmax(logits_TE + shift_E)``: every row sums to 1 exactly and every
    column to T/E within about ``tol`` (relative). Iterates at most ``iters`` times and stops early once an
    iteration changes ``shift_E`` by at most ``tol`` (that change is the relative column-mass error before
    it), checked every :data:`SINKHORN_CHECK_EVERY` iterations (a host read each; ``tol=0`` never checks).

    Differentiable by implicit differentiation of the balance condition at the solution, not through the
    iterations: exact at convergence, O(T·E² + E³) in backward, nothing stored per iteration. A shift
    common to all experts is immaterial (the map ignores it). Local tokens only: no communication.
    """
    return _SinkhornShift.apply(logits_TE.float(), iters, tol)


@torch.no_grad()
def _sinkhorn_solve(logits_TE: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """The forward of :func:`sinkhorn`: alternate row and column normalisation in log space."""
    tokens, num_experts = logits_TE.shape
    log_expert_mass = torch.log(torch.tensor(tokens / num_experts, device=logits_TE.device))
    shift_E = torch.zeros(num_experts, dtype=torch.float32, device=logits_TE.device)
    for step in range(1, iters + 1):
        token_shift_T1 = -torch.logsumexp(logits_TE + shift_E, dim=1, keepdim=True)
        new_shift_E = log_expert_mass - torch.logsumexp(logits_TE + token_shift_T1, dim=0)
        converged = tol > 0 and step % SINKHORN_CHECK_EVERY == 0
        converged = converged and (new_shift_E - shift_E).abs().max().item() <= tol
        shift_E = new_shift_E
        if converged:
            break
    return shift_E


class _SinkhornShift(torch.autograd.Function):
    """``shift_E`` with the implicit-function gradient of the balance condition.

    At the solution ``Σ_t softmax(l_t + shift)_e = T/E`` for every e. Differentiating gives
    ``H·d(shift) = −Σ_t J_t·dl_t`` with ``J_t = diag(p_t) − p_t p_tᵀ`` and ``H = Σ_t J_t``, so for an
    incoming gradient g: ``λ = H⁻¹g`` and ``∂/∂l_t = −J_t·λ``. H is singular only along the all-ones
    direction (the immaterial common shift), which ``11ᵀ/E`` fixes; a tiny ridge keeps near-one-hot
    maps solvable.
    """

    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
        shift_E = _sinkhorn_solve(logits_TE, iters, tol)
        ctx.save_for_backward(logits_TE, shift_E)
        return shift_E

    @staticmethod
    def backward(ctx, grad_E: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits_TE, shift_E = ctx.saved_tensors
        probs_TE = torch.softmax(logits_TE + shift_E, dim=-1)
        num_experts = probs_TE.shape[1]
        # fp64: for near-one-hot maps diag(Σp) and pᵀp nearly cancel.
        probs64_TE = probs_TE.double()
        hessian_EE = torch.diag(probs64_TE.sum(dim=0)) - probs64_TE.T @ probs64_TE
        ridge_EE = (
            1e-9
            * hessian_EE.diagonal().mean()
            * torch.eye(num_experts, dtype=torch.float64, device=grad_E.device)
        )
        system_EE = hessian_EE + 1.0 / num_experts + ridge_EE
        lam_E = torch.linalg.solve(system_EE, grad_E.double()).to(probs_TE.dtype)
        grad_TE = -(probs_TE * lam_E - probs_TE * (probs_TE @ lam_E).unsqueeze(1))
        return grad_TE, None, None
