"""The memory-safe training loop: plan before loading, train with self-healing, checkpoint, write the adapter.

`run_training(options)` reads top to bottom: plan the memory from the model's config (nothing loaded),
tokenize the data, then one attempt after another until one ends: `_setup_model`, `_setup_optimizer`,
restore the last checkpoint if there is one, and the visible loop in `_train_loop`. An attempt that runs
out of memory or diverges is thrown away whole (model, optimizer, activations) and the next one resumes
from the last complete checkpoint with a halved micro-batch or a halved learning rate.
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from backend.training.checkpoints import (
    CheckpointError,
    TrainerState,
    load_checkpoint,
    read_trainer_state,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from backend.training.datasets import (
    BUILTIN_DATASET,
    IGNORE_INDEX,
    DatasetError,
    TokenizedExample,
    collate,
    load_examples,
    tokenize_examples,
)
from backend.training.events import EventCallback, FailureCode, TrainingEvent, TrainResult
from backend.training.manifest import assert_not_base_folder, save_adapter, write_manifest
from backend.training.options import TrainingOptions
from backend.training.telemetry import MemorySampler, TelemetryWriter, ThroughputMeter

MAX_GRAD_NORM = 1.0
RECENT_LOSSES_KEPT = 20
GIB = 1024**3


# ---------------------------------------------------------------------------------------------------------
# The run, top to bottom


def run_training(
    options: TrainingOptions,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train as `options` say; a failed run is returned (status "failed", error_code), never raised."""
    report = _Reporter(on_event)
    try:
        _refuse_deepspeed_here(options)
        options, plan = _plan_before_loading(options, report)
        if options.dry_run:
            metrics = {"plan": plan.to_dict(), "options": options.model_dump(mode="json")}
            return TrainResult(status="succeeded", output_dir=options.output_dir, metrics=metrics)
        data = _setup_data(options)
        healing = _Healing.start(options, report)
    except DatasetError as error:
        return _failed(options, "invalid_training_file", str(error), report)
    except (ValueError, CheckpointError, OSError) as error:
        return _failed(options, "invalid_options", str(error), report)
    with TelemetryWriter(Path(options.output_dir)) as telemetry:
        session = _Session(options, plan, data, healing, report, telemetry, stop_requested or _never)
        try:
            return _train_with_healing(session)
        except ValueError as error:  # refused while loading: model source, precision, LoRA targets
            return _failed(options, "invalid_options", str(error), report)
        except Exception as error:
            report.emit("message", f"{type(error).__name__}: {error}", level="error",
                        data={"traceback": traceback.format_exc()})
            return _failed(options, "error", f"{type(error).__name__}: {error}", report)


def _train_with_healing(session: _Session) -> TrainResult:
    """Run attempts until one finishes, stops, or the retries run out."""
    while True:
        fault: _Fault
        try:
            return _attempt(session)
        except torch.OutOfMemoryError:
            fault = _Fault("out_of_memory", session.healing.step_in_progress)
        except _Diverged as diverged:
            fault = _Fault("diverged", diverged.step, diverged.loss, diverged.grad_norm)
        # Only now, outside the except block, are the failed attempt's frames (model, optimizer,
        # activations) unreachable, so this is where their memory can really be given back.
        _free_memory()
        failure = session.healing.recover(fault, session.options, session.report)
        if failure is not None:
            return _failed(session.options, fault.kind, failure, session.report)


def _attempt(session: _Session) -> TrainResult:
    """One attempt: a fresh model and optimizer, restored from the last good checkpoint when there is one."""
    _seed_everything(session.options.seed)
    session.healing.step_in_progress = 0  # an OOM before the first step is a loading problem, not a batch one
    model, tokenizer = _setup_model(session.options, session.report)
    total_steps = _total_steps(session.options, len(session.data.train))
    optimizer, scheduler = _setup_optimizer(model, session.options, total_steps, session.healing.lr_scale)
    run = _Run(session, model, tokenizer, optimizer, scheduler, _trainable_parameters(model))
    run.state = _restore(run, total_steps)
    return _train_loop(run)


# ---------------------------------------------------------------------------------------------------------
# Before anything loads


def _refuse_deepspeed_here(options: TrainingOptions) -> None:
    """Refuse --deepspeed before anything loads: train_safe.py re-executes under `accelerate launch` where it can."""
    if not options.deepspeed:
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        raise ValueError(
            f"--deepspeed {options.deepspeed}: sharding with DeepSpeed inside `accelerate launch` is not built "
            "into this trainer yet; run without --deepspeed (on one GPU: --use_4bit/--use_8bit with "
            "--gradient_checkpointing)"
        )
    from backend.training.deepspeed_presets import deepspeed_available

    have = "DeepSpeed is installed" if deepspeed_available() else "DeepSpeed is not installed"
    raise ValueError(
        f"--deepspeed {options.deepspeed} needs DeepSpeed and more than one GPU: {have} and this machine has "
        f"{torch.cuda.device_count()} GPU(s). Drop --deepspeed; on one GPU use --use_4bit or --use_8bit with "
        "--gradient_checkpointing"
    )


def _plan_before_loading(options: TrainingOptions, report: _Reporter) -> tuple[TrainingOptions, Any]:
    """Apply the guide's safe defaults and plan the peak memory from the config alone (meta device)."""
    from backend.training.memory import (
        apply_safe_defaults,
        device_budget_bytes,
        format_plan,
        load_model_config,
        plan_memory,
    )
    from backend.training.modeling import check_precision_supported, resolve_model_source

    source = resolve_model_source(options.model)
    assert_not_base_folder(options.output_dir, source)
    config = load_model_config(source, trust_remote_code=options.trust_remote_code)
    budget_bytes, device = device_budget_bytes(options)
    options, announcements = apply_safe_defaults(options, config, budget_bytes=budget_bytes)
    for note in [*announcements, *check_precision_supported(options)]:
        report.message(note)
    plan = plan_memory(options, config, budget_bytes=budget_bytes)
    # The options as resolved (safe defaults applied) ride along: they are what the run really uses.
    report.emit("plan", format_plan(plan), data={**plan.to_dict(), "device": device,
                                                  "options": options.model_dump(mode="json")})
    if not plan.fits:
        report.message(f"The plan does not fit the budget: {plan.recommendation}", level="warn")
    return options, plan


def _setup_data(options: TrainingOptions) -> _Data:
    """Validate and tokenize the training (and validation) data once; every attempt reuses it."""
    from backend.training.modeling import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(options.model), trust_remote_code=options.trust_remote_code)
    train = _tokenized(options.data or BUILTIN_DATASET, options, tokenizer)
    validation = _tokenized(options.validation_data, options, tokenizer) if options.validation_data else None
    return _Data(train, validation, int(tokenizer.pad_token_id), _eval_tasks(options))


def _eval_tasks(options: TrainingOptions) -> list[Any]:
    """--eval_data's tasks, validated now so a bad file fails before any training time is spent."""
    if not options.eval_data:
        return []
    from backend.evaluation.harness import EvalDataError, load_tasks

    try:
        return load_tasks(options.eval_data)
    except EvalDataError as error:
        raise DatasetError(None, f"--eval_data {options.eval_data}: {error}") from None


def _tokenized(path: str | Path, options: TrainingOptions, tokenizer: Any) -> list[TokenizedExample]:
    fmt, examples = load_examples(path)
    tokenized = tokenize_examples(
        examples, fmt, tokenizer,
        max_seq_length=options.max_seq_length,
        train_on_completions_only=options.train_on_completions_only,
        packing=options.packing,
    )
    if not tokenized:
        raise DatasetError(None, f"{path}: no example has a token to train on after tokenization")
    return tokenized


# ---------------------------------------------------------------------------------------------------------
# Setup of one attempt


def _setup_model(options: TrainingOptions, report: _Reporter) -> tuple[Any, Any]:
    """The base model, quantized, checkpointed and wrapped with LoRA as the options say, in training mode."""
    from backend.training.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(options)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    report.message(f"Loaded {options.model}: {trainable:,} of {total:,} parameters trainable")
    return model, tokenizer


def _setup_optimizer(
    model: Any, options: TrainingOptions, total_steps: int, lr_scale: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the trainable parameters, with linear warmup (warmup_ratio) then linear decay to zero."""
    optimizer = torch.optim.AdamW(
        _trainable_parameters(model), lr=options.resolved_learning_rate, weight_decay=options.weight_decay
    )
    warmup_steps = math.ceil(total_steps * options.warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return lr_scale * (step + 1) / warmup_steps
        return lr_scale * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _restore(run: _Run, total_steps: int) -> TrainerState:
    """A fresh trainer state, or the last good checkpoint's, with the settings the healing chose."""
    healing = run.session.healing
    state = TrainerState(total_steps=total_steps)
    if healing.resume_from is not None:
        state = load_checkpoint(healing.resume_from, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
        # The optimizer state carries the learning rate of its time; the schedule (and its scale) decides now.
        for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * factor(run.scheduler.last_epoch)
        run.session.report.message(f"Resumed from {healing.resume_from} at step {state.step}")
    state.total_steps = total_steps
    state.effective_batch_size = healing.effective_batch_size
    state.micro_batch_size = healing.micro_batch_size
    state.gradient_accumulation_steps = healing.gradient_accumulation_steps
    state.lr_scale = healing.lr_scale
    run.saved_step = state.step if healing.resume_from is not None else None
    return state


# ---------------------------------------------------------------------------------------------------------
# The loop


def _train_loop(run: _Run) -> TrainResult:
    """One optimizer step per iteration; logging, checkpoints and the stop check at each step boundary."""
    state, options = run.state, run.session.options
    order = _epoch_order(len(run.session.data.train), options.seed, state.epoch)
    with _progress_bar(state.step, state.total_steps) as bar:
        while state.step < state.total_steps:
            if run.session.stop_requested():
                return _stop(run)
            start = state.examples_seen_in_epoch
            indices = order[start : start + state.effective_batch_size]
            loss, tokens = _optimizer_step(run, [run.session.data.train[i] for i in indices])
            if _advance(state, len(indices), len(order), loss, tokens):
                order = _epoch_order(len(order), options.seed, state.epoch)
            run.window.append(loss)
            run.throughput.update(tokens)
            bar.update(1)
            if state.step % options.logging_steps == 0 or state.step == state.total_steps:
                bar.set_postfix(loss=f"{_log_metrics(run):.4f}")
            if options.save_steps and state.step % options.save_steps == 0:
                _save(run)
    if run.session.stop_requested():
        return _stop(run)
    return _finish(run)


def _optimizer_step(run: _Run, examples: list[TokenizedExample]) -> tuple[float, int]:
    """One optimizer step over `examples`, split into micro-batches; returns the step's loss and input tokens."""
    step = run.state.step + 1
    run.session.healing.step_in_progress = step
    _maybe_inject_oom(run, step)
    # The loss is summed over tokens and divided by the step's trained tokens, so it does not depend on how
    # the step is split into micro-batches: an OOM recovery that halves the micro-batch trains the same.
    label_tokens = max(1, sum(_trained_tokens(example) for example in examples))
    micro_losses: list[torch.Tensor] = []
    input_tokens = 0
    for micro_batch in _chunks(examples, run.state.micro_batch_size):
        batch = collate(micro_batch, run.session.data.pad_token_id)
        input_tokens += int(batch["attention_mask"].sum())
        loss = _summed_loss(run, batch) / label_tokens
        loss = _maybe_inject_nan(run, step, loss)
        run.scaler.scale(loss).backward()
        micro_losses.append(loss.detach().float())  # stays on the device: no sync per micro-batch
        del loss, batch  # the graph is gone after backward; drop the inputs before the next forward
    grad_norm_tensor = _clip_gradients(run)
    # One device sync per step, for the loss and the gradient norm together.
    step_loss = torch.stack([value.to(grad_norm_tensor.device) for value in micro_losses]).sum()
    loss_value, grad_norm = torch.stack([step_loss, grad_norm_tensor.float()]).tolist()
    # With fp16 the scaler skips steps whose gradients overflowed (and lowers its scale): that is not divergence.
    grad_diverged = not run.scaler.is_enabled() and not math.isfinite(grad_norm)
    if not math.isfinite(loss_value) or grad_diverged:
        raise _Diverged(step, loss_value, grad_norm)
    run.learning_rate = run.optimizer.param_groups[0]["lr"]  # the rate this step used, for the metrics
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # None, not zeros: gradient memory is freed between steps
    return loss_value, input_tokens


def _summed_loss(run: _Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cross-entropy of one micro-batch, summed over its trained tokens."""
    input_ids = batch["input_ids"].to(run.device)
    attention_mask = batch["attention_mask"].to(run.device)
    with run.autocast():
        outputs = run.model(input_ids=input_ids, attention_mask=attention_mask)
    logits = outputs.logits[:, :-1]
    del outputs  # holds other per-layer outputs when a model returns them; only the logits are needed
    labels = batch["labels"][:, 1:].to(logits.device)
    # A float32 log-softmax is stable under fp16/bf16; its vocabulary-wide copy lives only until backward.
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _clip_gradients(run: _Run) -> torch.Tensor:
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
    return torch.nn.utils.clip_grad_norm_(run.trainable, MAX_GRAD_NORM)


def _advance(state: TrainerState, n_examples: int, epoch_size: int, loss: float, tokens: int) -> bool:
    """Count one finished step; True when it finished an epoch (the next step reads a new shuffle)."""
    state.step += 1
    state.trained_tokens += tokens
    state.recent_losses = [*state.recent_losses, loss][-RECENT_LOSSES_KEPT:]
    state.examples_seen_in_epoch += n_examples
    if state.examples_seen_in_epoch < epoch_size:
        return False
    state.epoch += 1
    state.examples_seen_in_epoch = 0
    return True


def _log_metrics(run: _Run) -> float:
    """Emit a metrics event and a telemetry sample (also written to telemetry.jsonl); return the mean loss."""
    state, session = run.state, run.session
    sample = {"step": state.step, **run.sampler.sample()}
    session.telemetry.write(sample)
    session.report.emit("telemetry", data=sample)
    train_loss = _mean(run.window)
    metrics = {
        "step": state.step,
        "train_loss": train_loss,
        "learning_rate": run.learning_rate,
        "tokens_per_second": run.throughput.tokens_per_second(),
        "gpu_memory_used_bytes": sample["used_bytes"],
        "peak_memory_bytes": sample["peak_bytes"],
        "epoch": state.epoch + state.examples_seen_in_epoch / len(session.data.train),
        "total_steps": state.total_steps,
    }
    run.peak_memory_bytes = max(run.peak_memory_bytes, int(sample["peak_bytes"]))
    session.report.emit("metrics", _metrics_line(metrics), data=metrics)
    run.window.clear()
    return train_loss


def _save(run: _Run) -> Path:
    """Write a complete checkpoint (with the validation loss when there is validation data) and announce it."""
    state, session = run.state, run.session
    metrics: dict[str, Any] = {"train_loss": _mean(state.recent_losses[-session.options.logging_steps :])}
    if session.data.validation is not None:
        metrics["eval_loss"] = _validation_loss(run)
        session.report.message(f"step {state.step}: validation loss {metrics['eval_loss']:.4f}")
    state.metrics = metrics
    path = save_checkpoint(
        session.options.output_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        state=state, save_total_limit=session.options.save_total_limit,
    )
    session.healing.resume_from = path
    run.saved_step = state.step
    session.report.emit("checkpoint", f"Checkpoint at step {state.step}: {path}",
                        data={"step": state.step, "path": str(path), "metrics": metrics})
    return path


@torch.no_grad()
def _validation_loss(run: _Run) -> float:
    """Mean loss per trained token over the validation data, in eval mode (no dropout)."""
    validation = run.session.data.validation or []
    run.model.eval()
    total, tokens = 0.0, 0
    for micro_batch in _chunks(validation, run.state.micro_batch_size):
        total += float(_summed_loss(run, collate(micro_batch, run.session.data.pad_token_id)))
        tokens += sum(_trained_tokens(example) for example in micro_batch)
    run.model.train()
    return total / max(1, tokens)


# ---------------------------------------------------------------------------------------------------------
# How an attempt ends


def _stop(run: _Run) -> TrainResult:
    """Stopped on request: checkpoint at this step boundary (unless just saved) and say how to resume."""
    path = run.session.healing.resume_from if run.saved_step == run.state.step else _save(run)
    run.session.report.message(
        f"Stopped at step {run.state.step}: checkpoint {path}; resume with --resume_from_checkpoint latest",
        level="warn",
    )
    return TrainResult(
        status="stopped", output_dir=run.session.options.output_dir, steps=run.state.step,
        trained_tokens=run.state.trained_tokens, metrics=_final_metrics(run),
    )


def _finish(run: _Run) -> TrainResult:
    """Last checkpoint, then the adapter (or full model), the manifest and the summary."""
    from backend.training.modeling import resolve_model_source, weight_files_sha256

    session, state = run.session, run.state
    if run.saved_step != state.step:
        _save(run)
    output_dir = session.options.output_dir
    source = resolve_model_source(session.options.model)
    save_adapter(run.model, run.tokenizer, output_dir, base_folder=source)
    metrics = _final_metrics(run)
    evaluation = _evaluate(run)
    if evaluation is not None:
        metrics["pass_at_k"] = evaluation.get("pass_at_k")
    write_manifest(
        output_dir, base_model=session.options.model, base_weight_sha256=weight_files_sha256(source),
        options=session.options, metrics=metrics, extra={"evaluation": evaluation} if evaluation else None,
    )
    session.report.message(_summary(run, metrics))
    return TrainResult(
        status="succeeded", output_dir=output_dir, adapter_dir=output_dir, steps=state.step,
        trained_tokens=state.trained_tokens, metrics=metrics,
    )


def _evaluate(run: _Run) -> dict[str, Any] | None:
    """Greedy pass@1 of the trained model on --eval_data, every completion run in the sandbox; None without it."""
    tasks, report = run.session.data.eval_tasks, run.session.report
    if not tasks:
        return None
    from backend.evaluation.harness import evaluate_model
    from backend.evaluation.sandbox import SandboxUnavailable

    run.model.eval()
    run.model.config.use_cache = True  # generation, unlike training, wants the KV cache
    try:
        result = evaluate_model(run.model, run.tokenizer, tasks, temperature=0.0)
    except SandboxUnavailable as error:  # fails closed: nothing generated runs outside the sandbox
        report.message(f"Evaluation skipped: {error}", level="warn")
        return {"error": str(error)}
    finally:
        run.model.config.use_cache = False
    report.message(f"Evaluation on {len(tasks)} tasks (sandboxed): pass@1 {result.pass_at_k['pass@1']:.3f}")
    return result.to_dict(include_samples=False)


def _final_metrics(run: _Run) -> dict[str, Any]:
    state, session = run.state, run.session
    elapsed = time.perf_counter() - run.started
    metrics: dict[str, Any] = {
        "step": state.step,
        "total_steps": state.total_steps,
        "train_loss": _mean(state.recent_losses[-session.options.logging_steps :]),
        "tokens_per_second": run.throughput.overall_tokens_per_second(),
        "runtime_seconds": elapsed,
        "peak_memory_bytes": max(run.peak_memory_bytes, int(run.sampler.sample()["peak_bytes"])),
        "estimate_bytes": session.plan.estimate_bytes,
        "micro_batch_size": state.micro_batch_size,
        "gradient_accumulation_steps": state.gradient_accumulation_steps,
        "lr_scale": state.lr_scale,
        "oom_recoveries": session.healing.oom_retries,
        "divergence_recoveries": session.healing.divergence_retries,
    }
    metrics.update({key: value for key, value in state.metrics.items() if key == "eval_loss"})
    return metrics


def _summary(run: _Run, metrics: dict[str, Any]) -> str:
    what = "adapter" if run.session.options.use_lora else "full model"
    return (
        f"Done: {metrics['step']} steps in {metrics['runtime_seconds']:.1f} s, "
        f"{metrics['tokens_per_second']:.0f} tokens/s, final loss {metrics['train_loss']:.4f}; "
        f"peak memory {metrics['peak_memory_bytes'] / GIB:.2f} GiB against a plan of "
        f"{metrics['estimate_bytes'] / GIB:.2f} GiB; the {what} is in {Path(run.session.options.output_dir)}"
    )


def _failed(options: TrainingOptions, code: FailureCode, message: str, report: _Reporter) -> TrainResult:
    report.message(message, level="error")
    return TrainResult(status="failed", output_dir=options.output_dir, error_code=code, error_message=message)


# ---------------------------------------------------------------------------------------------------------
# Self-healing


class _Diverged(Exception):
    """A NaN or infinite loss or gradient norm at `step`."""

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(f"diverged at step {step}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


@dataclass
class _Fault:
    kind: FailureCode
    step: int
    loss: float | None = None
    grad_norm: float | None = None


@dataclass
class _Healing:
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
    def start(cls, options: TrainingOptions, report: _Reporter) -> _Healing:
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

    def recover(self, fault: _Fault, options: TrainingOptions, report: _Reporter) -> str | None:
        """Change the settings for the next attempt and announce it; or the failure message when capped."""
        if fault.kind == "out_of_memory":
            return self._after_out_of_memory(fault, options, report)
        return self._after_divergence(fault, options, report)

    def _after_out_of_memory(self, fault: _Fault, options: TrainingOptions, report: _Reporter) -> str | None:
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

    def _after_divergence(self, fault: _Fault, options: TrainingOptions, report: _Reporter) -> str | None:
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


def _maybe_inject_oom(run: _Run, step: int) -> None:
    healing = run.session.healing
    if run.session.options.inject_oom_at_step == step and not healing.injected_oom:
        healing.injected_oom = True
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step} by --inject_oom_at_step)")


def _maybe_inject_nan(run: _Run, step: int, loss: torch.Tensor) -> torch.Tensor:
    healing = run.session.healing
    if run.session.options.inject_nan_at_step == step and not healing.injected_nan:
        healing.injected_nan = True
        return loss * float("nan")
    return loss


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the cached blocks back so the retry starts from a clean allocator


# ---------------------------------------------------------------------------------------------------------
# Plumbing


class _Reporter:
    """Sends TrainingEvents to the caller's callback (if any)."""

    def __init__(self, on_event: EventCallback | None) -> None:
        self._on_event = on_event

    def emit(self, kind: Any, message: str = "", *, level: Any = "info", data: dict[str, Any] | None = None) -> None:
        if self._on_event is not None:
            self._on_event(TrainingEvent(kind=kind, message=message, level=level, data=data or {}))

    def message(self, text: str, *, level: Any = "info") -> None:
        self.emit("message", text, level=level)


@dataclass
class _Data:
    train: list[TokenizedExample]
    validation: list[TokenizedExample] | None
    pad_token_id: int
    eval_tasks: list[Any] = field(default_factory=list)  # --eval_data's HumanEval-shaped tasks


@dataclass
class _Session:
    """What every attempt of one run shares."""

    options: TrainingOptions
    plan: Any
    data: _Data
    healing: _Healing
    report: _Reporter
    telemetry: TelemetryWriter
    stop_requested: Callable[[], bool]


@dataclass
class _Run:
    """One attempt's live objects."""

    session: _Session
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

    def __post_init__(self) -> None:
        self.device = self.model.get_input_embeddings().weight.device
        options = self.session.options
        self.autocast_dtype = torch.bfloat16 if options.bf16 else torch.float16 if options.fp16 else None
        # Loss scaling is for fp16 on CUDA only; disabled, the scaler passes every call straight through.
        self.scaler = torch.amp.GradScaler("cuda", enabled=options.fp16 and self.device.type == "cuda")

    def autocast(self) -> torch.autocast:
        """Mixed precision for the forward pass when --fp16/--bf16 asked for it; a no-op otherwise."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)


def _total_steps(options: TrainingOptions, n_examples: int) -> int:
    """max_steps, else the optimizer steps that `epochs` passes over the data take (the last may be partial)."""
    if options.max_steps is not None:
        return options.max_steps
    steps_per_epoch = math.ceil(n_examples / options.effective_batch_size)
    return max(1, math.ceil(options.epochs * steps_per_epoch))


def _epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a shuffle seeded by (seed, epoch), so a resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def _chunks(items: list[TokenizedExample], size: int) -> Iterator[list[TokenizedExample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _trained_tokens(example: TokenizedExample) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def _trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _metrics_line(metrics: dict[str, Any]) -> str:
    return (
        f"step {metrics['step']}/{metrics['total_steps']}: loss {metrics['train_loss']:.4f}, "
        f"lr {metrics['learning_rate']:.2e}, {metrics['tokens_per_second']:.0f} tokens/s, "
        f"memory {metrics['gpu_memory_used_bytes'] / GIB:.2f} GiB (peak {metrics['peak_memory_bytes'] / GIB:.2f})"
    )


@contextmanager
def _progress_bar(initial: int, total: int) -> Iterator[tqdm]:
    bar = tqdm(total=total, initial=initial, unit="step", desc="training", disable=not sys.stderr.isatty())
    try:
        yield bar
    finally:
        bar.close()


def _never() -> bool:
    return False
