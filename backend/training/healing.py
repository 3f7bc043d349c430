"""Self-healing: what the run does after an attempt runs out of memory or diverges, and the faults tests inject.

An out-of-memory halves the micro-batch and doubles the gradient accumulation (the effective batch stays);
a NaN or infinite loss or gradient norm rolls back to the last good checkpoint with the learning rate halved.
Each has a cap (--max_oom_retries, --max_divergence_retries); past it the run fails with a message that
says what to change. The decisions live in `Healing`, which outlives the attempts it heals.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.training.checkpoints import read_trainer_state, resolve_resume_checkpoint
from backend.training.events import FailureCode
from backend.training.options import TrainingOptions
from backend.training.reporting import Reporter


class Diverged(Exception):
    """A NaN or infinite loss or gradient norm at `step`."""

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(f"diverged at step {step}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


@dataclass
class Fault:
    """Why an attempt ended early: out of memory or diverged, at `step` (0: before the first step)."""

    kind: FailureCode
    step: int
    loss: float | None = None
    grad_norm: float | None = None


@dataclass
class Healing:
    """What outlives a failed attempt: the settings to retry with, the retries spent, the faults injected."""

    effective_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    lr_scale: float = 1.0
    resume_from: Path | None = None  # the last good checkpoint (saved or loaded by this run)
    oom_retries: int = 0
    divergence_retries: int = 0
    injected_oom: bool = False
    injected_nan: bool = False
    step_in_progress: int = 0

    @classmethod
    def start(cls, options: TrainingOptions, report: Reporter) -> Healing:
        """From the options, or from the checkpoint being resumed (whose micro-batch may have been halved)."""
        healing = cls(options.effective_batch_size, options.per_device_train_batch_size,
                      options.gradient_accumulation_steps)
        resume = resolve_resume_checkpoint(options.resume_from_checkpoint, options.output_dir)
        if options.resume_from_checkpoint == "latest" and resume is None:
            report.message(f"No complete checkpoint in {options.output_dir} yet: starting from step 0")
        if resume is not None:
            saved = read_trainer_state(resume)
            healing.resume_from = resume
            healing.lr_scale = saved.lr_scale
            if saved.effective_batch_size == options.effective_batch_size:
                healing.micro_batch_size = saved.micro_batch_size
                healing.gradient_accumulation_steps = saved.gradient_accumulation_steps
        return healing

    def recover(self, fault: Fault, options: TrainingOptions, report: Reporter) -> str | None:
        """Change the settings for the next attempt and announce it; or the failure message when capped."""
        if fault.kind == "out_of_memory":
            return self._after_out_of_memory(fault, options, report)
        return self._after_divergence(fault, options, report)

    def _after_out_of_memory(self, fault: Fault, options: TrainingOptions, report: Reporter) -> str | None:
        micro, accumulation = self.micro_batch_size, self.gradient_accumulation_steps
        if fault.step == 0:
            return (
                "Out of memory while loading the model or its checkpoint, before any step: a smaller micro-batch "
                "cannot help. Try --use_4bit or --use_8bit with --use_lora, or --device_map auto with --max_memory"
            )
        if self.oom_retries >= options.max_oom_retries or micro == 1:
            why = "the micro-batch cannot be halved further" if micro == 1 else (
                f"{self.oom_retries} recoveries spent (--max_oom_retries {options.max_oom_retries})")
            return (
                f"Out of memory at step {fault.step} with micro-batch {micro} and gradient accumulation "
                f"{accumulation}: {why}. Try --use_4bit, --gradient_checkpointing or a shorter --max_seq_length"
            )
        self.oom_retries += 1
        self.micro_batch_size = micro // 2
        self.gradient_accumulation_steps = math.ceil(self.effective_batch_size / self.micro_batch_size)
        report.message(
            f"Out of memory at step {fault.step} with micro-batch {micro}: retrying with micro-batch "
            f"{self.micro_batch_size} and gradient accumulation {self.gradient_accumulation_steps} (effective "
            f"batch {self.effective_batch_size} unchanged) from {self._resume_point()} "
            f"(recovery {self.oom_retries} of {options.max_oom_retries})",
            level="warn",
        )
        return None

    def _after_divergence(self, fault: Fault, options: TrainingOptions, report: Reporter) -> str | None:
        numbers = f"loss {fault.loss}, gradient norm {fault.grad_norm}, micro-batch {self.micro_batch_size}"
        if self.divergence_retries >= options.max_divergence_retries:
            return (
                f"Training diverged at step {fault.step} ({numbers}, learning rate scale {self.lr_scale}) after "
                f"{self.divergence_retries} rollbacks (--max_divergence_retries {options.max_divergence_retries}). "
                "Try a lower --learning_rate or more --warmup_ratio"
            )
        self.divergence_retries += 1
        self.lr_scale /= 2
        report.message(
            f"Non-finite values at step {fault.step} ({numbers}): rolling back to {self._resume_point()} with "
            f"the learning rate halved (scale {self.lr_scale}) "
            f"(rollback {self.divergence_retries} of {options.max_divergence_retries})",
            level="warn",
        )
        return None

    def _resume_point(self) -> str:
        return str(self.resume_from) if self.resume_from is not None else "the start (no checkpoint yet)"


def deepspeed_cannot_resplit(
    healing: Healing, fault: Fault, options: TrainingOptions, *, deepspeed: bool
) -> str | None:
    """The failure message for an OOM under DeepSpeed, whose engine fixed its batch sizes when it was built."""
    if fault.kind != "out_of_memory" or not deepspeed:
        return None
    return (
        f"Out of memory at step {fault.step} under DeepSpeed {options.deepspeed} with micro-batch "
        f"{healing.micro_batch_size}: rerun with a smaller --per_device_train_batch_size (and more "
        "--gradient_accumulation_steps), or an -offload preset"
    )


def maybe_inject_oom(healing: Healing, options: TrainingOptions, step: int) -> None:
    """--inject_oom_at_step: raise the error a real OOM raises, once per run."""
    if options.inject_oom_at_step == step and not healing.injected_oom:
        healing.injected_oom = True
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step} by --inject_oom_at_step)")


def maybe_inject_nan(healing: Healing, options: TrainingOptions, step: int, loss: torch.Tensor) -> torch.Tensor:
    """--inject_nan_at_step: the loss made NaN, once per run (so its gradients are NaN too)."""
    if options.inject_nan_at_step == step and not healing.injected_nan:
        healing.injected_nan = True
        return loss * float("nan")
    return loss


def free_memory() -> None:
    """Collect a failed attempt's objects and give the allocator's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the cached blocks back so the retry starts from a clean allocator
