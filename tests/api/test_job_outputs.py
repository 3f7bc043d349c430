"""A job's events (list and Server-Sent Events), checkpoints and telemetry, as the worker writes them."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.db.models import Checkpoint, Job, JobEvent, TelemetrySample
from tests.api.conftest import bearer

Upload = Callable[..., dict[str, object]]


def _job(sdk: OpenAI, upload: Upload, key: str) -> str:
    return sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=str(upload(key)["id"])).id


def _add_metrics(session: Session, job_id: str, steps: range) -> None:
    for step in steps:
        session.add(JobEvent(job_id=job_id, attempt=1, type="metrics", message=f"step {step}",
                             data={"step": step, "train_loss": 2.0 / step, "learning_rate": 1e-4}))
        session.commit()


def _sse(client: TestClient, key: str, job_id: str, last_event_id: str | None = None) -> list[dict[str, str]]:
    headers = bearer(key) | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    events: list[dict[str, str]] = []
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                current[name] = value.strip()
    return events


def test_sdk_lists_events_newest_first_with_metrics_data(sdk: OpenAI, upload: Upload, key_a: str,
                                                         session: Session) -> None:
    job_id = _job(sdk, upload, key_a)
    _add_metrics(session, job_id, range(1, 4))
    events = list(sdk.fine_tuning.jobs.list_events(job_id, limit=2))  # pages twice
    assert [event.message for event in events] == ["step 3", "step 2", "step 1", f"Created fine-tuning job: {job_id}"]
    assert events[0].type == "metrics" and events[0].object == "fine_tuning.job.event"
    assert events[0].data == {"step": 3, "train_loss": 2.0 / 3, "learning_rate": 1e-4}
    assert events[-1].type == "message" and events[-1].level == "info"


def test_event_stream_replays_in_order_resumes_after_last_event_id_and_ends_when_the_job_ends(
    sdk: OpenAI, client: TestClient, upload: Upload, key_a: str, session: Session
) -> None:
    job_id = _job(sdk, upload, key_a)
    _add_metrics(session, job_id, range(1, 4))
    sdk.fine_tuning.jobs.cancel(job_id)  # queued → cancelled: the stream has an end
    streamed = _sse(client, key_a, job_id)
    assert streamed[-1] == {"event": "done", "data": "[DONE]"}
    messages = [json.loads(event["data"])["message"] for event in streamed[:-1]]
    assert messages == [f"Created fine-tuning job: {job_id}", "step 1", "step 2", "step 3", "Job cancelled"]
    ids = [int(event["id"]) for event in streamed[:-1]]
    assert ids == sorted(ids)
    resumed = _sse(client, key_a, job_id, last_event_id=str(ids[2]))
    assert [json.loads(event["data"])["message"] for event in resumed[:-1]] == ["step 3", "Job cancelled"]
    assert [int(event["id"]) for event in resumed[:-1]] == ids[3:]
    bad = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?stream=true",
                     headers=bearer(key_a) | {"Last-Event-ID": "abc"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_event_stream_follows_a_running_job_until_it_finishes(
    sdk: OpenAI, client: TestClient, upload: Upload, key_a: str, session: Session
) -> None:
    import threading

    job_id = _job(sdk, upload, key_a)
    session.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=1))
    session.commit()

    def worker() -> None:  # what the worker's recorder does: events as they come, then the outcome
        import time

        time.sleep(0.3)
        _add_metrics(session, job_id, range(1, 3))
        time.sleep(0.6)
        session.add(JobEvent(job_id=job_id, attempt=1, message="The job has successfully completed"))
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.commit()

    writer = threading.Thread(target=worker)
    writer.start()
    streamed = _sse(client, key_a, job_id)
    writer.join()
    messages = [json.loads(event["data"])["message"] for event in streamed[:-1]]
    assert messages == [f"Created fine-tuning job: {job_id}", "step 1", "step 2", "The job has successfully completed"]
    assert streamed[-1]["event"] == "done"


def test_sdk_lists_checkpoints_as_openai_shapes_them(sdk: OpenAI, upload: Upload, key_a: str,
                                                     session: Session) -> None:
    job_id = _job(sdk, upload, key_a)
    for step in (10, 20):
        session.add(Checkpoint(job_id=job_id, attempt=1, step_number=step, path=f"jobs/{job_id}/checkpoint-{step}",
                               metrics={"train_loss": 1.0 / step}))
        session.commit()
    checkpoints = list(sdk.fine_tuning.jobs.checkpoints.list(job_id))
    assert [checkpoint.step_number for checkpoint in checkpoints] == [20, 10]
    newest = checkpoints[0]
    assert newest.id.startswith("ftckpt-") and newest.object == "fine_tuning.job.checkpoint"
    assert newest.fine_tuning_job_id == job_id
    assert newest.fine_tuned_model_checkpoint == f"ft:tiny-gpt2:project-a:{job_id}:ckpt-step-20"
    assert newest.metrics.train_loss == 0.05 and newest.metrics.step == 20


def test_telemetry_lists_memory_samples_in_time_order(client: TestClient, sdk: OpenAI, upload: Upload,
                                                      key_a: str, session: Session) -> None:
    job_id = _job(sdk, upload, key_a)
    for step in range(1, 6):
        session.add(TelemetrySample(job_id=job_id, attempt=1, step=step,
                                    sample={"process_rss_bytes": 1000 * step, "gpus": []}))
    session.commit()
    first = client.get(f"/v1/fine_tuning/jobs/{job_id}/telemetry?limit=3", headers=bearer(key_a)).json()
    assert [sample["step"] for sample in first["data"]] == [1, 2, 3] and first["has_more"]
    assert first["data"][0]["sample"]["process_rss_bytes"] == 1000
    rest = client.get(f"/v1/fine_tuning/jobs/{job_id}/telemetry?after={first['last_seq']}",
                      headers=bearer(key_a)).json()
    assert [sample["step"] for sample in rest["data"]] == [4, 5] and not rest["has_more"]
    bad = client.get(f"/v1/fine_tuning/jobs/{job_id}/telemetry?after=-1", headers=bearer(key_a))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


def test_job_shows_memory_progress_and_result_files(sdk: OpenAI, upload: Upload, key_a: str,
                                                    session: Session) -> None:
    job_id = _job(sdk, upload, key_a)
    session.execute(update(Job).where(Job.id == job_id).values(
        status="succeeded", fine_tuned_model=f"ft:tiny-gpt2:project-a:{job_id}", result_files=["file-x"],
        trained_tokens=1234, memory_estimate_bytes=100, memory_peak_bytes=90, memory_budget_bytes=1000,
        memory_device="cpu", progress_step=5, progress_total_steps=5, progress_epoch=1.0, finished_at=1700000000,
        error=None,
    ))
    session.commit()
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.result_files == ["file-x"] and job.trained_tokens == 1234
    extra = job.model_extra or {}
    assert extra["memory"] == {"estimate_bytes": 100, "peak_bytes": 90, "budget_bytes": 1000, "device": "cpu"}
    assert extra["progress"] == {"step": 5, "total_steps": 5, "epoch": 1.0}
    assert job_id in [model.id.split(":")[-1] for model in sdk.models.list()]


def test_failed_job_error_is_shaped_as_openai(sdk: OpenAI, upload: Upload, key_a: str, session: Session) -> None:
    job_id = _job(sdk, upload, key_a)
    session.execute(update(Job).where(Job.id == job_id).values(
        status="failed", error={"code": "out_of_memory", "message": "needs 9 GiB, 4 GiB free", "param": None}))
    session.commit()
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    assert job.error is not None and job.error.code == "out_of_memory" and "GiB" in job.error.message
