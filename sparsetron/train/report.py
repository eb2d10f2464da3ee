"""``sparsetron report RUN_DIR``: figures and a short text summary of a run's ``metrics.jsonl``.

The trainer appends one JSON object per optimizer step to ``<run_dir>/metrics.jsonl``. :func:`make_report`
reads and validates the whole file before it writes anything, so a malformed file raises a ``ValueError``
naming the line and leaves no partial report. It then writes into ``<run_dir>/report/``:

* ``loss_lr.png``: loss (raw and smoothed) with the learning rate on a twin axis, eval accuracy below;
* ``throughput.png``: tokens/s (raw and smoothed) with MFU on a twin axis;
* ``expert_load.png``: per-layer heatmaps of load/mean per expert over steps, and max/mean over steps;
* ``grad_norm.png``: the global gradient norm, on a log axis when it spans more than two decades;
* ``summary.txt``: the numbers people ask for first.

Figures are standalone :class:`~matplotlib.figure.Figure` objects on an Agg canvas, never pyplot's, so a
report leaves no open figures and no backend choice behind in the calling process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator, PercentFormatter

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.txt"

# Every key the trainer writes as a plain number; any of them may be absent or null (mfu is null on CPU).
NUMBER_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "step_time_s",
    "comm_bytes",
    "mfu",
    "aux_loss",
    "expert_load_max_over_mean",
    "eval_accuracy",
)

# Steps averaged for "loss start → end": enough to see past single-step noise, never more than half a run.
EDGE_STEPS = 5

COLOR = {
    "loss": "#1f5fa8",
    "lr": "#d9822b",
    "eval": ("#2e9a4f", "#8c564b", "#d1477a", "#1f9fb4", "#6b6b6b"),
    "throughput": "#138a8a",
    "mfu": "#7b4fb0",
    "grad": "#b8413b",
    "worst": "#b8413b",
    "layer": "#8a8f98",
    "reference": "#555555",
    "alarm": "#d62728",
}
DPI = 130
# Diverging, white at balance; grey marks a layer that routed no tokens in that step (NaN).
HEATMAP_CMAP = colormaps["RdBu_r"].with_extremes(bad="#c8c8c8")
# Widest expert-load heatmap in columns; longer runs average neighbouring steps into one column.
MAX_HEATMAP_COLUMNS = 600


@dataclass
class Report:
    """What :func:`make_report` wrote: the figures (in drawing order) and the text of ``summary.txt``."""

    pngs: list[Path]
    summary: str


@dataclass(frozen=True)
class Metrics:
    """The validated records of one ``metrics.jsonl``: one per step, sorted by step."""

    path: Path
    records: list[dict[str, Any]]

    def has(self, key: str) -> bool:
        """Whether any record carries a non-null ``key``."""
        return any(r.get(key) is not None for r in self.records)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and float values of the records where ``key`` is present and not null."""
        kept = [r for r in self.records if r.get(key) is not None]
        steps = np.array([r["step"] for r in kept], dtype=np.int64)
        return steps, np.array([r[key] for r in kept], dtype=float)

    def expert_load(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the ``(steps, layers, experts)`` array of routed-load fractions, where logged."""
        kept = [r for r in self.records if r.get("expert_load") is not None]
        steps = np.array([r["step"] for r in kept], dtype=np.int64)
        return steps, np.stack([r["expert_load"] for r in kept])


# --------------------------------------------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> Metrics:
    """Read and validate a ``metrics.jsonl``.

    Blank lines are ignored. When a step appears twice (a run resumed from a checkpoint logs the steps
    after it again) the later record wins. Raises ``ValueError`` naming the file, and the line where
    there is one, for a missing or empty file, invalid JSON, a wrong type or inconsistent expert shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a training run writes {METRICS_FILE} into its run dir)")
    by_step: dict[int, dict[str, Any]] = {}
    load_shape: tuple[tuple[int, ...], int] | None = None  # (layers, experts) and the line that set it
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            where = f"{path}, line {lineno}"
            record = _parse_record(raw, where)
            if record is None:
                continue
            if record.get("expert_load") is not None:
                # Kept as an array: long runs hold millions of fractions, checked and stacked with numpy.
                record["expert_load"] = _expert_load_array(record["expert_load"], where)
                shape = record["expert_load"].shape
                if load_shape is None:
                    load_shape = (shape, lineno)
                elif shape != load_shape[0]:
                    raise ValueError(
                        f"{where}: 'expert_load' is {_shape_text(shape)} (layers × experts) but line "
                        f"{load_shape[1]} has {_shape_text(load_shape[0])}"
                    )
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path}: empty, no metrics records (has the run finished its first step?)")
    return Metrics(path, [by_step[step] for step in sorted(by_step)])


def _parse_record(raw: bytes, where: str) -> dict[str, Any] | None:
    """One line as a checked record, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_short(record)}")
    if not _is_int(record.get("step")):
        raise ValueError(f"{where}: 'step' must be an integer, got {_short(record.get('step'))}")
    for key in NUMBER_KEYS:
        value = record.get(key)
        if value is not None and not _is_number(value):
            raise ValueError(f"{where}: {key!r} must be a number or null, got {_short(value)}")
    task = record.get("eval_task")
    if task is not None and not isinstance(task, str):
        raise ValueError(f"{where}: 'eval_task' must be a string, got {_short(task)}")
    return record


def _expert_load_array(load: Any, where: str) -> np.ndarray:
    """A well-formed ``expert_load`` as a (layers, experts) float array; ValueError otherwise."""
    try:
        array = np.array(load)
    except ValueError:  # ragged: layers with different expert counts
        array = None
    if array is None or array.ndim != 2 or array.size == 0 or array.dtype.kind not in "iuf":
        raise ValueError(
            f"{where}: 'expert_load' must be a non-empty list (layers) of equally long lists of numbers (experts)"
        )
    array = array.astype(float)
    if not (np.isfinite(array) & (array >= 0)).all():
        raise ValueError(f"{where}: 'expert_load' fractions must be finite numbers ≥ 0")
    return array


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}×{shape[1]}"


def read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """The run's resolved ``config.yaml`` as a dict, and a note when it exists but cannot be used.

    The config only adds context to the summary, so a bad one is reported there rather than raised.
    """
    if not path.is_file():
        return {}, None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return {}, f"{path} could not be parsed ({type(exc).__name__})"
    if not isinstance(config, dict):
        return {}, f"{path} is not a mapping of sections"
    return config, None


# --------------------------------------------------------------------------------------------------- helpers


def smooth(values: np.ndarray) -> np.ndarray:
    """Centred moving average over about 1/25 of the series, so the trend does not lag the raw curve.

    Non-finite values (a diverged loss) are left out of every window and stay NaN in the output, so a
    divergence shows as a gap rather than as a smeared-out spike.
    """
    n = len(values)
    half = max(1, n // 50)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(n)
    # Shrink the window symmetrically at the ends: a one-sided window would bias the first and last
    # points towards their neighbours (e.g. pull a falling loss curve's start down).
    reach = np.minimum(half, np.minimum(index, n - 1 - index))
    lo, hi = index - reach, index + reach + 1
    window = counts[hi] - counts[lo]
    out = np.divide(sums[hi] - sums[lo], window, out=np.full(n, np.nan), where=window > 0)
    out[~finite] = np.nan
    return out


def edge_steps(n: int) -> int:
    """Steps averaged at each end for "start → end": up to EDGE_STEPS, at most half the run, at least one."""
    return max(1, min(EDGE_STEPS, n // 2))


def load_over_mean(load: np.ndarray) -> np.ndarray:
    """Each expert's load divided by its layer's mean load (1 = perfectly balanced).

    NaN for a layer that routed no tokens that step (all fractions 0: the trainer clamps the division).
    """
    mean = load.mean(axis=-1, keepdims=True)
    return np.divide(load, mean, out=np.full_like(load, np.nan), where=mean > 0)


def max_over_mean(metrics: Metrics) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Steps, the worst layer's max/mean load, and every layer's ``(steps, layers)`` when per-expert loads exist.

    Computed from ``expert_load`` when logged, so the line agrees with the heatmaps; otherwise the
    trainer's own ``expert_load_max_over_mean``.
    """
    if metrics.has("expert_load"):
        steps, load = metrics.expert_load()
        # fmax skips the NaN of token-less layers without the warnings nanmax gives on all-NaN rows.
        per_layer = np.fmax.reduce(load_over_mean(load), axis=-1)
        return steps, np.fmax.reduce(per_layer, axis=-1), per_layer
    steps, worst = metrics.series("expert_load_max_over_mean")
    return steps, worst, None


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Axes, *, ylabel: str, xlabel: str | None = "step") -> None:
    ax.grid(True, color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    # Steps are whole numbers; min_n_ticks=1 keeps a single-step run from getting fractional ticks.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _style_twin(ax: Axes, *, ylabel: str, color: str) -> None:
    ax.set_ylabel(ylabel, color=color)
    ax.tick_params(axis="y", colors=color)
    ax.spines["right"].set_color(color)
    ax.spines["top"].set_visible(False)


def _raw_and_smoothed(
    ax: Axes, steps: np.ndarray, values: np.ndarray, color: str, label: str, *, raw_alpha: float = 0.3
) -> list[Line2D]:
    """A short series as markers; a long one as a faint raw line under its moving average."""
    if len(values) < 20:
        return ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=1.5, label=label)
    ax.plot(steps, values, color=color, alpha=raw_alpha, linewidth=0.9)
    return ax.plot(steps, smooth(values), color=color, linewidth=2, label=f"{label} (smoothed)")


def _mark_non_finite(ax: Axes, steps: np.ndarray, values: np.ndarray, what: str) -> None:
    """A red line at the first NaN/inf, named above the axes, so a divergence is not just a silent gap."""
    bad = steps[~np.isfinite(values)]
    if bad.size:
        ax.axvline(bad[0], color=COLOR["alarm"], linestyle=":", linewidth=1.5)
        # In the axes title, where it can overlap neither the curves nor the legend.
        ax.set_title(
            f"{what} non-finite at {bad.size} step(s), first at step {bad[0]}",
            loc="right",
            color=COLOR["alarm"],
            fontsize=10,
        )


def _title(fig: Figure, run_name: str, what: str) -> None:
    fig.suptitle(f"{what}  ·  {run_name}", fontsize=12, x=0.01, ha="left")


# --------------------------------------------------------------------------------------------------- figures


def plot_loss_lr(metrics: Metrics, run_name: str) -> Figure | None:
    """Loss (raw and smoothed) with lr on a twin axis; eval accuracy per task in a strip below."""
    if not metrics.has("loss"):
        return None
    has_eval = metrics.has("eval_accuracy")
    fig = _new_figure(10, 6.5 if has_eval else 5)
    if has_eval:
        ax, ax_eval = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax = fig.subplots()
    steps, loss = metrics.series("loss")
    handles = _raw_and_smoothed(ax, steps, loss, COLOR["loss"], "loss")
    _style(ax, ylabel="loss", xlabel=None if has_eval else "step")
    _mark_non_finite(ax, steps, loss, "loss")
    if metrics.has("lr"):
        ax_lr = ax.twinx()
        lr_steps, lr = metrics.series("lr")
        marker = "s" if len(lr) < 20 else None
        handles += ax_lr.plot(
            lr_steps,
            lr,
            color=COLOR["lr"],
            linestyle="--",
            linewidth=1.4,
            marker=marker,
            label="learning rate",
        )
        ax_lr.set_ylim(bottom=0)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        _style_twin(ax_lr, ylabel="learning rate", color=COLOR["lr"])
    ax.legend(handles=handles, loc="upper right", frameon=False)
    if has_eval:
        _plot_eval(ax_eval, metrics)
    _title(fig, run_name, "loss and learning rate")
    return fig


def _evals_by_task(metrics: Metrics) -> dict[str, list[tuple[int, float]]]:
    """(step, accuracy) of every eval, grouped by ``eval_task`` in order of first appearance."""
    tasks: dict[str, list[tuple[int, float]]] = {}
    for record in metrics.records:
        if record.get("eval_accuracy") is not None:
            task = record.get("eval_task") or "eval"
            tasks.setdefault(task, []).append((record["step"], record["eval_accuracy"]))
    return tasks


def _plot_eval(ax: Axes, metrics: Metrics) -> None:
    """Eval accuracy markers, one colour and marker per eval task, the latest value written next to it."""
    tasks = _evals_by_task(metrics)
    for i, (task, points) in enumerate(tasks.items()):
        color, marker = COLOR["eval"][i % len(COLOR["eval"])], "osD^v"[i % 5]
        steps, accuracy = zip(*points, strict=True)
        ax.plot(steps, accuracy, color=color, marker=marker, linewidth=0.8, markersize=6, label=task)
        ax.annotate(
            f"{accuracy[-1]:.3g}",
            (steps[-1], accuracy[-1]),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            color=color,
        )
    ax.set_ylim(-0.05, 1.1)
    _style(ax, ylabel="eval accuracy")
    ax.legend(loc="upper left", frameon=False, fontsize=9, ncols=min(len(tasks), 4))


def plot_throughput(metrics: Metrics, run_name: str) -> Figure | None:
    """Tokens/s over steps (raw and smoothed) with its mean, and MFU on a twin axis where logged."""
    if not metrics.has("tokens_per_s"):
        return None
    fig = _new_figure(10, 4.5)
    ax = fig.subplots()
    steps, rate = metrics.series("tokens_per_s")
    handles = _raw_and_smoothed(ax, steps, rate, COLOR["throughput"], "tokens/s")
    mean = float(np.nanmean(rate))
    handles.append(
        ax.axhline(
            mean, color=COLOR["throughput"], linestyle=":", linewidth=1.2, label=f"mean {_si(mean)} tokens/s"
        )
    )
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    _style(ax, ylabel="tokens / s")
    if metrics.has("mfu"):
        ax_mfu = ax.twinx()
        mfu_steps, mfu = metrics.series("mfu")
        handles += _raw_and_smoothed(ax_mfu, mfu_steps, mfu, COLOR["mfu"], "MFU")
        ax_mfu.set_ylim(0, max(0.05, float(np.nanmax(mfu)) * 1.15))
        ax_mfu.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        _style_twin(ax_mfu, ylabel="MFU", color=COLOR["mfu"])
    ax.legend(handles=handles, loc="lower right", frameon=False)
    _title(fig, run_name, "throughput")
    return fig


def plot_expert_load(metrics: Metrics, run_name: str) -> Figure | None:
    """Per-layer heatmaps of load/mean (experts × steps, 1 = balanced) and max/mean load over steps."""
    if not (metrics.has("expert_load") or metrics.has("expert_load_max_over_mean")):
        return None
    if not metrics.has("expert_load"):
        fig = _new_figure(10, 3.5)
        _plot_max_over_mean(fig.subplots(), metrics)
        _title(fig, run_name, "expert load balance (no per-expert loads logged)")
        return fig
    steps, load = metrics.expert_load()
    n_layers, n_experts = load.shape[1:]
    ncols = min(4, math.ceil(n_layers / 6))
    nrows = math.ceil(n_layers / ncols)
    panel_height = min(1.6, max(0.9, 0.12 * n_experts))
    fig = _new_figure(10 if ncols == 1 else 14, panel_height * nrows + 3.2)
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[panel_height] * nrows + [2.6])
    heat_axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n_layers)]
    _draw_heatmaps(fig, heat_axes, steps, load, label_rows_from=n_layers - ncols)
    _plot_max_over_mean(fig.add_subplot(grid[nrows, :], sharex=heat_axes[0]), metrics)
    _title(fig, run_name, f"expert load: {n_layers} layers × {n_experts} experts")
    return fig


def _draw_heatmaps(
    fig: Figure, axes: list[Axes], steps: np.ndarray, load: np.ndarray, *, label_rows_from: int
) -> None:
    """One experts × steps heatmap of log2(load/mean) per layer, sharing a step axis and a colour bar.

    The log scale on a diverging map centred on 0 (balanced) makes an expert at twice the mean as red as
    one at half of it is blue; an expert that got no tokens (-inf) takes the colour past the darkest blue.
    """
    n_experts = load.shape[2]
    edges, load = _bin_columns(steps, load)
    with np.errstate(divide="ignore"):
        log_ratio = np.log2(load_over_mean(load))
    limit = _colour_limit(log_ratio, n_experts)
    # pcolormesh masks every non-finite value as "no data"; a dead expert must show as under-range instead.
    drawn = np.maximum(log_ratio, -2 * limit)
    norm = Normalize(vmin=-limit, vmax=limit)
    for ax in axes[1:]:
        ax.sharex(axes[0])
    for layer, ax in enumerate(axes):
        mesh = ax.pcolormesh(
            edges,
            np.arange(n_experts + 1) - 0.5,
            drawn[:, layer, :].T,
            cmap=HEATMAP_CMAP,
            norm=norm,
            rasterized=True,
        )
        ax.set_ylim(n_experts - 0.5, -0.5)
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(n_experts, 8), integer=True))
        ax.tick_params(labelsize=8, labelbottom=layer >= label_rows_from)
    clipped = bool((np.abs(log_ratio) > limit).any())
    colorbar = fig.colorbar(
        mesh, ax=axes, shrink=0.9, pad=0.01, aspect=30, extend="both" if clipped else "neither"
    )
    colorbar.set_ticks(_colorbar_ticks(limit))
    colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{2.0**value:.2g}×"))
    idle = ", grey = no tokens routed" if np.isnan(log_ratio).any() else ""
    colorbar.set_label(f"load / mean (log scale)\n1× = balanced{idle}")


def _colour_limit(log_ratio: np.ndarray, n_experts: int) -> float:
    """Half-range of the log2 colour scale: the 99.5th percentile of |log2(load/mean)|, from 1 (2×) to log2(E).

    A percentile rather than the maximum keeps the first few chaotic steps from washing out the rest.
    """
    finite = np.abs(log_ratio[np.isfinite(log_ratio)])
    observed = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    return float(np.clip(observed, 1.0, max(1.0, math.log2(n_experts))))


def _colorbar_ticks(limit: float) -> list[float]:
    """log2 tick positions: every power of two in range, plus 1.5× and 0.67× when that leaves few ticks."""
    ticks = [float(k) for k in range(-math.floor(limit), math.floor(limit) + 1)]
    if limit < 2:
        ticks += [math.log2(1.5), -math.log2(1.5)]
    return sorted(ticks)


def _bin_columns(steps: np.ndarray, load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap column edges and loads, averaging consecutive steps into at most MAX_HEATMAP_COLUMNS.

    A long run has far more steps than a figure has pixels; averaging first keeps drawing fast and
    shows every step's share of each column instead of whichever step the renderer happens to sample.
    """
    edges = _cell_edges(steps)
    if len(steps) <= MAX_HEATMAP_COLUMNS:
        return edges, load
    starts = np.array([group[0] for group in np.array_split(np.arange(len(steps)), MAX_HEATMAP_COLUMNS)])
    counts = np.diff(np.append(starts, len(steps)))
    binned = np.add.reduceat(load, starts, axis=0) / counts[:, None, None]
    return np.append(edges[starts], edges[-1]), binned


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Heatmap column edges halfway between logged steps, so gaps in the log keep their true width."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])


def _plot_max_over_mean(ax: Axes, metrics: Metrics) -> None:
    """Max/mean load of every layer (thin, grey) and of the worst one (bold), smoothed on long runs."""
    steps, worst, per_layer = max_over_mean(metrics)
    if per_layer is not None and per_layer.shape[1] > 1:
        layers = per_layer if len(steps) < 20 else np.column_stack([smooth(col) for col in per_layer.T])
        marker = "o" if len(steps) < 20 else None
        ax.plot(steps, layers, color=COLOR["layer"], alpha=0.5, linewidth=0.8, marker=marker, markersize=3)
        ax.plot([], [], color=COLOR["layer"], alpha=0.6, label="each layer")
    _raw_and_smoothed(ax, steps, worst, COLOR["worst"], "worst layer")
    ax.axhline(1.0, color=COLOR["reference"], linestyle="--", linewidth=1, label="balanced")
    ax.set_ylim(bottom=0.9)
    _style(ax, ylabel="max / mean load")
    ax.legend(loc="upper right", frameon=False, fontsize=9, ncols=3)


def plot_grad_norm(metrics: Metrics, run_name: str, clip: float | None) -> Figure | None:
    """Global grad norm over steps (log axis past two decades), with the clipping threshold when known."""
    if not metrics.has("grad_norm"):
        return None
    fig = _new_figure(10, 4.5)
    ax = fig.subplots()
    steps, norm = metrics.series("grad_norm")
    # Spikes are what one looks for in a grad norm, so the raw curve stays clearly visible.
    handles = _raw_and_smoothed(ax, steps, norm, COLOR["grad"], "grad norm", raw_alpha=0.55)
    if clip:
        handles.append(
            ax.axhline(clip, color=COLOR["reference"], linestyle="--", linewidth=1, label=f"clip at {clip:g}")
        )
    positive = norm[np.isfinite(norm) & (norm > 0)]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_yscale("log")
    _style(ax, ylabel="grad norm" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    _mark_non_finite(ax, steps, norm, "grad norm")
    ax.legend(handles=handles, loc="upper right", frameon=False)
    _title(fig, run_name, "gradient norm")
    return fig


# --------------------------------------------------------------------------------------------------- summary


def summarize(metrics: Metrics, config: dict[str, Any], config_note: str | None = None) -> str:
    """The text of ``summary.txt``: config facts, steps, loss, tokens, throughput, expert load, eval, time."""
    lines = [f"run: {metrics.path.parent}"]
    lines += _config_lines(config)
    if config_note:
        lines.append(f"config: {config_note}")
    lines.append(_steps_line(metrics, config))
    lines += _loss_lines(metrics)
    lines += _throughput_lines(metrics)
    lines.append(_expert_line(metrics))
    lines += _dead_expert_lines(metrics)
    lines += _eval_lines(metrics)
    steps, seconds = metrics.series("step_time_s")
    if steps.size:
        lines.append(f"wall time: {_duration(float(np.nansum(seconds)))} (sum of step times)")
    return "\n".join(lines) + "\n"


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def _config_lines(config: dict[str, Any]) -> list[str]:
    """A line each for the model, parallel layout and schedule, from whatever keys the config has."""
    lines = [_model_line(_section(config, "model")), _parallel_line(_section(config, "parallel"))]
    lines.append(_train_line(_section(config, "train")))
    return [line for line in lines if line]


def _model_line(model: dict[str, Any]) -> str:
    facts = [
        f"{label} {model[key]}"
        for key, label in (
            ("preset", "preset"),
            ("dim", "dim"),
            ("n_layers", "layers"),
            ("num_experts", "experts"),
        )
        if model.get(key) is not None
    ]
    if model.get("top_k") is not None:
        facts.append(f"top-{model['top_k']}")
    return "model: " + ", ".join(facts) if facts else ""


def _parallel_line(parallel: dict[str, Any]) -> str:
    # dp_replicate × dp_shard × cp is the world size; ep is folded over dp_shard × cp, so it is listed apart.
    degrees = [
        f"{key} {'auto' if parallel[key] == -1 else parallel[key]}"
        for key in ("dp_replicate", "dp_shard", "cp")
        if key in parallel
    ]
    if not degrees:
        return ""
    method = f" ({parallel['cp_method']})" if parallel.get("cp", 1) != 1 and "cp_method" in parallel else ""
    experts = f", ep {parallel['ep']}" if "ep" in parallel else ""
    return "parallel: " + " × ".join(degrees) + method + experts


def _train_line(train: dict[str, Any]) -> str:
    facts = [
        f"{label} {_number(train[key])}"
        for key, label in (("steps", "steps"), ("lr", "peak lr"), ("global_batch_tokens", "tokens/step"))
        if _is_number(train.get(key))
    ]
    return "train: " + ", ".join(facts) if facts else ""


def _steps_line(metrics: Metrics, config: dict[str, Any]) -> str:
    first, last = metrics.records[0]["step"], metrics.records[-1]["step"]
    planned = _section(config, "train").get("steps")
    of_planned = f" of {planned} planned" if _is_int(planned) else ""
    return f"steps: {len(metrics.records)} logged (step {first} → {last}){of_planned}"


def _loss_lines(metrics: Metrics) -> list[str]:
    steps, loss = metrics.series("loss")
    finite = np.isfinite(loss)
    if not finite.any():
        return ["loss: not logged" if not loss.size else "loss: no finite values"]
    kept, kept_steps = loss[finite], steps[finite]
    k = edge_steps(len(kept))
    start, end = kept[:k].mean(), kept[-k:].mean()
    best = int(np.argmin(kept))
    which = "finite step" if not finite.all() else "step"
    lines = [
        f"loss: {start:.4f} → {end:.4f} (mean of first/last {k} {which}{'s' if k > 1 else ''}), "
        f"min {kept[best]:.4f} at step {kept_steps[best]}"
    ]
    if not finite.all():
        lines.append(f"loss: non-finite at {int((~finite).sum())} step(s), first at step {steps[~finite][0]}")
    return lines


def _throughput_lines(metrics: Metrics) -> list[str]:
    lines = []
    if metrics.has("tokens"):
        tokens = int(metrics.series("tokens")[1][-1])
        lines.append(f"tokens: {tokens:,} ({_si(tokens)})")
    if metrics.has("tokens_per_s"):
        rate = float(np.nanmean(metrics.series("tokens_per_s")[1]))
        mfu = f", mean MFU {np.nanmean(metrics.series('mfu')[1]):.1%}" if metrics.has("mfu") else ""
        lines.append(f"throughput: mean {rate:,.0f} tokens/s{mfu}")
    if metrics.has("comm_bytes"):
        sent = float(np.nanmean(metrics.series("comm_bytes")[1]))
        lines.append(f"communication: mean {_si(sent, 'B')} sent per rank per step (estimate)")
    return lines


def _expert_line(metrics: Metrics) -> str:
    steps, worst, per_layer = max_over_mean(metrics)
    if not steps.size:
        return "expert load: no MoE stats in metrics.jsonl (expert_load.png skipped)"
    located = per_layer is not None and np.isfinite(worst[-1])
    where = f" in layer {int(np.nanargmax(per_layer[-1]))}" if located else ""
    return f"expert load: final max/mean {worst[-1]:.2f}{where} at step {steps[-1]} (1.00 = balanced)"


def _dead_expert_lines(metrics: Metrics) -> list[str]:
    """Experts that got no tokens in the last logged step (in layers that routed any): lost capacity."""
    if not metrics.has("expert_load"):
        return []
    steps, load = metrics.expert_load()
    last = load[-1]
    layers, experts = np.nonzero((last == 0) & (last.sum(axis=1, keepdims=True) > 0))
    if not layers.size:
        return []
    named = ", ".join(
        f"layer {layer} expert {expert}" for layer, expert in zip(layers[:6], experts[:6], strict=True)
    )
    more = f" and {layers.size - 6} more" if layers.size > 6 else ""
    return [f"expert load: {layers.size} expert(s) got no tokens at step {steps[-1]}: {named}{more}"]


def _eval_lines(metrics: Metrics) -> list[str]:
    lines = []
    for task, points in _evals_by_task(metrics).items():
        (last_step, last), (best_step, best) = points[-1], max(points, key=lambda point: point[1])
        line = f"eval accuracy ({task}): {last:.3f} at step {last_step}"
        if best > last:
            line += f", best {best:.3f} at step {best_step}"
        lines.append(line)
    return lines


def _si(value: float, unit: str = "") -> str:
    return EngFormatter(unit=unit, places=1, sep=" " if unit else "")(value)


def _number(value: float) -> str:
    return f"{value:,}" if _is_int(value) else f"{value:g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


# --------------------------------------------------------------------------------------------------- report


def make_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Draw the figures and write ``summary.txt`` for the run in ``run_dir``; return what was written.

    ``out`` defaults to ``<run_dir>/report``. ``metrics.jsonl`` is validated in full first: a missing,
    empty or malformed file raises ``ValueError`` (naming the file and line) before anything is written.
    A figure whose metrics were never logged is skipped, and a stale copy of it from an earlier report
    is removed so the directory never mixes runs.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / METRICS_FILE)
    config, config_note = read_config(run_dir / CONFIG_FILE)
    clip = _section(config, "train").get("grad_clip")
    run_name = run_dir.resolve().name
    figures: dict[str, Callable[[], Figure | None]] = {
        "loss_lr.png": lambda: plot_loss_lr(metrics, run_name),
        "throughput.png": lambda: plot_throughput(metrics, run_name),
        "expert_load.png": lambda: plot_expert_load(metrics, run_name),
        "grad_norm.png": lambda: plot_grad_norm(metrics, run_name, clip if _is_number(clip) else None),
    }
    out_dir = Path(out) if out is not None else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for name, draw in figures.items():
        path = out_dir / name
        fig = draw()
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        fig.savefig(path)
        pngs.append(path)
    summary = summarize(metrics, config, config_note)
    (out_dir / SUMMARY_FILE).write_text(summary, encoding="utf-8")
    return Report(pngs=pngs, summary=summary)
