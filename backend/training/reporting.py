"""What a run tells its caller: events from the main rank, the metrics of a logging step, the final summary.

The loop calls `log_metrics` at each logging step and `final_metrics`/`summary` at the end; the progress bar
is shown only on the main rank and only on a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from backend.training.events import EventCallback, TrainingEvent

if TYPE_CHECKING:
    from backend.training.state import Attempt

GIB = 1024**3


class Reporter:
    """Sends TrainingEvents to the caller's callback (if any): all of them from rank 0, only errors from the others."""

    def __init__(self, on_event: EventCallback | None, *, rank: int = 0) -> None:
        self._on_event = on_event
        self._rank = rank

    def emit(self, kind: Any, message: str = "", *, level: Any = "info", data: dict[str, Any] | None = None) -> None:
        """Send one event of `kind` (dropped on the other ranks unless it is an error)."""
        if self._on_event is None or (self._rank != 0 and level != "error"):
            return
        if self._rank != 0:
            message = f"rank {self._rank}: {message}"
        self._on_event(TrainingEvent(kind=kind, message=message, level=level, data=data or {}))

    def message(self, text: str, *, level: Any = "info") -> None:
        """Send a plain message event."""
        self.emit("message", text, level=level)


def log_metrics(attempt: Attempt) -> float:
    """Emit a metrics event and a telemetry sample (also written to telemetry.jsonl); return the mean loss."""
    state, setup = attempt.state, attempt.setup
    sample = {"step": state.step, **attempt.sampler.sample()}
    if setup.telemetry is not None:  # the main rank's; the other ranks write none
        setup.telemetry.write(sample)
    setup.report.emit("telemetry", data=sample)
    train_loss = mean(attempt.window)
    metrics = {
        "step": state.step,
        "train_loss": train_loss,
        "learning_rate": attempt.learning_rate,
        "tokens_per_second": attempt.throughput.tokens_per_second(),
        "gpu_memory_used_bytes": sample["used_bytes"],
        "peak_memory_bytes": sample["peak_bytes"],
        "epoch": state.epoch + state.examples_seen_in_epoch / len(setup.data.train),
        "total_steps": state.total_steps,
    }
    attempt.peak_memory_bytes = max(attempt.peak_memory_bytes, int(sample["peak_bytes"]))
    setup.report.emit("metrics", metrics_line(metrics), data=metrics)
    attempt.window.clear()
    return train_loss


def final_metrics(attempt: Attempt) -> dict[str, Any]:
    """The metrics a finished or stopped run returns (and the manifest records)."""
    state, setup = attempt.state, attempt.setup
    metrics: dict[str, Any] = {
        "step": state.step,
        "total_steps": state.total_steps,
        "train_loss": mean(state.recent_losses[-setup.options.logging_steps :]),
        "tokens_per_second": attempt.throughput.overall_tokens_per_second(),
        "runtime_seconds": time.perf_counter() - attempt.started,
        "peak_memory_bytes": max(attempt.peak_memory_bytes, int(attempt.sampler.sample()["peak_bytes"])),
        "estimate_bytes": setup.plan.estimate_bytes,
        "micro_batch_size": state.micro_batch_size,
        "gradient_accumulation_steps": state.gradient_accumulation_steps,
        "lr_scale": state.lr_scale,
        "oom_recoveries": setup.healing.oom_retries,
        "divergence_recoveries": setup.healing.divergence_retries,
    }
    metrics.update({key: value for key, value in state.metrics.items() if key == "eval_loss"})
    return metrics


def summary(attempt: Attempt, metrics: dict[str, Any]) -> str:
    """The closing line: steps, speed, final loss, peak memory against the plan, where the output is."""
    what = "adapter" if attempt.setup.options.use_lora else "full model"
    return (
        f"Done: {metrics['step']} steps in {metrics['runtime_seconds']:.1f} s, "
        f"{metrics['tokens_per_second']:.0f} tokens/s, final loss {metrics['train_loss']:.4f}; "
        f"peak memory {metrics['peak_memory_bytes'] / GIB:.2f} GiB against a plan of "
        f"{metrics['estimate_bytes'] / GIB:.2f} GiB; the {what} is in {Path(attempt.setup.options.output_dir)}"
    )


def metrics_line(metrics: dict[str, Any]) -> str:
    """One logging step's metrics as the line the log shows."""
    return (
        f"step {metrics['step']}/{metrics['total_steps']}: loss {metrics['train_loss']:.4f}, "
        f"lr {metrics['learning_rate']:.2e}, {metrics['tokens_per_second']:.0f} tokens/s, "
        f"memory {metrics['gpu_memory_used_bytes'] / GIB:.2f} GiB (peak {metrics['peak_memory_bytes'] / GIB:.2f})"
    )


@contextmanager
def progress_bar(initial: int, total: int, *, shown: bool = True) -> Iterator[tqdm]:
    """A step counter on stderr, drawn only when `shown` and stderr is a terminal."""
    bar = tqdm(total=total, initial=initial, unit="step", desc="training", disable=not (shown and sys.stderr.isatty()))
    try:
        yield bar
    finally:
        bar.close()


def mean(values: list[float]) -> float:
    """The mean of `values`, NaN when there are none."""
    return sum(values) / len(values) if values else float("nan")
