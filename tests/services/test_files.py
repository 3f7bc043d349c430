"""Uploads stream through a hashing, validating, size-capped sink in bounded memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import File
from backend.services import files as file_service
from backend.services.errors import InvalidRequest, TooLarge
from backend.services.keys import get_or_create_project

LINE = b'{"prompt": "' + b"p" * 200 + b'", "completion": "' + b"c" * 200 + b'"}\n'


def test_a_large_upload_streams_in_bounded_memory(session: Session, settings: Settings) -> None:
    big = settings.model_copy(update={"max_upload_bytes": 64 * 1024**2})
    project = get_or_create_project(session=session, name="p")
    pending = file_service.start_upload(session=session, settings=big, project=project)
    chunk = LINE * 160  # ~67 KB, what a server hands over at a time
    digest = hashlib.sha256()
    tracemalloc.start()
    for _ in range(300):  # ~20 MB
        pending.write(chunk)
        digest.update(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row = file_service.finish_upload(session=session, pending=pending, filename="big.jsonl", purpose="fine-tune")
    assert peak < 2 * 1024**2, peak
    assert row.bytes == len(chunk) * 300 and row.sha256 == digest.hexdigest()
    assert row.format == "prompt_completion" and row.n_examples == 160 * 300
    assert (big.data_dir / row.path).stat().st_size == row.bytes
    assert [path.name for path in (big.data_dir / "files").iterdir()] == [row.id]


def test_refusals_leave_nothing_on_disk(session: Session, settings: Settings) -> None:
    project = get_or_create_project(session=session, name="p")
    pending = file_service.start_upload(session=session, settings=settings, project=project)
    with pytest.raises(TooLarge):
        while True:
            pending.write(LINE * 10)
    bad = file_service.start_upload(session=session, settings=settings, project=project)
    with pytest.raises(InvalidRequest, match=r"^Line 3: "):
        bad.write(LINE * 2 + b'{"prompt": 1}\n')
    wrong_purpose = file_service.start_upload(session=session, settings=settings, project=project)
    wrong_purpose.write(LINE)
    with pytest.raises(InvalidRequest):
        file_service.finish_upload(session=session, pending=wrong_purpose, filename="x", purpose="batch")
    assert list((settings.data_dir / "files").iterdir()) == []


def test_the_service_commits_what_it_records_and_deletes(session: Session, db_engine: Engine, settings: Settings
                                                         ) -> None:
    project = get_or_create_project(session=session, name="p")
    pending = file_service.start_upload(session=session, settings=settings, project=project)
    pending.write(LINE)
    row = file_service.finish_upload(session=session, pending=pending, filename="one.jsonl", purpose="fine-tune")
    with Session(db_engine) as other:  # another connection sees only what was committed
        assert other.scalar(select(File.n_examples).where(File.id == row.id)) == 1
    file_service.delete_file(session=session, settings=settings, project=project, file_id=row.id)
    with Session(db_engine) as other:
        assert other.scalar(select(File.id).where(File.id == row.id)) is None
    assert not (settings.data_dir / row.path).exists()
