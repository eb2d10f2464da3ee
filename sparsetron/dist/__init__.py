"""How processes find and talk to each other: discovery, layout, meshes."""

from sparsetron.dist.env import ProcessEnv, discover, init_distributed
from sparsetron.dist.errors import DistEnvError, LayoutError
from sparsetron.dist.layout import ParallelDims, ParallelMesh

__all__ = ["DistEnvError", "LayoutError", "ParallelDims", "ParallelMesh", "ProcessEnv", "discover", "init_distributed"]
