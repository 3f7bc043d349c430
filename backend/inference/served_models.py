"""Which model a request names, within the caller's project: a base, a job's `ft:` model or a checkpoint's.

The engine is told only what it needs: the name and, for an adapter, the folder on the shared data disk it
loads from (the result archive unpacked once under `<data_dir>/serving/`, or the checkpoint folder itself), its
base model and the bit width the job trained with. Another project's model, a deleted result file or job, and a
rotated-away checkpoint all read as "no such model" (404).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import Checkpoint, File, Job, JobStatus, Project
from backend.services.base_models import resolve_base_model
from backend.services.errors import InvalidRequest, NotFound
from backend.training.checkpoints import is_complete

# ft:<base>:<suffix or project>:<job id>[:ckpt-step-<n>]; a job id never holds ':'.
_FINE_TUNED = re.compile(
    r"^ft:(?P<base>[^:]+):(?P<owner>.+):(?P<job>ftjob-[A-Za-z0-9_-]{1,60})(?::ckpt-step-(?P<step>\d{1,9}))?$"
)
SERVING_FOLDER = "serving"


@dataclass(frozen=True)
class Adapter:
    """What an engine needs to load an adapter."""

    path: Path
    base_model: str
    quantization: str | None
    dtype: str | None
    job_id: str


@dataclass(frozen=True)
class ServedModel:
    """A model the project may use: its name (the engine knows it by the same one) and its adapter, if any."""

    name: str
    adapter: Adapter | None = None


def _missing(name: str) -> NotFound:
    return NotFound(f"The model {name[:300]!r} does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def model_name_of(job: Job, project_name: str) -> str:
    """The name a job's model has (or will have): `ft:<base>:<suffix or project>:<job id>`."""
    return job.fine_tuned_model or f"ft:{job.model}:{job.suffix or project_name}:{job.id}"


def resolve_served_model(*, session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    """The model `name` as this project may use it; NotFound (param `model`) otherwise."""
    match = _FINE_TUNED.fullmatch(name)
    if match is None:
        try:
            resolve_base_model(name, settings=settings)
        except InvalidRequest:
            raise _missing(name) from None
        return ServedModel(name=name)
    job = session.scalar(select(Job).where(Job.id == match["job"], Job.project_id == project.id))
    if job is None or not name.startswith(model_name_of(job, project.name)):
        raise _missing(name)
    if match["step"] is not None:
        return ServedModel(name=name, adapter=_checkpoint_adapter(session, settings, job, int(match["step"]), name))
    return ServedModel(name=name, adapter=_result_adapter(session, settings, job, name))


def _trained_as(job: Job, path: Path) -> Adapter:
    training = job.training or {}
    quantization = "4bit" if training.get("use_4bit") else "8bit" if training.get("use_8bit") else None
    dtype = "bfloat16" if training.get("bf16") else "float16" if training.get("fp16") else None
    return Adapter(path=path, base_model=job.model, quantization=quantization, dtype=dtype, job_id=job.id)


def _checkpoint_adapter(session: Session, settings: Settings, job: Job, step: int, name: str) -> Adapter:
    row = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step)
        .order_by(Checkpoint.seq.desc()).limit(1)
    ).first()
    folder = (settings.data_dir / row.path).resolve() if row is not None else None
    # Checkpoints rotate (save_total_limit): a row whose folder is gone names a model that is no longer there.
    if folder is None or not is_complete(folder) or not (folder / "adapter_config.json").is_file():
        raise _missing(name)
    return _trained_as(job, folder)


def _result_adapter(session: Session, settings: Settings, job: Job, name: str) -> Adapter:
    if job.status != JobStatus.SUCCEEDED or job.fine_tuned_model != name or not job.result_files:
        raise _missing(name)
    file_id = job.result_files[0]
    row = session.scalar(select(File).where(File.id == file_id, File.project_id == job.project_id))
    archive = settings.data_dir / row.path if row is not None else None
    if archive is None or not archive.is_file():
        raise _missing(name)
    return _trained_as(job, unpacked_adapter(settings, archive, job_id=job.id, file_id=file_id))


def unpacked_adapter(settings: Settings, archive: Path, *, job_id: str, file_id: str) -> Path:
    """The archive unpacked under `<data_dir>/serving/<job>/<file>` (once: renamed into place whole)."""
    folder = (settings.data_dir / SERVING_FOLDER / job_id / file_id).resolve()
    if (folder / "adapter_config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A folder of its own per unpacking: concurrent first requests (threads of one API, or several APIs) race.
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                if "/" in member or "\\" in member or member.startswith("."):  # the worker writes flat names
                    raise ValueError(f"unexpected entry {member!r} in the adapter archive")
                with zipped.open(member) as source, open(temporary / member, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
        try:
            os.rename(temporary, folder)
        except OSError:  # another request unpacked it first
            if not (folder / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def still_served(*, session: Session, settings: Settings, name: str) -> bool:
    """Whether the adapter model `name` (registered with an engine earlier) still exists in any project."""
    match = _FINE_TUNED.fullmatch(name)
    if match is None:
        return True
    job = session.scalar(select(Job).where(Job.id == match["job"]))
    if job is None:
        return False
    project = session.get(Project, job.project_id)
    try:
        resolve_served_model(session=session, settings=settings, project=project, name=name)  # type: ignore[arg-type]
    except NotFound:
        return False
    return True


def forget_unpacked(settings: Settings, name: str) -> None:
    """Remove the unpacked copies of a job's result archive (the job or its file was deleted)."""
    match = _FINE_TUNED.fullmatch(name)
    if match is not None and match["step"] is None:
        shutil.rmtree(settings.data_dir / SERVING_FOLDER / match["job"], ignore_errors=True)
