"""Request and response bodies, shaped exactly as the openai-python SDK's types (safetrain's fields beside)."""

from __future__ import annotations

from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict

from backend.db.models import Checkpoint, Job, Project

Item = TypeVar("Item", bound=BaseModel)


class ListResponse(BaseModel, Generic[Item]):
    """OpenAI's cursor page."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool
    first_id: str | None
    last_id: str | None


def list_response(items: list[Item], *, has_more: bool, ids: bool = True) -> dict[str, Any]:
    """A list answer with the page's first and last ids (the next page's cursor is the last)."""
    first = getattr(items[0], "id", None) if items and ids else None
    last = getattr(items[-1], "id", None) if items and ids else None
    return {"object": "list", "data": items, "has_more": has_more, "first_id": first, "last_id": last}


class RowView(BaseModel):
    """An API object read straight off a row whose columns bear its fields' names."""

    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def of(cls, row: object) -> Self:
        """The API view of `row`."""
        return cls.model_validate(row)


# ------------------------------------------------------------------------------------------------ files


class FileObject(RowView):
    """openai.types.FileObject plus safetrain's sha256, format and n_examples."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str
    format: str | None = None
    n_examples: int | None = None


class FileDeleted(BaseModel):
    """openai.types.FileDeleted."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool


# ------------------------------------------------------------------------------------------------ jobs

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None = None


class Hyperparameters(BaseModel):
    """OpenAI's hyperparameters, as resolved."""

    n_epochs: int | float | str | None = None
    batch_size: int | str | None = None
    learning_rate_multiplier: float | str | None = None


class Memory(BaseModel):
    """The job's memory plan and what it used."""

    estimate_bytes: int | None
    peak_bytes: int | None
    budget_bytes: int | None
    device: str | None


class Progress(BaseModel):
    """Where the trainer is."""

    step: int | None
    total_steps: int | None
    epoch: float | None


# The job's columns that the API shows under their own names.
_JOB_COLUMNS_AS_IS = ("id", "created_at", "finished_at", "model", "fine_tuned_model", "status", "method",
                      "trained_tokens", "seed", "estimated_finish", "training", "attempt")


class FineTuningJob(BaseModel):
    """openai.types.fine_tuning.FineTuningJob plus safetrain's training, memory, progress and attempt."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: JobStatus
    error: JobError | None
    hyperparameters: Hyperparameters
    method: dict[str, Any] | None
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    seed: int
    estimated_finish: int | None
    metadata: dict[str, str] | None
    integrations: list[Any] | None = None
    user_provided_suffix: str | None = None
    training: dict[str, Any]
    memory: Memory
    progress: Progress
    attempt: int

    @classmethod
    def of(cls, job: Job) -> FineTuningJob:
        """The API view of a job row."""
        return cls.model_validate(dict(
            {name: getattr(job, name) for name in _JOB_COLUMNS_AS_IS},
            organization_id=job.project_id,
            error=JobError(**job.error) if job.error else None,
            hyperparameters=Hyperparameters(**job.hyperparameters),
            training_file=job.training_file_id,
            validation_file=job.validation_file_id,
            result_files=list(job.result_files or []),
            metadata=job.metadata_,
            integrations=list(job.integrations or []),
            user_provided_suffix=job.suffix,
            memory=Memory(estimate_bytes=job.memory_estimate_bytes, peak_bytes=job.memory_peak_bytes,
                          budget_bytes=job.memory_budget_bytes, device=job.memory_device),
            progress=Progress(step=job.progress_step, total_steps=job.progress_total_steps, epoch=job.progress_epoch),
        ))


class FineTuningJobEvent(RowView):
    """openai.types.fine_tuning.FineTuningJobEvent."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class FineTuningJobCheckpoint(BaseModel):
    """openai.types.fine_tuning.jobs.FineTuningJobCheckpoint."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]

    @classmethod
    def of(cls, row: Checkpoint, *, job: Job, project: Project) -> FineTuningJobCheckpoint:
        """The API view of a checkpoint row."""
        return cls(
            id=row.id,
            created_at=row.created_at,
            fine_tuned_model_checkpoint=f"{fine_tuned_model_name(job, project)}:ckpt-step-{row.step_number}",
            fine_tuning_job_id=job.id,
            step_number=row.step_number,
            metrics={"step": row.step_number, **(row.metrics or {})},
        )


def fine_tuned_model_name(job: Job, project: Project) -> str:
    """`ft:<base>:<suffix or project>:<job id>`, the name a job's model has (or will have)."""
    return job.fine_tuned_model or f"ft:{job.model}:{job.suffix or project.name}:{job.id}"


class TelemetrySampleOut(RowView):
    """One memory sample of a job."""

    object: Literal["fine_tuning.job.telemetry_sample"] = "fine_tuning.job.telemetry_sample"
    seq: int
    created_at: int
    attempt: int
    step: int | None
    sample: dict[str, Any]


class TelemetryList(BaseModel):
    """Memory samples in time order; continue with `?after=<last_seq>`."""

    object: Literal["list"] = "list"
    data: list[TelemetrySampleOut]
    has_more: bool
    last_seq: int | None


# ------------------------------------------------------------------------------------------------ models


class ExportObject(RowView):
    """safetrain's export of a job: its adapter merged into the base, stored as the file `file_id` once succeeded."""

    id: str
    object: Literal["fine_tuning.export"] = "fine_tuning.export"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    format: Literal["merged"]
    file_id: str | None
    error: str | None
    created_at: int
    finished_at: int | None


class ModelObject(BaseModel):
    """openai.types.Model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelObject]


# ------------------------------------------------------------------------------------------------ errors


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every failure: `{"error": {message, type, param, code}}`."""

    error: ErrorDetail


_ERROR_MEANINGS = {
    400: "Invalid request (the error's `param` names the field), or a state conflict.",
    401: "Missing, wrong or revoked API key.",
    404: "No such object in this project (other projects' objects included).",
    413: "The upload is over the size limit.",
    429: "A project quota (unfinished jobs, stored bytes) is reached.",
    503: "The database is unavailable for a moment; retry.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting the error envelope under each of `statuses`."""
    return {status: {"model": ErrorResponse, "description": _ERROR_MEANINGS[status]} for status in statuses}
