"""Auth, the error envelope everywhere, models, health, readiness, metrics, CORS and the OpenAPI docs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from backend.api.app import create_app
from backend.config import Settings
from backend.services.keys import revoke_key
from tests.api.conftest import bearer

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def test_missing_wrong_and_revoked_keys_are_401(client: TestClient, key_a: str, session) -> None:  # type: ignore[no-untyped-def]
    for headers in ({}, {"Authorization": "Bearer sk-st-wrong"}, {"Authorization": f"Basic {key_a}"},
                    {"Authorization": "Bearer "}):
        response = client.get("/v1/files", headers=headers)
        assert response.status_code == 401, headers
        assert set(response.json()["error"]) == ENVELOPE_KEYS and response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/files", headers=bearer(key_a)).status_code == 200
    assert revoke_key(session=session, key=key_a)
    session.commit()
    assert client.get("/v1/files", headers=bearer(key_a)).status_code == 401


def test_sdk_sees_401_as_authentication_error(client: TestClient) -> None:
    sdk = OpenAI(base_url="http://testserver/v1", api_key="sk-st-nope", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.fine_tuning.jobs.list()


def test_unknown_routes_and_methods_get_the_envelope(client: TestClient, key_a: str) -> None:
    missing = client.get("/v1/nothing-here", headers=bearer(key_a))
    assert missing.status_code == 404 and set(missing.json()["error"]) == ENVELOPE_KEYS
    wrong_method = client.put("/v1/files", headers=bearer(key_a))
    assert wrong_method.status_code == 405 and set(wrong_method.json()["error"]) == ENVELOPE_KEYS


def test_models_lists_base_folders_and_retrieves_one(sdk: OpenAI) -> None:
    models = list(sdk.models.list())
    assert [(model.id, model.object, model.owned_by) for model in models] == [("tiny-gpt2", "model", "safetrain")]
    assert sdk.models.retrieve("tiny-gpt2").id == "tiny-gpt2"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("../etc")


def test_estimate_returns_a_breakdown_and_refuses_bad_input(client: TestClient, key_a: str) -> None:
    body = {"model": "tiny-gpt2", "hyperparameters": {"batch_size": 4},
            "training": {"use_4bit": True, "gradient_checkpointing": True}, "budget_bytes": 8 * 1024**3}
    response = client.post("/v1/fine_tuning/estimate", headers=bearer(key_a), json=body)
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["fits"] is True and plan["budget_bytes"] == 8 * 1024**3
    assert set(plan["breakdown"]) >= {"weights", "adapters", "gradients", "optimizer", "activations", "overhead"}
    assert plan["estimate_bytes"] == pytest.approx(sum(plan["breakdown"].values()), rel=0.01)
    assert "recommendation" in plan
    tight = client.post("/v1/fine_tuning/estimate", headers=bearer(key_a),
                        json={**body, "training": {}, "budget_bytes": 1024})
    assert tight.status_code == 200 and tight.json()["fits"] is False
    for bad, param in [({"model": "../x"}, "model"), ({"training": {"lora_r": 0}}, "training.lora_r"),
                       ({"budget_bytes": -1}, "budget_bytes"), ({"nope": 1}, "nope")]:
        refused = client.post("/v1/fine_tuning/estimate", headers=bearer(key_a), json={**body, **bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, bad


def test_health_readiness_and_metrics(client: TestClient, key_a: str, upload: Callable[..., dict[str, object]]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    file_id = upload(key_a)["id"]
    client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json={"model": "tiny-gpt2", "training_file": file_id})
    client.get(f"/v1/files/{file_id}", headers=bearer(key_a))
    text = client.get("/metrics").text
    assert 'safetrain_jobs{status="queued"} 1.0' in text
    assert 'safetrain_http_requests_total{method="GET",route="/v1/files/{file_id}",status="200"} 1.0' in text
    assert 'safetrain_http_request_duration_seconds_count{method="POST",route="/v1/files"}' in text


def test_unreachable_database_is_503_and_not_ready(settings: Settings, key_a: str) -> None:
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        response = client.get("/v1/files", headers=bearer(key_a))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "database" in ready.json()["error"]["message"]


def test_unreachable_broker_is_not_ready(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["message"] == "Not ready: broker unavailable."


def test_embedded_broker_is_ready(settings: Settings, tmp_path: Path) -> None:
    embedded = settings.model_copy(update={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"})
    with TestClient(create_app(embedded)) as client:
        assert client.get("/readyz").status_code == 200


def test_cors_allows_only_configured_origins(settings: Settings) -> None:
    configured = settings.model_copy(update={"cors_origins": ["https://ui.example"]})
    with TestClient(create_app(configured)) as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = client.options("/v1/files", headers={"Origin": "https://ui.example", **preflight})
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        other = client.options("/v1/files", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
                 "/v1/fine_tuning/estimate", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in paths
