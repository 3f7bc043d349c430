"""/v1/fine_tuning/jobs through the openai SDK and raw HTTP: create, list, state changes, isolation."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import redis
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import Job, Project
from tests.api.conftest import bearer
from tests.conftest import REDIS_URL

Upload = Callable[..., dict[str, object]]


def _queued_job_ids() -> list[str]:
    """Job ids of the `safetrain.run_job` messages waiting in the test broker."""
    found = []
    for raw in redis.Redis.from_url(REDIS_URL).lrange("safetrain", 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        if message["headers"]["task"] == "safetrain.run_job":
            found.append(body[0][0])
    return found


def _create(client: TestClient, key: str, **body: object) -> dict[str, object]:
    response = client.post("/v1/fine_tuning/jobs", headers=bearer(key), json=body)
    assert response.status_code == 200, response.text
    created: dict[str, object] = response.json()
    return created


def _set_status(session: Session, job_id: str, status: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(status=status))
    session.commit()


def test_sdk_creates_a_queued_job_mapping_hyperparameters_and_enqueues_its_id(sdk: OpenAI, upload: Upload,
                                                                               key_a: str) -> None:
    file_id = str(upload(key_a)["id"])
    job = sdk.fine_tuning.jobs.create(
        model="tiny-gpt2", training_file=file_id, suffix="demo", seed=7, metadata={"team": "nlp"},
        hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5},
        extra_body={"training": {"lora_r": 4, "gradient_checkpointing": True}},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "queued" and job.model == "tiny-gpt2" and job.training_file == file_id
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 0.5
    assert job.seed == 7 and job.metadata == {"team": "nlp"} and job.result_files == []
    assert job.method is not None and job.method.type == "supervised"
    training = (job.model_extra or {})["training"]
    assert training["use_lora"] is True  # the API's safe default
    assert training["epochs"] == 3 and training["lora_r"] == 4 and training["gradient_checkpointing"] is True
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 4
    assert training["per_device_train_batch_size"] <= 2
    assert training["learning_rate"] == pytest.approx(1e-4)  # half of LoRA's default 2e-4
    assert (job.model_extra or {})["attempt"] == 0
    assert job.id in _queued_job_ids()
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "queued"
    events = sdk.fine_tuning.jobs.list_events(job.id)
    assert [event.message for event in events] == [f"Created fine-tuning job: {job.id}"]


def test_odd_batch_size_keeps_the_effective_batch(client: TestClient, key_a: str, upload: Upload) -> None:
    job = _create(client, key_a, model="tiny-gpt2", training_file=upload(key_a)["id"],
                  hyperparameters={"batch_size": 3})
    training = job["training"]
    assert isinstance(training, dict)
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 3


def test_sdk_pages_through_jobs_and_filters_by_metadata(sdk: OpenAI, upload: Upload, key_a: str,
                                                        settings: Settings) -> None:
    file_id = str(upload(key_a)["id"])
    ids = [
        sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=file_id, metadata={"n": str(n)}).id
        for n in range(3)
    ]
    first = sdk.fine_tuning.jobs.list(limit=2)
    assert [job.id for job in first.data] == ids[:0:-1] and first.has_more
    assert [job.id for job in sdk.fine_tuning.jobs.list(limit=2)] == ids[::-1]  # auto-paging
    assert [job.id for job in sdk.fine_tuning.jobs.list(metadata={"n": "1"})] == [ids[1]]


def test_cancel_pause_resume_follow_the_state_machine(client: TestClient, key_a: str, upload: Upload,
                                                      session: Session) -> None:
    file_id = upload(key_a)["id"]
    headers = bearer(key_a)
    queued = str(_create(client, key_a, model="tiny-gpt2", training_file=file_id)["id"])
    paused = client.post(f"/v1/fine_tuning/jobs/{queued}/pause", headers=headers).json()
    assert paused["status"] == "paused"
    resumed = client.post(f"/v1/fine_tuning/jobs/{queued}/resume", headers=headers).json()
    assert resumed["status"] == "queued" and _queued_job_ids().count(queued) == 2
    refused = client.post(f"/v1/fine_tuning/jobs/{queued}/resume", headers=headers)
    assert refused.status_code == 400 and "paused" in refused.json()["error"]["message"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{queued}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{queued}/cancel", headers=headers)
    assert again.status_code == 400 and again.json()["error"]["type"] == "invalid_request_error"
    assert client.post(f"/v1/fine_tuning/jobs/{queued}/pause", headers=headers).status_code == 400

    running = str(_create(client, key_a, model="tiny-gpt2", training_file=file_id)["id"])
    _set_status(session, running, "running")
    assert client.post(f"/v1/fine_tuning/jobs/{running}/pause", headers=headers).json()["status"] == "running"
    assert session.scalar(select(Job.requested_action).where(Job.id == running)) == "pause"
    assert client.post(f"/v1/fine_tuning/jobs/{running}/resume", headers=headers).status_code == 200
    assert session.scalar(select(Job.requested_action).where(Job.id == running).execution_options(
        populate_existing=True)) is None
    assert client.post(f"/v1/fine_tuning/jobs/{running}/cancel", headers=headers).json()["status"] == "running"
    session.expire_all()
    assert session.scalar(select(Job.requested_action).where(Job.id == running)) == "cancel"


MODEL_ATTACKS = ["../x", "/etc", "a/../../b", "https://example.com/m", "tiny-gpt2/../tiny-gpt2", ".", "..",
                 "missing-model", "org/hub-model", "tiny-gpt2/", "~root", "", "tiny-gpt2\x00", "..\\x"]


def test_model_paths_urls_and_unknown_names_are_400(client: TestClient, key_a: str, upload: Upload) -> None:
    file_id = upload(key_a)["id"]
    for model in MODEL_ATTACKS:
        response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                               json={"model": model, "training_file": file_id})
        assert response.status_code == 400, model
        assert response.json()["error"]["param"] == "model", model
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).json()["data"] == []


def test_symlink_out_of_the_models_folder_is_400(client: TestClient, key_a: str, upload: Upload,
                                                 models_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (outside / "model.safetensors").write_bytes(b"")
    link = models_dir / "escape"
    link.symlink_to(outside, target_is_directory=True)
    try:
        response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                               json={"model": "escape", "training_file": upload(key_a)["id"]})
    finally:
        link.unlink()
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


BAD_JOB_REQUESTS: list[tuple[dict[str, object], str]] = [
    ({"training": {"use_8bit": True, "use_4bit": True}}, "training.use_8bit"),
    ({"training": {"fp16": True, "bf16": True}}, "training.fp16"),
    ({"training": {"lora_r": 0}}, "training.lora_r"),
    ({"training": {"lora_dropout": 1.0}}, "training.lora_dropout"),
    ({"training": {"max_steps": -5}}, "training.max_steps"),
    ({"training": {"lora_r": "8"}}, "training.lora_r"),
    ({"training": {"output_dir": "/tmp/x"}}, "training.output_dir"),
    ({"training": {"trust_remote_code": True}}, "training.trust_remote_code"),
    ({"training": {"deepspeed": "/etc/ds.json"}}, "training.deepspeed"),
    ({"training": "lora"}, "training"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 1}}, "hyperparameters.warmup"),
    ({"hyperparameters": {"n_epochs": 2}, "training": {"epochs": 3}}, "hyperparameters.n_epochs"),
    ({"method": {"type": "dpo"}}, "training_file"),  # a chat file for a dpo job
    ({"seed": "seven"}, "seed"),
    ({"suffix": "has space"}, "suffix"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"integrations": [{"type": "wandb"}]}, "integrations.0.wandb"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"validation_file": "file-doesnotexist"}, "validation_file"),
]


def test_bad_job_requests_are_400_naming_the_field(client: TestClient, key_a: str, upload: Upload) -> None:
    file_id = upload(key_a)["id"]
    for body, param in BAD_JOB_REQUESTS:
        response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                               json={"model": "tiny-gpt2", "training_file": file_id, **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).json()["data"] == []


def test_missing_fields_and_bad_json_are_400_not_422(client: TestClient, key_a: str) -> None:
    missing = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json={"model": "tiny-gpt2"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"
    broken = client.post("/v1/fine_tuning/jobs", headers={**bearer(key_a), "Content-Type": "application/json"},
                         content=b"{not json")
    assert broken.status_code == 400 and "error" in broken.json()
    limit = client.get("/v1/fine_tuning/jobs?limit=0", headers=bearer(key_a))
    assert limit.status_code == 400 and limit.json()["error"]["param"] == "limit"
    cursor = client.get("/v1/fine_tuning/jobs?after=ftjob-nope", headers=bearer(key_a))
    assert cursor.status_code == 400 and cursor.json()["error"]["param"] == "after"


def test_another_projects_file_cannot_be_trained_on(client: TestClient, key_a: str, key_b: str,
                                                    upload: Upload) -> None:
    response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_b),
                           json={"model": "tiny-gpt2", "training_file": upload(key_a)["id"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"


def test_other_projects_jobs_are_404_on_every_route(client: TestClient, key_a: str, key_b: str,
                                                    upload: Upload) -> None:
    job_id = _create(client, key_a, model="tiny-gpt2", training_file=upload(key_a)["id"])["id"]
    for method, path in [
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/pause"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/telemetry"),
    ]:
        response = client.request(method, path, headers=bearer(key_b))
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "not_found"
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_b)).json()["data"] == []
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=bearer(key_a)).json()["status"] == "queued"


def test_concurrent_job_quota_is_429(sdk: OpenAI, key_a: str, upload: Upload, session: Session) -> None:
    session.execute(update(Project).where(Project.name == "project-a").values(max_concurrent_jobs=1))
    session.commit()
    file_id = str(upload(key_a)["id"])
    first = sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=file_id)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=file_id)
    assert refused.value.code == "quota_exceeded"
    sdk.fine_tuning.jobs.cancel(first.id)
    assert sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=file_id).status == "queued"


def test_file_in_use_by_an_unfinished_job_cannot_be_deleted(sdk: OpenAI, key_a: str, upload: Upload) -> None:
    file_id = str(upload(key_a)["id"])
    job = sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=file_id)
    with pytest.raises(openai.BadRequestError):
        sdk.files.delete(file_id)
    sdk.fine_tuning.jobs.cancel(job.id)
    assert sdk.files.delete(file_id).deleted


def test_a_jobs_method_must_fit_its_files_format(client: TestClient, key_a: str, upload: Upload) -> None:
    from backend.db.models import File
    from backend.services.errors import InvalidRequest
    from backend.services.jobs import check_method_fits_file
    from tests.training.test_dataset_validation import PREFERENCE_LINE

    preference = upload(key_a, json.dumps(PREFERENCE_LINE).encode() + b"\n")
    chat = upload(key_a)
    assert preference["format"] == "preference"
    for body, param in [
        ({"training_file": preference["id"]}, "training_file"),
        ({"training_file": preference["id"], "method": {"type": "supervised"}}, "training_file"),
        ({"training_file": chat["id"], "validation_file": preference["id"]}, "validation_file"),
    ]:
        response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json={"model": "tiny-gpt2", **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and 'train with method "dpo"' in error["message"], error
    # DPO's side of the rule, also through the API in BAD_JOB_REQUESTS.
    with pytest.raises(InvalidRequest) as refused:
        check_method_fits_file(method_type="dpo", row=File(id=chat["id"], format="chat"), param="training_file")
    assert refused.value.param == "training_file" and '"chat" file' in str(refused.value)
    check_method_fits_file(method_type="dpo", row=File(id="f", format="preference"), param="training_file")
    check_method_fits_file(method_type="supervised", row=File(id="f", format="chat_tools"), param="training_file")
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).json()["data"] == []


def test_a_dpo_job_maps_its_hyperparameters_onto_the_trainers_options(client: TestClient, key_a: str,
                                                                     upload: Upload) -> None:
    from tests.training.test_dataset_validation import PREFERENCE_LINE

    preference = upload(key_a, json.dumps(PREFERENCE_LINE).encode() + b"\n")
    hyperparameters = {"beta": 0.25, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json={
        "model": "tiny-gpt2", "training_file": preference["id"],
        "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}
    training = job["training"]
    assert training["method"] == "dpo" and training["dpo_beta"] == 0.25 and training["epochs"] == 2
    assert training["learning_rate"] == pytest.approx(1e-4)
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 4
    for body, param in [
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
         "method.supervised.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo"}, "training": {"method": "supervised"}}, "method.type"),
    ]:
        refused = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                              json={"model": "tiny-gpt2", "training_file": preference["id"], **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)


def test_reinforcement_is_refused_with_a_reason(client: TestClient, key_a: str, upload: Upload) -> None:
    file_id = upload(key_a)["id"]
    for kind, reason in [("reinforcement", "graders")]:
        response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                               json={"model": "tiny-gpt2", "training_file": file_id, "method": {"type": kind}})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "method.type" and reason in error["message"], error
