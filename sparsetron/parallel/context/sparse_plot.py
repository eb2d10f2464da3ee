"""Pictures of a sparse ring: the block pattern of one head and the per-rank × per-step work of its plan.

:func:`plot_pattern` draws a :class:`~sparsetron.parallel.context.patterns.BlockPattern`'s bitmap for one
(batch, KV head): active (query block, key block) pairs dark, inactive ones white, the blocks a causal mask
never computes grey, and the pattern's bars (vertical key columns) as red vertical lines from the query block
holding the column down to the last query. :func:`plot_work` draws a
:class:`~sparsetron.parallel.context.sparse_plan.StripedPlan`'s ``work_RS`` as a heatmap (rank rows × step
columns, counts written in the cells while they fit) over the per-step max/mean imbalance, so the step a ring
waits on and the steps it skips stand out.

Both build standalone :class:`~matplotlib.figure.Figure` objects on an Agg canvas (as ``sparsetron report``
does), never pyplot's, so plotting leaves no open figures and no backend choice behind in the caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from sparsetron.parallel.context.patterns import BlockPattern
from sparsetron.parallel.context.sparse_plan import StripedPlan

DPI = 130
#: Bitmap colours: never computed under the causal mask, inactive, active.
PATTERN_COLORS = ("#dcdcdc", "#ffffff", "#1f5fa8")
BAR_COLOR = "#d62728"
IDLE_COLOR = "#c8c8c8"
#: Widest work matrix whose cells still get their counts written in.
MAX_ANNOTATED_WORLD = 16


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_pattern(pattern: BlockPattern, path: str | Path, batch: int = 0, kv_head: int = 0) -> Path:
    """Write the block bitmap of ``pattern`` for one (``batch``, ``kv_head``) as a PNG at ``path``; return it.

    Rows are query blocks, columns key blocks (block 0 top left). The title gives the head's density (its
    active blocks over the blocks dense attention computes, the causal triangle when causal) next to the
    whole pattern's, and the head's bar count; bars are drawn as vertical lines over the queries they reach.
    """
    active = pattern.active_BHQK
    n_batch, n_heads, n_q, n_k = active.shape
    if not (0 <= batch < n_batch and 0 <= kv_head < n_heads):
        raise ValueError(
            f"batch={batch}, kv_head={kv_head} out of range for a pattern of {n_batch} batch rows and "
            f"{n_heads} KV heads"
        )
    head = active[batch, kv_head].cpu().numpy().astype(np.int8)
    if pattern.causal:
        causal = np.tril(np.ones((n_q, n_k), dtype=bool))
        image = np.where(causal, 1 + head, 0)
        dense = int(causal.sum())
    else:
        image = 1 + head
        dense = n_q * n_k
    head_density = float(head.sum()) / dense
    bars = np.zeros(0, dtype=np.int64)
    if pattern.bars_BHS is not None:
        bars = torch.nonzero(pattern.bars_BHS[batch, kv_head]).flatten().cpu().numpy()

    side = 6.0
    fig = _new_figure(side + 0.6, side + 0.4)
    ax = fig.add_subplot()
    # Upsampled bitmaps keep sharp blocks; ones wider than the axes in pixels are averaged, not aliased.
    axes_pixels = 0.8 * side * DPI
    interpolation = "nearest" if max(n_q, n_k) <= axes_pixels / 2 else "antialiased"
    ax.imshow(
        image,
        cmap=ListedColormap(PATTERN_COLORS),
        vmin=0,
        vmax=2,
        interpolation=interpolation,
        aspect="equal",
    )
    if len(bars):
        # Token column c sits at (c + ½)/block − ½ in block coordinates; it reaches queries from its own block on.
        x = (bars + 0.5) / pattern.block - 0.5
        top = bars // pattern.block - 0.5 if pattern.causal else np.full(len(bars), -0.5)
        ax.vlines(x, top, n_q - 0.5, colors=BAR_COLOR, linewidth=0.8, alpha=0.8)
    ax.set_xlim(-0.5, n_k - 0.5)
    ax.set_ylim(n_q - 0.5, -0.5)
    ax.set_xlabel(f"key block ({pattern.block} tokens)")
    ax.set_ylabel("query block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Patch(facecolor=PATTERN_COLORS[2], label="active")]
    if pattern.causal:
        handles.append(Patch(facecolor=PATTERN_COLORS[0], label="causal mask"))
    if len(bars):
        handles.append(Patch(facecolor=BAR_COLOR, label=f"bars ({len(bars)} key columns)"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    ax.set_title(
        f"batch {batch}, KV head {kv_head}: density {head_density:.1%} (all heads {pattern.density():.1%}), "
        f"{n_q}×{n_k} blocks",
        fontsize=10,
    )
    return _save(fig, path)


def plot_work(plan: StripedPlan, path: str | Path) -> Path:
    """Write ``plan.work_RS`` as a heatmap PNG at ``path`` (rank rows × ring-step columns); return the path.

    Cells hold the active block pairs each rank computes at each step (written in while the world is at most
    :data:`MAX_ANNOTATED_WORLD`); idle steps (no rank has work, a sparse ring skips them) are grey. Below, the
    per-step max/mean over ranks. The title gives the worst step's max/mean and the idle steps.
    """
    work = plan.work_RS.cpu().numpy()
    world = plan.world
    per_step = plan.step_imbalance().cpu().numpy()
    idle = plan.idle_steps()
    worst = int(np.argmax(per_step))

    side = min(4.0 + 0.35 * world, 12.0)
    fig = _new_figure(side + 1.2, side + 1.6)
    grid = fig.add_gridspec(2, 1, height_ratios=[4, 1])
    ax = fig.add_subplot(grid[0])
    masked = np.ma.masked_array(work, mask=np.broadcast_to(work.sum(axis=0) == 0, work.shape))
    cmap = colormaps["viridis"].with_extremes(bad=IDLE_COLOR)
    shown = ax.imshow(masked, cmap=cmap, vmin=0, vmax=max(int(work.max()), 1), aspect="auto")
    fig.colorbar(shown, ax=ax, label="active block pairs")
    if world <= MAX_ANNOTATED_WORLD:
        threshold = 0.6 * max(int(work.max()), 1)
        size = 9 if world <= 8 else 7
        for r in range(world):
            for s in range(world):
                color = "black" if work[r, s] >= threshold or s in idle else "white"
                ax.text(s, r, str(int(work[r, s])), ha="center", va="center", fontsize=size, color=color)
    ax.set_xlabel("ring step (source rank = (rank − step) mod W)")
    ax.set_ylabel("rank")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    idle_text = ", ".join(map(str, idle)) if idle else "none"
    ax.set_title(
        f"work per rank × step, W={world}: worst step {worst} max/mean {per_step[worst]:.2f}; "
        f"idle steps: {idle_text}",
        fontsize=10,
    )

    bar_ax = fig.add_subplot(grid[1])
    colors = [IDLE_COLOR if s in idle else "#b8413b" if s == worst else "#1f5fa8" for s in range(world)]
    bar_ax.bar(np.arange(world), per_step, color=colors)
    bar_ax.axhline(1.0, color="#555555", linewidth=0.8, linestyle="--")
    bar_ax.set_xlim(-0.5, world - 0.5)
    bar_ax.set_ylim(0, max(float(per_step.max()) * 1.1, 1.1))
    bar_ax.set_xlabel("ring step")
    bar_ax.set_ylabel("max/mean")
    bar_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)
