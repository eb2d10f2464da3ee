"""Resumable distributed checkpoints: DCP save/load with resharding, atomic commits and hashed manifests."""

from sparsetron.checkpoint.dcp import Checkpointer, verify
from sparsetron.checkpoint.manifest import CheckpointError, read_manifest

__all__ = ["CheckpointError", "Checkpointer", "read_manifest", "verify"]
