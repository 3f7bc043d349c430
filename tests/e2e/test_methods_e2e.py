"""OpenAI's other training files through the `openai` SDK, on both stacks: a DPO job on a preference file and a
supervised job on a tool-use chat file, each with a validation file, and the metrics they report. The tool-use
job also reports to TensorBoard, MLflow and W&B (offline: the worker has no WANDB_API_KEY), read back from its
output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.e2e.conftest import Stack
from tests.e2e.test_service_e2e import upload, wait_status
from tests.support.report_sinks import (
    mlflow_file_store,
    mlflow_history,
    tensorboard_scalars,
    wandb_exited_cleanly,
    wandb_records,
    wandb_run,
    wandb_series,
)

# Two optimizer steps and one checkpoint: enough for every metric to exist, little enough for the suite's time.
TINY_RUN = {"use_lora": True, "lora_r": 4, "max_steps": 2, "save_steps": 2, "logging_steps": 1}
# The second job waits for the first on the one worker.
BOTH_JOBS_TIMEOUT = 180.0
OPENAI_CHECKPOINT_METRICS = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                             "full_valid_loss", "full_valid_mean_token_accuracy")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}
# The tool-use job's W&B run, and the sinks it names besides.
WANDB_TAGS = ["e2e", "tool-use"]
REPORT_TO = ["tensorboard", "mlflow"]


def preference_line(n: int) -> dict[str, Any]:
    return {"input": {"messages": [{"role": "user", "content": f"What is {n} plus one?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{n + 1}"}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}]}


def tool_line(city: str) -> dict[str, Any]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"sky": "clear"})},
        {"role": "assistant", "content": f"The sky is clear in {city}."},
    ]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def method_jobs(stack: Stack, client: OpenAI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A DPO job and a tool-use job (with a W&B integration, reporting to TensorBoard and MLflow too), both
    submitted at once: the worker trains one after the other."""
    folder = tmp_path_factory.mktemp("method-files")
    files = {
        name: upload(client, write_jsonl(folder / f"{name}.jsonl", rows)) for name, rows in {
            "pairs": [preference_line(n) for n in range(4)], "pairs_valid": [preference_line(n) for n in (7, 8)],
            "tools": [tool_line(city) for city in ("Paris", "Rome", "Oslo", "Lima")],
            "tools_valid": [tool_line(city) for city in ("Bern", "Kyiv")],
        }.items()
    }
    dpo = client.fine_tuning.jobs.create(
        model="tiny-gpt2", training_file=files["pairs"], validation_file=files["pairs_valid"],
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 2, "n_epochs": 1}}},
        extra_body={"training": TINY_RUN},
    )
    tools = client.fine_tuning.jobs.create(
        model="tiny-gpt2", training_file=files["tools"], validation_file=files["tools_valid"],
        hyperparameters={"n_epochs": 1, "batch_size": 2},
        integrations=[{"type": "wandb", "wandb": {"project": "safetrain-e2e", "name": wandb_name(stack),
                                                   "tags": WANDB_TAGS}}],
        extra_body={"training": {**TINY_RUN, "report_to": REPORT_TO}},
    )
    return {"dpo": dpo.id, "tools": tools.id}


def wandb_name(stack: Stack) -> str:
    return f"tool-use-{stack.name}"


def metrics_events(client: OpenAI, job_id: str) -> list[dict[str, Any]]:
    return [event.data for event in client.fine_tuning.jobs.list_events(job_id, limit=50) if event.type == "metrics"]


def only_checkpoint_metrics(client: OpenAI, job_id: str) -> dict[str, Any]:
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job_id).data  # save_steps 2 of 2 steps
    assert checkpoint.step_number == 2 and checkpoint.fine_tuned_model_checkpoint.endswith(":ckpt-step-2")
    return checkpoint.metrics.to_dict()


def test_a_dpo_job_succeeds_and_reports_the_loss_and_rewards(client: OpenAI, method_jobs: dict[str, str]) -> None:
    job = wait_status(client, method_jobs["dpo"], {"succeeded"}, timeout=BOTH_JOBS_TIMEOUT)

    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    assert job.fine_tuned_model.endswith(job.id) and job.result_files
    events = metrics_events(client, job.id)
    assert sorted(int(data["step"]) for data in events) == [1, 2]
    for data in [*events, only_checkpoint_metrics(client, job.id)]:
        assert 0 < data["train_loss"] < 1 and 0 < data["valid_loss"] < 1  # the DPO loss starts at ln 2
        assert all(isinstance(data[name], float) for name in DPO_METRICS) and 0 <= data["rewards/accuracy"] <= 1
        assert "train_mean_token_accuracy" not in data, "a preference pair has no token accuracy"
    assert 0 < only_checkpoint_metrics(client, job.id)["full_valid_loss"] < 1


def test_a_tool_use_job_succeeds_with_openais_checkpoint_metrics(
    stack: Stack, client: OpenAI, method_jobs: dict[str, str]
) -> None:
    job = wait_status(client, method_jobs["tools"], {"succeeded"}, timeout=BOTH_JOBS_TIMEOUT)

    assert job.method.type == "supervised" and job.trained_tokens > 0
    metrics = only_checkpoint_metrics(client, job.id)
    assert metrics["step"] == 2 and all(isinstance(metrics[name], float) for name in OPENAI_CHECKPOINT_METRICS)
    assert all(0 <= metrics[name] <= 1 for name in OPENAI_CHECKPOINT_METRICS if name.endswith("accuracy"))
    assert all("train_mean_token_accuracy" in data and "valid_loss" in data for data in metrics_events(client, job.id))
    # The checkpoint travels: its adapter names the base by name, not by this deployment's path.
    [config] = [path for path in Path(stack.env["SAFETRAIN_DATA_DIR"]).rglob("checkpoint-2/adapter_config.json")
                if job.id in str(path)]
    text = config.read_text()
    assert json.loads(text)["base_model_name_or_path"] == "tiny-gpt2" and str(stack.models_dir) not in text


def logged_series(events: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each number of the metrics events (but the step and total) as (step, value) in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for data in sorted(events, key=lambda data: int(data["step"])):
        for name, value in data.items():
            if name not in ("step", "total_steps") and isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(name, []).append((int(data["step"]), float(value)))
    return series


def close(values: list[tuple[int, float]], rel: float = 1e-12) -> list[tuple[int, Any]]:
    """The same steps, each value to `rel` (the events' numbers went through JSON and the database)."""
    return [(step, pytest.approx(value, rel=rel)) for step, value in values]


def test_a_job_with_integrations_reports_its_metrics_to_tensorboard_mlflow_and_wandb_offline(
    stack: Stack, client: OpenAI, method_jobs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = wait_status(client, method_jobs["tools"], {"succeeded"}, timeout=BOTH_JOBS_TIMEOUT)
    assert "WANDB_API_KEY" not in stack.env
    assert [entry.to_dict() for entry in job.integrations] == [{"type": "wandb", "wandb": {
        "project": "safetrain-e2e", "name": wandb_name(stack), "entity": None, "tags": WANDB_TAGS}}]
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=50))  # the SDK follows the pages
    series = logged_series([event.data for event in events if event.type == "metrics"])
    assert {"train_loss", "valid_loss", "learning_rate"} <= set(series)
    assert [step for step, _ in series["train_loss"]] == [1, 2]
    checkpoint = only_checkpoint_metrics(client, job.id)
    # A checkpoint adds the whole validation file's numbers, which the logging steps' events do not carry.
    full_validation = {name: [(2, checkpoint[name])]
                       for name in ("eval_loss", "full_valid_loss", "full_valid_mean_token_accuracy")}
    expected = {**series, **full_validation}
    output = Path(stack.env["SAFETRAIN_DATA_DIR"]) / "jobs" / job.id  # the worker's settings.job_dir

    scalars = tensorboard_scalars(output / "tensorboard")
    assert set(scalars) == set(expected)
    for name, values in expected.items():
        assert scalars[name] == close(values, rel=1e-6), name  # TensorBoard keeps float32

    mlflow = mlflow_file_store(output / "mlruns", monkeypatch)
    experiment = mlflow.get_experiment_by_name("safetrain")
    assert experiment is not None
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == wandb_name(stack)
    assert set(run.data.metrics) == set(expected)
    for name, values in expected.items():
        assert mlflow_history(mlflow, run.info.run_id, name) == close(values), name

    (run_folder,) = (output / "wandb").glob("offline-run-*")
    (run_file,) = run_folder.glob("run-*.wandb")
    records = wandb_records(run_file)
    wandb = wandb_run(records)
    assert (wandb.project, wandb.display_name, list(wandb.tags)) == ("safetrain-e2e", wandb_name(stack), WANDB_TAGS)
    assert [step for step, _ in wandb_series(records, "train_loss")] == [1, 2] and wandb_exited_cleanly(records)
    for name, values in expected.items():
        assert wandb_series(records, name) == close(values), name
    (said,) = [event.message for event in events if event.message.startswith("Weights & Biases:")]
    assert f"offline run in {run_folder}" in said and "no WANDB_API_KEY" in said
    assert not [event.message for event in events if "--report_to" in event.message], "no sink was dropped"
