"""The job task: claim the job in SQL, validate and plan, run the trainer child, record the outcome."""

from __future__ import annotations

import logging

from backend.config import get_settings
from backend.db.fence import StaleAttemptError
from backend.db.session import session_scope
from backend.services import job_runs
from backend.workers.celery_app import app
from backend.workers.evaluations.task import follow_training
from backend.workers.jobs.attempt import run_attempt
from backend.workers.jobs.recorder import AttemptRecorder
from backend.workers.writes import worker_name

logger = logging.getLogger(__name__)


@app.task(name=job_runs.RUN_JOB, ignore_result=True)
def run_job(job_id: str) -> None:
    """Run one attempt of fine-tuning job `job_id` (the message carries nothing else)."""
    settings = get_settings()
    worker = worker_name()
    with session_scope() as session:
        claimed = job_runs.claim_job(session=session, job_id=job_id, worker=worker)
    if claimed is None:
        logger.info("job %s: gone, finished or claimed by another worker; nothing to do", job_id)
        follow_training(job_id)  # a job cancelled while queued fails its waiting evaluations here
        return
    # Give up on an unreachable database (and kill the trainer) before the heartbeat can expire, so the
    # reconciler never starts the next attempt while this one's trainer still runs.
    retry_seconds = max(1.0, settings.heartbeat_expiry_seconds - 2.0 * settings.heartbeat_seconds)
    recorder = AttemptRecorder(job_id, claimed.attempt, data_dir=settings.data_dir, retry_seconds=retry_seconds)
    try:
        run_attempt(recorder, settings, worker)
    except StaleAttemptError:
        logger.warning("job %s attempt %s went stale; its writes are refused", job_id, claimed.attempt)
        return
    follow_training(job_id)  # the job's `evaluation` runs once it succeeded (its own task, its own child)
