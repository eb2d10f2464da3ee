"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step) and the progress line on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: bf16 dense peak FLOP/s per GPU, for MFU; unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a CUDA device by its marketing name, or None when unknown."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


class MetricsLog:
    """Appends one JSON line per step to ``<run_dir>/metrics.jsonl`` (only on the rank that owns it)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # A resumed run re-trains the steps after its checkpoint: drop their old lines so each step
            # appears once and the file reads as one uninterrupted run.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class ProgressLine:
    """A rich progress bar with ETA on a terminal; plain lines every ``every`` steps otherwise (CI, logs)."""

    def __init__(self, total_steps: int, first_step: int, *, enabled: bool, every: int):
        self.enabled, self.every = enabled, max(1, every)
        self.console = Console(soft_wrap=True)
        self.progress = None
        self.started = time.monotonic()
        self.first_step, self.total = first_step, total_steps
        if enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()

    def update(self, step: int, status: str) -> None:
        """Report that optimizer step ``step`` (0-based) finished, with a short status text."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step + 1, status=status)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            done = step + 1 - self.first_step
            elapsed = time.monotonic() - self.started
            eta = elapsed / done * (self.total - step - 1) if done else 0.0
            self.console.print(f"step {step + 1:>5}/{self.total}  {status}  eta {eta:5.0f}s", highlight=False)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
