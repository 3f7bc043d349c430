"""The state a training run carries, defined before the loop in trainer.py that uses it.

`TrainingSetup` is what every attempt of one run shares: the options, the plan, the tokenized data, the
healing settings and the ranks. An `Attempt` holds one attempt's live objects (model, optimizer, schedule,
counters); after an out-of-memory or a divergence it is dropped whole and the next one starts fresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.training.checkpoints import TrainerState
from backend.training.distributed import Ranks
from backend.training.dpo import RewardTally
from backend.training.healing import Healing
from backend.training.offload import compute_device
from backend.training.options import TrainingOptions
from backend.training.reporting import Reporter, TokenAccuracy
from backend.training.telemetry import MemorySampler, TelemetryWriter, ThroughputMeter


@dataclass
class TrainingData:
    """The run's data, validated and tokenized once before the first attempt."""

    # TokenizedExample for supervised runs, preference_data.PreferenceExample for --method dpo
    train: list[Any]
    validation: list[Any] | None
    pad_token_id: int
    eval_tasks: list[Any] = field(default_factory=list)  # --eval_data's HumanEval-shaped tasks


@dataclass
class TrainingSetup:
    """What every attempt of one run shares."""

    options: TrainingOptions
    plan: Any
    data: TrainingData
    healing: Healing
    report: Reporter
    telemetry: TelemetryWriter | None  # None on the ranks other than the main one
    stop_requested: Callable[[], bool]
    ranks: Ranks = field(default_factory=Ranks)


@dataclass
class Attempt:
    """One attempt's live objects."""

    setup: TrainingSetup
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[torch.nn.Parameter]
    state: TrainerState = field(default_factory=TrainerState)
    saved_step: int | None = None
    window: list[float] = field(default_factory=list)  # step losses since the last log line
    throughput: ThroughputMeter = field(default_factory=ThroughputMeter)
    sampler: MemorySampler = field(default_factory=MemorySampler)
    started: float = field(default_factory=time.perf_counter)
    peak_memory_bytes: int = 0
    learning_rate: float = 0.0
    forward_model: Any = None  # what the loop calls: the model, or its DDP / DeepSpeed wrapper across ranks
    loss_head: Any = None  # lm_head for the chunked loss (chunked_loss.py); None: the plain loss on full logits
    accuracy: TokenAccuracy = field(default_factory=TokenAccuracy)  # argmax hits since the last log line
    rewards: RewardTally = field(default_factory=RewardTally)  # --method dpo: rewards since the last log line

    def __post_init__(self) -> None:
        ranks = self.setup.ranks
        if self.forward_model is None:
            self.forward_model = self.model
        self.device = ranks.device or compute_device(self.model)
        options = self.setup.options
        self.autocast_dtype = torch.bfloat16 if options.bf16 else torch.float16 if options.fp16 else None
        # Loss scaling is for fp16 on CUDA only; disabled, the scaler passes every call straight through.
        # DeepSpeed scales the loss itself.
        use_scaler = options.fp16 and self.device.type == "cuda" and not ranks.deepspeed
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.loss_scaled = options.fp16 and (use_scaler or ranks.deepspeed)

    def autocast(self) -> torch.autocast:
        """Mixed precision for the forward pass when --fp16/--bf16 asked for it; a no-op otherwise."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)
