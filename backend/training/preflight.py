"""Before anything loads: refuse what cannot run here, plan the memory from the config, prepare the data.

Everything here runs once per run, before the first attempt, so a bad option or a bad file fails in seconds
instead of after a model has loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from backend.training.datasets import BUILTIN_DATASET, DatasetError, TokenizedExample, load_examples, tokenize_examples
from backend.training.distributed import launched_world_size
from backend.training.manifest import assert_not_base_folder
from backend.training.options import TrainingOptions
from backend.training.reporting import Reporter
from backend.training.state import TrainingData


def refuse_deepspeed_here(options: TrainingOptions) -> None:
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


def plan_before_loading(options: TrainingOptions, report: Reporter) -> tuple[TrainingOptions, Any]:
    """Apply the guide's safe defaults and plan the peak memory from the config alone (meta device)."""
    from backend.training.memory import (
        apply_safe_defaults,
        device_budget_bytes,
        format_plan,
        load_model_config,
        model_shape,
        plan_memory,
    )
    from backend.training.modeling import check_precision_supported, resolve_model_source

    source = resolve_model_source(options.model)
    assert_not_base_folder(options.output_dir, source)
    config = load_model_config(source, trust_remote_code=options.trust_remote_code)
    if options.offload_embeddings and model_shape(config).tied_embeddings:
        from backend.training.offload import TIED_HEAD_PROBLEM

        raise ValueError(TIED_HEAD_PROBLEM)
    budget_bytes, device = device_budget_bytes(options)
    options, announcements = apply_safe_defaults(options, config, budget_bytes=budget_bytes, device=device)
    for note in [*announcements, *check_precision_supported(options)]:
        report.message(note)
    plan = plan_memory(options, config, budget_bytes=budget_bytes, device=device)
    # The options as resolved (safe defaults applied) ride along: they are what the run really uses.
    report.emit("plan", format_plan(plan), data={**plan.to_dict(), "device": device,
                                                  "options": options.model_dump(mode="json")})
    if not plan.fits:
        report.message(f"The plan does not fit the budget: {plan.recommendation}", level="warn")
    return options, plan


def setup_data(options: TrainingOptions) -> TrainingData:
    """Validate and tokenize the training (and validation) data once; every attempt reuses it."""
    from backend.training.modeling import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(options.model), trust_remote_code=options.trust_remote_code)
    train = _tokenized(options.data or BUILTIN_DATASET, options, tokenizer)
    validation = _tokenized(options.validation_data, options, tokenizer) if options.validation_data else None
    return TrainingData(train, validation, int(tokenizer.pad_token_id), _eval_tasks(options))


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
        max_seq_length=options.seq_length,
        train_on_completions_only=options.train_on_completions_only,
        packing=options.packing,
    )
    if not tokenized:
        raise DatasetError(None, f"{path}: no example has a token to train on after tokenization")
    return tokenized
