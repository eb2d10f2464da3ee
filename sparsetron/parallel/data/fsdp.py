"""FSDP2 (``fully_shard``) over ``dp_shard × cp``, replicated over ``dp_replicate`` (HSDP), per decoder layer.

Each decoder layer is its own FSDP unit so only one layer's parameters are unsharded at a time; the root
unit holds the embedding, final norm and head. With ``dp_replicate > 1`` the mesh is 2-D
(``dp_replicate × dp_shard``): parameters are sharded within a replica and gradients all-reduced across
replicas, i.e. plain data parallelism over replicas.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetron.dist.layout import ParallelMesh


def _fsdp_api():
    # torch >= 2.6 exports fully_shard publicly; keep one place that knows where it lives.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    return fully_shard, MixedPrecisionPolicy


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Recompute each layer's activations in backward (trades ~1 extra forward for activation memory)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    # checkpoint_wrapper keeps the wrapped module's state-dict keys, so checkpoints stay interchangeable.
    for index, layer in enumerate(layers):
        layers[index] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_data_parallel(
    model: nn.Module,
    mesh: ParallelMesh,
    *,
    param_dtype: torch.dtype | None = None,
    sync_replicas: bool = True,
) -> bool:
    """Shard ``model`` with FSDP2 over ``dp_shard × cp``, replicated over ``dp_replicate``; False if unsharded.

    Context-parallel ranks hold the same weights and their gradients must be summed, so they join the shard
    axis (as torchtitan does). With ``ep > 1`` the routed experts (sharded over ``ep`` beforehand by
    :meth:`Transformer.enable_expert_parallel`) are sharded over ``edp`` (× ``dp_replicate``) instead. Communicates (during forward/backward) over ``dp_shard_cp`` (all-gather,
    reduce-scatter) and ``dp_replicate`` (gradient all-reduce). ``param_dtype`` (e.g. bf16 on GPU) casts
    parameters for compute while gradients are reduced in fp32. Gradients are averaged over all ranks.

    ``sync_replicas=False`` (DiLoCo / SparseLoCo): each replica is its own FSDP job over ``dp_shard × cp``;
    nothing crosses ``dp_replicate`` in forward/backward (the outer step does that), and gradients are
    averaged over the replica's ranks. A replica of one rank is left unsharded.
    """
    dims = mesh.dims
    across = sync_replicas and dims.dp_replicate > 1
    if dims.world_size // (1 if sync_replicas else dims.dp_replicate) == 1:
        return False
    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    dp_mesh = mesh.fsdp if across else mesh.flat["dp_shard_cp"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if dims.ep > 1:
        # Routed experts (already DTensors sharded over ep) get their own FSDP unit over the expert-data-
        # parallel ranks; the enclosing layer's unit then skips their parameters.
        expert_mesh = mesh.expert["dp_replicate", "edp"] if across else mesh.expert["edp"]
        for moe in model.moe_layers():
            fully_shard(moe.experts, mesh=expert_mesh, mp_policy=policy)
    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return True


def fsdp_comm_bytes_per_step(
    model: nn.Module, mesh: ParallelMesh, micro_batches: int, *, sync_replicas: bool = True
) -> int:
    """Bytes this rank sends per optimizer step for FSDP2/HSDP traffic, from the collective sizes.

    Per micro-batch each shard is all-gathered twice (forward, and again in backward after resharding):
    a ring all-gather of a tensor of N elements over W ranks sends N·(W−1)/W per rank. Gradients are
    reduce-scattered once per step (gradient sync is off for all but the last micro-batch), also
    N·(W−1)/W, and with replicas all-reduced across them: 2·(N/W)·(R−1)/R (not with ``sync_replicas=False``,
    where the outer step accounts for what crosses replicas).
    """
    dims = mesh.dims
    if dims.world_size // (1 if sync_replicas else dims.dp_replicate) == 1:
        return 0
    expert_params = set()
    if dims.ep > 1:
        expert_params = {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}
    total = 0
    for param in model.parameters():
        # Routed experts with ep > 1: each rank's E/ep experts are sharded over edp only.
        is_expert = id(param) in expert_params
        w = dims.edp if is_expert else dims.dp_shard * dims.cp
        r = dims.dp_replicate if sync_replicas else 1
        numel = param.numel() // (dims.ep if is_expert else 1)  # global count, also for DTensor parameters
        nbytes = numel * param.element_size()
        shard_share = nbytes * (w - 1) / w
        total += 2 * micro_batches * shard_share + shard_share
        total += 2 * (nbytes / w) * (r - 1) / r
    return int(total)
