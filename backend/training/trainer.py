"""The memory-safe training loop: plan before loading, train with self-healing, checkpoint, write the adapter.

`run_training(options)` reads top to bottom: plan the memory from the model's config (nothing loaded),
tokenize the data, then one attempt after another until one ends: `_setup_model`, `_setup_optimizer`,
restore the last checkpoint if there is one, and the visible loop in `_train_loop`. An attempt that runs
out of memory or diverges is thrown away whole (model, optimizer, activations) and the next one resumes
from the last complete checkpoint with a halved micro-batch or a halved learning rate.

Under `accelerate launch` the same loop runs on every rank (backend/training/distributed.py): each step
reads the same seeded order, each rank trains on its slice, the loss is summed across ranks for logging,
rank 0 alone writes checkpoints, the adapter and telemetry, and a stop request is agreed by all ranks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
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
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    TEMP_PREFIX,
    TRAINER_STATE_FILE,
    CheckpointError,
    TrainerState,
    load_checkpoint,
    read_trainer_state,
    resolve_resume_checkpoint,
    rotate_checkpoints,
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
from backend.training.distributed import Processes, launched_rank, launched_world_size, shard, start_processes
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
    report = _Reporter(on_event, rank=launched_rank())
    try:
        _refuse_deepspeed_here(options)
        options, plan = _plan_before_loading(options, report)
        if options.dry_run:
            metrics = {"plan": plan.to_dict(), "options": options.model_dump(mode="json")}
            return TrainResult(status="succeeded", output_dir=options.output_dir, metrics=metrics)
        data = _setup_data(options)
        healing = _Healing.start(options, report)
        processes = start_processes(options, micro_batch_size=healing.micro_batch_size,
                                    gradient_accumulation_steps=healing.gradient_accumulation_steps)
    except DatasetError as error:
        return _failed(options, "invalid_training_file", str(error), report)
    except (ValueError, CheckpointError, OSError) as error:
        return _failed(options, "invalid_options", str(error), report)
    # Telemetry, like events, comes from the main process only: one file, one writer.
    writer = TelemetryWriter(Path(options.output_dir)) if processes.is_main else contextlib.nullcontext(None)
    with writer as telemetry:
        session = _Session(options, plan, data, healing, report, telemetry, stop_requested or _never, processes)
        try:
            return _train_with_healing(session)
        except ValueError as error:  # refused while loading: model source, precision, LoRA targets
            return _failed(options, "invalid_options", str(error), report)
        except Exception as error:
            report.emit("message", f"{type(error).__name__}: {error}", level="error",
                        data={"traceback": traceback.format_exc()})
            return _failed(options, "error", f"{type(error).__name__}: {error}", report)
        finally:
            processes.close()


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
        session.processes.free_memory()
        _free_memory()
        failure = _deepspeed_cannot_resplit(session, fault) or session.healing.recover(
            fault, session.options, session.report)
        if failure is not None:
            return _failed(session.options, fault.kind, failure, session.report)


def _attempt(session: _Session) -> TrainResult:
    """One attempt: a fresh model and optimizer, restored from the last good checkpoint when there is one."""
    _seed_everything(session.options.seed)
    session.healing.step_in_progress = 0  # an OOM before the first step is a loading problem, not a batch one
    model, tokenizer = _setup_model(session.options, session.report)
    total_steps = _total_steps(session.options, len(session.data.train), session.processes.world_size)
    optimizer, scheduler = _setup_optimizer(model, session.options, total_steps, session.healing.lr_scale)
    run = _Run(session, model, tokenizer, optimizer, scheduler, _trainable_parameters(model))
    run.state = _restore(run, total_steps)
    _prepare_across_ranks(run)
    return _train_loop(run)


def _deepspeed_cannot_resplit(session: _Session, fault: _Fault) -> str | None:
    """The DeepSpeed engine's batch sizes are fixed when it is built: an OOM there cannot halve the micro-batch."""
    if fault.kind != "out_of_memory" or not session.processes.deepspeed:
        return None
    return (
        f"Out of memory at step {fault.step} under DeepSpeed {session.options.deepspeed} with micro-batch "
        f"{session.healing.micro_batch_size}: rerun with a smaller --per_device_train_batch_size (and more "
        "--gradient_accumulation_steps), or an -offload preset"
    )


# ---------------------------------------------------------------------------------------------------------
# Before anything loads


def _refuse_deepspeed_here(options: TrainingOptions) -> None:
    """Refuse --deepspeed before anything loads unless this is a rank of `accelerate launch` with DeepSpeed, on GPUs
    or on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu).

    train_safe.py re-executes itself under `accelerate launch` where it can; anywhere else this says what is missing.
    """
    if not options.deepspeed:
        return
    from backend.training.deepspeed_presets import deepspeed_available

    installed, gpus, launched = deepspeed_available(), torch.cuda.device_count(), launched_world_size() > 1
    # DeepSpeed's own switch to its CPU accelerator: the ranks shard over gloo instead of GPUs (slow; for tests).
    cpu_accelerator = os.environ.get("DS_ACCELERATOR") == "cpu"
    if installed and (gpus > 0 or cpu_accelerator) and launched:
        return
    missing = [] if installed else ["DeepSpeed is not installed (pip install deepspeed)"]
    if gpus < 2:
        missing.append(f"this machine has {gpus} GPU(s) and ZeRO shards over more than one")
    elif not launched:
        missing.append("this process was not started by `accelerate launch` (train_safe.py starts it itself)")
    raise ValueError(
        f"--deepspeed {options.deepspeed} needs DeepSpeed and more than one GPU, under `accelerate launch`: "
        f"{'; '.join(missing)}. Drop --deepspeed; on one GPU use --use_4bit or --use_8bit with "
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
    if healing.resume_from is not None and run.session.processes.deepspeed:
        state = read_trainer_state(healing.resume_from)  # the engine's shards load once it exists (after prepare)
    elif healing.resume_from is not None:
        state = load_checkpoint(healing.resume_from, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
        _apply_schedule(run.scheduler)
        run.session.report.message(f"Resumed from {healing.resume_from} at step {state.step}")
    state.total_steps = total_steps
    state.effective_batch_size = healing.effective_batch_size
    state.micro_batch_size = healing.micro_batch_size
    state.gradient_accumulation_steps = healing.gradient_accumulation_steps
    state.lr_scale = healing.lr_scale
    run.saved_step = state.step if healing.resume_from is not None else None
    return state


def _apply_schedule(scheduler: Any) -> None:
    """The optimizer state carries the learning rate of its time; the schedule (and its scale) decides now."""
    schedule = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds the LambdaLR
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["lr"] = group["initial_lr"] * factor(schedule.last_epoch)


def _prepare_across_ranks(run: _Run) -> None:
    """Hand the model, optimizer and schedule to the ranks (DDP, or a DeepSpeed engine); nothing in one process."""
    processes, healing = run.session.processes, run.session.healing
    run.forward_model, run.optimizer, run.scheduler = processes.prepare(run.model, run.optimizer, run.scheduler)
    if processes.deepspeed and healing.resume_from is not None:
        processes.load_sharded_state(healing.resume_from)
        _apply_schedule(run.scheduler)
        run.session.report.message(f"Resumed from {healing.resume_from} at step {run.state.step}")


# ---------------------------------------------------------------------------------------------------------
# The loop


def _train_loop(run: _Run) -> TrainResult:
    """One optimizer step per iteration; logging, checkpoints and the stop check at each step boundary."""
    state, options, processes = run.state, run.session.options, run.session.processes
    order = _epoch_order(len(run.session.data.train), options.seed, state.epoch)
    with _progress_bar(state.step, state.total_steps, shown=processes.is_main) as bar:
        while state.step < state.total_steps:
            if _stop_agreed(run):
                return _stop(run)
            start = state.examples_seen_in_epoch
            # Every rank reads the same step of the seeded order; _optimizer_step trains on this rank's slice.
            indices = order[start : start + state.effective_batch_size * processes.world_size]
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
    if _stop_agreed(run):
        return _stop(run)
    return _finish(run)


def _stop_agreed(run: _Run) -> bool:
    """Whether a stop was asked here or on any other rank: all ranks stop at the same step boundary."""
    return run.session.processes.any(run.session.stop_requested())


def _optimizer_step(run: _Run, examples: list[TokenizedExample]) -> tuple[float, int]:
    """One optimizer step over `examples` (this rank's slice of them), in micro-batches; returns the step's loss
    and input tokens, summed over the ranks."""
    step = run.state.step + 1
    processes = run.session.processes
    run.session.healing.step_in_progress = step
    _maybe_inject_oom(run, step)
    # The loss is summed over tokens and divided by the step's trained tokens (on all ranks), so it does not
    # depend on how the step is split into micro-batches or ranks: an OOM recovery that halves the
    # micro-batch trains the same, and N ranks train as one process with N times the batch.
    label_tokens = max(1, sum(_trained_tokens(example) for example in examples))
    micro_losses: list[torch.Tensor] = []
    input_tokens = 0
    micro_batches = _rank_micro_batches(run, examples)
    for index, (micro_batch, counts) in enumerate(micro_batches):
        with processes.gradient_sync(run.forward_model, sync=index == len(micro_batches) - 1):
            batch = collate(micro_batch, run.session.data.pad_token_id)
            input_tokens += int(batch["attention_mask"].sum()) if counts else 0
            loss = _summed_loss(run, batch) / label_tokens
            loss = _maybe_inject_nan(run, step, loss if counts else loss * 0.0)
            _backward(run, loss)
            micro_losses.append(loss.detach().float())  # stays on the device: no sync per micro-batch
            del loss, batch  # the graph is gone after backward; drop the inputs before the next forward
    grad_norm_tensor = _clip_gradients(run)
    # One device sync per step, for the loss and the gradient norm together.
    step_loss = torch.stack([value.to(grad_norm_tensor.device) for value in micro_losses]).sum()
    loss_value, grad_norm = torch.stack([step_loss, grad_norm_tensor.float()]).tolist()
    if processes.world_size > 1:  # each rank holds its part of the step's loss; every rank decides on the sum
        loss_value, tokens = processes.sum([loss_value, float(input_tokens)])
        input_tokens = int(tokens)
    # With fp16 the scaler skips steps whose gradients overflowed (and lowers its scale): that is not divergence.
    grad_diverged = not run.loss_scaled and not math.isfinite(grad_norm)
    if not math.isfinite(loss_value) or grad_diverged:
        raise _Diverged(step, loss_value, grad_norm)
    run.learning_rate = run.optimizer.param_groups[0]["lr"]  # the rate this step used, for the metrics
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # None, not zeros: gradient memory is freed between steps
    return loss_value, input_tokens


def _rank_micro_batches(run: _Run, examples: list[TokenizedExample]) -> list[tuple[list[TokenizedExample], bool]]:
    """This rank's micro-batches of one step, each with whether it counts.

    Across ranks every rank runs the same number (DDP's forward and DeepSpeed's accumulation boundary wait for
    all ranks): a rank short of examples in a short last step runs zero-weighted stand-ins.
    """
    processes = run.session.processes
    mine = shard(examples, processes.rank, processes.world_size)
    micro_batches = [(chunk, True) for chunk in _chunks(mine, run.state.micro_batch_size)]
    if processes.world_size > 1:
        missing = run.state.gradient_accumulation_steps - len(micro_batches)
        micro_batches += [(examples[:1], False)] * missing
    return micro_batches


def _backward(run: _Run, loss: torch.Tensor) -> None:
    """Backward of one micro-batch's part of the step's loss, scaled for fp16 and for the ranks' averaging."""
    factor = run.session.processes.gradient_factor
    scaled = run.scaler.scale(loss)
    run.session.processes.backward(scaled if factor == 1 else scaled * factor)


def _summed_loss(run: _Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cross-entropy of one micro-batch, summed over its trained tokens."""
    input_ids = batch["input_ids"].to(run.device)
    attention_mask = batch["attention_mask"].to(run.device)
    with run.autocast():
        outputs = run.forward_model(input_ids=input_ids, attention_mask=attention_mask)
    logits = outputs.logits[:, :-1]
    del outputs  # holds other per-layer outputs when a model returns them; only the logits are needed
    labels = batch["labels"][:, 1:].to(logits.device)
    # A float32 log-softmax is stable under fp16/bf16; its vocabulary-wide copy lives only until backward.
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _clip_gradients(run: _Run) -> torch.Tensor:
    if run.session.processes.deepspeed:
        # The engine clipped (gradient_clipping in its config) and stepped inside the last backward.
        norm = run.forward_model.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else 0.0, device=run.device)
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
    if session.telemetry is not None:  # the main process's; the other ranks write none
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
    path = _write_checkpoint(run)
    session.healing.resume_from = path
    run.saved_step = state.step
    session.report.emit("checkpoint", f"Checkpoint at step {state.step}: {path}",
                        data={"step": state.step, "path": str(path), "metrics": metrics})
    return path


def _write_checkpoint(run: _Run) -> Path:
    """Every rank comes here; the main process writes the checkpoint and renames it, the others wait until then."""
    session, processes = run.session, run.session.processes
    if processes.deepspeed:
        return _write_sharded_checkpoint(run)
    path = Path(session.options.output_dir) / f"{CHECKPOINT_PREFIX}{run.state.step}"
    if processes.is_main:  # DDP keeps identical weights and optimizer states on every rank: one copy is enough
        path = save_checkpoint(
            session.options.output_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
            state=run.state, save_total_limit=session.options.save_total_limit,
        )
    processes.barrier()  # no rank goes on, or rolls back to it, before the checkpoint is complete
    return path


def _write_sharded_checkpoint(run: _Run) -> Path:
    """DeepSpeed: every rank writes its shard into the temporary folder; rank 0 completes it and renames it."""
    processes, options, state = run.session.processes, run.session.options, run.state
    root = Path(options.output_dir)
    temporary, final = root / f"{TEMP_PREFIX}{state.step}", root / f"{CHECKPOINT_PREFIX}{state.step}"
    if processes.is_main:
        shutil.rmtree(temporary, ignore_errors=True)  # the leftover of a crash mid-write
        temporary.mkdir(parents=True)
    processes.barrier()
    processes.save_sharded_state(temporary)
    processes.barrier()
    if processes.is_main:
        (temporary / TRAINER_STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2), encoding="utf-8")
        (temporary / COMPLETE_MARKER).write_text(f"{state.step}\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)  # a replayed step's older copy
        os.replace(temporary, final)
        rotate_checkpoints(root, keep=options.save_total_limit)
    processes.barrier()
    return final


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

    session, state, processes = run.session, run.state, run.session.processes
    if run.saved_step != state.step:
        _save(run)
    output_dir = session.options.output_dir
    gathered = processes.full_state_dict(run.forward_model)  # ZeRO-3: every rank gives its shard (a collective)
    metrics = _final_metrics(run)
    if processes.is_main:
        source = resolve_model_source(session.options.model)
        save_adapter(run.model, run.tokenizer, output_dir, base_folder=source, state_dict=gathered)
        evaluation = _evaluate(run)
        if evaluation is not None:
            metrics["pass_at_k"] = evaluation.get("pass_at_k")
        write_manifest(
            output_dir, base_model=session.options.model, base_weight_sha256=weight_files_sha256(source),
            options=session.options, metrics=metrics, extra={"evaluation": evaluation} if evaluation else None,
        )
        session.report.message(_summary(run, metrics))
    processes.barrier()  # every rank ends once the adapter is written
    return TrainResult(
        status="succeeded", output_dir=output_dir, adapter_dir=output_dir, steps=state.step,
        trained_tokens=state.trained_tokens, metrics=metrics,
    )


def _evaluate(run: _Run) -> dict[str, Any] | None:
    """Greedy pass@1 of the trained model on --eval_data, every completion run in the sandbox; None without it."""
    tasks, report = run.session.data.eval_tasks, run.session.report
    if not tasks:
        return None
    if run.session.processes.deepspeed:  # sharded weights would need every rank to generate in step
        report.message("Evaluation skipped: --eval_data is not run under DeepSpeed", level="warn")
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
    """Sends TrainingEvents to the caller's callback (if any): all of them from rank 0, only errors from the others."""

    def __init__(self, on_event: EventCallback | None, *, rank: int = 0) -> None:
        self._on_event = on_event
        self._rank = rank

    def emit(self, kind: Any, message: str = "", *, level: Any = "info", data: dict[str, Any] | None = None) -> None:
        if self._on_event is None or (self._rank != 0 and level != "error"):
            return
        if self._rank != 0:
            message = f"rank {self._rank}: {message}"
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
    telemetry: TelemetryWriter | None  # None on the ranks other than the main one
    stop_requested: Callable[[], bool]
    processes: Processes = field(default_factory=Processes)


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
    forward_model: Any = None  # what the loop calls: the model, or its DDP / DeepSpeed wrapper across ranks

    def __post_init__(self) -> None:
        processes = self.session.processes
        if self.forward_model is None:
            self.forward_model = self.model
        self.device = processes.device or self.model.get_input_embeddings().weight.device
        options = self.session.options
        self.autocast_dtype = torch.bfloat16 if options.bf16 else torch.float16 if options.fp16 else None
        # Loss scaling is for fp16 on CUDA only; disabled, the scaler passes every call straight through.
        # DeepSpeed scales the loss itself.
        use_scaler = options.fp16 and self.device.type == "cuda" and not processes.deepspeed
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.loss_scaled = options.fp16 and (use_scaler or processes.deepspeed)

    def autocast(self) -> torch.autocast:
        """Mixed precision for the forward pass when --fp16/--bf16 asked for it; a no-op otherwise."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)


def _total_steps(options: TrainingOptions, n_examples: int, world_size: int = 1) -> int:
    """max_steps, else the optimizer steps that `epochs` passes over the data take (the last may be partial)."""
    if options.max_steps is not None:
        return options.max_steps
    steps_per_epoch = math.ceil(n_examples / (options.effective_batch_size * world_size))
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
def _progress_bar(initial: int, total: int, *, shown: bool = True) -> Iterator[tqdm]:
    bar = tqdm(total=total, initial=initial, unit="step", desc="training", disable=not (shown and sys.stderr.isatty()))
    try:
        yield bar
    finally:
        bar.close()


def _never() -> bool:
    return False
