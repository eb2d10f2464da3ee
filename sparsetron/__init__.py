"""sparsetron: sparse context, expert and communication parallelism for MoE training."""

__version__ = "0.1.0"
