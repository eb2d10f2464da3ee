"""Expert parallelism: routers and balancing losses, token dispatch (EP all-to-all), grouped experts, the MoE layer."""

from sparsetron.parallel.expert.dispatch import Assignments, ExpertDispatcher
from sparsetron.parallel.expert.experts import SwiGLU, SwiGLUExperts
from sparsetron.parallel.expert.moe import AUX_LOSSES, MoE, MoEStats
from sparsetron.parallel.expert.router import ROUTERS, Router, Routing, build_router

__all__ = [
    "AUX_LOSSES",
    "ROUTERS",
    "Assignments",
    "ExpertDispatcher",
    "MoE",
    "MoEStats",
    "Router",
    "Routing",
    "SwiGLU",
    "SwiGLUExperts",
    "build_router",
]
