"""The training loop: data, model, FSDP2, AdamW, checkpoints, metrics — one rank's view, run on every rank.

Loss normalisation is global: each step's loss is the sum of token losses over the whole global batch
divided by its number of target tokens (an all-reduced count), and the MoE balance loss is a mean over
sequences. Neither depends on how sequences are spread over ranks or micro-batches, which is what makes
the same seed give the same loss curve on every data-parallel layout.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsetron.checkpoint import Checkpointer, CheckpointError, read_manifest
from sparsetron.config import Config, to_yaml
from sparsetron.dist.layout import ParallelMesh
from sparsetron.dist.preflight import cp_node_size
from sparsetron.model import Transformer, count_parameters
from sparsetron.model.sparse_attention import SparseAttention
from sparsetron.parallel.context import ContextParallelAttention, shard_sequence, unshard_sequence
from sparsetron.parallel.context.sparse_hier import HierarchyGroups
from sparsetron.parallel.data.fsdp import (
    apply_activation_checkpointing,
    apply_data_parallel,
    fsdp_comm_bytes_per_step,
)
from sparsetron.parallel.data.outer import OuterStats, OuterStep
from sparsetron.sync.live import LivePublisher
from sparsetron.train.data import MicroBatch, StepLoader, build_source
from sparsetron.train.metrics import MetricsLog, ProgressLine, peak_flops
from sparsetron.train.optim import build_optimizer, clip_grad_norm, lr_factor
from sparsetron.train.synthetic import answers_correct, heldout_indices


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step, the rank and what to change."""


@dataclass
class TrainResult:
    """What a finished (or preempted) run reports back to the CLI."""

    steps_done: int
    first_loss: float | None
    last_loss: float | None
    mean_tokens_per_s: float
    run_dir: Path
    checkpoint: Path | None
    preempted: bool = False
    eval_accuracy: float | None = None
    losses: list[float] = field(default_factory=list)


def local_sgd(cfg: Config) -> bool:
    """Whether replicas train apart between outer steps (DiLoCo / SparseLoCo) instead of every step (DDP)."""
    return cfg.train.dp.algorithm.value != "ddp"


def replica_group(mesh: ParallelMesh):
    """The ranks of this rank's replica (dp_shard × cp, EP folded inside): the world without dp_replicate."""
    return mesh.group("dp_shard_cp") if mesh.dims.dp_replicate > 1 else None


def build_outer_step(model: Transformer, cfg: Config, mesh: ParallelMesh) -> OuterStep | None:
    """The DiLoCo / SparseLoCo outer step over ``dp_replicate`` for ``model``'s (sharded) parameters."""
    if not local_sgd(cfg):
        return None
    d = cfg.train.dp
    group = mesh.group("dp_replicate") if mesh.dims.dp_replicate > 1 else None
    return OuterStep(
        list(model.named_parameters()),
        d.algorithm.value,
        group,
        lr=d.outer_lr,
        momentum=d.outer_momentum,
        chunk=d.chunk,
        topk=d.topk,
        bits=d.bits,
        error_decay=d.error_decay,
        dense_below=d.dense_below,
        index_coding=d.index_coding,
        overlap=d.overlap,
    )


@torch.no_grad()
def average_buffers_over_replicas(model: Transformer, mesh: ParallelMesh) -> int:
    """Mean of the floating-point buffers (e.g. the router's expert bias) over ``dp_replicate``; returns bytes
    sent. Replicas update them from their own expert load between outer steps, so the outer step re-joins
    them; one small fp32 all-reduce over the ``dp_replicate`` group."""
    replicas = mesh.dims.dp_replicate
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if replicas == 1 or not buffers:
        return 0
    flat = torch.cat([b.detach().float().reshape(-1) for b in buffers])
    dist.all_reduce(flat, group=mesh.group("dp_replicate"))
    flat /= replicas
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view(b.shape))
        offset += b.numel()
    return int(2 * flat.numel() * 4 * (replicas - 1) / replicas)


class _SequenceSharding:
    """Splits every micro-batch over the context-parallel group with the configured layout (identity at cp=1)."""

    def __init__(self, cfg: Config, mesh: ParallelMesh):
        p = cfg.parallel
        self.group = mesh.group("cp") if mesh.dims.cp > 1 else None
        self.layout = p.cp_layout.value
        self.block = p.cp_block if p.cp_layout.value == "striped" else 1

    def shard(self, x_BS: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return x_BS
        return shard_sequence(x_BS, 1, self.group, self.layout, self.block)

    def shard_batch(self, mb: MicroBatch) -> MicroBatch:
        """This rank's part of every sequence of ``mb`` (tokens, targets, RoPE positions and doc ids alike)."""
        if self.group is None:
            return mb
        return dataclasses.replace(
            mb,
            tokens_BS=self.shard(mb.tokens_BS),
            targets_BS=self.shard(mb.targets_BS),
            positions_BS=self.shard(mb.positions_BS),
            doc_ids_BS=self.shard(mb.doc_ids_BS),
        )

    def unshard(self, x_BS: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return x_BS
        return unshard_sequence(x_BS, 1, self.group, self.layout, self.block)


def install_context_parallelism(model: Transformer, cfg: Config, mesh: ParallelMesh) -> None:
    """With cp > 1, make every attention layer a context-parallel core and shard per-sequence MoE statistics."""
    if mesh.dims.cp == 1:
        return
    p = cfg.parallel
    group = (
        (mesh.group("cp_ring"), mesh.group("cp_ulysses"))
        if p.cp_method.value == "hybrid"
        else mesh.group("cp")
    )
    block = p.cp_block if p.cp_layout.value == "striped" else 1
    # Layers that keep dense attention under the sparse ring use the exact ring on the same striped shards.
    method = "ring" if p.cp_method.value == "sparse_ring" else p.cp_method.value
    model.set_attention_core(
        ContextParallelAttention(group, method=method, layout=p.cp_layout.value, block=block)
    )
    model.set_sequence_group(mesh.group("cp"))


def install_sparse_attention(model: Transformer, cfg: Config, mesh: ParallelMesh) -> None:
    """With a sparse ``model.attention_pattern``, every layer from ``model.sparse_dense_layers`` on attends within
    its estimated block-sparse pattern (over the cp group when cp > 1: the sparse ring, hierarchical when
    ``parallel.cp_node_size`` resolves to fewer ranks per node than cp)."""
    if cfg.model.attention_pattern == "dense":
        return
    group = node_groups = None
    if mesh.dims.cp > 1:
        group = mesh.group("cp")
        node_size = cp_node_size(cfg)
        if node_size < mesh.dims.cp:
            node_groups = build_node_groups(mesh, node_size)
    core = SparseAttention(cfg.model, group, node_groups)
    for layer in model.layers[cfg.model.sparse_dense_layers :]:
        layer.attn.core = core


def build_node_groups(mesh: ParallelMesh, node_size: int) -> HierarchyGroups:
    """This rank's node-local and cross-node groups of the hierarchical sparse ring over its cp group.

    Each cp group (consecutive ranks, numbered node-major) is cut into nodes of ``node_size`` ranks: the node
    group holds one node's ranks, the cross-node group the ranks with this rank's index on every node.
    Collective over the whole world: ``new_group`` needs every rank to create every group, so each rank builds
    those of all cp groups, in the same order, and keeps its own.
    """
    cp_groups = mesh.dims.groups_of("cp")
    node, _ = dist.new_subgroups_by_enumeration(
        [
            members[start : start + node_size]
            for members in cp_groups
            for start in range(0, len(members), node_size)
        ]
    )
    cross, _ = dist.new_subgroups_by_enumeration(
        [members[local::node_size] for members in cp_groups for local in range(node_size)]
    )
    return HierarchyGroups(node, cross, node_size, mesh.dims.cp)


def install_expert_parallelism(model: Transformer, cfg: Config, mesh: ParallelMesh) -> None:
    """With ep > 1, shard the routed experts over the ep axis (all-to-all dispatch over its group); with the
    global balance loss, count expert load over every rank of a micro-step."""
    dims = mesh.dims
    if dims.ep > 1:
        # FSDP averages expert gradients over edp × dp_replicate = world/ep ranks, but each rank's expert
        # gradient already sums the tokens of its whole EP group: 1/ep makes it a world mean like the rest.
        model.enable_expert_parallel(
            mesh.submesh("ep"), grad_scale=1.0 / dims.ep, overlap_chunks=cfg.parallel.ep_overlap_chunks
        )
    if dims.world_size > 1 and cfg.model.aux_loss.value == "global":
        # Between outer steps a local-SGD replica is its own training job: balance over its ranks.
        model.set_batch_group(replica_group(mesh) if local_sgd(cfg) else dist.group.WORLD)


def _outer_record(stats: OuterStats) -> dict:
    """metrics.jsonl fields of an outer step (bytes are this rank's; every rank of a replica sends alike)."""
    return {
        "outer_payload_bytes": stats.payload_bytes,
        "outer_sent_bytes": stats.sent_bytes,
        "outer_received_bytes": stats.received_bytes,
        "outer_dense_fp32_bytes": stats.dense_fp32_bytes,
        "outer_ratio_vs_fp32": stats.ratio_vs_fp32,
        "outer_ratio_vs_bf16": stats.ratio_vs_bf16,
        "outer_wait_s": stats.wait_s,
        "outer_encode_s": stats.encode_s,
        "outer_decode_s": stats.decode_s,
    }


def _check_resumable(path: Path, cfg: Config, dims) -> None:
    """Refuse, before loading, a checkpoint whose replica structure differs from this run's.

    DiLoCo/SparseLoCo checkpoints hold one state per replica (weights, AdamW moments, error buffers), so
    they resume only with local SGD and the same dp_replicate; DDP checkpoints hold one shared state.
    """
    saved = read_manifest(path)["layout"]
    saved_algorithm = saved.get("dp_algorithm", "ddp")
    ours = cfg.train.dp.algorithm.value
    if (saved_algorithm == "ddp") != (ours == "ddp"):
        raise CheckpointError(
            f"checkpoint {path} was saved with train.dp.algorithm={saved_algorithm} but this run uses {ours}: "
            "DDP keeps one shared state, DiLoCo/SparseLoCo one per replica; resume with "
            f"train.dp.algorithm={saved_algorithm} or start a new run (another train.run_dir / checkpoint.dir)."
        )
    if ours != "ddp" and saved["dp_replicate"] != dims.dp_replicate:
        raise CheckpointError(
            f"checkpoint {path} holds {saved['dp_replicate']} replicas' states but parallel.dp_replicate="
            f"{dims.dp_replicate}; resume with parallel.dp_replicate={saved['dp_replicate']} (dp_shard, cp and ep "
            "may change: each replica's state is resharded)."
        )


def _compute_dtype(cfg: Config, device_type: str) -> torch.dtype:
    choice = cfg.train.dtype
    if choice == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if choice in ("fp32", "bf16"):
        return torch.float32 if choice == "fp32" else torch.bfloat16
    raise ValueError(f"train.dtype={choice!r} must be auto, fp32 or bf16")


def build_model(cfg: Config, mesh: ParallelMesh, device_type: str, compute_dtype: torch.dtype) -> Transformer:
    """Build, initialise and shard the model identically on every layout.

    On the CPU the full model is initialised from the seed on every rank before sharding, so every layout
    starts from the same weights bit for bit (tested). On GPUs the model is built on the meta device, sharded,
    then materialised shard by shard from the CUDA generator, so no rank ever holds the full model; those
    weights differ from a CPU run of the same seed (the generators differ).
    """
    torch.manual_seed(cfg.train.seed)
    if device_type == "cpu":
        model = Transformer(cfg.model)
        install_context_parallelism(model, cfg, mesh)
        install_sparse_attention(model, cfg, mesh)
        install_expert_parallelism(model, cfg, mesh)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model.layers)
        apply_data_parallel(model, mesh, param_dtype=None, sync_replicas=not local_sgd(cfg))
        return model
    with torch.device("meta"):
        model = Transformer(cfg.model)
    install_context_parallelism(model, cfg, mesh)
    install_sparse_attention(model, cfg, mesh)
    install_expert_parallelism(model, cfg, mesh)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    param_dtype = compute_dtype if compute_dtype != torch.float32 else None
    apply_data_parallel(model, mesh, param_dtype=param_dtype, sync_replicas=not local_sgd(cfg))
    model.to_empty(device=device_type)
    with torch.no_grad():
        model.init_weights()
    return model


def _all_reduce(values: list[float], group, device: torch.device) -> list[float]:
    """Sum ``values`` over ``group`` (the world when None); on the compute device so NCCL can carry it."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t.tolist()


def _flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6 × active non-embedding parameters + causal attention (6·L·H·Dh·S / 2 · 2)."""
    m = cfg.model
    _, active = count_parameters(m)
    embedding = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    attention = 6 * m.n_layers * m.n_heads * m.resolved_head_dim() * cfg.train.seq_len
    return 6 * (active - embedding) + attention


class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm preemption or time limit); ranks agree on it once per step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    cfg: Config, mesh: ParallelMesh, device_type: str = "cpu", *, stop_after: int | None = None
) -> TrainResult:
    """Run ``cfg.train.steps`` optimizer steps (resuming from the newest checkpoint when there is one).

    ``stop_after`` ends this call after that many steps with a checkpoint, exactly as a preemption signal
    would (the schedule still spans ``cfg.train.steps``); a later call resumes. Collective over the whole
    world: every rank calls it with the same ``cfg`` and its ``mesh``.
    """
    dims = mesh.dims
    # DDP: every step is one job over the world. DiLoCo/SparseLoCo: between outer steps each replica is its
    # own job, so losses are normalised and reduced over the replica's ranks only.
    local = local_sgd(cfg)
    step_group = replica_group(mesh) if local else None
    step_world = dims.world_size // dims.dp_replicate if local else dims.world_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    is_main = rank == 0
    run_dir = Path(cfg.train.run_dir)
    compute_dtype = _compute_dtype(cfg, device_type)
    device = (
        torch.device(device_type, torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )

    source = build_source(cfg.data, cfg.train, run_dir)
    if source.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"data vocabulary has {source.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size>={source.vocab_size}"
        )
    dp_group = mesh.group("dp") if dims.dp > 1 else None
    sharding = _SequenceSharding(cfg, mesh)
    dp_rank = mesh.coordinate("dp")
    global_seqs = cfg.train.global_batch_tokens // cfg.train.seq_len
    step_seqs = global_seqs // dims.dp_replicate if local else global_seqs
    loader = StepLoader(
        source,
        seq_len=cfg.train.seq_len,
        global_batch_seqs=global_seqs,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dims.dp,
        seed=cfg.train.seed,
    )

    model = build_model(cfg, mesh, device_type, compute_dtype)
    moe_layers = model.moe_layers()
    optimizer = build_optimizer(model, cfg.train)
    outer = build_outer_step(model, cfg, mesh)
    checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    checkpointer = Checkpointer(
        checkpoint_dir,
        keep_last=cfg.checkpoint.keep_last,
        layout=dims.__dict__ | {"world_size": dims.world_size, "dp_algorithm": cfg.train.dp.algorithm.value},
        config_yaml=to_yaml(cfg),
        replica=mesh.coordinate("dp_replicate") if local else None,
    )

    start_step, tokens_seen, last_checkpoint = 0, 0, None
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        _check_resumable(latest, cfg, dims)
        extra = outer.state_dict() if outer is not None else None
        state = checkpointer.load(latest, model, optimizer, extra)
        if outer is not None:
            outer.load_state_dict(extra)
        start_step, tokens_seen = state["step"], state["tokens"]
        loader.load_state_dict(state["data"])
        last_checkpoint = latest
    elif cfg.checkpoint.init_from:
        checkpointer.load_model(cfg.checkpoint.init_from, model)
        if outer is not None:
            outer = build_outer_step(model, cfg, mesh)  # its θ is a copy of the weights: take the loaded ones

    metrics = MetricsLog(run_dir, enabled=is_main, resume_step=start_step if latest is not None else None)
    progress = ProgressLine(cfg.train.steps, start_step, enabled=is_main, every=cfg.train.log_every)
    live = LivePublisher(model, cfg.sync, progress.print) if cfg.sync.serve else None
    if latest is not None:
        progress.print(f"resumed from {latest} at step {start_step}")
    elif cfg.checkpoint.init_from:
        progress.print(f"model weights from {cfg.checkpoint.init_from}")
    micro_batches = global_seqs // (dims.dp * cfg.train.micro_batch_size)
    comm_bytes = fsdp_comm_bytes_per_step(model, mesh, micro_batches, sync_replicas=not local)
    flops_per_token = _flops_per_token(cfg)
    peak = peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None
    # Without FSDP (one data-parallel rank) there is no mixed-precision policy, so bf16 comes from autocast.
    use_autocast = device_type == "cuda" and step_world == 1 and compute_dtype != torch.float32
    autocast = torch.autocast("cuda", dtype=compute_dtype) if use_autocast else None
    stop = _StopFlag()
    losses: list[float] = []
    rates: list[float] = []
    eval_accuracy = None
    heldout = eval_indices(source, cfg)
    preempted = False
    try:
        for step in range(start_step, cfg.train.steps):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(step, cfg.train)
            batches = loader.batch(step)
            batches = [sharding.shard_batch(mb) for mb in batches]
            local_targets = sum(int((mb.targets_BS != -100).sum()) for mb in batches)
            # Every rank holds different tokens (dp: other sequences, cp: other parts): sum over the job.
            (global_targets,) = _all_reduce([float(local_targets)], step_group, device)
            if global_targets == 0:
                raise ValueError(f"step {step}: the global batch has no target tokens (every target is -100)")

            # Accumulated on the device; one host sync per step (the all-reduce below), not per micro-batch.
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # [token loss sum, aux loss share]
            moe_LS = None  # per layer: [tokens per expert (E), dropped, entropy sum]
            for moe in moe_layers:
                moe.dispatcher.sent_bytes = 0
            for index, mb in enumerate(batches):
                if hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(index == len(batches) - 1)
                tokens = mb.tokens_BS.to(device)
                targets = mb.targets_BS.to(device)
                context = autocast if autocast is not None else torch.autocast(device_type, enabled=False)
                with context:
                    out = model(
                        tokens, positions_BS=mb.positions_BS.to(device), doc_ids_BS=mb.doc_ids_BS.to(device)
                    )
                micro_loss = F.cross_entropy(
                    out.logits_BSV.float().flatten(0, 1),
                    targets.flatten(),
                    ignore_index=-100,
                    reduction="sum",
                )
                seq_share = tokens.shape[0] / step_seqs
                # FSDP averages gradients over the job's ranks; scale by their count so the sum is the mean.
                objective = (micro_loss / global_targets + out.aux_loss * seq_share) * step_world
                objective.backward()
                sums[0] += micro_loss.detach().double()
                sums[1] += out.aux_loss.detach().double() * seq_share
                micro_LS = torch.cat(
                    [out.tokens_per_expert_LE, out.dropped_L[:, None], out.entropy_L[:, None]], dim=1
                ).double()
                moe_LS = micro_LS if moe_LS is None else moe_LS + micro_LS

            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            grad_norm = clip_grad_norm(model.parameters(), max_norm)
            if step_world > 1:
                dist.all_reduce(sums, group=step_group)
                dist.all_reduce(moe_LS, group=step_group)
            load_LE, dropped_L = moe_LS[:, :-2], moe_LS[:, -2]
            entropy_L = moe_LS[:, -1] / (step_world * len(batches))
            global_loss_sum, global_aux = sums.tolist()
            loss = global_loss_sum / global_targets
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                raise TrainingDiverged(
                    f"non-finite {what} at step {step + 1} on rank {rank} (loss={loss}, grad_norm={grad_norm}); "
                    f"lower train.lr (now {cfg.train.lr}) or set train.grad_clip > 0, then resume from the last checkpoint."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Identical on every rank of the job (all-reduced), so load-based balancing (the expert bias)
            # stays in step; local-SGD replicas re-join their biases at the outer step.
            model.update_router_balance(load_LE.float())
            is_last = step + 1 == cfg.train.steps
            outer_stats, outer_bytes = None, 0
            if outer is not None and (is_last or (step + 1) % cfg.train.dp.inner_steps == 0):
                # The last step drains everything in flight, so the run ends on one θ on every replica.
                outer_stats = outer.finish() if is_last else outer.step()
                outer_bytes = outer_stats.sent_bytes + average_buffers_over_replicas(model, mesh)

            load_fraction_LE = (load_LE / load_LE.sum(dim=1, keepdim=True).clamp_min(1)).cpu()
            max_over_mean_L = load_fraction_LE.max(dim=1).values * load_fraction_LE.shape[1]
            # Load per EP rank: experts are laid out contiguously, E/ep per rank.
            rank_load_LR = load_fraction_LE.view(load_LE.shape[0], dims.ep, -1).sum(dim=2)
            rank_max_over_mean = float((rank_load_LR.max(dim=1).values * dims.ep).max())
            # Relative to the token choices T·k of every layer (expert-choice routers choose as many).
            choices = step_seqs * cfg.train.seq_len * cfg.model.top_k * load_LE.shape[0]
            dropped_fraction = float(dropped_L.sum()) / choices
            elapsed = time.perf_counter() - started
            step_tokens = global_seqs * cfg.train.seq_len
            tokens_seen += step_tokens
            rate = step_tokens / elapsed
            rates.append(rate)
            losses.append(loss)
            record = {
                "step": step + 1,
                "loss": loss,
                "aux_loss": global_aux,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_s": rate,
                "step_time_s": elapsed,
                "comm_bytes": comm_bytes
                + sum(moe.dispatcher.sent_bytes for moe in moe_layers) * 2
                + outer_bytes,
                "mfu": flops_per_token * rate / (peak * dims.world_size) if peak else None,
                "expert_load": load_fraction_LE.tolist(),
                "expert_load_max_over_mean": float(max_over_mean_L.max()),
                "expert_tokens": load_LE.cpu().tolist(),
                "ep_rank_load_max_over_mean": rank_max_over_mean,
                "dropped_tokens": dropped_L.cpu().tolist(),
                "dropped_fraction": dropped_fraction,
                "router_entropy": entropy_L.cpu().tolist(),
            }
            if outer_stats is not None:
                record |= _outer_record(outer_stats)
            published = live.after_step(step + 1, is_last) if live is not None else None
            if published is not None:
                record |= {
                    "sync_version": published.version,
                    "sync_payload_bytes": published.payload_bytes,
                    "sync_changed_fraction": published.changed_fraction,
                    "sync_encode_s": published.encode_s,
                }
            if heldout and (is_last or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0)):
                scores = evaluate(model, source, heldout, cfg, device, dp_group, dims.dp, dp_rank)
                record |= scores
                eval_accuracy = scores.get("eval_accuracy", eval_accuracy)
                if source.has_accuracy:
                    record["eval_task"] = cfg.data.task
            metrics.write(record)
            status = (
                f"loss {loss:.4f}  lr {record['lr']:.2e}  {rate:,.0f} tok/s  "
                f"load max/mean {record['expert_load_max_over_mean']:.2f}"
            )
            if dims.ep > 1:
                status += f" (ep ranks {rank_max_over_mean:.2f})"
            if dropped_fraction:
                status += f"  dropped {dropped_fraction:.1%}"
            if outer_stats is not None:
                status += f"  outer ×{outer_stats.ratio_vs_bf16:,.0f} vs bf16"
            if "eval_loss" in record:
                status += f"  eval loss {record['eval_loss']:.4f}"
            if "eval_accuracy" in record:
                status += f"  {cfg.data.task} acc {eval_accuracy:.2%}"
            progress.update(step, status)

            (stop_now,) = _all_reduce([1.0 if stop.raised else 0.0], None, device)
            stop_now = stop_now or (stop_after is not None and len(losses) >= stop_after and not is_last)
            interval = cfg.checkpoint.interval
            if is_last or stop_now or (interval and (step + 1) % interval == 0):
                trainer_state = {"step": step + 1, "tokens": tokens_seen, "data": loader.state_dict()}
                extra = outer.state_dict() if outer is not None else None
                last_checkpoint = checkpointer.save(step + 1, model, optimizer, trainer_state, extra)
            if stop_now:
                preempted = True
                progress.print(f"stopping: saved {last_checkpoint} after step {step + 1}; rerun to resume")
                break
    finally:
        if live is not None:
            live.close(cfg.sync.linger if not preempted else 0.0)
        progress.close()
        stop.restore()
    return TrainResult(
        steps_done=start_step + len(losses),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        mean_tokens_per_s=sum(rates) / len(rates) if rates else 0.0,
        run_dir=run_dir,
        checkpoint=last_checkpoint,
        preempted=preempted,
        eval_accuracy=eval_accuracy,
        losses=losses,
    )


def eval_indices(source, cfg: Config) -> list[int]:
    """The held-out samples evaluation scores: the synthetic task's held-out range, or a packed source's
    held-out windows (``data.heldout_windows``); at most ``train.eval_samples``. Empty: nothing to evaluate."""
    if source.has_accuracy:
        return list(heldout_indices(cfg.train.eval_samples))
    heldout = source.heldout_indices() if hasattr(source, "heldout_indices") else range(0)
    return list(heldout)[: cfg.train.eval_samples]


@torch.no_grad()
def evaluate(
    model, source, indices: list[int], cfg: Config, device, dp_group, dp_size: int, dp_rank: int
) -> dict[str, float]:
    """Held-out loss (mean over target tokens) and, for synthetic tasks, exact-match accuracy of ``indices``,
    split over the data-parallel ranks (all-reduce over ``dp_group``).

    Every rank scores the same number of samples (FSDP's collectives in forward must match across ranks),
    so the list is padded to a multiple of dp_size by repeating samples, and the padding is not counted.
    """
    count = len(indices)
    per_rank = math.ceil(count / dp_size)
    slots = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    batch = cfg.train.micro_batch_size
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    for first in range(0, per_rank, batch):
        mine = [slot for slot in slots[first : first + batch]]
        samples = [source[indices[slot % count]] for slot in mine]
        mb = MicroBatch.stack(samples, torch.tensor([indices[slot % count] for slot in mine]))
        out = model(
            mb.tokens_BS.to(device),
            positions_BS=mb.positions_BS.to(device),
            doc_ids_BS=mb.doc_ids_BS.to(device),
        )
        counted_B = torch.tensor([slot < count for slot in mine])
        targets_BS = mb.targets_BS.to(device).masked_fill(~counted_B.to(device)[:, None], -100)
        loss_sum += float(
            F.cross_entropy(
                out.logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        tokens += int((targets_BS != -100).sum())
        if source.has_accuracy:
            hits = answers_correct(out.logits_BSV, mb.targets_BS)
            correct += sum(hit for hit, counted in zip(hits, counted_B.tolist(), strict=True) if counted)
    model.train(was_training)
    if dp_size > 1:
        loss_sum, tokens, correct = _all_reduce([loss_sum, float(tokens), float(correct)], dp_group, device)
    result = {"eval_loss": loss_sum / max(tokens, 1)}
    if source.has_accuracy:
        result["eval_accuracy"] = correct / count
    return result
