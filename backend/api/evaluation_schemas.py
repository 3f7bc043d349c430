"""The API's view of an evaluation (safetrain's own object, beside OpenAI's job types)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from backend.db.models import Evaluation
from backend.services.evaluation_options import EvaluationOptions

# What a row stored without some option (older rows) shows for it.
_DEFAULT_OPTIONS = EvaluationOptions.model_construct(file="").to_dict()


class EvaluationObject(BaseModel):
    """An evaluation of a job's adapter; `results` holds pass@k overall and per task once it succeeded."""

    id: str
    object: Literal["fine_tuning.job.evaluation"] = "fine_tuning.job.evaluation"
    fine_tuning_job_id: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: Literal["queued", "running", "succeeded", "failed"]
    file: str
    n_samples: int
    k: list[int]
    max_new_tokens: int
    temperature: float
    mode: str
    timeout_s: float
    pass_at_k: dict[str, float] | None = Field(None, description="Overall pass@k (mean over tasks).")
    results: dict[str, Any] | None = Field(None, description="The harness's report: per task, per sample.")
    error: str | None

    @classmethod
    def of(cls, row: Evaluation) -> EvaluationObject:
        """The API view of an evaluation row."""
        options = {**_DEFAULT_OPTIONS, **(row.options or {}), "file": row.file_id}
        return cls.model_validate(dict(
            options, id=row.id, fine_tuning_job_id=row.job_id, created_at=row.created_at, started_at=row.started_at,
            finished_at=row.finished_at, status=row.status,
            pass_at_k=(row.results or {}).get("pass_at_k"), results=row.results, error=row.error,
        ))
