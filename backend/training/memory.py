"""The memory plan: the estimate against a budget, the cheapest settings that fit, and the guide's safe defaults.

The estimate itself, term by term, is in memory_estimate.py; a model's shape from its config in model_shape.py.
Both keep their public names importable from here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from transformers import PretrainedConfig

from backend.training.memory_estimate import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MIB,
    MemoryBreakdown,
    MemoryPlan,
    activation_bytes,
    compute_bytes,
    cublas_workspace_bytes,
    default_device,
    estimate_memory,
    kbit_stream_bytes,
    overhead_bytes,
    quantized_bytes,
    weight_bytes,
)
from backend.training.model_shape import (
    LinearLayer,
    ModelShape,
    load_model_config,
    lora_layers,
    lora_targets,
    model_shape,
)
from backend.training.options import TrainingOptions

__all__ = [
    "CUDA_CONTEXT_BYTES", "GIB", "MIB", "LinearLayer", "MemoryBreakdown", "MemoryPlan",
    "ModelShape", "activation_bytes", "apply_safe_defaults", "cheapest_fitting_changes", "compute_bytes",
    "cublas_workspace_bytes", "default_device", "describe_changes", "device_budget_bytes", "estimate_memory",
    "format_plan", "kbit_stream_bytes", "load_model_config", "longest_fitting_seq_length", "lora_layers",
    "lora_targets", "model_shape",
    "overhead_bytes", "plan_memory", "quantized_bytes", "resolve_auto_seq_length", "smallest_fitting_budget",
    "weight_bytes",
]

OVER_7B_PARAMETERS = 7_000_000_000
TIGHT_FRACTION = 0.8
# Where the search for the longest context stops when the model sets no limit of its own (16M tokens)
LONGEST_SEQ_SEARCHED = 1 << 24


@dataclass(frozen=True)
class _Target:
    """What a trial of changed options must fit: the model's config, the budget and the device it is for."""

    config: PretrainedConfig
    budget_bytes: int
    device: str


def device_budget_bytes(options: TrainingOptions) -> tuple[int, str]:
    """The budget and its device (--plan_device, else this machine's): --memory_budget_gb, else what is free there."""
    device = options.plan_device or default_device()
    if options.memory_budget_gb is not None:
        return int(options.memory_budget_gb * GIB), device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--plan_device cuda on a machine without a GPU needs --memory_budget_gb (the GPU's size)")
        free, _total = torch.cuda.mem_get_info()
        return int(free), device
    return int(psutil.virtual_memory().available), "cpu"


def longest_fitting_seq_length(
    options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str, limit: int | None = None
) -> int | None:
    """The longest --max_seq_length whose plan fits the budget with these settings (binary search), or None."""
    def fits(length: int) -> bool:
        trial = _updated(options, {"max_seq_length": length})
        return estimate_memory(trial, config, device=device).estimate_bytes <= budget_bytes

    low, high = 0, limit or LONGEST_SEQ_SEARCHED
    if fits(high):
        return high
    while high - low > 1:  # fits(low) holds (0 trivially), fits(high) does not: the plan grows with the length
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low or None


def smallest_fitting_budget(options: TrainingOptions, config: PretrainedConfig, *, device: str) -> int:
    """The plan of one token with these settings: no smaller budget fits anything."""
    return estimate_memory(_updated(options, {"max_seq_length": 1}), config, device=device).estimate_bytes


def resolve_auto_seq_length(
    options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str
) -> tuple[TrainingOptions, list[str]]:
    """--max_seq_length auto: the longest context the plan fits in the budget (capped at the model's positions)."""
    if options.max_seq_length != "auto":
        return options, []
    messages: list[str] = []
    if options.gradient_checkpointing is None:  # left open: the longest context is the checkpointed one
        options = _updated(options, {"gradient_checkpointing": True})
        messages.append("--max_seq_length auto: enabling --gradient_checkpointing (the longest context needs it)")
    limit = model_position_limit(config)
    length = longest_fitting_seq_length(options, config, budget_bytes=budget_bytes, device=device, limit=limit)
    if length is None:  # nothing fits with the settings given: the cheapest changes that fit, if any do
        one_token = _updated(options, {"max_seq_length": 1})
        changes = cheapest_fitting_changes(one_token, config, budget_bytes=budget_bytes, device=device)
        if changes is None or "device_map" in changes:  # weight offload's plan is not one the search can grow
            raise ValueError(_nothing_fits(options, config, budget_bytes=budget_bytes, device=device))
        options = _updated(options, changes)
        messages.append(f"--max_seq_length auto: nothing fits {_gib(budget_bytes)} with the settings given; "
                        f"{describe_changes(changes)}")
        length = longest_fitting_seq_length(options, config, budget_bytes=budget_bytes, device=device, limit=limit)
        assert length is not None  # the changes fit one token
    capped = ", the model's position limit" if length == limit else ""
    messages.append(f"--max_seq_length auto: {length:,} tokens fit {_gib(budget_bytes)} on {device}{capped}")
    return _updated(options, {"max_seq_length": length}), messages


def _nothing_fits(options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str) -> str:
    """The refusal of --max_seq_length auto: the smallest budget with the settings given, and with every saver."""
    needed = smallest_fitting_budget(options, config, device=device)
    message = (f"--max_seq_length auto: nothing fits --memory_budget_gb {budget_bytes / GIB:.2f} on {device} with "
               f"these settings or any memory saver; the smallest budget that fits is {needed / GIB:.2f} GiB "
               f"(--memory_budget_gb {needed / GIB:.2f})")
    every_saver = _merge([step for step in _memory_saving_steps(options, device=device, budget_bytes=budget_bytes)
                          if "device_map" not in step])  # weight offload is planned apart (_fits_with_offload)
    try:
        saving = _updated(options, every_saver)
    except ValueError:
        return message
    least = smallest_fitting_budget(saving, config, device=device)
    if least < needed:
        message += f", or {least / GIB:.2f} GiB if you {describe_changes(every_saver)}"
    return message


def model_position_limit(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's positions allow (learned, or what RoPE was trained for), when it says."""
    text = config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def plan_memory(
    options: TrainingOptions,
    config: PretrainedConfig,
    *,
    budget_bytes: int | None = None,
    device: str | None = None,
) -> MemoryPlan:
    """Estimate against a budget (the device's when omitted); when it does not fit, the cheapest change that does."""
    if budget_bytes is None:
        budget_bytes, budget_device = device_budget_bytes(options)
        device = device or budget_device
    device = device or options.plan_device or default_device()
    options, _messages = resolve_auto_seq_length(options, config, budget_bytes=budget_bytes, device=device)
    plan = estimate_memory(options, config, device=device)
    plan.budget_bytes = budget_bytes
    plan.fits = plan.estimate_bytes <= budget_bytes and host_fits(plan)
    if plan.fits:
        return plan
    changes = cheapest_fitting_changes(options, config, budget_bytes=budget_bytes, device=plan.device)
    if changes is None:
        plan.recommendation = (
            f"does not fit even with every memory saver: estimated {_gib(plan.estimate_bytes)} "
            f"of {_gib(budget_bytes)}; use a smaller model, shorter --max_seq_length or a larger device"
        )
        return plan
    changed = estimate_memory(_updated(options, changes), config, device=plan.device)
    plan.recommended_changes = changes
    plan.recommendation = (
        f"{describe_changes(changes)}: estimated {_gib(changed.estimate_bytes)} of {_gib(budget_bytes)}"
    )
    return plan


def cheapest_fitting_changes(
    options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str
) -> dict[str, Any] | None:
    """The first cumulative step that fits, with the steps it turns out not to need dropped again."""
    steps = _memory_saving_steps(options, device=device, budget_bytes=budget_bytes)
    target = _Target(config, budget_bytes, device)
    for count in range(1, len(steps) + 1):
        if _fits(options, _merge(steps[:count]), target):
            return _drop_unneeded(options, steps[:count], target)
    return None


def _memory_saving_steps(options: TrainingOptions, *, device: str, budget_bytes: int) -> list[dict[str, Any]]:
    """Changes from cheapest to most drastic: chunked loss, checkpointing, micro-batch, tiled MLP, activation and
    embedding offload (GPU), 8-bit optimizer states, LoRA, 8-bit, 4-bit, weight offload."""
    steps: list[dict[str, Any]] = []
    if not options.chunked_loss and options.deepspeed is None:  # the same loss, only never the whole logits
        steps.append({"chunked_loss": True})
    if not options.gradient_checkpointing:
        steps.append({"gradient_checkpointing": True})
    effective = options.effective_batch_size
    for micro_batch in (2, 1):
        if micro_batch < options.per_device_train_batch_size and effective % micro_batch == 0:
            steps.append({"per_device_train_batch_size": micro_batch,
                          "gradient_accumulation_steps": effective // micro_batch})
    if not options.tiled_mlp and options.deepspeed is None:  # the same training, the MLP recomputed once more
        steps.append({"tiled_mlp": True})
    if device.startswith("cuda") and not options.offload_activations:  # the same training, slower by the copies
        steps.append({"gradient_checkpointing": True, "offload_activations": True})
    if device.startswith("cuda") and options.use_lora and not options.offload_embeddings:  # row copies only
        steps.append({"offload_embeddings": True})
    if options.optim == "adamw_torch" and importlib.util.find_spec("bitsandbytes"):
        steps.append({"optim": "adamw_8bit"})
    if not options.use_lora:
        steps.append({"use_lora": True})
    if options.deepspeed is None:
        if not options.use_8bit and not options.use_4bit:
            steps.append({"use_8bit": True, "use_4bit": False})
        if not options.use_4bit:
            steps.append({"use_8bit": False, "use_4bit": True})
        if device.startswith("cuda") and options.device_map is None:
            steps.append({"device_map": "auto", "max_memory": _offload_max_memory(budget_bytes)})
    return steps


def _offload_max_memory(budget_bytes: int) -> dict[str, str]:
    host = int(psutil.virtual_memory().available * 0.8)
    return {"0": f"{budget_bytes // GIB}GiB", "cpu": f"{host // GIB}GiB"}


def _drop_unneeded(options: TrainingOptions, steps: list[dict[str, Any]], target: _Target) -> dict[str, Any]:
    kept = list(steps)
    for step in reversed(steps[:-1]):  # the last step is the one that made it fit
        trial = [other for other in kept if other is not step]
        if _fits(options, _merge(trial), target):
            kept = trial
    return _merge(kept)


def _merge(steps: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for step in steps:
        merged.update(step)
    return merged


def _fits(options: TrainingOptions, changes: dict[str, Any], target: _Target) -> bool:
    try:
        changed = _updated(options, changes)
    except ValueError:  # e.g. 8-bit without LoRA once LoRA was dropped again
        return False
    if changed.device_map == "auto" and target.device.startswith("cuda"):
        return _fits_with_offload(changed, target)
    plan = estimate_memory(changed, target.config, device=target.device)
    return plan.estimate_bytes <= target.budget_bytes and host_fits(plan)


def host_fits(plan: MemoryPlan) -> bool:
    """Whether what the plan puts in host RAM (offloaded activations) fits the host's available memory."""
    return plan.host_bytes <= psutil.virtual_memory().available


def _fits_with_offload(options: TrainingOptions, target: _Target) -> bool:
    """Offload fits when all but the weights fit the GPU with a layer to spare and the weights fit the host."""
    plan = estimate_memory(options, target.config, device=target.device)
    on_gpu = plan.estimate_bytes - plan.breakdown.weights
    one_layer = plan.breakdown.weights // max(model_shape(target.config).layers, 1)
    return on_gpu + one_layer <= target.budget_bytes and plan.breakdown.weights <= psutil.virtual_memory().available


def _updated(options: TrainingOptions, changes: dict[str, Any]) -> TrainingOptions:
    """A validated copy of the options with the changes applied."""
    return TrainingOptions.model_validate({**options.model_dump(), **changes})


def describe_changes(changes: dict[str, Any]) -> str:
    """The changes as the flags a user would type, e.g. 'enable --gradient_checkpointing and --use_4bit'."""
    switches = [f"--{name}" for name, value in changes.items() if value is True]
    values = [
        f"--{name} {_flag_value(value)}"
        for name, value in changes.items()
        if not isinstance(value, bool) and value is not None
    ]
    parts = []
    if switches:
        parts.append("enable " + " and ".join(switches))
    if values:
        parts.append("set " + " ".join(values))
    return "; ".join(parts) or "no change"


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{key}={size}" for key, size in value.items())
    return str(value)


def apply_safe_defaults(
    options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str | None = None
) -> tuple[TrainingOptions, list[str]]:
    """The guide's safe defaults, each announced: 8-bit over 7B, small micro-batches, checkpointing when tight."""
    device = device or options.plan_device or default_device()
    options, messages = resolve_auto_seq_length(options, config, budget_bytes=budget_bytes, device=device)
    shape = model_shape(config)
    changes: dict[str, Any] = {}
    if shape.n_parameters > OVER_7B_PARAMETERS and options.deepspeed is None:
        changes.update(_large_model_defaults(options, shape.n_parameters, messages))
    target = _Target(config, budget_bytes, device)
    current = _updated(options, changes)
    changes.update(_checkpointing_default(current, target, messages))
    current = _updated(options, changes)
    changes.update(_micro_batch_default(current, target, messages))
    current = _updated(options, changes)
    plan = plan_memory(current, config, budget_bytes=budget_bytes, device=device)
    if not plan.fits and plan.recommended_changes:
        messages.append(f"memory plan: {plan.recommendation}")
        current = _updated(current, plan.recommended_changes)
    elif not plan.fits:
        messages.append(f"memory plan: {plan.recommendation}")
    return current, messages


def _large_model_defaults(options: TrainingOptions, n_parameters: int, messages: list[str]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    size = f"{n_parameters / 1e9:.1f}B parameters"
    if options.use_8bit is None and not options.use_4bit:
        if options.use_lora:
            changes["use_8bit"] = True
            messages.append(f"{size} (over 7B): loading weights in 8-bit (--use_8bit)")
        else:
            messages.append(f"{size} (over 7B): 8-bit needs --use_lora, so weights stay at full precision")
    if options.device_map is None:
        changes["device_map"] = "auto"
        messages.append(f"{size} (over 7B): placing layers with --device_map auto")
    return changes


def _micro_batch_default(options: TrainingOptions, target: _Target, messages: list[str]) -> dict[str, Any]:
    """Micro-batches above 2 that do not fit go down to 2 or 1, accumulation up, effective batch unchanged."""
    if options.per_device_train_batch_size <= 2 or _fits(options, {}, target):
        return {}
    effective = options.effective_batch_size
    candidates = [size for size in (2, 1) if effective % size == 0]
    for micro_batch in candidates:
        changes = {"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": effective // micro_batch}
        if _fits(options, changes, target) or micro_batch == candidates[-1]:
            messages.append(
                f"micro-batch {options.per_device_train_batch_size} does not fit: using {micro_batch} with "
                f"{effective // micro_batch} accumulation steps (effective batch {effective} unchanged)"
            )
            return changes
    return {}


def _checkpointing_default(options: TrainingOptions, target: _Target, messages: list[str]) -> dict[str, Any]:
    """Decide --gradient_checkpointing when it was left open: on when the plan without it is tight."""
    if options.gradient_checkpointing is not None:
        return {}
    without = estimate_memory(_updated(options, {"gradient_checkpointing": False}), target.config, device=target.device)
    budget_bytes = target.budget_bytes
    share = without.estimate_bytes / budget_bytes
    if share > TIGHT_FRACTION:
        messages.append(
            f"memory plan is tight ({_gib(without.estimate_bytes)} of {_gib(budget_bytes)}, {share:.0%}): "
            "enabling --gradient_checkpointing"
        )
        return {"gradient_checkpointing": True}
    messages.append(f"memory plan has room ({share:.0%} of {_gib(budget_bytes)}): gradient checkpointing off")
    return {"gradient_checkpointing": False}


def format_plan(plan: MemoryPlan) -> str:
    """The human table `--dry_run` prints."""
    rows = [(name.capitalize(), value) for name, value in plan.breakdown.to_dict().items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        f"Memory plan on {plan.device}: {plan.n_parameters / 1e6:,.1f}M parameters, "
        f"{plan.trainable_parameters / 1e6:,.2f}M trainable",
        *(f"  {name:<{width}}{_size(value):>12}" for name, value in rows),
        f"  {'Total':<{width}}{_size(plan.estimate_bytes):>12}",
        f"  (activations: {_size(plan.activations_without_checkpointing)} without gradient checkpointing, "
        f"{_size(plan.activations_with_checkpointing)} with)",
        f"  Sequence length {plan.max_seq_length:,}; techniques: {', '.join(plan.techniques) or 'none'}",
        *(f"  (--{name} saves {_size(saved)} on the device)" for name, saved in plan.savings.items()),
        *([f"  Host RAM for what is offloaded: {_size(plan.host_bytes)}"] if plan.host_bytes else []),
    ]
    if plan.budget_bytes is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"  {'Budget':<{width}}{_size(plan.budget_bytes):>12}  -> {verdict}")
    if plan.recommendation:
        lines.append(f"Recommendation: {plan.recommendation}")
    return "\n".join(lines)


def _size(value: int) -> str:
    return _gib(value) if value >= GIB else f"{value / MIB:.1f} MiB"


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
