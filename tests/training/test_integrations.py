"""integrations.py: --report_to's TensorBoard, MLflow and W&B runs, read back with each library's own reader."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from backend.training.datasets import BUILTIN_DATASET
from backend.training.events import TrainingEvent
from backend.training.integrations import (
    RUN_IDS_FILE,
    MetricSinks,
    sunk_values,
    without_credentials,
)
from backend.training.options import TrainingOptions
from backend.training.reporting import Reporter
from backend.training.train_safe import parse_options
from backend.training.trainer import run_training
from tests.support.report_sinks import wandb_records, wandb_series

from .conftest import EventLog

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LOGGED = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy", "learning_rate")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """No W&B key and no MLflow server: W&B runs offline and MLflow writes its file store in the output folder."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "SAFETRAIN_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def _options(model: Path, output_dir: Path, **overrides: Any) -> TrainingOptions:
    settings: dict[str, Any] = dict(
        model=str(model), output_dir=str(output_dir), validation_data=str(BUILTIN_DATASET), max_steps=3,
        per_device_train_batch_size=2, max_seq_length=32, logging_steps=1, use_lora=True, use_8bit=False,
        report_to=["tensorboard", "mlflow", "wandb"], wandb_project="counting", wandb_tags=["tiny", "cpu"],
    )
    return TrainingOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def reported_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EventLog]:
    """One 3-step run reporting to all three sinks (no credentials in its environment), and its events."""
    saved = {name: os.environ.pop(name) for name in ("WANDB_API_KEY", "SAFETRAIN_MLFLOW_TRACKING_URI")
             if name in os.environ}
    events = EventLog()
    output = tmp_path_factory.mktemp("reported") / "ftjob-counting"
    try:
        result = run_training(_options(tiny_gpt2, output), on_event=events)
    finally:
        os.environ.update(saved)
    assert result.status == "succeeded", result.error_message
    assert [entry["step"] for entry in events.metrics()] == [1, 2, 3]
    return output, events


def _expected(events: EventLog, name: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[name]) for entry in events.metrics()]


def _full_validation(events: EventLog) -> dict[str, float]:
    (checkpoint,) = [event.data for event in events.of_kind("checkpoint")]
    assert checkpoint["step"] == 3
    return {name: checkpoint["metrics"][name] for name in ("full_valid_loss", "full_valid_mean_token_accuracy")}


def test_tensorboard_event_files_hold_each_logging_steps_metrics(reported_run):
    output, events = reported_run
    accumulator = EventAccumulator(str(output / "tensorboard"))
    accumulator.Reload()

    for name in LOGGED:
        logged = [(scalar.step, scalar.value) for scalar in accumulator.Scalars(name)]
        assert logged == [(step, pytest.approx(value, rel=1e-6)) for step, value in _expected(events, name)], name
    for name, value in _full_validation(events).items():
        assert [(s.step, s.value) for s in accumulator.Scalars(name)] == [(3, pytest.approx(value, rel=1e-6))]
    assert any("TensorBoard: event files in" in event.message for event in events)


def test_the_mlflow_file_store_holds_a_finished_run_with_the_metrics(reported_run, monkeypatch):
    output, events = reported_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    client = MlflowClient(tracking_uri=(output / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("safetrain")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])

    assert run.info.status == "FINISHED" and run.info.run_name == "ftjob-counting"
    for name in LOGGED:
        history = [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, name)]
        assert history == _expected(events, name), name
    for name, value in _full_validation(events).items():
        assert run.data.metrics[name] == value
    assert json.loads(run.data.params["lora_r"]) == 8 and json.loads(run.data.params["max_steps"]) == 3


def test_the_wandb_offline_run_in_the_output_folder_holds_the_metrics(reported_run):
    output, events = reported_run
    (run_folder,) = (output / "wandb").glob("offline-run-*")
    (run_file,) = run_folder.glob("run-*.wandb")
    records = wandb_records(run_file)

    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, list(run.tags)) == ("counting", "ftjob-counting", ["tiny", "cpu"])
    assert run_file.name == f"run-{run.run_id}.wandb"
    for name in LOGGED:
        assert wandb_series(records, name) == _expected(events, name), name
    for name, value in _full_validation(events).items():
        assert wandb_series(records, name) == [(3, value)]
    assert any(record.WhichOneof("record_type") == "exit" and record.exit.exit_code == 0 for record in records)
    (said,) = [event.message for event in events if event.message.startswith("Weights & Biases:")]
    assert f"offline run in {run_folder}" in said and "no WANDB_API_KEY" in said
    assert json.loads((output / RUN_IDS_FILE).read_text())["wandb"] == run.run_id


@pytest.mark.usefixtures("no_credentials")
def test_a_resumed_run_continues_the_same_mlflow_and_wandb_runs(tiny_gpt2, tmp_path, monkeypatch):
    output = tmp_path / "out"
    first = run_training(_options(tiny_gpt2, output, max_steps=1, report_to=["mlflow", "wandb"], wandb_tags=None,
                                  validation_data=None))
    ids = json.loads((output / RUN_IDS_FILE).read_text())
    events = EventLog()

    second = run_training(_options(tiny_gpt2, output, max_steps=2, report_to=["mlflow", "wandb"], wandb_tags=None,
                                   validation_data=None, resume_from_checkpoint="latest"), on_event=events)

    assert first.status == second.status == "succeeded"
    assert json.loads((output / RUN_IDS_FILE).read_text()) == ids
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(output / "mlruns").as_uri())
    history = client.get_metric_history(ids["mlflow"], "train_loss")
    assert [metric.step for metric in history] == [1, 2]
    assert history[1].value == events.metrics()[0]["train_loss"]
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    run_files = sorted((output / "wandb").glob("offline-run-*/run-*.wandb"))  # one offline folder per process
    assert [path.name for path in run_files] == [f"run-{ids['wandb']}.wandb"] * 2


def test_steps_a_healed_run_retried_reach_wandb_as_the_events_give_them(tiny_gpt2, tmp_path, no_credentials):
    events = EventLog()
    output = tmp_path / "out"
    result = run_training(_options(tiny_gpt2, output, max_steps=5, save_steps=2, inject_nan_at_step=4,
                                   report_to=["wandb"], validation_data=None), on_event=events)
    assert result.status == "succeeded" and result.metrics["divergence_recoveries"] == 1
    steps = [entry["step"] for entry in events.metrics()]
    assert len(steps) > len(set(steps)), f"the rollback retries a step: {steps}"
    (run_file,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_series(wandb_records(run_file), "train_loss") == _expected(events, "train_loss")


def test_a_run_without_report_to_imports_no_sink_library(tiny_gpt2, tmp_path):
    script = (
        "import sys\n"
        "from backend.training.options import TrainingOptions\n"
        "from backend.training.trainer import run_training\n"
        f"result = run_training(TrainingOptions(model={str(tiny_gpt2)!r}, output_dir={str(tmp_path / 'out')!r}, "
        "max_steps=1, max_seq_length=16, use_lora=True, use_8bit=False))\n"
        "assert result.status == 'succeeded', result.error_message\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'wandb', 'mlflow', 'tensorboard'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "out" / RUN_IDS_FILE).exists()


def test_unknown_sinks_and_missing_libraries_are_refused_naming_the_flag(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"--report_to: unknown sink 'comet'"):
        TrainingOptions(report_to="tensorboard,comet")
    with pytest.raises(ValueError, match=r"--wandb_project needs --report_to wandb"):
        TrainingOptions(report_to=["mlflow"], wandb_project="p")
    with pytest.raises(SystemExit) as refused:
        parse_options(["--report_to", "tensorboard,neptune"])
    assert refused.value.code == 2 and "--report_to: unknown sink 'neptune'" in capsys.readouterr().err
    assert TrainingOptions(report_to="tensorboard, mlflow").report_to == ["tensorboard", "mlflow"]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlflow" else real_find_spec(name, *args))
    with pytest.raises(ValueError, match=r"--report_to mlflow needs the mlflow package, which is not installed"):
        TrainingOptions(report_to=["mlflow"])


def test_only_an_events_numbers_reach_the_sinks():
    metrics = {"step": 4, "total_steps": 9, "train_loss": 1.5, "learning_rate": 1e-4, "valid_loss": float("nan")}
    assert sunk_values("metrics", metrics) == (4, {"train_loss": 1.5, "learning_rate": 1e-4})
    checkpoint = {"step": 4, "path": "/x", "metrics": {"step": 4, "train_loss": 1.5, "full_valid_loss": 2.0}}
    assert sunk_values("checkpoint", checkpoint) == (4, {"full_valid_loss": 2.0})
    assert sunk_values("metrics", {"step": 4, "rewards/margin": 0.25}) == (4, {"rewards/margin": 0.25})  # DPO's
    assert sunk_values("message", {"step": 4, "rewards/margin": 0.25}) is None
    assert sunk_values("telemetry", {"step": 4, "used_bytes": 1}) is None
    assert without_credentials("https://user:secret@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert without_credentials("file:///tmp/mlruns") == "file:///tmp/mlruns"


class _BrokenSink:
    name = "tensorboard"

    def __init__(self) -> None:
        self.logged: list[int] = []

    def log(self, values: dict[str, float], step: int) -> None:
        self.logged.append(step)
        raise OSError("disk full")

    def close(self, status: str) -> None:
        raise AssertionError("a dropped sink is not closed")


def test_a_sink_that_fails_is_dropped_with_a_warning_and_training_goes_on():
    events: list[TrainingEvent] = []
    report = Reporter(events.append)
    broken = _BrokenSink()
    report.sinks = MetricSinks([broken], report)

    report.emit("metrics", "step 1", data={"step": 1, "train_loss": 2.0})
    report.emit("metrics", "step 2", data={"step": 2, "train_loss": 1.0})
    report.sinks.close()

    assert broken.logged == [1] and report.sinks.names == []
    (warning,) = [event for event in events if event.level == "warn"]
    assert "--report_to tensorboard: could not write to it (OSError: disk full)" in warning.message
    assert [event.data["step"] for event in events if event.kind == "metrics"] == [1, 2]
