"""Evaluations on a live deployment: `safetrain up` (uvicorn + a real Celery worker), the openai SDK, tiny-gpt2.

A job fine-tunes the tiny model for a few steps with an `evaluation` option; the worker then evaluates the
adapter on two tasks, every sample run in the sandbox. A random tiny model writes no correct code, so the test
asserts what really happened: each sample ran in the sandbox to an exit (or a recorded stop), pass@k follows
from the samples, and the results are in SQL (the API), in the job's events and in the adapter's safetrain.json.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from backend.evaluation.harness import pass_at_k
from tests.e2e.conftest import Stack, start_embedded
from tests.support.waiting import wait_for

TASKS = [
    {"task_id": "live/add", "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"},
    {"task_id": "live/double", "prompt": 'def double(x):\n    """Twice x."""\n',
     "test": "def check(candidate):\n    assert candidate(4) == 8\n", "entry_point": "double"},
]
TRAIN = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(8)]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, OpenAI, OpenAI]]:
    stack = start_embedded(tmp_path_factory.mktemp("evaluations"))
    try:
        assert stack.printed_key, stack.logs()
        other = stack.safetrain("keys", "create", "--project", "other").strip()
        yield stack, stack.client(stack.printed_key), stack.client(other)
    finally:
        stack.stop()


def _upload(client: OpenAI, tmp: Path, name: str, rows: list[dict[str, Any]], purpose: str) -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return client.files.create(file=path.open("rb"), purpose=purpose).id  # type: ignore[arg-type]


def _get(client: OpenAI, path: str) -> Any:
    return client.get(path, cast_to=object)


def _post(client: OpenAI, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, body=body, cast_to=object)


def test_an_evaluation_follows_training_and_runs_every_sample_in_the_sandbox(
    live: tuple[Stack, OpenAI, OpenAI], tmp_path: Path
) -> None:
    stack, client, other = live
    evals = _upload(client, tmp_path, "evals.jsonl", TASKS, "evals")
    training = _upload(client, tmp_path, "train.jsonl", TRAIN, "fine-tune")
    option = {"file": evals, "n_samples": 2, "k": [1, 2], "max_new_tokens": 12, "temperature": 0.8,
              "mode": "sandbox"}
    job = client.fine_tuning.jobs.create(
        model="tiny-gpt2", training_file=training, hyperparameters={"n_epochs": 1, "batch_size": 2},
        extra_body={"training": {"max_steps": 2, "logging_steps": 1}, "evaluation": option},
    )
    path = f"/fine_tuning/jobs/{job.id}/evaluations"
    with pytest.raises(openai.BadRequestError, match="only a succeeded job"):  # not finished yet
        _post(client, path, {"file": evals})
    [queued] = _get(client, path)["data"]
    assert queued["status"] in ("queued", "running")

    done = wait_for(lambda: (e := _get(client, f"{path}/{queued['id']}"))["status"] in ("succeeded", "failed") and e,
                    120, "the evaluation that follows training")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert done["status"] == "succeeded", (done["error"], stack.logs())
    results = done["results"]
    assert results["mode"] == "sandbox" and results["n_samples"] == 2 and results["k_values"] == [1, 2]
    assert [task["task_id"] for task in results["tasks"]] == ["live/add", "live/double"]
    for task in results["tasks"]:
        assert task["n"] == 2 and len(task["samples"]) == 2
        for sample in task["samples"]:
            # The sandbox ran it: an exit status, or the reason it was stopped, is recorded for every sample.
            assert sample["exit_code"] is not None or sample["stopped_reason"] is not None, sample
            if sample["passed"]:
                assert sample["exit_code"] == 0 and sample["stopped_reason"] is None
        assert task["correct"] == sum(sample["passed"] for sample in task["samples"])
        assert task["pass_at_k"]["pass@1"] == pytest.approx(pass_at_k(2, task["correct"], 1))
        assert 0.0 <= task["pass_at_k"]["pass@1"] <= 1.0
    mean = sum(task["pass_at_k"]["pass@1"] for task in results["tasks"]) / 2
    assert done["pass_at_k"]["pass@1"] == pytest.approx(mean)

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    data: list[dict[str, Any]] = [event.data if isinstance(event.data, dict) else {} for event in events]
    mine = [(event, d) for event, d in zip(events, data, strict=True) if d.get("evaluation_id") == done["id"]]
    metrics = [d for event, d in mine if event.type == "metrics"]
    assert len(metrics) == 1 and metrics[0]["pass@1"] == pytest.approx(mean)
    assert sum("task live/" in event.message for event, _ in mine) == 2

    archive = client.files.content(client.fine_tuning.jobs.retrieve(job.id).result_files[0]).read()
    with zipfile.ZipFile(io.BytesIO(archive)) as adapter:
        manifest = json.loads(adapter.read("safetrain.json"))
    assert manifest["evaluations"][done["id"]]["pass_at_k"] == done["pass_at_k"]

    # On its own, against the finished job: lint mode (nothing executes), then the refusals.
    lint = _post(client, path, {"file": evals, "mode": "lint"})
    assert lint["status"] == "queued" and lint["id"] != done["id"]
    linted = wait_for(lambda: (e := _get(client, f"{path}/{lint['id']}"))["status"] in ("succeeded", "failed") and e,
                      60, "the lint evaluation")
    assert linted["status"] == "succeeded" and linted["results"]["mode"] == "lint"
    assert [e["id"] for e in _get(client, path)["data"]] == [lint["id"], done["id"]]  # newest first
    with pytest.raises(openai.BadRequestError) as zero:
        _post(client, path, {"file": evals, "n_samples": 0})
    assert zero.value.body["param"] == "n_samples"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong:
        _post(client, path, {"file": training})
    assert wrong.value.body["param"] == "file"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        _post(other, path, {"file": evals})
    with pytest.raises(openai.NotFoundError):
        _get(other, f"{path}/{done['id']}")
