"""The evaluation's lease in backend/services/evaluation_runs.py (on the evaluation path's fixture): a job that
did not succeed has nothing to evaluate, so its evaluation fails at the claim; a stale attempt's writes raise."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from backend.db.fence import StaleAttemptError
from backend.db.models import Evaluation, Job, now
from backend.db.session import session_scope
from backend.db.statuses import EvaluationStatus
from backend.services import evaluation_runs, evaluations
from backend.services.evaluation_runs import ClaimedEvaluation
from backend.services.evaluations import EvaluationOptions
from tests.workers.evaluations import conftest as evaluation_fixtures
from tests.workers.evaluations.conftest import Stored

# The evaluation path's fixtures (found by name in this module).
silent_model_dir = evaluation_fixtures.silent_model_dir
silent_adapter_dir = evaluation_fixtures.silent_adapter_dir
stored = evaluation_fixtures.stored


def test_an_evaluation_of_a_job_that_did_not_succeed_is_refused_by_the_claim(stored: Stored) -> None:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == stored.job_id))
        assert job is not None
        job.status = "failed"
        row = evaluations.add_evaluation(session=session, job=job, options=EvaluationOptions(file="file-evals"))
        evaluation_id = row.id
    with session_scope() as session:
        claimed = evaluation_runs.claim_evaluation(session=session, evaluation_id=evaluation_id, worker="t",
                                                   stale_before=0)
    assert isinstance(claimed, str) and "did not succeed" in claimed
    with session_scope() as session:
        assert session.scalar(select(Evaluation.status).where(Evaluation.id == evaluation_id)) == "failed"


def test_a_stale_evaluation_attempt_is_refused_like_a_stale_job_attempt(stored: Stored) -> None:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == stored.job_id))
        assert job is not None
        evaluation_id = evaluations.add_evaluation(session=session, job=job,
                                                   options=EvaluationOptions(file="file-evals")).id
    with session_scope() as session:
        first = evaluation_runs.claim_evaluation(session=session, evaluation_id=evaluation_id, worker="w1",
                                                 stale_before=0)
    with session_scope() as session:  # its heartbeat counts as stopped: another worker takes it over
        second = evaluation_runs.claim_evaluation(session=session, evaluation_id=evaluation_id, worker="w2",
                                                  stale_before=now() + 100)
    assert isinstance(first, ClaimedEvaluation) and isinstance(second, ClaimedEvaluation)
    assert (first.attempt, second.attempt) == (1, 2)
    stale_writes = {
        "heartbeat": lambda s: evaluation_runs.heartbeat(session=s, evaluation_id=evaluation_id, attempt=1),
        "finish": lambda s: evaluation_runs.finish(session=s, evaluation_id=evaluation_id, attempt=1,
                                                   status=EvaluationStatus.SUCCEEDED, results={"pass_at_k": {}}),
    }
    for write in stale_writes.values():
        with pytest.raises(StaleAttemptError), session_scope() as session:
            write(session)
    with session_scope() as session:
        evaluation_runs.heartbeat(session=session, evaluation_id=evaluation_id, attempt=2)  # the live one writes
        row = session.scalar(select(Evaluation).where(Evaluation.id == evaluation_id))
        assert row is not None and (row.status, row.attempt, row.worker, row.results) == ("running", 2, "w2", None)
