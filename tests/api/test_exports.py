"""Exports through the API: create, list with keyset paging, retrieve, cancel, and every refusal.

No worker consumes the test broker, so exports stay queued here; tests/workers/exports runs one end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.db.models import Export, Job
from tests.api.conftest import bearer


def _job(client: TestClient, key: str, upload: Callable[..., dict[str, Any]]) -> str:
    created = client.post("/v1/fine_tuning/jobs", headers=bearer(key),
                          json={"model": "tiny-gpt2", "training_file": upload(key)["id"]})
    assert created.status_code == 200, created.text
    job_id: str = created.json()["id"]
    return job_id


def _succeed(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
    session.commit()


@pytest.fixture
def succeeded_job(client: TestClient, session: Session, key_a: str, upload: Callable[..., dict[str, Any]]) -> str:
    job_id = _job(client, key_a, upload)
    _succeed(session, job_id)
    return job_id


def test_an_export_of_a_job_not_succeeded_is_a_400_naming_the_job(
    client: TestClient, key_a: str, upload: Callable[..., dict[str, Any]]
) -> None:
    job_id = _job(client, key_a, upload)
    answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/exports", headers=bearer(key_a), json={"format": "merged"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "fine_tuning_job_id" and job_id in error["message"]
    assert "only a succeeded job" in error["message"]


@pytest.mark.parametrize("body", [{"format": "gguf"}, {"format": 1}, {}, None, [1], {"format": "MERGED"}])
def test_an_unknown_format_is_a_400_naming_format(client: TestClient, key_a: str, succeeded_job: str,
                                                   body: Any) -> None:
    answer = client.post(f"/v1/fine_tuning/jobs/{succeeded_job}/exports", headers=bearer(key_a), json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "format" and "format must be one of merged" in error["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{succeeded_job}/exports", headers=bearer(key_a)).json()["data"] == []


def test_create_list_retrieve_and_cancel(client: TestClient, session: Session, key_a: str,
                                         succeeded_job: str) -> None:
    path = f"/v1/fine_tuning/jobs/{succeeded_job}/exports"
    created = [client.post(path, headers=bearer(key_a), json={"format": "merged"}) for _ in range(3)]
    assert all(answer.status_code == 200 for answer in created), created[0].text
    first = created[0].json()
    assert first["id"].startswith("ftexp-") and first["object"] == "fine_tuning.export"
    assert (first["status"], first["format"], first["file_id"], first["error"], first["finished_at"]) == (
        "queued", "merged", None, None, None)
    assert set(first) == {"id", "object", "status", "format", "file_id", "error", "created_at", "finished_at"}
    ids = [answer.json()["id"] for answer in created]

    page = client.get(path, headers=bearer(key_a), params={"limit": 2}).json()
    assert [row["id"] for row in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = client.get(path, headers=bearer(key_a), params={"limit": 2, "after": page["last_id"]}).json()
    assert [row["id"] for row in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert client.get(f"{path}/{ids[1]}", headers=bearer(key_a)).json() == created[1].json()
    missing = client.get(f"{path}/ftexp-nope", headers=bearer(key_a))
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "export_id"

    # A queued export is cancelled at once; a running one is asked to stop (its worker's heartbeat reads it).
    cancelled = client.post(f"{path}/{ids[0]}/cancel", headers=bearer(key_a)).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = client.post(f"{path}/{ids[0]}/cancel", headers=bearer(key_a))
    assert again.status_code == 400 and "already cancelled" in again.json()["error"]["message"]
    session.execute(update(Export).where(Export.id == ids[1]).values(status="running", attempt=1))
    session.commit()
    running = client.post(f"{path}/{ids[1]}/cancel", headers=bearer(key_a)).json()
    assert running["status"] == "running"
    session.expire_all()
    assert session.scalar(select(Export.requested_action).where(Export.id == ids[1])) == "cancel"
    events = client.get(f"/v1/fine_tuning/jobs/{succeeded_job}/events", headers=bearer(key_a)).json()["data"]
    assert any(f"Export {ids[2]} queued (merged)" == event["message"] for event in events)
    assert any(f"Export {ids[1]}: cancellation requested" == event["message"] for event in events)


def test_another_projects_job_and_exports_are_404(client: TestClient, key_a: str, key_b: str,
                                                  succeeded_job: str) -> None:
    path = f"/v1/fine_tuning/jobs/{succeeded_job}/exports"
    export_id = client.post(path, headers=bearer(key_a), json={"format": "merged"}).json()["id"]
    for answer in (client.post(path, headers=bearer(key_b), json={"format": "merged"}),
                   client.get(path, headers=bearer(key_b)),
                   client.get(f"{path}/{export_id}", headers=bearer(key_b)),
                   client.post(f"{path}/{export_id}/cancel", headers=bearer(key_b))):
        assert answer.status_code == 404, answer.text
        assert export_id not in answer.text
    assert client.get(f"{path}/{export_id}", headers=bearer(key_a)).json()["status"] == "queued"
