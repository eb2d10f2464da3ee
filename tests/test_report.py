"""`sparsetron report`: figures and summary from a run's metrics.jsonl, on synthetic but realistic runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import QuadMesh

from sparsetron.train.report import make_report, plot_expert_load, plot_grad_norm, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = ["loss_lr.png", "throughput.png", "expert_load.png", "grad_norm.png"]
CONFIG_YAML = """\
model:
  preset: demo
  dim: 256
  n_layers: 4
  num_experts: 8
  top_k: 2
parallel:
  dp_replicate: 1
  dp_shard: 2
  cp: 2
  ep: 2
  cp_method: ring
train:
  steps: 200
  lr: 0.003
  grad_clip: 1.0
  global_batch_tokens: 8192
"""


def cosine_lr(step: int, steps: int, peak: float = 3e-3, warmup: int = 10, floor: float = 0.1) -> float:
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / (steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def expert_load(rng: np.random.Generator, step: int, layers: int, experts: int) -> list[list[float]]:
    """Routed-load fractions: skewed early and balancing as the aux loss acts; layer 2 keeps a hot expert."""
    rows = []
    for layer in range(layers):
        skew = np.exp(-step / 60) * np.linspace(1.5, -1.5, experts)
        if layer == 2:
            skew[3] += 0.8
        weights = np.exp(skew + rng.normal(0, 0.1, experts))
        rows.append((weights / weights.sum()).tolist())
    return rows


def synthetic_records(
    steps: int = 200, *, moe: bool = True, evals: bool = True, layers: int = 4, experts: int = 8
) -> list[dict]:
    """One trainer-like record per step: decaying loss, warmup+cosine lr, skewed expert load, evals."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, steps + 1):
        rate = 12_000 * (0.3 if step == 1 else 1) + rng.normal(0, 300)  # step 1 compiles
        spike = 3 if step % 37 == 0 else 1
        record = {
            "step": step,
            "loss": 2.0 + 3.5 * math.exp(-step / 40) + rng.normal(0, 0.05),
            "lr": cosine_lr(step, steps),
            "grad_norm": (8 * math.exp(-step / 25) + 0.3) * rng.lognormal(0, 0.15) * spike,
            "tokens": 8192 * step,
            "tokens_per_s": rate,
            "step_time_s": 8192 / rate,
            "comm_bytes": 48_000_000,
            "mfu": None,  # as on CPU
            "aux_loss": 0.01,
        }
        if moe:
            record["expert_load"] = expert_load(rng, step, layers, experts)
            record["expert_load_max_over_mean"] = max(max(row) * len(row) for row in record["expert_load"])
        if evals and step % 50 == 0:
            record["eval_accuracy"] = min(1.0, step / 200 - 0.1)
            record["eval_task"] = "passkey"
        records.append(record)
    return records


def write_run(run_dir: Path, records: list[dict], *, config: str | None = CONFIG_YAML) -> Path:
    """A run dir as the trainer leaves it: metrics.jsonl and, unless config is None, config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 400 <= width <= 4000 and 300 <= height <= 4000, (path, image.shape)
    assert image.std() > 0.01, f"{path} is blank"


def test_full_run_writes_every_figure_and_a_summary_with_the_right_numbers(tmp_path):
    records = synthetic_records()
    run = write_run(tmp_path / "run", records)

    report = make_report(run)

    out = run / "report"
    assert [p.name for p in report.pngs] == ALL_PNGS
    for png in report.pngs:
        assert png.parent == out
        assert_valid_png(png)
    assert (out / "summary.txt").read_text() == report.summary

    losses = [r["loss"] for r in records]
    summary = report.summary
    assert f"{np.mean(losses[:5]):.4f} → {np.mean(losses[-5:]):.4f} (mean of first/last 5 steps)" in summary
    assert f"min {min(losses):.4f} at step {1 + losses.index(min(losses))}" in summary
    assert "steps: 200 logged (step 1 → 200) of 200 planned" in summary
    assert f"tokens: {8192 * 200:,}" in summary
    assert f"mean {np.mean([r['tokens_per_s'] for r in records]):,.0f} tokens/s" in summary
    final_load = records[-1]["expert_load_max_over_mean"]
    assert f"final max/mean {final_load:.2f} in layer 2 at step 200" in summary
    assert "eval accuracy (passkey): 0.900 at step 200" in summary
    assert "model: preset demo, dim 256, layers 4, experts 8, top-2" in summary
    assert "parallel: dp_replicate 1 × dp_shard 2 × cp 2 (ring), ep 2" in summary
    assert "MFU" not in summary  # null on CPU
    minutes, seconds = divmod(round(sum(r["step_time_s"] for r in records)), 60)
    assert f"wall time: {minutes}m {seconds:02d}s" in summary


def test_out_dir_argument_and_a_run_without_config(tmp_path):
    run = write_run(tmp_path / "run", synthetic_records(30, evals=False), config=None)
    report = make_report(run, out=tmp_path / "elsewhere")
    assert {p.parent for p in report.pngs} == {tmp_path / "elsewhere"}
    assert not (run / "report").exists()
    assert "model:" not in report.summary and "steps: 30 logged (step 1 → 30)\n" in report.summary


def test_run_without_moe_stats_skips_the_expert_plot_and_says_so(tmp_path):
    run = write_run(tmp_path / "dense", synthetic_records(40, moe=False))
    (run / "report").mkdir()
    (run / "report" / "expert_load.png").write_bytes(b"stale figure of an earlier run")

    report = make_report(run)

    assert [p.name for p in report.pngs] == ["loss_lr.png", "throughput.png", "grad_norm.png"]
    assert not (run / "report" / "expert_load.png").exists()
    assert "no MoE stats" in report.summary


def test_single_step_with_only_the_required_keys(tmp_path):
    run = write_run(tmp_path / "one", [{"step": 0, "loss": 5.5}], config=None)
    report = make_report(run)
    assert [p.name for p in report.pngs] == ["loss_lr.png"]
    assert_valid_png(report.pngs[0])
    assert "loss: 5.5000 → 5.5000 (mean of first/last 1 step)" in report.summary


def test_single_step_with_every_key(tmp_path):
    run = write_run(tmp_path / "one", synthetic_records(1))
    report = make_report(run)
    assert [p.name for p in report.pngs] == ALL_PNGS
    for png in report.pngs:
        assert_valid_png(png)


def test_resumed_run_keeps_the_newest_record_of_a_repeated_step(tmp_path):
    records = synthetic_records(20, moe=False, evals=False)
    rerun = [dict(r, loss=r["loss"] - 1) for r in records[10:]]
    run = write_run(tmp_path / "resumed", records + rerun, config=None)
    losses = [r["loss"] for r in records[:10] + rerun]
    summary = make_report(run).summary
    assert "steps: 20 logged" in summary
    assert f"→ {np.mean(losses[-5:]):.4f}" in summary


def test_diverged_loss_is_reported(tmp_path):
    records = synthetic_records(30, moe=False, evals=False)
    for r in records[25:]:
        r["loss"] = float("nan")
    report = make_report(write_run(tmp_path / "nan", records, config=None))
    assert "non-finite at 5 step(s), first at step 26" in report.summary


@pytest.mark.parametrize(("decades", "scale"), [(3.0, "log"), (1.5, "linear")])
def test_grad_norm_uses_a_log_axis_past_two_decades(tmp_path, decades, scale):
    records = [{"step": step, "grad_norm": 10.0 ** (-decades * step / 29)} for step in range(30)]
    metrics = read_metrics(write_run(tmp_path / "g", records) / "metrics.jsonl")
    assert plot_grad_norm(metrics, "g", clip=None).axes[0].get_yscale() == scale


def test_expert_heatmap_colours_are_centred_on_balanced_load(tmp_path):
    # Layer 0 perfectly balanced; layer 1 with expert 0 at twice the mean and expert 1 at half of it.
    loads = [[0.25, 0.25, 0.25, 0.25], [0.5, 0.125, 0.1875, 0.1875]]
    records = [{"step": step, "loss": 1.0, "expert_load": loads} for step in range(1, 4)]
    metrics = read_metrics(write_run(tmp_path / "run", records) / "metrics.jsonl")
    fig = plot_expert_load(metrics, "run")
    heatmaps = [ax for ax in fig.axes if ax.get_ylabel().startswith("layer")]
    meshes = [c for ax in heatmaps for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 2
    balanced, skewed = (np.asarray(m.norm(m.get_array())).reshape(4, 3) for m in meshes)
    np.testing.assert_allclose(balanced, 0.5)
    assert (skewed[0] > 0.5).all() and (skewed[1] < 0.5).all()
    np.testing.assert_allclose(skewed[0] - 0.5, 0.5 - skewed[1])  # 2× and ½× equally far from white


def test_idle_layers_and_dead_experts(tmp_path):
    # The trainer writes all-zero fractions for a layer that routed nothing (it clamps the division).
    records = [{"step": 1, "expert_load": [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0]]}]
    report = make_report(write_run(tmp_path / "idle", records, config=None))
    assert [p.name for p in report.pngs] == ["expert_load.png"]
    assert "final max/mean 2.25 in layer 0 at step 1" in report.summary
    assert "1 expert(s) got no tokens at step 1: layer 0 expert 2\n" in report.summary


def test_long_run_heatmap_averages_steps_into_columns(tmp_path):
    report = make_report(write_run(tmp_path / "long", synthetic_records(1500, layers=2, experts=4)))
    assert_valid_png(report.pngs[2])
    assert "steps: 1500 logged" in report.summary


def test_several_eval_tasks_and_an_unreadable_config(tmp_path):
    records = synthetic_records(40, moe=False, evals=False)
    records[19].update(eval_accuracy=0.5, eval_task="passkey")
    records[29].update(eval_accuracy=0.25, eval_task="associative_recall")
    records[39].update(eval_accuracy=0.375, eval_task="passkey")
    report = make_report(write_run(tmp_path / "run", records, config="model: [unclosed\n"))
    assert "eval accuracy (passkey): 0.375 at step 40, best 0.500 at step 20" in report.summary
    assert "eval accuracy (associative_recall): 0.250 at step 30\n" in report.summary
    assert "config.yaml could not be parsed" in report.summary
    assert_valid_png(report.pngs[0])


def test_no_pyplot_figures_are_left_open(tmp_path):
    before = plt.get_fignums()
    make_report(write_run(tmp_path / "run", synthetic_records(20)))
    assert plt.get_fignums() == before


@pytest.mark.parametrize(
    ("lines", "line_number", "message"),
    [
        (['{"step": 1, "loss": 2.0}', '{"step": 2, "lo'], 2, "not valid JSON"),  # killed mid-write
        (["[1, 2]"], 1, "expected a JSON object"),
        (['{"loss": 1.0}'], 1, "'step' must be an integer"),
        (['{"step": 1, "loss": 1.0}', "", '{"step": 2, "loss": "high"}'], 3, "'loss' must be a number"),
        (
            ['{"step": 1, "expert_load": [[0.5, 0.5]]}', '{"step": 2, "expert_load": [[1.0]]}'],
            2,
            "line 1 has 1×2",
        ),
        (['{"step": 1, "expert_load": [[0.5, -0.5]]}'], 1, "fractions must be finite numbers ≥ 0"),
        (['{"step": 1, "expert_load": [[0.5, 0.5], [1.0]]}'], 1, "equally long lists"),
        (['{"step": 1, "expert_load": [[0.5, "0.5"]]}'], 1, "equally long lists of numbers"),
    ],
)
def test_malformed_lines_name_the_file_and_line_and_write_nothing(tmp_path, lines, line_number, message):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as error:
        make_report(run)
    assert f"{run / 'metrics.jsonl'}, line {line_number}:" in str(error.value)
    assert not (run / "report").exists()


@pytest.mark.parametrize(("content", "message"), [(None, "no such file"), ("", "empty"), ("\n\n", "empty")])
def test_missing_or_empty_metrics_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        make_report(tmp_path)
    assert "metrics.jsonl" in str(error.value)
    assert not (tmp_path / "report").exists()
