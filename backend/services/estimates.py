"""Memory estimates for a job request, from the model's config alone (nothing is loaded)."""

from __future__ import annotations

from typing import Any

from backend.config import Settings
from backend.devices import cpu_device, list_gpus
from backend.services.base_models import resolve_base_model
from backend.services.errors import InvalidRequest
from backend.services.job_request import EstimateRequest
from backend.services.training_request import resolve_training


def _device_and_budget(spec: EstimateRequest) -> tuple[str, int]:
    """The device planned for (`device`, else a GPU when one is visible) and its budget (`budget_bytes`, else free)."""
    gpus = list_gpus()
    device = spec.device or ("cuda" if gpus else "cpu")
    if spec.budget_bytes is not None:
        return device, spec.budget_bytes
    if device == "cpu":
        return device, cpu_device().free_bytes
    if not gpus:
        raise InvalidRequest("Planning for device cuda on a server without a GPU needs budget_bytes.",
                             param="budget_bytes")
    return device, max(gpu.free_bytes for gpu in gpus)


def estimate_job(*, settings: Settings, spec: EstimateRequest) -> dict[str, Any]:
    """The plan as a dict: fits, estimate_bytes, budget_bytes, device, breakdown, max_seq_length, techniques."""
    from backend.training.memory import load_model_config, plan_memory

    ref = resolve_base_model(spec.model, settings=settings)
    if ref.path is None:
        raise InvalidRequest(
            "Estimates need a local base model folder (Hub ids are planned by the worker).", param="model"
        )
    resolved = resolve_training(
        hyperparameters=spec.hyperparameters, method=spec.method, training=spec.training, seed=spec.seed
    )
    options = resolved.options.model_copy(update={"model": str(ref.path)})
    try:
        config = load_model_config(str(ref.path))
    except (OSError, ValueError, KeyError) as error:  # a folder transformers cannot read is the model's fault
        raise InvalidRequest(f"The config of model {ref.name!r} cannot be read: {error}", param="model") from None
    device, budget_bytes = _device_and_budget(spec)
    try:
        plan = plan_memory(options, config, budget_bytes=budget_bytes, device=device)
    except ValueError as error:  # max_seq_length "auto" with a budget that fits no context at all
        raise InvalidRequest(str(error), param="training.max_seq_length") from None
    answer: dict[str, Any] = plan.to_dict()
    answer.setdefault("object", "fine_tuning.estimate")
    answer["model"] = ref.name
    answer["training"] = resolved.training
    return answer
