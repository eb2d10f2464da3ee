"""Block-sparse attention as a model attention core: estimates the layer's pattern from its own q and k each
step (a constant for the gradients) and attends only within it.

Without context parallelism, on CUDA the block-sparse Triton kernel attends within the pattern
(:mod:`sparsetron.kernels.block_sparse`); elsewhere the pattern's token mask goes to SDPA (exact; O(S²) mask
memory, like the reference core's document mask). With it, every rank estimates the same global pattern
(:mod:`sparsetron.parallel.context.pattern_estimation`) and runs the sparse ring on the striped layout
(:func:`sparsetron.parallel.context.context_attention` with ``method="sparse_ring"``). ``model.attention_pattern``
and the ``model.sparse_*`` keys choose the pattern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.config import ModelConfig
from sparsetron.kernels.block_sparse import block_sparse_attention
from sparsetron.parallel.context.pattern_estimation import estimate_pattern
from sparsetron.parallel.context.patterns import BlockPattern, sliding_window_sinks, strided
from sparsetron.parallel.context.sparse_compute import resolve_backend

PATTERNS = ("window", "strided", "block_topk", "vertical_slash")


def build_pattern(cfg: ModelConfig, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, group, seq: int, layout: str,
                  layout_block: int) -> BlockPattern:  # fmt: skip
    """The layer's global pattern for this step from this rank's q/k shards (collective over ``group``)."""
    kind, block = cfg.attention_pattern, cfg.sparse_block
    batch, kv_heads, device = q_BSHD.shape[0], k_BSHD.shape[2], q_BSHD.device
    if kind == "window":
        return sliding_window_sinks(batch, kv_heads, seq, block, window_blocks=cfg.sparse_local_blocks,
                                    sink_blocks=cfg.sparse_sink_blocks, device=device)  # fmt: skip
    if kind == "strided":
        return strided(batch, kv_heads, seq, block, stride=cfg.sparse_stride, local_blocks=cfg.sparse_local_blocks,
                       device=device)  # fmt: skip
    if kind == "block_topk":
        options = {"k": cfg.sparse_topk, "local_blocks": cfg.sparse_local_blocks}
    elif kind == "vertical_slash":
        options = {"verticals": cfg.sparse_verticals, "slashes": cfg.sparse_slashes, "last_q": cfg.sparse_last_q,
                   "sink_blocks": cfg.sparse_sink_blocks, "window_blocks": cfg.sparse_local_blocks}  # fmt: skip
    else:
        raise ValueError(f"model.attention_pattern={kind!r} is not one of dense, {', '.join(PATTERNS)}")
    return estimate_pattern(kind, q_BSHD, k_BSHD, group, layout=layout, layout_block=layout_block, block=block,
                            **options)  # fmt: skip


class SparseAttention(nn.Module):
    """Attention core (``Transformer.set_attention_core``) attending within ``cfg``'s block-sparse pattern.

    ``group``: the context-parallel group (None: the whole sequence is local); with a group, the shards are
    striped with ``block = cfg.sparse_block``. ``node_groups``: the group's node-local and cross-node groups
    (``sparse_hier.HierarchyGroups``, built once for the run) to attend over the hierarchical sparse ring
    instead of the flat one. No parameters.
    """

    def __init__(self, cfg: ModelConfig, group=None, node_groups=None) -> None:
        super().__init__()
        if cfg.attention_pattern not in PATTERNS:
            raise ValueError(
                f"model.attention_pattern={cfg.attention_pattern!r} is not one of {', '.join(PATTERNS)}"
            )
        self.cfg, self.group, self.node_groups = cfg, group, node_groups

    def forward(self, q_BSHD, k_BSHD, v_BSHD, *, doc_ids_BS=None, positions_BS=None) -> torch.Tensor:
        if doc_ids_BS is not None and self._packs_documents(doc_ids_BS):
            raise ValueError(
                "block-sparse attention does not mask documents yet, and a sequence holds several; train it on "
                "one document per sequence (data.source=synthetic) or with model.attention_pattern=dense"
            )
        world = 1 if self.group is None else torch.distributed.get_world_size(self.group)
        seq = q_BSHD.shape[1] * world
        pattern = build_pattern(self.cfg, q_BSHD.detach(), k_BSHD.detach(), self.group, seq, "striped",
                                self.cfg.sparse_block)  # fmt: skip
        if self.group is not None:
            from sparsetron.parallel.context import context_attention

            node_size = None if self.node_groups is None else self.node_groups.node_size
            return context_attention(q_BSHD, k_BSHD, v_BSHD, group=self.group, method="sparse_ring",
                                     layout="striped", block=self.cfg.sparse_block, pattern=pattern,
                                     node_size=node_size, node_groups=self.node_groups)  # fmt: skip
        if resolve_backend("auto", q_BSHD, pattern.block) == "triton":
            return block_sparse_attention(q_BSHD, k_BSHD, v_BSHD, pattern)[0]
        groups = q_BSHD.shape[2] // k_BSHD.shape[2]
        mask = pattern.token_mask(heads_per_group=groups)  # [B, Hq, S, S]
        out = F.scaled_dot_product_attention(
            q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), attn_mask=mask,
            scale=q_BSHD.shape[-1] ** -0.5, enable_gqa=groups > 1,
        )  # fmt: skip
        return out.transpose(1, 2)

    def _packs_documents(self, doc_ids_BS: torch.Tensor) -> bool:
        """Whether any sequence holds more than one document (agreed over the cp group, so all ranks raise)."""
        several = (doc_ids_BS != doc_ids_BS[:, :1]).any().float().reshape(1)
        if self.group is not None:
            # Shards of one document can still carry different ids on different ranks: compare the firsts too.
            firsts = doc_ids_BS[:, :1].float()
            low, high = firsts.clone(), firsts.clone()
            torch.distributed.all_reduce(low, torch.distributed.ReduceOp.MIN, group=self.group)
            torch.distributed.all_reduce(high, torch.distributed.ReduceOp.MAX, group=self.group)
            several = torch.maximum(several, (low != high).any().float().reshape(1))
            torch.distributed.all_reduce(several, torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(several.item())

    def extra_repr(self) -> str:
        ring = "" if self.node_groups is None else f", node_size={self.node_groups.node_size}"
        return f"pattern={self.cfg.attention_pattern}, block={self.cfg.sparse_block}{ring}"
