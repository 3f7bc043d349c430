"""Self-healing decisions, one at a time: no model is loaded, each test runs in milliseconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from backend.training.checkpoints import COMPLETE_MARKER, TRAINER_STATE_FILE, TrainerState
from backend.training.healing import (
    Fault,
    Healing,
    deepspeed_cannot_resplit,
    maybe_inject_nan,
    maybe_inject_oom,
)
from backend.training.options import TrainingOptions
from backend.training.reporting import Reporter


def _options(tmp_path: Path, **overrides: object) -> TrainingOptions:
    values: dict[str, object] = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8,
                                 "gradient_accumulation_steps": 2}
    return TrainingOptions.model_validate({**values, **overrides})


def _healing(micro: int = 8, accumulation: int = 2, **fields: object) -> Healing:
    return Healing(micro * accumulation, micro, accumulation, **fields)  # type: ignore[arg-type]


def _checkpoint(output_dir: Path, state: TrainerState) -> Path:
    """A complete checkpoint folder as the trainer would find it (the trainer state is all healing reads)."""
    folder = output_dir / f"checkpoint-{state.step}"
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE_FILE).write_text(json.dumps(state.to_dict()))
    (folder / COMPLETE_MARKER).write_text(f"{state.step}\n")
    return folder


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, events):
    healing = _healing(micro=8, accumulation=2)

    failure = healing.recover(Fault("out_of_memory", 5), _options(tmp_path), Reporter(events))

    assert failure is None
    assert (healing.micro_batch_size, healing.gradient_accumulation_steps) == (4, 4)
    assert healing.micro_batch_size * healing.gradient_accumulation_steps == healing.effective_batch_size == 16
    assert healing.oom_retries == 1 and healing.lr_scale == 1.0
    (warning,) = events.warnings()
    assert warning.startswith("Out of memory at step 5 with micro-batch 8: retrying with micro-batch 4 and "
                              "gradient accumulation 4 (effective batch 16 unchanged) from the start")
    assert warning.endswith("(recovery 1 of 3)")


def test_out_of_memory_rounds_the_accumulation_up_for_an_odd_micro_batch(tmp_path, events):
    healing = _healing(micro=3, accumulation=1)

    assert healing.recover(Fault("out_of_memory", 2), _options(tmp_path), Reporter(events)) is None
    assert (healing.micro_batch_size, healing.gradient_accumulation_steps) == (1, 3)


def test_out_of_memory_gives_up_when_the_recoveries_are_spent(tmp_path, events):
    options = _options(tmp_path, max_oom_retries=2)
    healing = _healing(micro=8, accumulation=2)
    reporter = Reporter(events)
    assert healing.recover(Fault("out_of_memory", 3), options, reporter) is None
    assert healing.recover(Fault("out_of_memory", 3), options, reporter) is None

    failure = healing.recover(Fault("out_of_memory", 3), options, reporter)

    assert failure == (
        "Out of memory at step 3 with micro-batch 2 and gradient accumulation 8: 2 recoveries spent "
        "(--max_oom_retries 2). Try --use_4bit, --gradient_checkpointing or a shorter --max_seq_length"
    )
    assert (healing.micro_batch_size, healing.gradient_accumulation_steps, healing.oom_retries) == (2, 8, 2)
    assert len(events.warnings()) == 2  # the failure is the caller's to report


def test_out_of_memory_gives_up_at_micro_batch_one(tmp_path, events):
    healing = _healing(micro=1, accumulation=16)

    failure = healing.recover(Fault("out_of_memory", 4), _options(tmp_path), Reporter(events))

    assert failure is not None and "the micro-batch cannot be halved further" in failure
    assert (healing.micro_batch_size, healing.oom_retries) == (1, 0) and not events


def test_out_of_memory_before_the_first_step_is_a_loading_problem(tmp_path, events):
    healing = _healing(micro=8, accumulation=2)

    failure = healing.recover(Fault("out_of_memory", 0), _options(tmp_path), Reporter(events))

    assert failure is not None and failure.startswith("Out of memory while loading the model or its checkpoint")
    assert healing.micro_batch_size == 8 and healing.oom_retries == 0


def test_divergence_rolls_back_to_the_last_checkpoint_with_the_learning_rate_halved(tmp_path, events):
    checkpoint = tmp_path / "out" / "checkpoint-3"
    healing = _healing(micro=8, accumulation=2, resume_from=checkpoint)
    fault = Fault("diverged", 5, loss=math.nan, grad_norm=math.inf)

    assert healing.recover(fault, _options(tmp_path), Reporter(events)) is None
    assert healing.lr_scale == 0.5 and healing.divergence_retries == 1
    assert healing.recover(fault, _options(tmp_path), Reporter(events)) is None
    assert healing.lr_scale == 0.25 and healing.divergence_retries == 2
    assert (healing.micro_batch_size, healing.gradient_accumulation_steps) == (8, 2)  # the batch is not the cause
    first, second = events.warnings()
    assert first == (
        f"Non-finite values at step 5 (loss nan, gradient norm inf, micro-batch 8): rolling back to {checkpoint} "
        "with the learning rate halved (scale 0.5) (rollback 1 of 2)"
    )
    assert "(scale 0.25) (rollback 2 of 2)" in second


def test_divergence_gives_up_when_the_rollbacks_are_spent(tmp_path, events):
    healing = _healing(lr_scale=0.25, divergence_retries=2)

    failure = healing.recover(Fault("diverged", 7, loss=math.nan, grad_norm=1.0), _options(tmp_path),
                              Reporter(events))

    assert failure == (
        "Training diverged at step 7 (loss nan, gradient norm 1.0, micro-batch 8, learning rate scale 0.25) after "
        "2 rollbacks (--max_divergence_retries 2). Try a lower --learning_rate or more --warmup_ratio"
    )
    assert healing.lr_scale == 0.25 and not events


def test_a_fresh_run_starts_from_the_options(tmp_path, events):
    healing = Healing.start(_options(tmp_path), Reporter(events))

    assert (healing.effective_batch_size, healing.micro_batch_size, healing.gradient_accumulation_steps) == (16, 8, 2)
    assert healing.resume_from is None and healing.lr_scale == 1.0 and not events


def test_resuming_latest_with_no_checkpoint_says_so_and_starts_at_step_zero(tmp_path, events):
    healing = Healing.start(_options(tmp_path, resume_from_checkpoint="latest"), Reporter(events))

    assert healing.resume_from is None
    assert [event.message for event in events] == [
        f"No complete checkpoint in {tmp_path / 'out'} yet: starting from step 0"
    ]


def test_resuming_takes_the_healed_settings_of_the_checkpoint(tmp_path, events):
    saved = TrainerState(step=6, effective_batch_size=16, micro_batch_size=2, gradient_accumulation_steps=8,
                         lr_scale=0.5)
    folder = _checkpoint(tmp_path / "out", saved)

    healing = Healing.start(_options(tmp_path, resume_from_checkpoint="latest"), Reporter(events))

    assert healing.resume_from == folder
    assert (healing.micro_batch_size, healing.gradient_accumulation_steps, healing.lr_scale) == (2, 8, 0.5)
    assert healing.oom_retries == 0  # the retries are per run: a resumed run gets its own


def test_resuming_with_another_effective_batch_keeps_the_options_split(tmp_path, events):
    saved = TrainerState(step=6, effective_batch_size=32, micro_batch_size=2, gradient_accumulation_steps=16,
                         lr_scale=0.5)
    _checkpoint(tmp_path / "out", saved)

    healing = Healing.start(_options(tmp_path, resume_from_checkpoint="latest"), Reporter(events))

    assert (healing.micro_batch_size, healing.gradient_accumulation_steps, healing.lr_scale) == (8, 2, 0.5)


def test_an_out_of_memory_under_deepspeed_fails_instead_of_resplitting(tmp_path):
    healing = _healing(micro=4, accumulation=4)
    options = _options(tmp_path)
    oom = Fault("out_of_memory", 2)

    assert deepspeed_cannot_resplit(healing, oom, options, deepspeed=False) is None
    assert deepspeed_cannot_resplit(healing, Fault("diverged", 2), options, deepspeed=True) is None
    message = deepspeed_cannot_resplit(healing, oom, options, deepspeed=True)
    assert message is not None and message.startswith("Out of memory at step 2 under DeepSpeed")
    assert "micro-batch 4: rerun with a smaller --per_device_train_batch_size" in message


def test_injected_faults_fire_once_at_their_step(tmp_path):
    options = _options(tmp_path, inject_oom_at_step=3, inject_nan_at_step=4)
    healing = _healing()
    loss = torch.tensor(2.0)

    maybe_inject_oom(healing, options, 2)
    with pytest.raises(torch.OutOfMemoryError, match="injected at step 3"):
        maybe_inject_oom(healing, options, 3)
    maybe_inject_oom(healing, options, 3)  # the retry of the same step trains
    assert maybe_inject_nan(healing, options, 3, loss).item() == 2.0
    assert math.isnan(maybe_inject_nan(healing, options, 4, loss).item())
    assert maybe_inject_nan(healing, options, 4, loss).item() == 2.0
    assert healing.injected_oom and healing.injected_nan
