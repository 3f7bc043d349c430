"""POST /v1/fine_tuning/estimate: planning for a device and budget, the longest context, and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.config import Settings
from backend.devices import list_gpus
from backend.training.memory import GIB
from benchmarks.context_planning import LLAMA_31_8B
from tests.api.conftest import bearer

QLORA_8B: dict[str, Any] = {
    "use_lora": True, "use_4bit": True, "lora_r": 32, "lora_dropout": 0.0, "bf16": True,
    "gradient_checkpointing": True, "per_device_train_batch_size": 1,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.fixture
def planning_client(settings: Settings, tmp_path: Path) -> TestClient:
    """The app with one more base model: the Llama-3.1-8B shape as a config.json (and an empty weights file)."""
    models = tmp_path / "models"
    for name, config in (("llama-3.1-8b", LLAMA_31_8B),):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text(json.dumps(config))
        (models / name / "model.safetensors").write_bytes(b"")
    app = create_app(settings.model_copy(update={"models_dir": models}))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _estimate(client: TestClient, key: str, **body: Any) -> Any:
    return client.post("/v1/fine_tuning/estimate", headers=bearer(key), json={"model": "llama-3.1-8b", **body})


def test_the_longest_context_for_a_gpu_budget_from_any_server(planning_client, key_a):
    response = _estimate(planning_client, key_a, device="cuda", budget_bytes=24 * GIB,
                         training={**QLORA_8B, "max_seq_length": "auto"})

    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["device"] == "cuda" and plan["budget_bytes"] == 24 * GIB and plan["fits"] is True
    assert 4 * 6_298 < plan["max_seq_length"] < 131_072  # four times the plain loss's longest (issue 11)
    assert {"use_4bit", "gradient_checkpointing", "chunked_loss"} <= set(plan["techniques"])
    assert plan["training"]["max_seq_length"] == "auto"  # what was asked; the plan says what it resolved to
    longer = _estimate(planning_client, key_a, device="cuda", budget_bytes=24 * GIB,
                       training={**QLORA_8B, "max_seq_length": plan["max_seq_length"] + 1}).json()
    assert longer["fits"] is False


def test_a_fixed_length_plans_for_the_device_asked(planning_client, key_a):
    on_gpu = _estimate(planning_client, key_a, device="cuda", budget_bytes=80 * GIB,
                       training={**QLORA_8B, "max_seq_length": 2048}).json()
    on_cpu = _estimate(planning_client, key_a, device="cpu", budget_bytes=80 * GIB,
                       training={**QLORA_8B, "max_seq_length": 2048}).json()

    assert on_gpu["device"] == "cuda" and on_cpu["device"] == "cpu" and on_gpu["max_seq_length"] == 2048
    assert on_gpu["breakdown"]["overhead"] != on_cpu["breakdown"]["overhead"]  # CUDA context vs CPU heap
    plain = _estimate(planning_client, key_a, device="cuda", budget_bytes=80 * GIB,
                      training={**QLORA_8B, "max_seq_length": 2048, "chunked_loss": False}).json()
    assert plain["estimate_bytes"] > on_gpu["estimate_bytes"] + on_gpu["savings"]["chunked_loss"] * 0.9


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"device": "tpu"}, "device", "cuda"),
    ({"budget_bytes": 0}, "budget_bytes", ""),
    ({"training": {"max_seq_length": "longest"}}, "training.max_seq_length", ""),
    ({"training": {"max_seq_length": 0}}, "training.max_seq_length", "at least 1"),
    ({"budget_bytes": 5 * GIB, "device": "cuda", "training": {**QLORA_8B, "max_seq_length": "auto"}},
     "training.max_seq_length", "the smallest budget that fits is 7.55 GiB"),
])
def test_bad_planning_values_are_400_naming_the_field(planning_client, key_a, body, param, words):
    response = _estimate(planning_client, key_a, **body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


@pytest.mark.skipif(bool(list_gpus()), reason="this server has a GPU: its free memory is the budget")
def test_planning_for_a_gpu_on_a_server_without_one_needs_a_budget(planning_client, key_a):
    response = _estimate(planning_client, key_a, device="cuda", training=QLORA_8B)

    assert response.status_code == 400 and response.json()["error"]["param"] == "budget_bytes"
