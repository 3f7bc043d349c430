"""The API's view of an evaluation (safetrain's own object, beside OpenAI's job types)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from backend.db.models import Evaluation


class EvaluationRequest(BaseModel):
    """The `evaluation` object: POST /v1/fine_tuning/jobs/{id}/evaluations, or `evaluation` on job create.

    Documentation only: the body is checked by the service, so a bad field is a 400 naming it.
    """

    file: str = Field(description="A file with purpose evals (HumanEval-shaped JSONL) of the same project.")
    n_samples: int = Field(1, ge=1, le=20, description="Completions generated per task.")
    k: list[int] = Field([1], description="The k of pass@k, each from 1 to n_samples.")
    max_new_tokens: int = Field(256, ge=1, le=2048, description="Tokens generated per completion at most.")
    temperature: float = Field(0.2, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    mode: Literal["sandbox", "lint"] = Field("sandbox", description="Run the tests in the sandbox, or lint only.")
    timeout_s: float = Field(10.0, ge=0.5, le=60.0, description="Wall-clock limit of one sandboxed run.")


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
        options = row.options or {}
        return cls.model_validate(dict(
            id=row.id, fine_tuning_job_id=row.job_id, created_at=row.created_at, started_at=row.started_at,
            finished_at=row.finished_at, status=row.status, file=row.file_id, n_samples=options.get("n_samples", 1),
            k=options.get("k", [1]), max_new_tokens=options.get("max_new_tokens", 256),
            temperature=options.get("temperature", 0.2), mode=options.get("mode", "sandbox"),
            timeout_s=options.get("timeout_s", 10.0),
            pass_at_k=(row.results or {}).get("pass_at_k"), results=row.results, error=row.error,
        ))
