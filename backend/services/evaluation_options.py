"""The `evaluation` object (on job create, or the evaluations route's body): one model, refusals naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy.orm import Session

from backend.db.models import File, Project
from backend.services.errors import InvalidRequest
from backend.services.lookup import project_row

# The order of the stored `options` dict and of the "known:" list in a refusal.
EVALUATION_FIELDS = ("file", "n_samples", "k", "max_new_tokens", "temperature", "mode", "timeout_s")
MAX_SAMPLES = 20
MAX_NEW_TOKENS = 2048
MAX_TEMPERATURE = 2.0
MIN_TIMEOUT_S = 0.5
MAX_TIMEOUT_S = 60.0

# What a refused field must be; `{n_samples}` is the request's (valid) number of samples.
_REFUSALS = {
    "file": "must be the id of a file with purpose evals.",
    "n_samples": f"must be an integer from 1 to {MAX_SAMPLES}.",
    "k": "must be a non-empty list of integers from 1 to n_samples ({n_samples}).",
    "mode": "must be 'sandbox' or 'lint'.",
    "max_new_tokens": f"must be an integer from 1 to {MAX_NEW_TOKENS}.",
    "temperature": f"must be a number from 0.0 to {MAX_TEMPERATURE}.",
    "timeout_s": f"must be a number from {MIN_TIMEOUT_S} to {MAX_TIMEOUT_S}.",
}


class EvaluationOptions(BaseModel):
    """The `evaluation` object: POST /v1/fine_tuning/jobs/{id}/evaluations's body, or `evaluation` on job create."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields in the order they are checked: a request's first refusal is the one reported.

    file: Annotated[StrictStr, Field(min_length=1)] = Field(
        description="A file with purpose evals (HumanEval-shaped JSONL) of the same project."
    )
    n_samples: Annotated[StrictInt, Field(ge=1, le=MAX_SAMPLES)] = Field(
        1, description="Completions generated per task."
    )
    k: Annotated[list[StrictInt], Field(min_length=1)] = Field(
        [1], description="The k of pass@k, each from 1 to n_samples."
    )
    mode: Literal["sandbox", "lint"] = Field("sandbox", description="Run the tests in the sandbox, or lint only.")
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_NEW_TOKENS)] = Field(
        256, description="Tokens generated per completion at most."
    )
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)] = Field(
        0.2, description="Sampling temperature; 0 is greedy."
    )
    timeout_s: Annotated[StrictFloat, Field(ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S, allow_inf_nan=False)] = Field(
        10.0, description="Wall-clock limit of one sandboxed run."
    )

    @field_validator("k")
    @classmethod
    def _k_within_samples(cls, k: list[int], info: ValidationInfo) -> list[int]:
        """Each k at most n_samples (checked when n_samples itself was valid); kept sorted and unique."""
        n_samples = info.data.get("n_samples")
        if n_samples is not None and not all(1 <= value <= n_samples for value in k):
            raise ValueError("k exceeds n_samples")
        return sorted(set(k))

    def to_dict(self) -> dict[str, Any]:
        """The evaluation row's `options`, as the worker reads them."""
        values = self.model_dump()
        return {name: values[name] for name in EVALUATION_FIELDS}


def parse_options(body: Any, *, prefix: str = "") -> EvaluationOptions:
    """Check an `evaluation` object; InvalidRequest (400) names the field at fault (`prefix` + name)."""
    if not isinstance(body, dict):
        where = prefix.rstrip(".")
        raise InvalidRequest(f"{where or 'The body'} must be a JSON object.", param=where or None)
    unknown = sorted(set(body) - set(EVALUATION_FIELDS))
    if unknown:
        raise InvalidRequest(f"Unknown evaluation field {unknown[0][:64]!r}; known: {', '.join(EVALUATION_FIELDS)}.",
                             param=prefix + unknown[0][:64])
    try:
        return EvaluationOptions.model_validate(body)
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0])
        refusal = _REFUSALS[name].format(n_samples=body.get("n_samples", 1))
        raise InvalidRequest(f"{prefix}{name} {refusal}", param=prefix + name) from None


def check_evals_file(*, session: Session, project_id: str, file_id: str, param: str) -> File:
    """The project's processed evals file; 400 naming `param` otherwise (another project's file included)."""
    missing = InvalidRequest(f"No such file: {file_id[:100]}", param=param, code="invalid_evaluation_file")
    row = project_row(session=session, model=File, row_id=file_id, project_id=project_id, missing=missing)
    if row.purpose != "evals" or row.status != "processed":
        raise InvalidRequest(f"File {file_id} is not a processed file with purpose evals.", param=param,
                             code="invalid_evaluation_file")
    return row


def validate_request(*, session: Session, project: Project, body: Any, prefix: str = "") -> EvaluationOptions:
    """Parse an evaluation request and check its file belongs to the project and has purpose evals."""
    options = parse_options(body, prefix=prefix)
    check_evals_file(session=session, project_id=project.id, file_id=options.file, param=prefix + "file")
    return options
