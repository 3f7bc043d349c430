"""The job request, one model for create and estimate: OpenAI's job-create body plus safetrain's own objects.

The types are checked here (a wrong type is a 400 naming the field); what the values mean is checked by the
services that use them (training_request, evaluation_options, jobs), in the order a client reads its refusals.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

# W&B's names: letters, digits, '_', '-' and '.'; a run name and tags are free text without control characters.
WandbName = Annotated[StrictStr, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
WandbText = Annotated[StrictStr, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
WandbTag = Annotated[StrictStr, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]


class WandbSettings(BaseModel):
    """OpenAI's FineTuningJobWandbIntegration: where the job's W&B run goes."""

    model_config = ConfigDict(extra="forbid")

    project: WandbName
    name: WandbText | None = None
    entity: WandbName | None = None
    tags: Annotated[list[WandbTag], Field(max_length=64)] | None = None


class WandbIntegration(BaseModel):
    """One entry of `integrations`: {"type": "wandb", "wandb": {...}} (no key: the worker's environment has it)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbSettings


class JobRequest(BaseModel):
    """What create and estimate both take."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    training_file: StrictStr | None = None
    validation_file: StrictStr | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    seed: StrictInt | None = None
    suffix: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    training: dict[str, Any] | None = Field(
        default=None, description="safetrain's training options (train_safe.py's flag names)."
    )
    evaluation: dict[str, Any] | None = Field(
        default=None, description="safetrain's sandboxed evaluation to run once training succeeds "
        "(file, n_samples, k, max_new_tokens, temperature, mode); the estimate accepts it and does not plan it."
    )


class JobCreateRequest(JobRequest):
    """POST /v1/fine_tuning/jobs: OpenAI's job-create body plus safetrain's `training` object."""

    training_file: StrictStr
    integrations: Annotated[list[WandbIntegration], Field(max_length=1)] | None = Field(
        default=None, description="OpenAI's integrations: one W&B run the worker logs the job's metrics to."
    )


class EstimateRequest(JobRequest):
    """POST /v1/fine_tuning/estimate: a job-create body; no training file needed."""

    budget_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Memory to plan for; the largest visible GPU's free memory when omitted."
    )
    device: Literal["cuda", "cpu"] | None = Field(
        default=None, description="The device to plan for, whatever this server has; a GPU when one is visible."
    )
