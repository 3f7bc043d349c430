"""The two reads the dashboard added to the public API: the queue, and the jobs list filtered by status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.db.models import Job
from tests.api.conftest import app, bearer, client, key_a, key_b, make_key, upload  # noqa: F401 - fixtures

Upload = Callable[..., dict[str, object]]


def _create(http: TestClient, key: str, file_id: object) -> str:
    body = {"model": "tiny-gpt2", "training_file": file_id}
    answer = http.post("/v1/fine_tuning/jobs", headers=bearer(key), json=body)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def _set(session: Session, job_id: str, **values: Any) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def test_queue_shows_running_jobs_with_their_worker_and_queued_ones_in_order(
    client: TestClient, session: Session, upload: Upload, key_a: str, key_b: str  # noqa: F811
) -> None:
    file_a, file_b = upload(key_a)["id"], upload(key_b)["id"]
    running = _create(client, key_a, file_a)
    first = _create(client, key_a, file_a)
    others = _create(client, key_b, file_b)
    last = _create(client, key_a, file_a)
    _set(session, running, status="running", worker="gpu-host-1:4242", memory_device="cuda:1", progress_step=7,
         progress_total_steps=50, started_at=1_800_000_000)

    queue = client.get("/v1/fine_tuning/queue", headers=bearer(key_a)).json()
    assert queue["object"] == "fine_tuning.queue" and queue["queued_total"] == 3
    assert [(e["id"], e["worker"], e["device"], e["progress"]["step"]) for e in queue["running"]] == [
        (running, "gpu-host-1:4242", "cuda:1", 7)]
    assert [(e["id"], e["position"]) for e in queue["queued"]] == [(first, 1), (last, 3)]
    assert others not in str(queue), "another project's job is counted, never shown"
    theirs = client.get("/v1/fine_tuning/queue", headers=bearer(key_b)).json()
    assert theirs["running"] == [] and [(e["id"], e["position"]) for e in theirs["queued"]] == [(others, 2)]
    assert client.get("/v1/fine_tuning/queue").status_code == 401


def test_jobs_list_filters_by_status_and_pages(
    client: TestClient, session: Session, upload: Upload, key_a: str, key_b: str  # noqa: F811
) -> None:
    file_a = upload(key_a)["id"]
    jobs = [_create(client, key_a, file_a) for _ in range(4)]
    _create(client, key_b, upload(key_b)["id"])
    _set(session, jobs[0], status="succeeded")
    _set(session, jobs[2], status="succeeded")
    _set(session, jobs[3], status="running")

    def ids(query: str, key: str = key_a) -> list[str]:
        answer = client.get(f"/v1/fine_tuning/jobs?{query}", headers=bearer(key))
        assert answer.status_code == 200, answer.text
        return [job["id"] for job in answer.json()["data"]]

    assert ids("status=succeeded") == [jobs[2], jobs[0]]
    assert ids("status=succeeded,running") == [jobs[3], jobs[2], jobs[0]]
    assert ids(f"status=succeeded&limit=1&after={jobs[2]}") == [jobs[0]]
    assert ids("status=queued") == [jobs[1]]
    assert ids("status=succeeded", key=key_b) == []
    bad = client.get("/v1/fine_tuning/jobs?status=done", headers=bearer(key_a))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"
