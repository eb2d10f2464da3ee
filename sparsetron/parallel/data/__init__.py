"""Data parallelism: FSDP2 inside a replica, DDP across replicas (DiLoCo / SparseLoCo arrive later)."""

from sparsetron.parallel.data.fsdp import apply_data_parallel, fsdp_comm_bytes_per_step

__all__ = ["apply_data_parallel", "fsdp_comm_bytes_per_step"]
