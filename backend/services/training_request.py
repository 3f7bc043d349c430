"""OpenAI's `hyperparameters`/`method` and safetrain's `training` object, resolved into TrainingOptions."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from backend.services.errors import InvalidRequest
from backend.training.options import API_TRAINING_FIELDS, TrainingOptions

HYPERPARAMETER_KEYS = ("n_epochs", "batch_size", "learning_rate_multiplier")
# The API's defaults are the safe ones: LoRA on (a full fine-tune must be asked for).
API_DEFAULTS: dict[str, Any] = {"use_lora": True}


@dataclass
class ResolvedTraining:
    """The options a job will run with, and OpenAI's view of them."""

    options: TrainingOptions
    hyperparameters: dict[str, Any]
    method: dict[str, Any]

    @property
    def training(self) -> dict[str, Any]:
        """The `training` object as stored and shown: the API's fields, learning rate resolved."""
        fields = self.options.model_dump(include=set(API_TRAINING_FIELDS))
        fields["learning_rate"] = self.options.resolved_learning_rate
        return fields


def _pick_hyperparameters(hyperparameters: Any, method: Any) -> tuple[dict[str, Any], str]:
    """The hyperparameters object the client sent (method's supervised one wins) and its param prefix."""
    if method is not None:
        if not isinstance(method, dict):
            raise InvalidRequest("method must be an object.", param="method")
        kind = method.get("type", "supervised")
        if kind != "supervised":
            raise InvalidRequest(f"Only supervised fine-tuning is supported (got {kind!r}).", param="method.type")
        unknown = set(method) - {"type", "supervised"}
        if unknown:
            raise InvalidRequest(f"Unknown key in method: {sorted(unknown)[0]}", param=f"method.{sorted(unknown)[0]}")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict):
            raise InvalidRequest("method.supervised must be an object.", param="method.supervised")
        if supervised.get("hyperparameters") is not None:
            return supervised["hyperparameters"], "method.supervised.hyperparameters"
    return hyperparameters if hyperparameters is not None else {}, "hyperparameters"


def _hyperparameter(values: dict[str, Any], key: str, prefix: str, *, integer: bool) -> float | None:
    """One hyperparameter: None for "auto" or absent, else a positive number."""
    value = values.get(key, "auto")
    if value == "auto" or value is None:
        return None
    bad_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if bad_type or value <= 0 or (not integer and not math.isfinite(value)):
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidRequest(f'{key} must be "auto" or {kind} (got {value!r}).', param=f"{prefix}.{key}")
    return float(value)


def _batch_split(batch_size: int) -> tuple[int, int]:
    """Micro-batch and accumulation whose product is exactly the effective batch, micro-batch 1 or 2."""
    micro = 2 if batch_size % 2 == 0 else 1
    return micro, batch_size // micro


def _check_training_object(training: Any) -> dict[str, Any]:
    if training is None:
        return {}
    if not isinstance(training, dict):
        raise InvalidRequest("training must be an object.", param="training")
    for key in training:
        if key not in API_TRAINING_FIELDS:
            raise InvalidRequest(f"Unknown training option: {key}", param=f"training.{key}")
    return dict(training)


def _agree(training: dict[str, Any], key: str, value: Any, param: str) -> None:
    """Refuse a training-object value that contradicts the hyperparameter the client also sent."""
    if key in training and training[key] is not None and training[key] != value:
        raise InvalidRequest(
            f"training.{key}={training[key]!r} contradicts {param}={value!r}: send one of them.", param=param
        )


def _build_options(fields: dict[str, Any]) -> TrainingOptions:
    try:
        return TrainingOptions.model_validate(fields, strict=True)  # "8" is not a number here
    except ValidationError as exc:
        error = exc.errors()[0]
        location = [str(part) for part in error["loc"]]
        named = re.search(r"--(\w+)", error["msg"])
        field_name = location[0] if location else (named.group(1) if named else None)
        message = error["msg"].removeprefix("Value error, ")
        if location:
            message = f"training.{'.'.join(location)}: {message}"
        raise InvalidRequest(message, param=f"training.{field_name}" if field_name else "training") from None


def resolve_training(
    *, hyperparameters: Any = None, method: Any = None, training: Any = None, seed: Any = None
) -> ResolvedTraining:
    """Merge the API defaults, the OpenAI hyperparameters and the training object; InvalidRequest names the field."""
    values, prefix = _pick_hyperparameters(hyperparameters, method)
    if not isinstance(values, dict):
        raise InvalidRequest("hyperparameters must be an object.", param=prefix)
    for key in values:
        if key not in HYPERPARAMETER_KEYS:
            raise InvalidRequest(f"Unknown hyperparameter: {key}", param=f"{prefix}.{key}")
    requested = _check_training_object(training)
    fields: dict[str, Any] = {**API_DEFAULTS}
    n_epochs = _hyperparameter(values, "n_epochs", prefix, integer=True)
    if n_epochs is not None:
        _agree(requested, "epochs", n_epochs, f"{prefix}.n_epochs")
        fields["epochs"] = n_epochs
    batch_size = _hyperparameter(values, "batch_size", prefix, integer=True)
    if batch_size is not None:
        micro, accumulation = _batch_split(int(batch_size))
        asked = requested.get("per_device_train_batch_size", micro) * requested.get("gradient_accumulation_steps", 1)
        if {"per_device_train_batch_size", "gradient_accumulation_steps"} & set(requested) and asked != batch_size:
            raise InvalidRequest(
                f"batch_size={int(batch_size)} contradicts the training object's micro-batch × accumulation.",
                param=f"{prefix}.batch_size",
            )
        fields.update(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidRequest(f"seed must be an integer (got {seed!r}).", param="seed")
        _agree(requested, "seed", seed, "seed")
        fields["seed"] = seed
    fields.update({key: value for key, value in requested.items() if value is not None or key == "use_8bit"})
    options = _build_options(fields)
    multiplier = _hyperparameter(values, "learning_rate_multiplier", prefix, integer=False)
    default_rate = options.model_copy(update={"learning_rate": None}).resolved_learning_rate
    if multiplier is not None:
        if requested.get("learning_rate") is not None:
            raise InvalidRequest(
                "learning_rate_multiplier contradicts training.learning_rate: send one of them.",
                param=f"{prefix}.learning_rate_multiplier",
            )
        options = _build_options({**fields, "learning_rate": default_rate * multiplier})
    shown = {
        "n_epochs": int(options.epochs) if float(options.epochs).is_integer() else options.epochs,
        "batch_size": options.effective_batch_size,
        "learning_rate_multiplier": round(options.resolved_learning_rate / default_rate, 6),
    }
    method_shown = {"type": "supervised", "supervised": {"hyperparameters": shown}}
    return ResolvedTraining(options=options, hyperparameters=shown, method=method_shown)
