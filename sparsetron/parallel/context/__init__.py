"""Context parallelism: layouts, and exact ring / Ulysses / hybrid / all-gather attention."""

from sparsetron.parallel.context.api import ContextParallelAttention, ContextParallelError, context_attention
from sparsetron.parallel.context.layouts import (
    ShardingError,
    global_token_index,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "ContextParallelAttention",
    "ContextParallelError",
    "ShardingError",
    "context_attention",
    "global_token_index",
    "shard_sequence",
    "unshard_sequence",
]
