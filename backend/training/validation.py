"""Validation during and after training: losses and token accuracy on the validation file, and the sandboxed
evaluation of --eval_data once training is done."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from backend.training.datasets import IGNORE_INDEX, TokenizedExample, collate
from backend.training.dpo import preference_validation_loss
from backend.training.loss import summed_loss
from backend.training.state import Attempt


def validation_loss(attempt: Attempt) -> float:
    """Mean loss per trained token over the validation data, in eval mode (no dropout)."""
    if attempt.setup.options.method == "dpo":
        return preference_validation_loss(attempt)
    return loss_and_accuracy(attempt, attempt.setup.data.validation or [])[0]


def validation_metrics(attempt: Attempt) -> dict[str, float]:
    """A checkpoint's validation: eval_loss and full_valid_* over the whole file, valid_* on this step's batch."""
    if attempt.setup.options.method == "dpo":  # the DPO loss; a preference pair has no token accuracy
        loss = validation_loss(attempt)
        return {**validation_batch_metrics(attempt), "eval_loss": loss, "full_valid_loss": loss}
    loss, accuracy = loss_and_accuracy(attempt, attempt.setup.data.validation or [])
    full = {"eval_loss": loss, "full_valid_loss": loss, "full_valid_mean_token_accuracy": accuracy}
    return {**validation_batch_metrics(attempt), **full}


def validation_batch_metrics(attempt: Attempt) -> dict[str, float]:
    """valid_loss and valid_mean_token_accuracy on one micro-batch of the validation file, a different one each
    logging step (OpenAI's per-step validation); none without a validation file; for --method dpo the loss alone."""
    validation, state = attempt.setup.data.validation, attempt.state
    if not validation:
        return {}
    size = min(state.micro_batch_size, len(validation))  # a micro-batch is what this attempt knows fits
    start = (state.step // attempt.setup.options.logging_steps * size) % len(validation)
    batch = (validation + validation)[start : start + size]
    if attempt.setup.options.method == "dpo":
        return {"valid_loss": preference_validation_loss(attempt, batch)}
    loss, accuracy = loss_and_accuracy(attempt, batch)
    return {"valid_loss": loss, "valid_mean_token_accuracy": accuracy}


@torch.no_grad()
def loss_and_accuracy(attempt: Attempt, examples: list[TokenizedExample]) -> tuple[float, float]:
    """Mean loss per trained token and mean token accuracy over `examples`, in eval mode (no dropout)."""
    attempt.model.eval()
    total, tokens = 0.0, 0
    hits: list[torch.Tensor] = []
    for micro_batch in micro_batches_of(examples, attempt.state.micro_batch_size):
        total += float(summed_loss(attempt, collate(micro_batch, attempt.setup.data.pad_token_id), hits))
        tokens += sum(trained_tokens(example) for example in micro_batch)
    attempt.model.train()
    hit_count, counted = torch.stack(hits).sum(dim=0).tolist() if hits else (0, 0)
    return total / max(1, tokens), hit_count / max(1, counted)


def evaluate_after_training(attempt: Attempt) -> dict[str, Any] | None:
    """Greedy pass@1 of the trained model on --eval_data, every completion run in the sandbox; None without it."""
    tasks, report = attempt.setup.data.eval_tasks, attempt.setup.report
    if not tasks:
        return None
    if attempt.setup.ranks.deepspeed:  # sharded weights would need every rank to generate in step
        report.message("Evaluation skipped: --eval_data is not run under DeepSpeed", level="warn")
        return None
    from backend.evaluation.harness import evaluate_model
    from backend.evaluation.sandbox import SandboxUnavailable

    attempt.model.eval()
    attempt.model.config.use_cache = True  # generation, unlike training, wants the KV cache
    try:
        result = evaluate_model(attempt.model, attempt.tokenizer, tasks, temperature=0.0)
    except SandboxUnavailable as error:  # fails closed: nothing generated runs outside the sandbox
        report.message(f"Evaluation skipped: {error}", level="warn")
        return {"error": str(error)}
    finally:
        attempt.model.config.use_cache = False
    report.message(f"Evaluation on {len(tasks)} tasks (sandboxed): pass@1 {result.pass_at_k['pass@1']:.3f}")
    return result.to_dict(include_samples=False)


def micro_batches_of(items: list[TokenizedExample], size: int) -> Iterator[list[TokenizedExample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def trained_tokens(example: TokenizedExample) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels[1:])
