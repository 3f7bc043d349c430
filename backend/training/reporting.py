"""What a run tells its caller: events from the main rank, the metrics of a logging step, the final summary.

The loop calls `log_metrics` at each logging step and `final_metrics`/`summary` at the end; the progress bar
is shown only on the main rank and only on a terminal. Metrics carry OpenAI's names (`train_loss`,
`train_mean_token_accuracy`, `valid_loss`, `valid_mean_token_accuracy`, `full_valid_loss`,
`full_valid_mean_token_accuracy`) beside safetrain's own (`eval_loss`, memory and speed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from tqdm import tqdm

from backend.training.events import DPO_METRICS, EventCallback, TrainingEvent
from backend.training.integrations import MetricSinks

if TYPE_CHECKING:
    from backend.training.state import Attempt

GIB = 1024**3
IGNORE_INDEX = -100
# Names OpenAI's FineTuningJobCheckpoint.metrics uses; a run's final metrics carry those it has.
OPENAI_METRICS = (
    "step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_mean_token_accuracy",
)


def token_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[argmax hits, trained tokens] of logits against labels already aligned with them (int64, on the device)."""
    trained = labels != IGNORE_INDEX
    hits = ((logits.argmax(dim=-1) == labels) & trained).sum()
    return torch.stack([hits, trained.sum()])


def mean_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of trained tokens whose argmax prediction is the label (NaN when none is trained)."""
    hits, tokens = token_hits(logits, labels).tolist()
    return hits / tokens if tokens else float("nan")


@dataclass
class TokenAccuracy:
    """Argmax hits and trained tokens of the steps since the last log line, kept on the device until logged."""

    pending: list[torch.Tensor] = field(default_factory=list)  # [hits, tokens] per micro-batch
    last: float | None = None  # the last logged window's accuracy; None before any (and for --method dpo)

    def window_accuracy(self, ranks: Any) -> float | None:
        """The window's accuracy over all ranks (one sync), or the last logged one when the window is empty."""
        if self.pending:
            hits, tokens = torch.stack([part.cpu() for part in self.pending]).sum(dim=0).tolist()
            hits, tokens = ranks.sum([float(hits), float(tokens)]) if ranks.world_size > 1 else (hits, tokens)
            self.last = hits / tokens if tokens else None
        return self.last

    def as_metrics(self, ranks: Any) -> dict[str, float]:
        """{"train_mean_token_accuracy": ...} when there is one (never NaN: events are stored as JSON)."""
        accuracy = self.window_accuracy(ranks)
        return {} if accuracy is None else {"train_mean_token_accuracy": accuracy}

    def clear(self) -> None:
        """Start the next logging window."""
        self.pending.clear()


class Reporter:
    """Sends TrainingEvents to the caller's callback (if any): all of them from rank 0, only errors from the others."""

    def __init__(self, on_event: EventCallback | None, *, rank: int = 0) -> None:
        self._on_event = on_event
        self._rank = rank
        # The process before any model loads: on the CPU, what RSS holds beyond this is what the plan counts.
        self.start_rss_bytes = int(psutil.Process().memory_info().rss)
        self.sinks = MetricSinks()  # --report_to's, while integrations.open_sinks holds them open

    def emit(self, kind: Any, message: str = "", *, level: Any = "info", data: dict[str, Any] | None = None) -> None:
        """Send one event of `kind` (dropped on the other ranks unless it is an error); its numbers to the sinks."""
        self.sinks.record(kind, data or {})  # only the main rank opens sinks: the others' record nothing
        if self._on_event is None or (self._rank != 0 and level != "error"):
            return
        if self._rank != 0:
            message = f"rank {self._rank}: {message}"
        self._on_event(TrainingEvent(kind=kind, message=message, level=level, data=data or {}))

    def message(self, text: str, *, level: Any = "info") -> None:
        """Send a plain message event."""
        self.emit("message", text, level=level)


def log_metrics(attempt: Attempt, validation: dict[str, float] | None = None) -> float:
    """Emit a metrics event (with `validation`'s batch metrics) and a telemetry sample; return the mean loss."""
    state, setup = attempt.state, attempt.setup
    sample = {"step": state.step, **attempt.sampler.sample()}
    if setup.telemetry is not None:  # the main rank's; the other ranks write none
        setup.telemetry.write(sample)
    setup.report.emit("telemetry", data=sample)
    train_loss = mean(attempt.window)
    metrics = {
        "step": state.step,
        "train_loss": train_loss,
        **attempt.accuracy.as_metrics(setup.ranks),
        **attempt.rewards.means(setup.ranks),  # --method dpo: the window's reward stats (in place of a token accuracy)
        **(validation or {}),
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
    attempt.accuracy.clear()
    return train_loss


def final_metrics(attempt: Attempt) -> dict[str, Any]:
    """The metrics a finished or stopped run returns (and the manifest records)."""
    state, setup = attempt.state, attempt.setup
    sample = attempt.sampler.sample()
    metrics: dict[str, Any] = {
        "step": state.step,
        "total_steps": state.total_steps,
        "train_loss": mean(state.recent_losses[-setup.options.logging_steps :]),
        **attempt.accuracy.as_metrics(setup.ranks),
        "tokens_per_second": attempt.throughput.overall_tokens_per_second(),
        "runtime_seconds": time.perf_counter() - attempt.started,
        "peak_memory_bytes": max(attempt.peak_memory_bytes, int(sample["peak_bytes"])),
        "memory_source": sample["source"],
        "start_rss_bytes": setup.report.start_rss_bytes,
        "estimate_bytes": setup.plan.estimate_bytes,
        "micro_batch_size": state.micro_batch_size,
        "gradient_accumulation_steps": state.gradient_accumulation_steps,
        "lr_scale": state.lr_scale,
        "oom_recoveries": setup.healing.oom_retries,
        "divergence_recoveries": setup.healing.divergence_retries,
    }
    # The last checkpoint's validation (this step's: a run ends with one) and its whole-file metrics.
    kept = {"eval_loss", *OPENAI_METRICS} - {"step", "train_loss", "train_mean_token_accuracy"}
    metrics.update({key: value for key, value in state.metrics.items() if key in kept})
    return metrics


def summary(attempt: Attempt, metrics: dict[str, Any]) -> str:
    """The closing line: steps, speed, final loss, peak memory against the plan, where the output is."""
    what = "adapter" if attempt.setup.options.use_lora else "full model"
    shown = _present(metrics, ("train_mean_token_accuracy", *DPO_METRICS, "full_valid_loss",
                               "full_valid_mean_token_accuracy"))
    return (
        f"Done: {metrics['step']} steps in {metrics['runtime_seconds']:.1f} s, "
        f"{metrics['tokens_per_second']:.0f} tokens/s, train_loss {metrics['train_loss']:.4f}"
        f"{shown}; {memory_against_plan(metrics)}; "
        f"the {what} is in {Path(attempt.setup.options.output_dir)}"
    )


def memory_against_plan(metrics: dict[str, Any]) -> str:
    """Peak memory beside the plan, like with like: on the CPU, RSS above what the process held before loading."""
    plan = f"a plan of {metrics['estimate_bytes'] / GIB:.2f} GiB"
    peak = metrics["peak_memory_bytes"]
    if metrics.get("memory_source") != "rss":
        return f"peak memory {peak / GIB:.2f} GiB against {plan}"
    # RSS counts the interpreter and the libraries (hundreds of MiB before any tensor), which the plan does not;
    # what the run gained still holds the libraries imported while loading (transformers' models, peft: ~0.2 GiB).
    training = max(0, peak - int(metrics.get("start_rss_bytes", 0)))
    return (
        f"peak process RSS {peak / GIB:.2f} GiB, {training / GIB:.2f} GiB of it above the "
        f"{metrics.get('start_rss_bytes', 0) / GIB:.2f} GiB held before the data, model and their libraries loaded, "
        f"against {plan}"
    )


def metrics_line(metrics: dict[str, Any]) -> str:
    """One logging step's metrics as the line the log shows."""
    shown = _present(metrics, ("train_mean_token_accuracy", *DPO_METRICS, "valid_loss", "valid_mean_token_accuracy"))
    return (
        f"step {metrics['step']}/{metrics['total_steps']}: train_loss {metrics['train_loss']:.4f}{shown}, "
        f"lr {metrics['learning_rate']:.2e}, {metrics['tokens_per_second']:.0f} tokens/s, "
        f"memory {metrics['gpu_memory_used_bytes'] / GIB:.2f} GiB (peak {metrics['peak_memory_bytes'] / GIB:.2f})"
    )


def _present(metrics: dict[str, Any], names: tuple[str, ...]) -> str:
    """`, name value` for each of `names` the metrics hold (a DPO run has no token accuracy: none is printed)."""
    return "".join(f", {name} {metrics[name]:.4f}" for name in names if name in metrics)


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
