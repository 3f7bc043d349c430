"""The status vocabulary of backend/db/statuses.py: members are the strings the API serves, one table of moves."""

from __future__ import annotations

import json

import pytest

from backend.db.statuses import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    TRANSITIONS,
    EvaluationStatus,
    JobStatus,
    can_move,
)


def test_members_are_the_strings_stored_and_served() -> None:
    assert JobStatus.QUEUED == "queued" and f"{JobStatus.VALIDATING_FILES}" == "validating_files"
    assert json.dumps({"status": EvaluationStatus.SUCCEEDED}) == '{"status": "succeeded"}'
    assert set(TERMINAL_JOB_STATUSES) == {"succeeded", "failed", "cancelled"}
    assert set(ACTIVE_JOB_STATUSES) == {"validating_files", "queued", "running"}


@pytest.mark.parametrize(("sources", "target", "allowed"), [
    ((JobStatus.QUEUED,), JobStatus.VALIDATING_FILES, True),  # a claim
    ((JobStatus.PAUSED,), JobStatus.QUEUED, True),  # a resume
    ((JobStatus.VALIDATING_FILES, JobStatus.RUNNING), JobStatus.SUCCEEDED, True),  # a finish under the fence
    ((JobStatus.VALIDATING_FILES,), JobStatus.SUCCEEDED, False),  # nothing trained yet
    ((JobStatus.SUCCEEDED,), JobStatus.QUEUED, False),  # terminal
    (("queued",), JobStatus.CANCELLED, True),  # a status read from the database
    ((EvaluationStatus.RUNNING,), EvaluationStatus.RUNNING, True),  # a stale attempt taken over
    ((EvaluationStatus.QUEUED,), EvaluationStatus.SUCCEEDED, False),
])
def test_the_table_allows_exactly_the_moves_the_code_makes(sources: tuple[str, ...], target: JobStatus,
                                                           allowed: bool) -> None:
    assert can_move(sources, target) is allowed


def test_each_kind_has_its_own_table() -> None:
    # "queued" is a status of both kinds; a job's moves from it are not an evaluation's.
    assert TRANSITIONS[JobStatus][JobStatus.QUEUED] != TRANSITIONS[EvaluationStatus][EvaluationStatus.QUEUED]
    assert can_move((JobStatus.QUEUED,), JobStatus.PAUSED) and not can_move((EvaluationStatus.QUEUED,),
                                                                            EvaluationStatus.SUCCEEDED)
