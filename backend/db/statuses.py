"""The states of leased rows and the moves between them: one table each for jobs, evaluations and exports.

The members are `StrEnum`s, so they compare equal to (and are stored and served as) the plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a fine-tuning job is."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"


class EvaluationStatus(StrEnum):
    """Where an evaluation of a job's adapter is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ExportStatus(StrEnum):
    """Where an export of a job's adapter merged into its base is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Every move a row may make, by who makes it: the API (cancel, pause, resume), a worker (claim, run, finish,
# requeue after a crash or a shutdown) and the reconciler (expire a silent attempt). A status missing as a
# key is terminal. One table per kind: a job's and an evaluation's statuses share their strings.
TRANSITIONS: dict[type[StrEnum], dict[str, frozenset[str]]] = {
    JobStatus: {
        JobStatus.QUEUED: frozenset({JobStatus.VALIDATING_FILES, JobStatus.CANCELLED, JobStatus.PAUSED}),
        JobStatus.VALIDATING_FILES: frozenset({
            JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED,
        }),
        JobStatus.RUNNING: frozenset({
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED,
        }),
        JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    },
    EvaluationStatus: {
        EvaluationStatus.QUEUED: frozenset({EvaluationStatus.RUNNING, EvaluationStatus.FAILED}),
        # running -> running: a claim takes over an attempt whose heartbeat stopped.
        EvaluationStatus.RUNNING: frozenset({
            EvaluationStatus.SUCCEEDED, EvaluationStatus.FAILED, EvaluationStatus.QUEUED, EvaluationStatus.RUNNING,
        }),
    },
    ExportStatus: {
        ExportStatus.QUEUED: frozenset({ExportStatus.RUNNING, ExportStatus.FAILED, ExportStatus.CANCELLED}),
        # running -> running: a claim takes over an attempt whose heartbeat stopped.
        ExportStatus.RUNNING: frozenset({
            ExportStatus.SUCCEEDED, ExportStatus.FAILED, ExportStatus.CANCELLED, ExportStatus.QUEUED,
            ExportStatus.RUNNING,
        }),
    },
}

JOB_STATUSES = tuple(JobStatus)
EVALUATION_STATUSES = tuple(EvaluationStatus)
EXPORT_STATUSES = tuple(ExportStatus)
TERMINAL_JOB_STATUSES = frozenset(status for status in JobStatus if status not in TRANSITIONS[JobStatus])
# Statuses that count against a project's concurrent-job quota.
ACTIVE_JOB_STATUSES = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING})


def can_move(sources: tuple[str, ...], target: StrEnum) -> bool:
    """Whether a row of `target`'s kind in any of `sources` may move to `target`."""
    table = TRANSITIONS[type(target)]
    return any(target in table.get(source, frozenset()) for source in sources)
