"""The service's tables (SQLAlchemy 2.0 typed mappings); Alembic alone creates them."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from backend.db.statuses import (  # noqa: F401 - re-exported: the API and services import them from here
    ACTIVE_JOB_STATUSES,
    EVALUATION_STATUSES,
    JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    EvaluationStatus,
    ExportStatus,
    JobStatus,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# SQLite only autoincrements INTEGER PRIMARY KEY; BigInteger elsewhere keeps room for many rows.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


def now() -> int:
    """The current time in integer Unix seconds."""
    return int(time.time())


def new_id(prefix: str) -> str:
    """A random, URL-safe, unguessable public id such as `file-3kQ…`."""
    return f"{prefix}-{secrets.token_urlsafe(18)}"


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations name constraints predictably."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Project(Base):
    """A tenant: API keys, files and jobs belong to exactly one project."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("proj"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ApiKey(Base):
    """An API key, stored only as its sha256 hash."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("key"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class File(Base):
    """An uploaded dataset or a result file (an adapter archive) stored under data_dir."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_id_seq", "project_id", "seq"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("file"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(32), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class LeasedRow:
    """The lease's columns on a row that one worker at a time holds as a numbered attempt (services/lease.py)."""

    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Job(LeasedRow, Base):
    """A fine-tuning job: its request, its state machine, and what the worker reported."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_id_seq", "project_id", "seq"),
        Index("ix_jobs_status", "status"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftjob"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(512))
    training_file_id: Mapped[str] = mapped_column(String(64))
    validation_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.QUEUED)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    method: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    training: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    integrations: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)  # OpenAI's, e.g. W&B
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger, default=42)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requested_action: Mapped[str | None] = mapped_column(String(16), nullable=True)
    memory_estimate_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    memory_peak_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    memory_budget_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    memory_device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_epoch: Mapped[float | None] = mapped_column(nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class JobEvent(Base):
    """One event of a job; `seq` is the SSE event id and the Last-Event-ID cursor."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_seq", "job_id", "seq"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftevent"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    """A complete checkpoint a job wrote (the folder was renamed into place whole)."""

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_seq", "job_id", "seq"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    step_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class TelemetrySample(Base):
    """One memory sample of a running job (the trainer's MemorySampler dict)."""

    __tablename__ = "telemetry_samples"
    __table_args__ = (Index("ix_telemetry_samples_job_id_seq", "job_id", "seq"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sample: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Artifact(Base):
    """A stored output of a job (the adapter archive), with its size and hash."""

    __tablename__ = "artifacts"
    __table_args__ = (Index("ix_artifacts_job_id_seq", "job_id", "seq"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("artifact"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(32), default="adapter")
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Evaluation(LeasedRow, Base):
    """A sandboxed code evaluation of a job's adapter: its request, its state and its pass@k results."""

    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_job_id_seq", "job_id", "seq"),
        Index("ix_evaluations_status", "status"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("fteval"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    file_id: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # n_samples, k, max_new_tokens, ...
    status: Mapped[str] = mapped_column(String(16), default=EvaluationStatus.QUEUED)
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Export(LeasedRow, Base):
    """A job's adapter merged into its base and stored as a model folder archive (a result file of its own)."""

    __tablename__ = "exports"
    __table_args__ = (
        Index("ix_exports_job_id_seq", "job_id", "seq"),
        Index("ix_exports_status", "status"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, default=lambda: new_id("ftexp"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=ExportStatus.QUEUED)
    requested_action: Mapped[str | None] = mapped_column(String(16), nullable=True)
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
