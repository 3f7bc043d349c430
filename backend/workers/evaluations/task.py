"""The evaluation task: claim the evaluation in SQL and run it (run.py); and what a job's end means for the
evaluations that follow its training."""

from __future__ import annotations

import logging
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.config import get_settings
from backend.db.models import Job
from backend.db.statuses import TERMINAL_JOB_STATUSES, JobStatus
from backend.services import evaluation_runs
from backend.workers.celery_app import app
from backend.workers.dispatch import enqueue_evaluation
from backend.workers.evaluations.run import EvaluationRun
from backend.workers.writes import claim_attempt, with_retry

logger = logging.getLogger(__name__)


@app.task(name=evaluation_runs.RUN_EVALUATION, ignore_result=True)
def run_evaluation(evaluation_id: str) -> None:
    """Run evaluation `evaluation_id` (the message carries nothing else)."""
    settings = get_settings()
    claimed = claim_attempt(partial(evaluation_runs.claim_evaluation, evaluation_id=evaluation_id), settings=settings,
                            log=logger, label=f"evaluation {evaluation_id}")
    if claimed is not None:
        EvaluationRun(claimed, settings).run()


def follow_training(job_id: str) -> None:
    """After an attempt: send the job's waiting evaluations once it succeeded, fail them if it ended otherwise."""

    def pending(session: Session) -> list[str]:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status == JobStatus.SUCCEEDED:
            return evaluation_runs.queued_for_job(session=session, job_id=job_id)
        if status is None or status in TERMINAL_JOB_STATUSES:
            evaluation_runs.fail_queued(session=session, job_id=job_id,
                                        reason=f"The job {status or 'was deleted'}: there is no adapter to evaluate.")
        return []

    for evaluation_id in with_retry(pending):
        enqueue_evaluation(evaluation_id)
