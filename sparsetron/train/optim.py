"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsetron.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters (plain or FSDP2 DTensor).

    Weight decay applies to parameters with two or more dimensions (projections, stacked experts,
    embeddings); norms and biases are not decayed, as in GPT-style training.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule as a ``LambdaLR`` (its step count is restored from the trainer state)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the global L2 norm of the gradients to ``max_norm`` (``inf``: measure only); return the norm.

    Gradients may be DTensors on different meshes (dense weights sharded over ``dp_shard × cp``, routed
    experts over ``edp × ep``), which ``torch.nn.utils.clip_grad_norm_`` cannot stack. So the norm is taken
    per mesh (a collective over that mesh), combined on the host side of the math, and every gradient is
    scaled by the same coefficient. Plain tensors form their own group (no communication).
    """
    by_mesh: dict[object, list[torch.nn.Parameter]] = {}
    for param in parameters:
        if param.grad is not None:
            by_mesh.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    if not by_mesh:
        return 0.0
    norms = []
    for params in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    for params in by_mesh.values():
        # Takes parameters (it scales their .grad), not the gradients themselves.
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
