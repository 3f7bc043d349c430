"""An export end to end: a job trained by a live Celery worker, exported through the API, merged by the same
worker's child, and downloaded: the archive matches its manifest and loads with AutoModelForCausalLM."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from sqlalchemy import select
from transformers import AutoModelForCausalLM

from backend.api.app import create_app
from backend.db.models import Export, File, Job, Project
from backend.db.session import session_scope
from backend.services.keys import create_key
from backend.services.storage import hash_file
from backend.training.merge import EXPORT_MANIFEST
from backend.workers.adapter_archive import unpack_adapter
from tests.support.waiting import wait_for
from tests.workers.conftest import WorkerStack, create_job, job_status, load_job, load_row

TIMEOUT = 180.0


@pytest.fixture
def api(stack: WorkerStack) -> Iterator[TestClient]:
    with TestClient(create_app(stack.settings), raise_server_exceptions=False) as client:
        yield client


def _key_for(job: Job) -> str:
    with session_scope() as session:
        project = session.scalar(select(Project).where(Project.id == job.project_id))
        assert project is not None
        return create_key(session=session, project=project)


@pytest.mark.parametrize("stack", ["postgresql", "sqlite"], indirect=True)
def test_a_trained_job_exports_a_merged_model_that_downloads_and_loads(
    stack: WorkerStack, api: TestClient, tmp_path: Path
) -> None:
    job = create_job(stack.settings)
    wait_for(lambda: job_status(job.id) in ("succeeded", "failed"), TIMEOUT, f"job {job.id}", stack)
    assert job_status(job.id) == "succeeded", load_job(job.id).error
    headers = {"Authorization": f"Bearer {_key_for(job)}"}
    path = f"/v1/fine_tuning/jobs/{job.id}/exports"

    created = api.post(path, headers=headers, json={"format": "merged"})
    assert created.status_code == 200, created.text
    export_id = created.json()["id"]
    wait_for(lambda: load_row(Export, export_id).status in ("succeeded", "failed"), TIMEOUT, f"export {export_id}",
             stack)
    done = api.get(f"{path}/{export_id}", headers=headers).json()
    assert done["status"] == "succeeded", (done["error"], stack.log_tail())
    assert done["file_id"] and done["error"] is None and done["finished_at"] >= done["created_at"]
    assert load_row(Export, export_id).attempt == 1

    described = api.get(f"/v1/files/{done['file_id']}", headers=headers).json()
    assert described["purpose"] == "fine-tune-results" and described["filename"] == f"{job.id}-merged.zip"
    download = api.get(f"/v1/files/{done['file_id']}/content", headers=headers)
    assert download.status_code == 200 and len(download.content) == described["bytes"]
    folder = tmp_path / "merged"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        archive.extractall(folder)
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    assert (manifest["job_id"], manifest["export_id"], manifest["base_model"]) == (job.id, export_id, "tiny-gpt2")
    assert manifest["dtype"] == "bfloat16"
    assert set(manifest["files"]) == {p.name for p in folder.iterdir() if p.name != EXPORT_MANIFEST}
    for name, entry in manifest["files"].items():
        assert hash_file(folder / name) == (entry["sha256"], entry["bytes"])

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.bfloat16}
    adapter = tmp_path / "adapter"
    with session_scope() as session:
        adapter_archive = session.scalar(select(File.path).where(File.id == load_job(job.id).result_files[0]))
    assert adapter_archive is not None
    unpack_adapter(stack.settings.data_dir / adapter_archive, adapter)
    base = AutoModelForCausalLM.from_pretrained(stack.settings.models_dir / "tiny-gpt2", dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()

    events = api.get(f"/v1/fine_tuning/jobs/{job.id}/events", headers=headers, params={"limit": 100}).json()["data"]
    assert any(event["message"].startswith(f"Export {export_id} succeeded") for event in events)
