"""OpenAI's `integrations` (W&B) and safetrain's `training.report_to` on job create: accepted, stored, echoed, passed
to the trainer's options by the worker; bad shapes are 400 naming the field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Job
from backend.workers.jobs.preparation import build_options
from tests.api.conftest import bearer

Upload = Callable[..., dict[str, object]]
WANDB = {"type": "wandb", "wandb": {"project": "counting", "name": "first try", "entity": "my-team",
                                    "tags": ["tiny", "lora"]}}


def test_a_wandb_integration_is_stored_echoed_and_given_to_the_trainer(sdk: OpenAI, upload: Upload, key_a: str,
                                                                         session: Session, tmp_path: Path) -> None:
    file_id = str(upload(key_a)["id"])

    job = sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=file_id, integrations=[WANDB],  # type: ignore[list-item]
                                      extra_body={"training": {"report_to": ["tensorboard"]}})

    for shown in (job, sdk.fine_tuning.jobs.retrieve(job.id)):
        assert shown.integrations is not None and len(shown.integrations) == 1
        (integration,) = shown.integrations
        assert integration.type == "wandb" and integration.wandb.project == "counting"
        assert (integration.wandb.name, integration.wandb.entity, integration.wandb.tags) == (
            "first try", "my-team", ["tiny", "lora"])
        assert (shown.model_extra or {})["training"]["report_to"] == ["tensorboard"]
    row = session.scalars(select(Job).where(Job.id == job.id)).one()
    assert row.integrations == [WANDB]
    options = build_options(row, model_dir=tmp_path / "model", train_path=tmp_path / "train.jsonl",
                            validation_path=None, work_dir=tmp_path / job.id)
    assert options.report_to == ["tensorboard", "wandb"]
    assert (options.wandb_project, options.wandb_name, options.wandb_entity, options.wandb_tags) == (
        "counting", "first try", "my-team", ["tiny", "lora"])


def test_a_job_without_integrations_echoes_an_empty_list_and_reports_nowhere(
    client: TestClient, key_a: str, upload: Upload, session: Session, tmp_path: Path
) -> None:
    file_id = upload(key_a)["id"]
    response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                           json={"model": "tiny-gpt2", "training_file": file_id})

    assert response.status_code == 200, response.text
    assert response.json()["integrations"] == []
    row = session.scalars(select(Job).where(Job.id == response.json()["id"])).one()
    options = build_options(row, model_dir=tmp_path, train_path=tmp_path / "t.jsonl", validation_path=None,
                            work_dir=tmp_path)
    assert row.integrations is None and options.report_to is None and options.wandb_project is None


BAD_INTEGRATIONS: list[tuple[object, str]] = [
    ({"integrations": "wandb"}, "integrations"),
    ({"integrations": [WANDB, WANDB]}, "integrations"),
    ({"integrations": [{"type": "comet", "wandb": WANDB["wandb"]}]}, "integrations.0.type"),
    ({"integrations": [{"type": "wandb"}]}, "integrations.0.wandb"),
    ({"integrations": [{"type": "wandb", "wandb": {"name": "no project"}}]}, "integrations.0.wandb.project"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "a/b"}}]}, "integrations.0.wandb.project"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "entity": 7}}]}, "integrations.0.wandb.entity"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "tags": "one"}}]}, "integrations.0.wandb.tags"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}]},
     "integrations.0.wandb.tags.0"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}]},
     "integrations.0.wandb.api_key"),
    ({"training": {"report_to": ["tensorboard", "comet"]}}, "training.report_to"),
    ({"training": {"report_to": [7]}}, "training.report_to"),
    ({"training": {"wandb_project": "p"}}, "training.wandb_project"),
]


def test_bad_integrations_and_report_to_are_400_naming_the_field(client: TestClient, key_a: str,
                                                                  upload: Upload) -> None:
    file_id = upload(key_a)["id"]
    for body, param in BAD_INTEGRATIONS:
        assert isinstance(body, dict)
        response = client.post("/v1/fine_tuning/jobs", headers=bearer(key_a),
                               json={"model": "tiny-gpt2", "training_file": file_id, **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).json()["data"] == []
