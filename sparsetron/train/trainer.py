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

from sparsetron.checkpoint import Checkpointer
from sparsetron.config import Config, to_yaml
from sparsetron.dist.layout import ParallelMesh
from sparsetron.model import Transformer, count_parameters
from sparsetron.parallel.context import ContextParallelAttention, shard_sequence, unshard_sequence
from sparsetron.parallel.data.fsdp import (
    apply_activation_checkpointing,
    apply_data_parallel,
    fsdp_comm_bytes_per_step,
)
from sparsetron.train.data import MicroBatch, StepLoader, build_source
from sparsetron.train.metrics import MetricsLog, ProgressLine, peak_flops
from sparsetron.train.optim import build_optimizer, clip_grad_norm, lr_factor
from sparsetron.train.synthetic import heldout_indices


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the message names the step, the rank and what to change."""


class NotAvailableYet(RuntimeError):
    """A configured feature whose implementation lands in a later issue."""


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


def _refuse_unavailable(cfg: Config) -> None:
    p = cfg.parallel
    if p.cp_method.value == "sparse_ring":
        raise NotAvailableYet(
            "parallel.cp_method=sparse_ring: sparse context parallelism is not available yet (it lands with its "
            "own issue); use parallel.cp_method=ring, ulysses, hybrid or allgather."
        )
    if cfg.train.dp.algorithm.value != "ddp":
        raise NotAvailableYet(
            f"train.dp.algorithm={cfg.train.dp.algorithm.value} is not available yet (DiLoCo/SparseLoCo land with "
            "the SparseLoCo issue); use train.dp.algorithm=ddp."
        )


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
    model.set_attention_core(
        ContextParallelAttention(group, method=p.cp_method.value, layout=p.cp_layout.value, block=block)
    )
    model.set_sequence_group(mesh.group("cp"))


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
        model.set_batch_group(dist.group.WORLD)


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
        install_expert_parallelism(model, cfg, mesh)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model.layers)
        apply_data_parallel(model, mesh, param_dtype=None)
        return model
    with torch.device("meta"):
        model = Transformer(cfg.model)
    install_context_parallelism(model, cfg, mesh)
    install_expert_parallelism(model, cfg, mesh)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    param_dtype = compute_dtype if compute_dtype != torch.float32 else None
    apply_data_parallel(model, mesh, param_dtype=param_dtype)
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
    _refuse_unavailable(cfg)
    dims = mesh.dims
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
    checkpoint_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    checkpointer = Checkpointer(
        checkpoint_dir,
        keep_last=cfg.checkpoint.keep_last,
        layout=dims.__dict__ | {"world_size": dims.world_size},
        config_yaml=to_yaml(cfg),
    )

    start_step, tokens_seen, last_checkpoint = 0, 0, None
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        state = checkpointer.load(latest, model, optimizer)
        start_step, tokens_seen = state["step"], state["tokens"]
        loader.load_state_dict(state["data"])
        last_checkpoint = latest

    metrics = MetricsLog(run_dir, enabled=is_main, resume_step=start_step if latest is not None else None)
    progress = ProgressLine(cfg.train.steps, start_step, enabled=is_main, every=cfg.train.log_every)
    if latest is not None:
        progress.print(f"resumed from {latest} at step {start_step}")
    micro_batches = global_seqs // (dims.dp * cfg.train.micro_batch_size)
    comm_bytes = fsdp_comm_bytes_per_step(model, mesh, micro_batches)
    flops_per_token = _flops_per_token(cfg)
    peak = peak_flops(torch.cuda.get_device_name()) if device_type == "cuda" else None
    # Without FSDP (one data-parallel rank) there is no mixed-precision policy, so bf16 comes from autocast.
    use_autocast = device_type == "cuda" and dims.world_size == 1 and compute_dtype != torch.float32
    autocast = torch.autocast("cuda", dtype=compute_dtype) if use_autocast else None
    stop = _StopFlag()
    losses: list[float] = []
    rates: list[float] = []
    eval_accuracy = None
    preempted = False
    try:
        for step in range(start_step, cfg.train.steps):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(step, cfg.train)
            batches = loader.batch(step)
            batches = [sharding.shard_batch(mb) for mb in batches]
            local_targets = sum(int((mb.targets_BS != -100).sum()) for mb in batches)
            # Every rank holds different tokens (dp: other sequences, cp: other parts): sum over the world.
            (global_targets,) = _all_reduce([float(local_targets)], None, device)
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
                seq_share = tokens.shape[0] / global_seqs
                # FSDP averages gradients over all ranks; scale by the world so their sum is the global mean.
                objective = (micro_loss / global_targets + out.aux_loss * seq_share) * dims.world_size
                objective.backward()
                sums[0] += micro_loss.detach().double()
                sums[1] += out.aux_loss.detach().double() * seq_share
                micro_LS = torch.cat(
                    [out.tokens_per_expert_LE, out.dropped_L[:, None], out.entropy_L[:, None]], dim=1
                ).double()
                moe_LS = micro_LS if moe_LS is None else moe_LS + micro_LS

            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            grad_norm = clip_grad_norm(model.parameters(), max_norm)
            if dims.world_size > 1:
                dist.all_reduce(sums)
                dist.all_reduce(moe_LS)
            load_LE, dropped_L = moe_LS[:, :-2], moe_LS[:, -2]
            entropy_L = moe_LS[:, -1] / (dims.world_size * len(batches))
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
            # Identical on every rank (all-reduced), so load-based balancing (the expert bias) stays in step.
            model.update_router_balance(load_LE.float())

            load_fraction_LE = (load_LE / load_LE.sum(dim=1, keepdim=True).clamp_min(1)).cpu()
            max_over_mean_L = load_fraction_LE.max(dim=1).values * load_fraction_LE.shape[1]
            # Load per EP rank: experts are laid out contiguously, E/ep per rank.
            rank_load_LR = load_fraction_LE.view(load_LE.shape[0], dims.ep, -1).sum(dim=2)
            rank_max_over_mean = float((rank_load_LR.max(dim=1).values * dims.ep).max())
            # Relative to the token choices T·k of every layer (expert-choice routers choose as many).
            choices = global_seqs * cfg.train.seq_len * cfg.model.top_k * load_LE.shape[0]
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
                "comm_bytes": comm_bytes + sum(moe.dispatcher.sent_bytes for moe in moe_layers) * 2,
                "mfu": flops_per_token * rate / (peak * dims.world_size) if peak else None,
                "expert_load": load_fraction_LE.tolist(),
                "expert_load_max_over_mean": float(max_over_mean_L.max()),
                "expert_tokens": load_LE.cpu().tolist(),
                "ep_rank_load_max_over_mean": rank_max_over_mean,
                "dropped_tokens": dropped_L.cpu().tolist(),
                "dropped_fraction": dropped_fraction,
                "router_entropy": entropy_L.cpu().tolist(),
            }
            is_last = step + 1 == cfg.train.steps
            if source.has_accuracy and (
                is_last or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0)
            ):
                eval_accuracy = evaluate(model, source, cfg, device, dp_group, dims.dp, dp_rank, sharding)
                record["eval_accuracy"] = eval_accuracy
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
            if "eval_accuracy" in record:
                status += f"  {cfg.data.task} acc {eval_accuracy:.2%}"
            progress.update(step, status)

            (stop_now,) = _all_reduce([1.0 if stop.raised else 0.0], None, device)
            stop_now = stop_now or (stop_after is not None and len(losses) >= stop_after and not is_last)
            interval = cfg.checkpoint.interval
            if is_last or stop_now or (interval and (step + 1) % interval == 0):
                trainer_state = {"step": step + 1, "tokens": tokens_seen, "data": loader.state_dict()}
                last_checkpoint = checkpointer.save(step + 1, model, optimizer, trainer_state)
            if stop_now:
                preempted = True
                progress.print(f"stopping: saved {last_checkpoint} after step {step + 1}; rerun to resume")
                break
    finally:
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


@torch.no_grad()
def evaluate(model, source, cfg: Config, device, dp_group, dp_size: int, dp_rank: int, sharding) -> float:
    """Held-out accuracy of the synthetic task, split over the data-parallel ranks (all-reduce over dp);
    context-parallel ranks score the same samples together (inputs sharded, logits gathered over cp).

    Every rank scores the same number of samples (FSDP's collectives in forward must match across ranks),
    so the sample list is padded to a multiple of dp_size and the padding is not counted.
    """
    per_rank = math.ceil(cfg.train.eval_samples / dp_size)
    # Held-out indices lie far beyond anything training reads; slot j of the padded list is counted if j < n.
    heldout = list(heldout_indices(per_rank * dp_size))
    slots = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    indices = [heldout[j] for j in slots]

    def model_fn(tokens_BS, positions_BS, doc_ids_BS):
        out = model(
            tokens_BS.to(device), positions_BS=positions_BS.to(device), doc_ids_BS=doc_ids_BS.to(device)
        )
        return out.logits_BSV

    was_training = model.training
    model.eval()
    hits = source.sample_correct(model_fn, indices)
    model.train(was_training)
    counted = [hit for slot, hit in zip(slots, hits, strict=True) if slot < cfg.train.eval_samples]
    if dp_size == 1:
        return sum(counted) / len(counted)
    total_correct, total = _all_reduce([float(sum(counted)), float(len(counted))], dp_group, device)
    return total_correct / total
