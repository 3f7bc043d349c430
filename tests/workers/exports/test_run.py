"""One export attempt run in this process on a real database, a real adapter archive and a real merge child:
a pending cancel stops the child and records `cancelled` with nothing stored; a missing base fails it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from sqlalchemy import select, update
from transformers import AutoModelForCausalLM

from backend.config import Settings
from backend.db.migrations import upgrade_to_head
from backend.db.models import Artifact, Export, File, Job, JobEvent, Project
from backend.db.session import make_engine, session_scope, set_engine
from backend.services import export_runs
from backend.services.export_runs import ClaimedExport
from backend.services.storage import hash_file
from backend.training.tiny_models import make_tiny_model
from backend.workers.adapter_archive import archive_adapter
from backend.workers.exports.run import ExportRun


@dataclass
class Stored:
    settings: Settings
    job_id: str


@pytest.fixture()
def stored(tmp_path: Path) -> Iterator[Stored]:
    """A migrated SQLite database with a succeeded tiny-gpt2 job and its adapter archive."""
    models = tmp_path / "models"
    base = make_tiny_model(models / "tiny-gpt2", hidden=32, layers=1, heads=2, context=64)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["c_attn"])
                   ).save_pretrained(adapter)
    settings = Settings(data_dir=tmp_path / "var", models_dir=models, database_url=f"sqlite:///{tmp_path / 'db'}",
                        heartbeat_seconds=1)
    engine = make_engine(settings.database_url)
    upgrade_to_head(engine)
    set_engine(engine)
    archive = settings.data_dir / "artifacts" / "job" / "adapter.zip"
    archive_adapter(adapter, archive, extra_manifest={"base_model_name": "tiny-gpt2"})
    sha256, size = hash_file(archive)
    with session_scope() as session:
        project = Project(name="p")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-gpt2", training_file_id="file-x", status="succeeded", attempt=1)
        session.add(job)
        session.flush()
        session.add(Artifact(job_id=job.id, file_id="file-adapter", path="artifacts/job/adapter.zip", sha256=sha256,
                             bytes=size))
        job_id = job.id
    try:
        yield Stored(settings, job_id)
    finally:
        set_engine(None)
        engine.dispose()


def _claim(stored: Stored) -> ClaimedExport:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == stored.job_id))
        assert job is not None
        row = Export(job_id=job.id, project_id=job.project_id, format="merged")
        session.add(row)
        session.flush()
        export_id = row.id
    with session_scope() as session:
        claimed = export_runs.claim_export(session=session, export_id=export_id, worker="test", stale_before=0)
    assert isinstance(claimed, ClaimedExport), claimed
    return claimed


def _row(export_id: str) -> Export:
    with session_scope() as session:
        row = session.scalar(select(Export).where(Export.id == export_id))
        assert row is not None
        session.expunge(row)
        return row


def _messages(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def test_a_cancel_stops_the_merge_child_and_stores_nothing(stored: Stored) -> None:
    claimed = _claim(stored)
    with session_scope() as session:  # the API's cancel of a running export
        session.execute(update(Export).where(Export.id == claimed.id).values(requested_action="cancel"))

    ExportRun(claimed, stored.settings).run()

    row = _row(claimed.id)
    assert (row.status, row.requested_action, row.file_id, row.error) == ("cancelled", None, None, None)
    assert row.finished_at is not None and row.worker is None
    assert f"Export {claimed.id} cancelled: the merge stopped" in _messages(stored.job_id)
    work = stored.settings.job_dir(stored.job_id) / "exports" / claimed.id
    assert not (work / "merged").exists() and not (work / "adapter").exists()
    assert not list((stored.settings.data_dir / "artifacts").rglob("export-*"))
    with session_scope() as session:
        assert session.scalar(select(File.id)) is None


def test_a_base_model_gone_from_the_models_folder_fails_the_export(stored: Stored) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == stored.job_id).values(model="gone-model"))
    claimed = _claim(stored)

    ExportRun(claimed, stored.settings).run()

    row = _row(claimed.id)
    assert row.status == "failed" and row.file_id is None
    assert row.error == "FileNotFoundError: the base model 'gone-model' is no longer in the models directory"
    assert f"Export {claimed.id} failed: {row.error}" in _messages(stored.job_id)
