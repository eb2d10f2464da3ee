"""CUDA-event timing shared by the benchmark scripts (they run as ``python3 benchmarks/NAME.py``)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def median_seconds(fn, reps: int, *, warmup: int = 2, barrier: bool = False) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after ``warmup`` runs, timed with CUDA events.

    ``barrier``: all ranks of the default group line up before each run (collective benchmarks), so one
    rank's late start is not timed as communication.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if barrier:
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
