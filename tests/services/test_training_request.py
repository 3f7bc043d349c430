"""OpenAI hyperparameters and the training object become one validated TrainingOptions."""

from __future__ import annotations

import pytest

from backend.services.errors import InvalidRequest
from backend.services.training_request import resolve_training


def test_defaults_are_the_safe_ones() -> None:
    resolved = resolve_training()
    assert resolved.options.use_lora is True
    assert resolved.hyperparameters == {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert resolved.training["learning_rate"] == pytest.approx(2e-4)


@pytest.mark.parametrize(("batch", "micro", "accumulation"), [(1, 1, 1), (2, 2, 1), (3, 1, 3), (8, 2, 4), (32, 2, 16)])
def test_batch_size_is_the_effective_batch_in_micro_batches_of_at_most_two(
    batch: int, micro: int, accumulation: int
) -> None:
    options = resolve_training(hyperparameters={"batch_size": batch}).options
    assert (options.per_device_train_batch_size, options.gradient_accumulation_steps) == (micro, accumulation)
    assert options.effective_batch_size == batch


def test_method_hyperparameters_and_learning_rate_multiplier() -> None:
    resolved = resolve_training(
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 2}},
        },
        training={"use_lora": False},
    )
    assert resolved.options.epochs == 2
    assert resolved.options.learning_rate == pytest.approx(4e-5)  # 2 × the full fine-tune default
    assert resolved.hyperparameters["learning_rate_multiplier"] == 2


def test_auto_lets_safetrain_choose_and_training_object_wins_where_consistent() -> None:
    resolved = resolve_training(
        hyperparameters={"n_epochs": "auto", "batch_size": 4},
        training={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "lora_target_modules": "c_attn"},
    )
    assert resolved.options.per_device_train_batch_size == 1 and resolved.options.gradient_accumulation_steps == 4
    assert resolved.options.lora_target_modules == ["c_attn"]
    with pytest.raises(InvalidRequest) as refused:
        resolve_training(hyperparameters={"batch_size": 4}, training={"per_device_train_batch_size": 3})
    assert refused.value.param == "hyperparameters.batch_size"


def test_contradictions_name_the_field() -> None:
    with pytest.raises(InvalidRequest) as refused:
        resolve_training(training={"use_8bit": True, "use_lora": False})
    assert refused.value.param == "training.use_8bit"
    with pytest.raises(InvalidRequest) as refused:
        resolve_training(hyperparameters={"learning_rate_multiplier": 2}, training={"learning_rate": 1e-3})
    assert refused.value.param == "hyperparameters.learning_rate_multiplier"
