"""Evaluations through the API: evals uploads, the job's `evaluation` option and the evaluations routes.

No worker consumes the test broker, so evaluations stay queued here; tests/evaluation and the live test run them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.db.models import Job
from tests.api.conftest import bearer

TASKS = [
    {"task_id": "t/add", "prompt": "def add(a, b):\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"},
    {"task_id": "t/neg", "prompt": "def neg(a):\n", "test": "def check(candidate):\n    assert candidate(1) == -1\n",
     "entry_point": "neg"},
]
EVALS = "".join(json.dumps(task) + "\n" for task in TASKS).encode()


def _upload(client: TestClient, key: str, content: bytes, purpose: str) -> Any:
    return client.post("/v1/files", headers=bearer(key), files={"file": ("f.jsonl", content)},
                       data={"purpose": purpose})


@pytest.fixture
def evals_file(client: TestClient, key_a: str) -> str:
    response = _upload(client, key_a, EVALS, "evals")
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def _create_job(client: TestClient, key: str, training_file: str, evaluation: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs", headers=bearer(key), json={
        "model": "tiny-gpt2", "training_file": training_file, "evaluation": evaluation})


def test_an_evals_upload_is_a_file_object_counting_its_tasks(client: TestClient, key_a: str) -> None:
    response = _upload(client, key_a, EVALS, "evals")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["purpose"], body["status"], body["format"], body["n_examples"]) == ("evals", "processed",
                                                                                     "humaneval", 2)
    assert body["bytes"] == len(EVALS)


@pytest.mark.parametrize(
    ("content", "purpose", "message"),
    [
        (EVALS + b'{"task_id": "t/x", "prompt": "p", "entry_point": "f"}\n', "evals", 'Line 3: missing "test"'),
        (EVALS + EVALS.splitlines(keepends=True)[0], "evals", "Line 3: task_id 't/add' appears twice"),
        (b'{"task_id": "a", "prompt": "p", "test": "def check(c): pass", "entry_point": "not ok"}\n', "evals",
         "Line 1: \"entry_point\" 'not ok' is not a Python identifier"),
        (b'{"prompt": "p", "completion": "c"}\n', "evals", 'Line 1: missing "task_id"'),
        (EVALS, "fine-tune", "Line 1"),  # an evals file is no training dataset
    ],
)
def test_a_bad_evals_upload_is_a_400_naming_the_line(
    client: TestClient, key_a: str, content: bytes, purpose: str, message: str
) -> None:
    response = _upload(client, key_a, content, purpose)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "file"


def test_a_job_with_an_evaluation_stores_it_queued(
    client: TestClient, key_a: str, upload: Callable[..., dict[str, Any]], evals_file: str
) -> None:
    training = upload(key_a)["id"]
    evaluation = {"file": evals_file, "n_samples": 4, "k": [1, 4], "max_new_tokens": 32, "temperature": 0.7,
                  "mode": "lint"}
    job = _create_job(client, key_a, training, evaluation)
    assert job.status_code == 200, job.text
    listed = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/evaluations", headers=bearer(key_a)).json()
    assert listed["object"] == "list" and len(listed["data"]) == 1
    row = listed["data"][0]
    assert row["id"].startswith("fteval-") and row["status"] == "queued" and row["results"] is None
    assert (row["file"], row["n_samples"], row["k"], row["max_new_tokens"], row["temperature"], row["mode"]) == (
        evals_file, 4, [1, 4], 32, 0.7, "lint")
    one = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/evaluations/{row['id']}", headers=bearer(key_a))
    assert one.status_code == 200 and one.json()["id"] == row["id"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n_samples": 0}, "evaluation.n_samples"),
        ({"n_samples": 21}, "evaluation.n_samples"),
        ({"n_samples": True}, "evaluation.n_samples"),
        ({"k": [2]}, "evaluation.k"),
        ({"k": []}, "evaluation.k"),
        ({"temperature": -1}, "evaluation.temperature"),
        ({"max_new_tokens": 0}, "evaluation.max_new_tokens"),
        ({"mode": "exec"}, "evaluation.mode"),
        ({"command": "rm -rf /"}, "evaluation.command"),
        ({"file": None}, "evaluation.file"),
        ({"file": "file-doesnotexist"}, "evaluation.file"),
    ],
)
def test_a_bad_evaluation_option_is_a_400_naming_the_field(
    client: TestClient, key_a: str, upload: Callable[..., dict[str, Any]], evals_file: str, change: dict[str, Any],
    param: str,
) -> None:
    response = _create_job(client, key_a, upload(key_a)["id"], {"file": evals_file, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).json()["data"] == []  # nothing was created


def test_the_evaluation_file_must_be_an_evals_file_of_the_same_project(
    client: TestClient, key_a: str, key_b: str, upload: Callable[..., dict[str, Any]], evals_file: str
) -> None:
    training = upload(key_a)["id"]
    wrong_purpose = _create_job(client, key_a, training, {"file": training})
    assert wrong_purpose.status_code == 400 and wrong_purpose.json()["error"]["param"] == "evaluation.file"
    other_project = _create_job(client, key_b, upload(key_b)["id"], {"file": evals_file})
    assert other_project.status_code == 400 and other_project.json()["error"]["param"] == "evaluation.file"
    assert evals_file not in other_project.json()["error"]["message"].replace(f"No such file: {evals_file}", "")


def test_evaluating_a_finished_job(
    client: TestClient, session: Session, key_a: str, key_b: str, upload: Callable[..., dict[str, Any]],
    evals_file: str,
) -> None:
    job = _create_job(client, key_a, upload(key_a)["id"], None).json()
    path = f"/v1/fine_tuning/jobs/{job['id']}/evaluations"
    not_done = client.post(path, headers=bearer(key_a), json={"file": evals_file})
    assert not_done.status_code == 400 and "only a succeeded job" in not_done.json()["error"]["message"]

    session.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded"))
    session.commit()
    created = client.post(path, headers=bearer(key_a), json={"file": evals_file, "n_samples": 2, "k": [1, 2]})
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "queued" and created.json()["fine_tuning_job_id"] == job["id"]
    assert client.post(path, headers=bearer(key_a), json={"file": evals_file, "n_samples": 0}).json()["error"][
        "param"] == "n_samples"
    assert client.post(path, headers=bearer(key_a), json=[1]).status_code == 400

    # Another project sees none of it.
    assert client.post(path, headers=bearer(key_b), json={"file": evals_file}).status_code == 404
    assert client.get(path, headers=bearer(key_b)).status_code == 404
    assert client.get(f"{path}/{created.json()['id']}", headers=bearer(key_b)).status_code == 404
    assert client.get(f"{path}/fteval-nope", headers=bearer(key_a)).status_code == 404
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=bearer(key_a)).json()["data"]
    assert any(created.json()["id"] in event["message"] for event in events)
