"""Files: streamed, validated uploads; listing, reading and deleting them, always within one project."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import TERMINAL_JOB_STATUSES, File, Job, Project, new_id
from backend.services import storage
from backend.services.errors import InvalidRequest, NotFound, QuotaExceeded
from backend.services.eval_files import UploadValidator
from backend.services.lookup import project_row
from backend.services.pagination import Page, keyset_page
from backend.services.quotas import lock_project
from backend.training.datasets import DatasetError

UPLOAD_PURPOSES = ("fine-tune", "evals")
FILE_PURPOSES = ("fine-tune", "evals", "fine-tune-results")


@dataclass
class PendingUpload:
    """An upload being streamed to disk: its id, where it goes, and the validator reading it."""

    file_id: str
    relative_path: str
    sink: storage.UploadSink
    validator: UploadValidator  # the upload as a dataset and as an evals file; the purpose decides
    project_id: str
    quota: int
    quota_left: int
    done: bool = field(default=False)

    def write(self, chunk: bytes) -> None:
        """Take the next bytes; raises TooLarge, QuotaExceeded or InvalidRequest (naming the bad line)."""
        try:
            total = self.sink.bytes + len(chunk)
            if self.quota_left < total <= self.sink.max_bytes:  # past the upload limit, 413 comes first
                raise QuotaExceeded("The upload would pass the project's storage quota.", param="file")
            self.sink.write(chunk)
        except DatasetError as exc:
            self.abort()
            raise InvalidRequest(str(exc), param="file", code="invalid_file") from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop what was written."""
        if not self.done:
            self.done = True
            self.sink.abort()


def stored_bytes(*, session: Session, project: Project) -> int:
    """Bytes the project's files take on disk."""
    return _stored_bytes_of(session=session, project_id=project.id)


def _stored_bytes_of(*, session: Session, project_id: str) -> int:
    total = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.project_id == project_id))
    return int(total or 0)


def _byte_quota(project: Project, settings: Settings) -> int:
    return project.max_stored_bytes or settings.max_stored_bytes


def start_upload(*, session: Session, settings: Settings, project: Project) -> PendingUpload:
    """Open a sink for a new upload; refuses at once when the project's storage is already full."""
    quota = _byte_quota(project, settings)
    used = stored_bytes(session=session, project=project)
    if used >= quota:
        raise QuotaExceeded(f"The project stores {used} bytes, its quota is {quota} bytes.", param="file")
    file_id = new_id("file")
    relative_path = f"files/{file_id}"
    validator = UploadValidator(max_line_bytes=settings.max_line_bytes)
    sink = storage.UploadSink(
        destination=settings.data_dir / relative_path,
        max_bytes=settings.max_upload_bytes,
        check_chunk=validator.feed,
    )
    return PendingUpload(file_id, relative_path, sink, validator, project.id, quota=quota, quota_left=quota - used)


def finish_upload(
    *, session: Session, pending: PendingUpload, filename: str | None, purpose: str | None
) -> File:
    """Check the end of the stream and the form fields, move the file into place, record it and commit."""
    try:
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"purpose must be one of {', '.join(UPLOAD_PURPOSES)} (got {purpose!r}).", param="purpose"
            )
        try:
            summary = pending.validator.finish(purpose)
        except DatasetError as exc:
            raise InvalidRequest(str(exc), param="file", code="invalid_file") from None
        # Concurrent uploads each passed the quota at their start: the last word is taken under the project's lock.
        lock_project(session=session, project_id=pending.project_id)
        used = _stored_bytes_of(session=session, project_id=pending.project_id)
        if used + pending.sink.bytes > pending.quota:
            raise QuotaExceeded(f"The upload would pass the project's storage quota of {pending.quota} bytes.",
                                param="file")
        pending.sink.commit()
        pending.done = True
    except BaseException:
        pending.abort()
        raise
    row = File(
        id=pending.file_id,
        project_id=pending.project_id,
        filename=_printable(filename)[:512] or "upload.jsonl",
        purpose=purpose,
        bytes=pending.sink.bytes,
        sha256=pending.sink.sha256,
        path=pending.relative_path,
        status="processed",
        format=summary.format,
        n_examples=summary.n_examples,
    )
    session.add(row)
    session.commit()
    return row


def _printable(filename: str | None) -> str:
    """A filename as a label: control characters (NUL included, which PostgreSQL cannot store) dropped."""
    return "".join(ch for ch in filename or "" if ch.isprintable())


def store_file_from_path(
    *, session: Session, settings: Settings, project_id: str, source: Path, filename: str, purpose: str
) -> File:
    """Copy a file the service made (an adapter archive) into the store and record it."""
    file_id = new_id("file")
    relative_path = f"files/{file_id}"
    storage.copy_into(source, settings.data_dir / relative_path)
    sha256, size = storage.hash_file(settings.data_dir / relative_path)
    row = File(
        id=file_id, project_id=project_id, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
        path=relative_path, status="processed",
    )
    session.add(row)
    session.flush()
    return row


def get_file(*, session: Session, project: Project, file_id: str) -> File:
    """The project's file, or NotFound (other projects' files included)."""
    missing = NotFound(f"No such file: {file_id[:100]}", param="file_id")
    return project_row(session=session, model=File, row_id=file_id, project_id=project.id, missing=missing)


def file_path(*, settings: Settings, row: File) -> Path:
    """Where a stored file's bytes are."""
    return settings.data_dir / row.path


def list_files(
    *, session: Session, project: Project, purpose: str | None, after: str | None, limit: int, order: str
) -> Page[File]:
    """The project's files, newest first by default, with keyset pagination."""
    query = select(File)
    if purpose:
        query = query.where(File.purpose == purpose)
    return keyset_page(
        session=session, query=query, model=File, after=after, limit=limit, descending=order != "asc",
        partition=(File.project_id, project.id),
    )


def delete_file(*, session: Session, settings: Settings, project: Project, file_id: str) -> None:
    """Delete a file and its bytes; refused while an unfinished job uses it.

    Under the project's lock (a job being created cannot pick the file meanwhile); the row goes first, committed,
    then the bytes, so a failed commit never leaves a row whose content is gone.
    """
    lock_project(session=session, project_id=project.id)
    row = get_file(session=session, project=project, file_id=file_id)
    user = session.scalar(
        select(Job.id).where(
            Job.project_id == project.id,
            Job.status.not_in(TERMINAL_JOB_STATUSES),
            or_(Job.training_file_id == file_id, Job.validation_file_id == file_id),
        ).limit(1)
    )
    if user is not None:
        raise InvalidRequest(f"File {file_id} is used by job {user}, which has not finished.", param="file_id")
    session.delete(row)
    session.commit()
    storage.remove_quietly(file_path(settings=settings, row=row))
