"""Pictures of sparse rings: the block-pattern and work-matrix PNGs (``sparsetron bench sparse-cp --plot``:
tests/test_bench_cli.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from sparsetron.parallel.context.patterns import (
    block_topk,
    from_block_mask,
    pool_blocks,
    sliding_window_sinks,
    strided,
    vertical_slash,
)
from sparsetron.parallel.context.sparse_plan import plan_striped
from sparsetron.parallel.context.sparse_plot import (
    BAR_COLOR,
    IDLE_COLOR,
    PATTERN_COLORS,
    plot_pattern,
    plot_work,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEQ, BLOCK, WORLD = 512, 16, 4


def _pattern(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "window":
        return sliding_window_sinks(1, 2, SEQ, BLOCK, window_blocks=3, sink_blocks=1)
    if kind == "strided":
        return strided(1, 2, SEQ, BLOCK, stride=4)
    q = torch.randn(1, SEQ, 4, 32, generator=g)
    k = torch.randn(1, SEQ, 2, 32, generator=g)
    if kind == "topk":
        return block_topk(pool_blocks(q, BLOCK), pool_blocks(k, BLOCK), BLOCK, k=4)
    return vertical_slash(q[:, -32:], k, BLOCK, verticals=6, slashes=3)


def _read_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    return image[..., :3]


def _pixels_of(image: np.ndarray, color: str, tolerance: float = 2 / 255) -> int:
    """Pixels within ``tolerance`` of ``color`` on every channel."""
    return int((np.abs(image - np.array(to_rgb(color))) <= tolerance).all(axis=-1).sum())


@pytest.mark.parametrize("kind", ["window", "strided", "topk", "vertical_slash"])
def test_pattern_and_work_pngs_are_written_for_each_kind(kind, tmp_path):
    pattern = _pattern(kind)
    plan = plan_striped(pattern, WORLD)
    pattern_png = plot_pattern(pattern, tmp_path / "sub" / "pattern.png", kv_head=1)
    work_png = plot_work(plan, tmp_path / "work.png")
    assert pattern_png == tmp_path / "sub" / "pattern.png" and work_png == tmp_path / "work.png"
    for image in (_read_png(pattern_png), _read_png(work_png)):
        height, width = image.shape[:2]
        assert 300 <= height <= 3000 and 300 <= width <= 3000, image.shape
        assert image.reshape(-1, 3).std(axis=0).max() > 0.05  # not a blank canvas
    image = _read_png(pattern_png)
    # The bitmap shows active blocks and the causal triangle; bars only where the pattern has them.
    assert _pixels_of(image, PATTERN_COLORS[2]) > 1000
    assert _pixels_of(image, PATTERN_COLORS[0]) > 10_000
    assert (_pixels_of(image, BAR_COLOR) > 50) == (pattern.bars_BHS is not None)
    if kind == "vertical_slash":
        assert pattern.bars_BHS is not None and bool(pattern.bars_BHS[0, 1].any())


def test_a_denser_pattern_paints_more_active_pixels(tmp_path):
    counts = []
    for window in (1, 4, 12):
        pattern = sliding_window_sinks(1, 1, SEQ, BLOCK, window_blocks=window, sink_blocks=0)
        counts.append(
            _pixels_of(_read_png(plot_pattern(pattern, tmp_path / f"w{window}.png")), PATTERN_COLORS[2])
        )
    assert counts[0] < counts[1] < counts[2], counts
    # Window 12 covers about 8.5× the blocks of window 1 (32 blocks per side).
    assert counts[2] > 5 * counts[0], counts


def test_idle_steps_are_grey_in_the_work_plot(tmp_path):
    window = sliding_window_sinks(1, 1, SEQ, BLOCK, window_blocks=2, sink_blocks=0)
    idle_plan = plan_striped(window, WORLD)
    assert idle_plan.idle_steps() == [2, 3]
    dense_plan = plan_striped(from_block_mask(torch.ones(1, 1, 32, 32, dtype=torch.bool), BLOCK), WORLD)
    assert dense_plan.idle_steps() == []
    idle = _read_png(plot_work(idle_plan, tmp_path / "idle.png"))
    dense = _read_png(plot_work(dense_plan, tmp_path / "dense.png"))
    # Two of four step columns of the heatmap are exactly the idle grey: a large share of the canvas (the
    # anti-aliased edges of text hit that grey exactly only in a few pixels).
    exact = 0.5 / 255
    assert _pixels_of(idle, IDLE_COLOR, exact) > 0.1 * idle.shape[0] * idle.shape[1]
    assert _pixels_of(dense, IDLE_COLOR, exact) < 0.002 * dense.shape[0] * dense.shape[1]


def test_the_work_figure_grows_with_the_world(tmp_path):
    pattern = sliding_window_sinks(1, 1, 64 * 8, 8, window_blocks=4)
    small = _read_png(plot_work(plan_striped(pattern, 4), tmp_path / "w4.png"))
    large = _read_png(plot_work(plan_striped(pattern, 32), tmp_path / "w32.png"))
    assert large.shape[0] > 1.5 * small.shape[0] and large.shape[1] > 1.5 * small.shape[1]
    assert large.shape[0] <= 2000  # capped


def test_out_of_range_head_is_refused(tmp_path):
    pattern = _pattern("window")
    with pytest.raises(ValueError, match="kv_head=2"):
        plot_pattern(pattern, tmp_path / "x.png", kv_head=2)
    assert not (tmp_path / "x.png").exists()
