"""Training: the per-rank worker, and (with the trainer issue) the loop, data and metrics."""
