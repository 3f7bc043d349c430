"""What the trainer reports while it runs: the `on_event` callback's payloads and the run's result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# Exit codes of train_safe.py, which the worker reads from its child process.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_OPTIONS = 2
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGINT after writing a checkpoint (EX_TEMPFAIL)

EventKind = Literal["message", "metrics", "checkpoint", "telemetry", "plan"]
# What a --method dpo run reports beside train_loss (TRL's names), in place of a token accuracy.
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


@dataclass(frozen=True)
class TrainingEvent:
    """One report from the trainer.

    kind: message (`message`, `level`), metrics (`data`: step, train_loss, learning_rate,
    tokens_per_second, gpu_memory_used_bytes, peak_memory_bytes, epoch, total_steps), checkpoint
    (`data`: step, path, metrics), telemetry (`data`: one memory sample), plan (`data`: the memory plan).
    """

    kind: EventKind
    message: str = ""
    level: Literal["info", "warn", "error"] = "info"
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "level": self.level, "data": self.data}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TrainingEvent:
        return cls(
            kind=payload["kind"],
            message=payload.get("message", ""),
            level=payload.get("level", "info"),
            data=payload.get("data", {}),
        )


EventCallback = Callable[[TrainingEvent], None]

RunStatus = Literal["succeeded", "failed", "stopped"]
FailureCode = Literal["out_of_memory", "diverged", "invalid_training_file", "invalid_options", "error"]


@dataclass
class TrainResult:
    """How one run ended, and where its output is."""

    status: RunStatus
    output_dir: str
    adapter_dir: str | None = None
    steps: int = 0
    trained_tokens: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    error_code: FailureCode | None = None
    error_message: str | None = None
