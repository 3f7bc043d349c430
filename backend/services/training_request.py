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
DPO_HYPERPARAMETER_KEYS = (*HYPERPARAMETER_KEYS, "beta")
METHODS = ("supervised", "dpo")
# The API's defaults are the safe ones: LoRA on (a full fine-tune must be asked for).
API_DEFAULTS: dict[str, Any] = {"use_lora": True}
# Upper bounds on what a client may ask (the trainer's own checks give the lower ones): values past them are
# typos or attacks that would only fail, or hold a GPU for ever, hours after the job was accepted.
API_LIMITS: dict[str, float] = {
    "lora_r": 1024, "lora_alpha": 65536, "epochs": 1000, "per_device_train_batch_size": 4096,
    "gradient_accumulation_steps": 65536, "max_steps": 10**8, "max_seq_length": 1 << 20, "save_steps": 10**8,
    "logging_steps": 10**8, "weight_decay": 10.0, "seed": 2**31 - 1,
}
MAX_SEED = 2**31 - 1
MAX_TARGET_MODULES = 64
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.*-]{1,128}$")


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


def _method_type(method: Any, training: dict[str, Any]) -> str:
    """"supervised" or "dpo": method.type, else the training object's `method`, else supervised."""
    if method is None:
        return str(training.get("method") or "supervised")
    if not isinstance(method, dict):
        raise InvalidRequest("method must be an object.", param="method")
    kind = method.get("type", "supervised")
    if isinstance(kind, str) and kind in METHODS:
        _agree(training, "method", kind, "method.type")
    return str(kind)


def _pick_hyperparameters(hyperparameters: Any, method: Any, kind: str) -> tuple[dict[str, Any], str]:
    """The hyperparameters object the client sent (the method's own one wins) and its param prefix."""
    if method is not None:
        if kind == "reinforcement":
            raise InvalidRequest(
                'Reinforcement fine-tuning is not supported: it samples the model and scores each answer with '
                'graders, which safetrain does not run. Use "supervised".',
                param="method.type",
            )
        if kind not in METHODS:
            raise InvalidRequest(f'Only "supervised" and "dpo" fine-tuning are supported (got {kind!r}).',
                                 param="method.type")
        unknown = set(method) - {"type", kind}
        if unknown:
            raise InvalidRequest(f"Unknown key in method: {sorted(unknown)[0]}", param=f"method.{sorted(unknown)[0]}")
        section = method.get(kind) or {}
        if not isinstance(section, dict):
            raise InvalidRequest(f"method.{kind} must be an object.", param=f"method.{kind}")
        if section.get("hyperparameters") is not None:
            return section["hyperparameters"], f"method.{kind}.hyperparameters"
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
    for key, value in training.items():
        if key not in API_TRAINING_FIELDS:
            raise InvalidRequest(f"Unknown training option: {key}", param=f"training.{key}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"training.{key} must be a finite number (got {value}).", param=f"training.{key}")
    _check_target_modules(training.get("lora_target_modules"))
    return dict(training)


def _check_target_modules(modules: Any) -> None:
    """Module names, not paths or free text; `null` (omitted) lets the architecture choose."""
    if not isinstance(modules, list):
        return  # null, or a wrong type the options model refuses
    if not 1 <= len(modules) <= MAX_TARGET_MODULES or not all(
        isinstance(name, str) and _MODULE_NAME.fullmatch(name) for name in modules
    ):
        raise InvalidRequest(
            f"training.lora_target_modules must list 1 to {MAX_TARGET_MODULES} module names "
            "(letters, digits, '_', '.', '-', '*'), or be omitted.",
            param="training.lora_target_modules",
        )


def _check_limits(options: TrainingOptions, requested: dict[str, Any], prefix: str) -> None:
    """Refuse values past API_LIMITS, naming the field the client sent (a hyperparameter or the training key)."""
    from_hyperparameters = {
        "epochs": f"{prefix}.n_epochs",
        "per_device_train_batch_size": f"{prefix}.batch_size",
        "gradient_accumulation_steps": f"{prefix}.batch_size",
        "seed": "seed",
    }
    for name, limit in API_LIMITS.items():
        value = getattr(options, name)
        if value is None or value == "auto" or value <= limit and not (name == "seed" and value < 0):
            continue
        param = f"training.{name}" if name in requested else from_hyperparameters.get(name, f"training.{name}")
        low = 0 if name in ("seed", "weight_decay") else 1
        raise InvalidRequest(f"{param} must be between {low} and {limit:g} (got {value}).", param=param)


def _agree(training: dict[str, Any], key: str, value: Any, param: str) -> None:
    """Refuse a training-object value that contradicts the hyperparameter the client also sent."""
    if key in training and training[key] is not None and training[key] != value:
        raise InvalidRequest(
            f"training.{key}={training[key]!r} contradicts {param}={value!r}: send one of them.", param=param
        )


def _build_options(fields: dict[str, Any], *, param: str | None = None, sent: Any = ()) -> TrainingOptions:
    try:
        return TrainingOptions.model_validate(fields, strict=True)  # "8" is not a number here
    except ValidationError as exc:
        if param is not None:  # a value derived from what the client sent under `param`
            raise InvalidRequest(f"{param}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}",
                                 param=param) from None
        error = exc.errors()[0]
        location = [str(part) for part in error["loc"]]
        # A contradiction names several flags: name the one the client sent (not a default it never saw).
        named = re.findall(r"--(\w+)", error["msg"])
        field_name = location[0] if location else next((n for n in named if n in sent), named[0] if named else None)
        message = error["msg"].removeprefix("Value error, ")
        if location:
            message = f"training.{'.'.join(location)}: {message}"
        raise InvalidRequest(message, param=f"training.{field_name}" if field_name else "training") from None


def resolve_training(
    *, hyperparameters: Any = None, method: Any = None, training: Any = None, seed: Any = None
) -> ResolvedTraining:
    """Merge the API defaults, the OpenAI hyperparameters and the training object; InvalidRequest names the field."""
    requested = _check_training_object(training)
    kind = _method_type(method, requested)
    values, prefix = _pick_hyperparameters(hyperparameters, method, kind)
    if not isinstance(values, dict):
        raise InvalidRequest("hyperparameters must be an object.", param=prefix)
    for key in values:
        if key not in (DPO_HYPERPARAMETER_KEYS if kind == "dpo" else HYPERPARAMETER_KEYS):
            raise InvalidRequest(f"Unknown hyperparameter: {key}", param=f"{prefix}.{key}")
    fields: dict[str, Any] = {**API_DEFAULTS, "method": kind}
    beta = _hyperparameter(values, "beta", prefix, integer=False)
    if beta is not None:
        _agree(requested, "dpo_beta", beta, f"{prefix}.beta")
        fields["dpo_beta"] = beta
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
    options = _build_options(fields, sent=requested)
    _check_limits(options, requested, prefix)
    multiplier = _hyperparameter(values, "learning_rate_multiplier", prefix, integer=False)
    default_rate = options.model_copy(update={"learning_rate": None}).resolved_learning_rate
    if multiplier is not None:
        if requested.get("learning_rate") is not None:
            raise InvalidRequest(
                "learning_rate_multiplier contradicts training.learning_rate: send one of them.",
                param=f"{prefix}.learning_rate_multiplier",
            )
        options = _build_options(
            {**fields, "learning_rate": default_rate * multiplier}, param=f"{prefix}.learning_rate_multiplier"
        )
    shown = {
        "n_epochs": int(options.epochs) if float(options.epochs).is_integer() else options.epochs,
        "batch_size": options.effective_batch_size,
        "learning_rate_multiplier": round(options.resolved_learning_rate / default_rate, 6),
    }
    method_shown: dict[str, Any] = {"type": kind, kind: {"hyperparameters": shown}}
    if kind == "dpo":
        method_shown["dpo"]["hyperparameters"] = {**shown, "beta": options.dpo_beta}
    return ResolvedTraining(options=options, hyperparameters=shown, method=method_shown)
