"""The memory-safe training loop: plan before loading, train with self-healing, checkpoint, write the adapter.

`run_training(options)` reads top to bottom: refuse and plan before anything loads, tokenize the data
(preflight.py), then one attempt after another until one ends: `_setup_model`, `_setup_optimizer`, restore
the last checkpoint if there is one, and the visible loop in `_train_loop` -> `_optimizer_step` ->
`summed_loss` (loss.py). An attempt that runs out of memory or diverges is thrown away whole (model, optimizer,
activations) and the next one resumes from the last complete checkpoint with a halved micro-batch or a halved
learning rate (healing.py). The state types are in state.py, events and metrics in reporting.py, validation
in validation.py, the checkpoint protocol in checkpoints.py.

Under `accelerate launch` the same loop runs on every rank (backend/training/distributed.py): each step
reads the same seeded order, each rank trains on its slice, the loss is summed across ranks for logging,
rank 0 alone writes checkpoints, the adapter and telemetry, and a stop request is agreed by all ranks.
"""

from __future__ import annotations

import contextlib
import math
import random
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.training.checkpoints import (
    CheckpointError,
    TrainerState,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from backend.training.datasets import DatasetError, TokenizedExample, collate
from backend.training.distributed import launched_rank, shard, start_ranks
from backend.training.dpo import (
    pair_tokens,
    preference_micro_batch_loss,
    setup_preference_data,
)
from backend.training.events import EventCallback, FailureCode, TrainResult
from backend.training.healing import (
    Diverged,
    Fault,
    Healing,
    deepspeed_cannot_resplit,
    free_memory,
    maybe_inject_nan,
    maybe_inject_oom,
)
from backend.training.integrations import open_sinks
from backend.training.loss import loss_head_for, summed_loss
from backend.training.manifest import save_adapter, write_manifest
from backend.training.options import TrainingOptions
from backend.training.preflight import plan_before_loading, refuse_deepspeed_here, setup_data
from backend.training.reporting import (
    Reporter,
    final_metrics,
    log_metrics,
    mean,
    progress_bar,
    summary,
)
from backend.training.state import Attempt, TrainingSetup
from backend.training.telemetry import TelemetryWriter
from backend.training.validation import (
    evaluate_after_training,
    micro_batches_of,
    trained_tokens,
    validation_batch_metrics,
    validation_metrics,
)

MAX_GRAD_NORM = 1.0
RECENT_LOSSES_KEPT = 20


# ---------------------------------------------------------------------------------------------------------
# The run, top to bottom


def run_training(
    options: TrainingOptions,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train as `options` say; a failed run is returned (status "failed", error_code), never raised."""
    report = Reporter(on_event, rank=launched_rank())
    try:
        refuse_deepspeed_here(options)
        options, plan = plan_before_loading(options, report)
        if options.dry_run:
            metrics = {"plan": plan.to_dict(), "options": options.model_dump(mode="json")}
            return TrainResult(status="succeeded", output_dir=options.output_dir, metrics=metrics)
        data = setup_preference_data(options) if options.method == "dpo" else setup_data(options)
        healing = Healing.start(options, report)
        ranks = start_ranks(options, micro_batch_size=healing.micro_batch_size,
                            gradient_accumulation_steps=healing.gradient_accumulation_steps)
    except DatasetError as error:
        return _failed(options, "invalid_training_file", str(error), report)
    except (ValueError, CheckpointError, OSError) as error:
        return _failed(options, "invalid_options", str(error), report)
    # Telemetry, like events, comes from the main process only: one file, one writer.
    writer = TelemetryWriter(Path(options.output_dir)) if ranks.is_main else contextlib.nullcontext(None)
    with writer as telemetry, open_sinks(options, report, main=ranks.is_main) as sinks:
        setup = TrainingSetup(options, plan, data, healing, report, telemetry, stop_requested or _never, ranks)
        try:
            return sinks.ended(_train_with_healing(setup))
        except ValueError as error:  # refused while loading: model source, precision, LoRA targets
            return _failed(options, "invalid_options", str(error), report)
        except Exception as error:
            report.emit("message", f"{type(error).__name__}: {error}", level="error",
                        data={"traceback": traceback.format_exc()})
            return _failed(options, "error", f"{type(error).__name__}: {error}", report)
        finally:
            ranks.close()


def _train_with_healing(setup: TrainingSetup) -> TrainResult:
    """Run attempts until one finishes, stops, or the retries run out."""
    while True:
        fault: Fault
        try:
            return _run_attempt(setup)
        except torch.OutOfMemoryError:
            fault = Fault("out_of_memory", setup.healing.step_in_progress)
        except Diverged as diverged:
            fault = Fault("diverged", diverged.step, diverged.loss, diverged.grad_norm)
        # Only now, outside the except block, are the failed attempt's frames (model, optimizer,
        # activations) unreachable, so this is where their memory can really be given back.
        setup.ranks.free_memory()
        free_memory()
        refusal = deepspeed_cannot_resplit(setup.healing, fault, setup.options, deepspeed=setup.ranks.deepspeed)
        failure = refusal or setup.healing.recover(fault, setup.options, setup.report)
        if failure is not None:
            return _failed(setup.options, fault.kind, failure, setup.report)


def _run_attempt(setup: TrainingSetup) -> TrainResult:
    """One attempt: a fresh model and optimizer, restored from the last good checkpoint when there is one."""
    _seed_everything(setup.options.seed)
    setup.healing.step_in_progress = 0  # an OOM before the first step is a loading problem, not a batch one
    model, tokenizer = _setup_model(setup.options, setup.report)
    total_steps = _total_steps(setup.options, len(setup.data.train), setup.ranks.world_size)
    optimizer, scheduler = _setup_optimizer(model, setup.options, total_steps, setup.healing.lr_scale)
    attempt = Attempt(setup, model, tokenizer, optimizer, scheduler, _trainable_parameters(model))
    attempt.state = _restore(attempt, total_steps)
    _prepare_across_ranks(attempt)
    attempt.loss_head = loss_head_for(attempt)
    return _train_loop(attempt)


# ---------------------------------------------------------------------------------------------------------
# Setup of one attempt


def _setup_model(options: TrainingOptions, report: Reporter) -> tuple[Any, Any]:
    """The base model, quantized, checkpointed and wrapped with LoRA as the options say, in training mode."""
    from backend.training.kernels import liger_kernels_message
    from backend.training.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(options)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    report.message(f"Loaded {options.model}: {trainable:,} of {total:,} parameters trainable")
    report.message(liger_kernels_message(options, model))
    return model, tokenizer


def _setup_optimizer(
    model: Any, options: TrainingOptions, total_steps: int, lr_scale: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (--optim) on the trainable parameters, with linear warmup (warmup_ratio) then linear decay to zero."""
    optimizer = new_optimizer(_trainable_parameters(model), options)
    warmup_steps = math.ceil(total_steps * options.warmup_ratio)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return lr_scale * (step + 1) / warmup_steps
        return lr_scale * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def new_optimizer(parameters: list[torch.nn.Parameter], options: TrainingOptions) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (states in uint8 with per-block scales: 2 bytes a parameter
    instead of 8); the paged one keeps its states in CUDA unified memory, which pages out to the host when tight."""
    settings: dict[str, Any] = {"lr": options.resolved_learning_rate, "weight_decay": options.weight_decay}
    if options.optim == "adamw_torch":
        return torch.optim.AdamW(parameters, **settings)
    import bitsandbytes as bnb  # only now: an optional dependency, checked by the options' validator

    if options.optim == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(parameters, **settings)
    return bnb.optim.AdamW8bit(parameters, **settings)


def _restore(attempt: Attempt, total_steps: int) -> TrainerState:
    """A fresh trainer state, or the last good checkpoint's, with the settings the healing chose."""
    healing = attempt.setup.healing
    state = TrainerState(total_steps=total_steps)
    if healing.resume_from is not None and attempt.setup.ranks.deepspeed:
        state = read_trainer_state(healing.resume_from)  # the engine's shards load once it exists (after prepare)
    elif healing.resume_from is not None:
        state = load_checkpoint(healing.resume_from, model=attempt.model, optimizer=attempt.optimizer,
                                scheduler=attempt.scheduler)
        _apply_schedule(attempt.scheduler)
        attempt.setup.report.message(f"Resumed from {healing.resume_from} at step {state.step}")
    state.total_steps = total_steps
    state.effective_batch_size = healing.effective_batch_size
    state.micro_batch_size = healing.micro_batch_size
    state.gradient_accumulation_steps = healing.gradient_accumulation_steps
    state.lr_scale = healing.lr_scale
    attempt.saved_step = state.step if healing.resume_from is not None else None
    return state


def _apply_schedule(scheduler: Any) -> None:
    """The optimizer state carries the learning rate of its time; the schedule (and its scale) decides now."""
    schedule = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds the LambdaLR
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["lr"] = group["initial_lr"] * factor(schedule.last_epoch)


def _prepare_across_ranks(attempt: Attempt) -> None:
    """Hand the model, optimizer and schedule to the ranks (DDP, or a DeepSpeed engine); nothing in one process."""
    ranks, healing = attempt.setup.ranks, attempt.setup.healing
    prepared = ranks.prepare(attempt.model, attempt.optimizer, attempt.scheduler)
    attempt.forward_model, attempt.optimizer, attempt.scheduler = prepared
    if ranks.deepspeed and healing.resume_from is not None:
        ranks.load_sharded_state(healing.resume_from)
        _apply_schedule(attempt.scheduler)
        attempt.setup.report.message(f"Resumed from {healing.resume_from} at step {attempt.state.step}")


# ---------------------------------------------------------------------------------------------------------
# The loop


def _train_loop(attempt: Attempt) -> TrainResult:
    """One optimizer step per iteration; logging, checkpoints and the stop check at each step boundary."""
    state, options, ranks = attempt.state, attempt.setup.options, attempt.setup.ranks
    order = _epoch_order(len(attempt.setup.data.train), options.seed, state.epoch)
    with progress_bar(state.step, state.total_steps, shown=ranks.is_main) as bar:
        while state.step < state.total_steps:
            if _stop_agreed(attempt):
                return _stop(attempt)
            start = state.examples_seen_in_epoch
            # Every rank reads the same step of the seeded order; _optimizer_step trains on this rank's slice.
            indices = order[start : start + state.effective_batch_size * ranks.world_size]
            loss, tokens = _optimizer_step(attempt, [attempt.setup.data.train[i] for i in indices])
            if _advance(state, len(indices), len(order), loss, tokens):
                order = _epoch_order(len(order), options.seed, state.epoch)
            attempt.window.append(loss)
            attempt.throughput.update(tokens)
            bar.update(1)
            if state.step % options.logging_steps == 0 or state.step == state.total_steps:
                bar.set_postfix(loss=f"{log_metrics(attempt, validation_batch_metrics(attempt)):.4f}")
            if options.save_steps and state.step % options.save_steps == 0:
                _save(attempt)
    if _stop_agreed(attempt):
        return _stop(attempt)
    return _finish(attempt)


def _stop_agreed(attempt: Attempt) -> bool:
    """Whether a stop was asked here or on any other rank: all ranks stop at the same step boundary."""
    return attempt.setup.ranks.any(attempt.setup.stop_requested())


def _optimizer_step(attempt: Attempt, examples: list[TokenizedExample]) -> tuple[float, int]:
    """One optimizer step over `examples` (this rank's slice of them), in micro-batches; returns the step's loss
    and input tokens, summed over the ranks."""
    step = attempt.state.step + 1
    ranks = attempt.setup.ranks
    attempt.setup.healing.step_in_progress = step
    maybe_inject_oom(attempt.setup.healing, attempt.setup.options, step)
    micro_losses, input_tokens = _accumulate_gradients(attempt, examples, step)
    grad_norm_tensor = _clip_gradients(attempt)
    # One device sync per step, for the loss and the gradient norm together.
    step_loss = torch.stack([value.to(grad_norm_tensor.device) for value in micro_losses]).sum()
    loss_value, grad_norm = torch.stack([step_loss, grad_norm_tensor.float()]).tolist()
    if ranks.world_size > 1:  # each rank holds its part of the step's loss; every rank decides on the sum
        loss_value, tokens = ranks.sum([loss_value, float(input_tokens)])
        input_tokens = int(tokens)
    # With fp16 the scaler skips steps whose gradients overflowed (and lowers its scale): that is not divergence.
    grad_diverged = not attempt.loss_scaled and not math.isfinite(grad_norm)
    if not math.isfinite(loss_value) or grad_diverged:
        raise Diverged(step, loss_value, grad_norm)
    attempt.learning_rate = attempt.optimizer.param_groups[0]["lr"]  # the rate this step used, for the metrics
    attempt.scaler.step(attempt.optimizer)
    attempt.scaler.update()
    attempt.scheduler.step()
    attempt.optimizer.zero_grad(set_to_none=True)  # None, not zeros: gradient memory is freed between steps
    return loss_value, input_tokens


def _accumulate_gradients(
    attempt: Attempt, examples: list[Any], step: int
) -> tuple[list[torch.Tensor], int]:
    """Forward and backward of this rank's micro-batches of one step; their losses (on the device) and input tokens."""
    micro_batch_loss = _micro_batch_loss(attempt, examples)
    micro_losses: list[torch.Tensor] = []
    input_tokens = 0
    micro_batches = _rank_micro_batches(attempt, examples)
    for index, (micro_batch, counts) in enumerate(micro_batches):
        with attempt.setup.ranks.gradient_sync(attempt.forward_model, sync=index == len(micro_batches) - 1):
            loss, tokens = micro_batch_loss(micro_batch, counts)
            input_tokens += tokens if counts else 0
            loss = maybe_inject_nan(attempt.setup.healing, attempt.setup.options, step, loss if counts else loss * 0.0)
            _backward(attempt, loss)
            micro_losses.append(loss.detach().float())  # stays on the device: no sync per micro-batch
            del loss  # the graph is gone after backward
    return micro_losses, input_tokens


def _micro_batch_loss(
    attempt: Attempt, examples: list[Any]
) -> Callable[[list[Any], bool], tuple[torch.Tensor, int]]:
    """The loss of one micro-batch, scaled to its share of the step's loss on all ranks, and its input tokens."""
    if attempt.setup.options.method == "dpo":  # the mean DPO loss over the step's pairs
        return lambda pairs, counts: (preference_micro_batch_loss(attempt, pairs, len(examples)),
                                      sum(pair_tokens(pair) for pair in pairs))
    # The loss is summed over tokens and divided by the step's trained tokens (on all ranks), so it does not
    # depend on how the step is split into micro-batches or ranks: an OOM recovery that halves the
    # micro-batch trains the same, and N ranks train as one process with N times the batch.
    label_tokens = max(1, sum(trained_tokens(example) for example in examples))

    def token_loss(micro_batch: list[TokenizedExample], counts: bool) -> tuple[torch.Tensor, int]:
        batch = collate(micro_batch, attempt.setup.data.pad_token_id)  # freed on return, before the next forward
        # Argmax hits are counted in the loss's own slices (no whole logits), for train_mean_token_accuracy.
        loss = summed_loss(attempt, batch, attempt.accuracy.pending if counts else None) / label_tokens
        return loss, int(batch["attention_mask"].sum())

    return token_loss


def _rank_micro_batches(attempt: Attempt, examples: list[Any]) -> list[tuple[list[Any], bool]]:
    """This rank's micro-batches of one step, each with whether it counts.

    Across ranks every rank runs the same number (DDP's forward and DeepSpeed's accumulation boundary wait for
    all ranks): a rank short of examples in a short last step runs zero-weighted stand-ins.
    """
    ranks = attempt.setup.ranks
    mine = shard(examples, ranks.rank, ranks.world_size)
    micro_batches = [(chunk, True) for chunk in micro_batches_of(mine, attempt.state.micro_batch_size)]
    if ranks.world_size > 1:
        missing = attempt.state.gradient_accumulation_steps - len(micro_batches)
        micro_batches += [(examples[:1], False)] * missing
    return micro_batches


def _backward(attempt: Attempt, loss: torch.Tensor) -> None:
    """Backward of one micro-batch's part of the step's loss, scaled for fp16 and for the ranks' averaging."""
    factor = attempt.setup.ranks.gradient_factor
    scaled = attempt.scaler.scale(loss)
    attempt.setup.ranks.backward(scaled if factor == 1 else scaled * factor)


def _clip_gradients(attempt: Attempt) -> torch.Tensor:
    if attempt.setup.ranks.deepspeed:
        # The engine clipped (gradient_clipping in its config) and stepped inside the last backward.
        norm = attempt.forward_model.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else 0.0, device=attempt.device)
    attempt.scaler.unscale_(attempt.optimizer)  # clip the true gradients, not the fp16-scaled ones
    return torch.nn.utils.clip_grad_norm_(attempt.trainable, MAX_GRAD_NORM)


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


def _save(attempt: Attempt) -> Path:
    """Write a complete checkpoint (with the validation loss when there is validation data) and announce it."""
    state, setup = attempt.state, attempt.setup
    metrics: dict[str, Any] = {
        "step": state.step,
        "train_loss": mean(state.recent_losses[-setup.options.logging_steps :]),
        **attempt.accuracy.as_metrics(setup.ranks),  # the window since the last log line, else that line's
    }
    metrics.update(attempt.rewards.latest)  # --method dpo's rewards of the last log line; none otherwise
    if setup.data.validation is not None:
        metrics.update(validation_metrics(attempt))
        setup.report.message(f"step {state.step}: validation loss {metrics['eval_loss']:.4f}")
    state.metrics = metrics
    path = save_checkpoint(
        setup.options.output_dir, model=attempt.model, optimizer=attempt.optimizer, scheduler=attempt.scheduler,
        state=state, save_total_limit=setup.options.save_total_limit, ranks=setup.ranks,
    )
    setup.healing.resume_from = path
    attempt.saved_step = state.step
    setup.report.emit("checkpoint", f"Checkpoint at step {state.step}: {path}",
                      data={"step": state.step, "path": str(path), "metrics": metrics})
    return path


@torch.no_grad()
# ---------------------------------------------------------------------------------------------------------
# How an attempt ends


def _stop(attempt: Attempt) -> TrainResult:
    """Stopped on request: checkpoint at this step boundary (unless just saved) and say how to resume."""
    path = attempt.setup.healing.resume_from if attempt.saved_step == attempt.state.step else _save(attempt)
    attempt.setup.report.message(
        f"Stopped at step {attempt.state.step}: checkpoint {path}; resume with --resume_from_checkpoint latest",
        level="warn",
    )
    return TrainResult(
        status="stopped", output_dir=attempt.setup.options.output_dir, steps=attempt.state.step,
        trained_tokens=attempt.state.trained_tokens, metrics=final_metrics(attempt),
    )


def _finish(attempt: Attempt) -> TrainResult:
    """Last checkpoint, then the adapter (or full model), the manifest and the summary."""
    from backend.training.modeling import resolve_model_source, weight_files_sha256

    setup, state, ranks = attempt.setup, attempt.state, attempt.setup.ranks
    if attempt.saved_step != state.step:
        _save(attempt)
    output_dir = setup.options.output_dir
    gathered = ranks.full_state_dict(attempt.forward_model)  # ZeRO-3: every rank gives its shard (a collective)
    metrics = {**final_metrics(attempt), **attempt.rewards.latest}
    if ranks.is_main:
        source = resolve_model_source(setup.options.model)
        save_adapter(attempt.model, attempt.tokenizer, output_dir, base_folder=source, state_dict=gathered)
        evaluation = evaluate_after_training(attempt)
        if evaluation is not None:
            metrics["pass_at_k"] = evaluation.get("pass_at_k")
        write_manifest(
            output_dir, base_model=setup.options.model, base_weight_sha256=weight_files_sha256(source),
            options=setup.options, metrics=metrics, extra={"evaluation": evaluation} if evaluation else None,
        )
        setup.report.message(summary(attempt, metrics))
    ranks.barrier()  # every rank ends once the adapter is written
    return TrainResult(
        status="succeeded", output_dir=output_dir, adapter_dir=output_dir, steps=state.step,
        trained_tokens=state.trained_tokens, metrics=metrics,
    )


def _failed(options: TrainingOptions, code: FailureCode, message: str, report: Reporter) -> TrainResult:
    report.message(message, level="error")
    return TrainResult(status="failed", output_dir=options.output_dir, error_code=code, error_message=message)


# ---------------------------------------------------------------------------------------------------------
# Arithmetic of steps and examples


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


def _trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _never() -> bool:
    return False
