"""Expert parallelism's building blocks; for now the single-process MoE layer, its routers and experts."""

from sparsetron.parallel.expert.experts import SwiGLU, SwiGLUExperts
from sparsetron.parallel.expert.moe import MoE, MoEStats, sequence_aux_loss
from sparsetron.parallel.expert.router import ROUTERS, Router, RouterOutput, SoftmaxTopKRouter, build_router

__all__ = [
    "ROUTERS",
    "MoE",
    "MoEStats",
    "Router",
    "RouterOutput",
    "SoftmaxTopKRouter",
    "SwiGLU",
    "SwiGLUExperts",
    "build_router",
    "sequence_aux_loss",
]
