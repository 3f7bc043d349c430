"""One claimed attempt of a job: validate and plan, hold a device, run the trainer child, record the outcome."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from backend.config import Settings
from backend.db.fence import StaleAttemptError
from backend.db.models import File
from backend.db.session import session_scope
from backend.db.statuses import JobStatus
from backend.devices import DeviceLease
from backend.services import job_runs
from backend.training.events import TrainingEvent
from backend.workers.dispatch import enqueue_job
from backend.workers.jobs.outcome import JobIdentity, OutcomeRecorder
from backend.workers.jobs.preparation import JobRefused, PreparedRun, prepare_run
from backend.workers.jobs.recorder import AttemptRecorder, keep_alive
from backend.workers.jobs.runner import run_trainer
from backend.workers.supervisor import STOP_ACTIONS, hold_device

logger = logging.getLogger(__name__)


def run_attempt(recorder: AttemptRecorder, settings: Settings, worker: str) -> str:
    """Validate, run and record one claimed attempt; return the status it left the job in."""
    job_id, attempt = recorder.job_id, recorder.attempt
    identity, prepared = _validate(recorder, settings, worker)
    outcomes = OutcomeRecorder(identity, recorder, settings)
    if prepared is None:
        return JobStatus.FAILED
    lease = _hold_device(recorder, prepared, settings)
    if lease is None:
        return _stop_before_start(outcomes, recorder)
    try:
        action = recorder.write(lambda s: job_runs.mark_running(
            session=s, job_id=job_id, attempt=attempt, training=prepared.training,
            memory_estimate_bytes=prepared.estimate_bytes, memory_budget_bytes=lease.device.free_bytes,
            memory_device=lease.device.label,
        ))
        if action in STOP_ACTIONS:
            return _stop_before_start(outcomes, recorder)
        adopt_checkpoints(recorder, settings.job_dir(job_id))
        outcome = run_trainer(
            spec={"job_id": job_id, "attempt": attempt, "options": prepared.options.model_dump(mode="json")},
            work_dir=settings.job_dir(job_id).resolve(), device=lease.device, recorder=recorder,
            heartbeat_seconds=settings.heartbeat_seconds, allow_hub=settings.allow_hub_models,
        )
    finally:
        lease.release()
    status = outcomes.record(outcome)
    if status == "requeued":
        enqueue_job(job_id)
    logger.info("job %s attempt %s: %s", job_id, attempt, status)
    return status


def adopt_checkpoints(recorder: AttemptRecorder, work_dir: Path) -> None:
    """Record complete checkpoints on disk that SQL lacks: a worker killed right after its trainer saved one
    never recorded it, yet this attempt resumes from it, so the job's checkpoint list must show it."""
    from backend.training.checkpoints import checkpoint_step, complete_checkpoints, read_trainer_state

    with session_scope() as session:
        known = job_runs.recorded_checkpoint_steps(session=session, job_id=recorder.job_id)
    for path in complete_checkpoints(work_dir):
        step = checkpoint_step(path)
        if step is not None and step not in known:
            metrics = read_trainer_state(path).metrics
            recorder.event(TrainingEvent("checkpoint", data={"step": step, "path": str(path), "metrics": metrics}))


def _validate(recorder: AttemptRecorder, settings: Settings, worker: str) -> tuple[JobIdentity, PreparedRun | None]:
    """Load the job, check its inputs and plan it; a refusal fails the job early with its error code."""
    with session_scope() as session:
        context = job_runs.job_context(session=session, job_id=recorder.job_id)
        if context is None:
            raise StaleAttemptError(recorder.job_id, recorder.attempt)
        job, project = context
        training_file = session.scalar(select(File).where(File.id == job.training_file_id))
        validation_file = (
            session.scalar(select(File).where(File.id == job.validation_file_id)) if job.validation_file_id else None
        )
        identity = JobIdentity(job.id, job.model, job.suffix, project.name)
        session.expunge_all()
    recorder.message(f"Validating the training file (attempt {recorder.attempt}, worker {worker})")
    refusal: JobRefused | None = None
    try:
        with keep_alive(recorder, settings.heartbeat_seconds):
            prepared = prepare_run(job, training_file, validation_file, settings)
    except JobRefused as refused:
        refusal = refused
    except (DBAPIError, StaleAttemptError):
        raise
    except Exception as exc:  # an unreadable config or tokenizer: retrying would not help
        logger.exception("job %s: validation failed", recorder.job_id)
        refusal = JobRefused("error", f"Validation failed: {type(exc).__name__}: {exc}")
    if refusal is not None:
        error = refusal.as_error()
        recorder.message(refusal.message, level="error")
        recorder.write(lambda s: job_runs.finish(
            session=s, job_id=recorder.job_id, attempt=recorder.attempt, status=JobStatus.FAILED, error=error
        ))
        return identity, None
    for note in prepared.notes:
        recorder.message(note)
    for warning in prepared.warnings:
        recorder.message(warning, level="warn")
    recorder.message(
        f"Memory plan: {prepared.estimate_bytes / 2**30:.2f} GiB estimated", data={"plan": prepared.plan}
    )
    return identity, prepared


def _hold_device(recorder: AttemptRecorder, prepared: PreparedRun, settings: Settings) -> DeviceLease | None:
    """The roomiest device that fits the plan, waiting (with heartbeats) while others hold them; None if stopped."""
    waited = False

    def still_wanted() -> bool:
        nonlocal waited
        if not waited:
            recorder.message("Waiting for a GPU with room for the plan", level="warn")
            waited = True
        return recorder.heartbeat() not in STOP_ACTIONS

    return hold_device(prepared.estimate_bytes, still_wanted=still_wanted, interval=settings.heartbeat_seconds,
                       candidates=prepared.devices)


def _stop_before_start(outcomes: OutcomeRecorder, recorder: AttemptRecorder) -> str:
    """Honour a cancel or pause that arrived before the trainer started."""
    action = recorder.heartbeat()
    status = JobStatus.CANCELLED if action == "cancel" else JobStatus.PAUSED
    recorder.message(f"Job {status} before training started")
    outcomes.finish(status)
    return status
