"""The `training` object and OpenAI's hyperparameters: every field with a wrong type, out of range, or contradicting
another; unknown keys; a DeepSpeed path instead of a preset. Each is 400 naming the field; nothing is stored."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from backend.training.options import API_TRAINING_FIELDS
from tests.security.conftest import Stored, assert_refused, bearer

Upload = Callable[..., dict[str, object]]

WRONG_TYPE: dict[str, list[object]] = {
    "use_lora": ["yes", 1, [True]],
    "lora_r": ["8", 8.5, True, [8]],
    "lora_alpha": ["16", 16.5, False],
    "lora_dropout": ["0.1", [0.1], True],
    "lora_target_modules": [5, [1, 2], {"c_attn": True}],
    "use_8bit": ["true", 1],
    "use_4bit": ["true", 0],
    "gradient_checkpointing": ["on", 1],
    "fp16": [1, "false"],
    "bf16": ["yes", 0.0],
    "epochs": ["1", [1], True],
    "per_device_train_batch_size": [1.5, "2", False],
    "gradient_accumulation_steps": ["2", 2.5],
    "learning_rate": ["1e-4", True],
    "max_steps": [1.5, "10"],
    "max_seq_length": ["512", 512.5, "longest", "AUTO"],
    "warmup_ratio": ["0.1", False],
    "weight_decay": ["0", True],
    "save_steps": ["5", 5.5],
    "logging_steps": ["1", 1.5],
    "seed": ["1", 1.5, True],
    "packing": ["yes", 1],
    "train_on_completions_only": [1, "no"],
    "deepspeed": [2, True, ["zero2"]],
    "chunked_loss": ["yes", 1],
    "method": [1, "ppo", ["dpo"]],
    "dpo_beta": ["0.1", True, [0.1]],
    "report_to": [7, True, [1], {"tensorboard": True}],
    "optim": [8, True, ["adamw_8bit"]],
    "offload_activations": ["yes", 1],
    "offload_embeddings": ["no", 0],
    "tiled_mlp": ["on", 1],
}

OUT_OF_RANGE: dict[str, list[object]] = {
    "lora_r": [0, -1, 10**9],
    "dpo_beta": [0, -0.1],
    "lora_alpha": [0, -16, 10**9],
    "lora_dropout": [1.0, -0.1, 7],
    "lora_target_modules": [[""], ["c_attn\x00"], ["../x"], ["m" * 300], ["m"] * 500, []],
    "epochs": [0, -1, 10**6, 1e308],
    "per_device_train_batch_size": [0, -2, 10**7],
    "gradient_accumulation_steps": [0, -1, 10**9],
    "learning_rate": [0, 1, -1e-4, 5.0],
    "max_steps": [0, -5, 10**15],
    "max_seq_length": [0, -1, 10**12],
    "warmup_ratio": [1, -0.1, 1.5],
    "weight_decay": [-1, 1e300],
    "save_steps": [0, -1, 10**15],
    "logging_steps": [0, -1, 10**15],
    "seed": [-1, 2**31, 2**70],
    "deepspeed": ["/tmp/ds.json", "zero9", "../zero2", "zero2.json", "file:///tmp/ds.json", "ZERO2", ""],
    "report_to": [["comet"], [""], ["tensorboard", "x" * 300], ["../wandb"]],
    "optim": ["sgd", "ADAMW_8BIT", "adamw_8bit; rm -rf /", ""],
}

CONTRADICTIONS: list[tuple[dict[str, object], str]] = [
    ({"use_8bit": True, "use_4bit": True}, "training.use_8bit"),
    ({"fp16": True, "bf16": True}, "training.fp16"),
    ({"use_lora": False, "use_4bit": True}, "training.use_4bit"),
    ({"use_lora": False, "use_8bit": True}, "training.use_8bit"),
    ({"deepspeed": "zero2", "use_4bit": True}, "training.deepspeed"),
    ({"offload_activations": True, "gradient_checkpointing": False}, "training.offload_activations"),
    ({"use_lora": False, "offload_embeddings": True}, "training.offload_embeddings"),
    ({"deepspeed": "zero2", "tiled_mlp": True}, "training.tiled_mlp"),
]

UNKNOWN_KEYS = ["output_dir", "trust_remote_code", "model", "data", "validation_data", "eval_data",
                "resume_from_checkpoint", "inject_oom_at_step", "inject_nan_at_step", "device_map", "max_memory",
                "dry_run", "memory_budget_gb", "max_oom_retries", "save_total_limit", "__class__", "lora-r", "LORA_R",
                "wandb_project", "wandb_entity", ""]  # W&B's settings come from `integrations` only

# (extra body fields, the param the 400 must name)
HYPERPARAMETER_ATTACKS: list[tuple[dict[str, object], str]] = [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 10**7}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 10**12}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 10**6}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": "1"}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": [1, 2]}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": 2}, "training": {"epochs": 3}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 8}, "training": {"per_device_train_batch_size": 3}},
     "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 2}, "training": {"learning_rate": 1e-4}},
     "hyperparameters.learning_rate_multiplier"),
    ({"seed": 5, "training": {"seed": 6}}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 2**80}, "seed"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "dpo"}}, "training_file"),  # dpo trains, but on a preference file, not this chat file
    ({"method": {"type": "supervised", "extra": 1}}, "method.extra"),
    ({"method": "supervised"}, "method"),
    ({"training": ["use_lora"]}, "training"),
    ({"training": None, "suffix": "x" * 65}, "suffix"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v\x00"}}, "metadata"),
]


def _cases() -> list[tuple[str, object]]:
    cases = [(field, value) for field, values in WRONG_TYPE.items() for value in values]
    return cases + [(field, value) for field, values in OUT_OF_RANGE.items() for value in values]


def test_every_api_field_is_attacked() -> None:
    assert set(WRONG_TYPE) == set(API_TRAINING_FIELDS)
    assert {field for field, _ in _cases()} == set(API_TRAINING_FIELDS)


def _create(client: TestClient, key: str, file_id: object, body: dict[str, object] | bytes):  # type: ignore[no-untyped-def]
    if isinstance(body, bytes):
        return client.post("/v1/fine_tuning/jobs", headers={**bearer(key), "Content-Type": "application/json"},
                           content=body)
    return client.post("/v1/fine_tuning/jobs", headers=bearer(key),
                       json={"model": "tiny-gpt2", "training_file": file_id, **body})


def test_wrong_types_and_out_of_range_values_are_400_naming_the_field(
    client: TestClient, key_a: str, upload: Upload, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    file_id = upload(key_a)["id"]
    before = snapshot()
    for field, value in _cases():
        response = _create(client, key_a, file_id, {"training": {field: value}})
        assert_refused(response, 400, f"training.{field}")
        estimate = client.post("/v1/fine_tuning/estimate", headers=bearer(key_a),
                               json={"model": "tiny-gpt2", "training": {field: value}, "budget_bytes": 10**9})
        assert_refused(estimate, 400, f"training.{field}")
    unchanged(before)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(
    client: TestClient, key_a: str, upload: Upload, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
    literal: str,
) -> None:
    """Python's JSON parser reads NaN and Infinity; no float field may take them."""
    file_id = upload(key_a)["id"]
    before = snapshot()
    floats = ["epochs", "lora_dropout", "learning_rate", "warmup_ratio", "weight_decay"]
    for field in floats:
        body = f'{{"model": "tiny-gpt2", "training_file": "{file_id}", "training": {{"{field}": {literal}}}}}'
        assert_refused(_create(client, key_a, file_id, body.encode()), 400, f"training.{field}")
    body = (f'{{"model": "tiny-gpt2", "training_file": "{file_id}", '
            f'"hyperparameters": {{"learning_rate_multiplier": {literal}}}}}')
    assert_refused(_create(client, key_a, file_id, body.encode()), 400, "hyperparameters.learning_rate_multiplier")
    unchanged(before)


def test_contradictions_unknown_keys_and_hyperparameter_attacks_are_400_naming_the_field(
    client: TestClient, key_a: str, upload: Upload, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    file_id = upload(key_a)["id"]
    before = snapshot()
    attacks = [({"training": training}, param) for training, param in CONTRADICTIONS]
    attacks += [({"training": {key: "x"}}, f"training.{key}") for key in UNKNOWN_KEYS]
    for body, param in attacks + HYPERPARAMETER_ATTACKS:
        error = assert_refused(_create(client, key_a, file_id, body), 400, param)
        assert error["type"] == "invalid_request_error"
    unchanged(before)
    # A request that uses every field sensibly is accepted: the refusals above are about the values.
    good = {"use_lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_modules": ["c_attn"],
            "use_8bit": False, "use_4bit": False, "gradient_checkpointing": True, "fp16": False, "bf16": False,
            "epochs": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-4,
            "max_steps": 10, "max_seq_length": 64, "warmup_ratio": 0.1, "weight_decay": 0.01, "save_steps": 5,
            "logging_steps": 1, "seed": 7, "packing": False, "train_on_completions_only": True, "deepspeed": "zero2",
            "chunked_loss": False, "method": "supervised", "dpo_beta": 0.1, "report_to": ["tensorboard"],
            "optim": "adamw_8bit", "offload_activations": True, "offload_embeddings": False,
            "tiled_mlp": False}
    assert set(good) == set(API_TRAINING_FIELDS)
    response = _create(client, key_a, file_id, {"training": good})
    assert response.status_code == 200, response.text
    assert response.json()["training"]["deepspeed"] == "zero2"
