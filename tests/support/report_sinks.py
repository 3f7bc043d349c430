"""Reading back what --report_to wrote in an output folder, with each library's own reader: TensorBoard's event
files, MLflow's file store and a W&B offline run's transaction log."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from backend.training.integrations import WANDB_STEP_METRIC


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `folder`: its (step, value) in order."""
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(scalar.step, scalar.value) for scalar in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def mlflow_file_store(mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A client of the file store in `mlruns` (MLflow 3 reads its file store only when asked to)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=mlruns.as_uri())


def mlflow_history(client: MlflowClient, run_id: str, name: str) -> list[tuple[int, float]]:
    """One metric of an MLflow run: its (step, value) in order."""
    return [(metric.step, metric.value) for metric in client.get_metric_history(run_id, name)]


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a .wandb transaction log (LevelDB's log format after a 7-byte header), as wandb's protos."""
    raw, block, position = run_file.read_bytes(), 32 * 1024, 7
    assert raw[:4] == b":W&B"
    records, pending = [], b""
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(records: list[Any]) -> Any:
    """The one run record of a transaction log."""
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    return run


def wandb_series(records: list[Any], name: str) -> list[tuple[int, float]]:
    """One metric of a transaction log: its (optimizer step, value) in the order logged."""
    series = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item  # wandb 0.31 writes each key as nested_key
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            if name in values:
                series.append((values[WANDB_STEP_METRIC], values[name]))
    return series


def wandb_exited_cleanly(records: list[Any]) -> bool:
    """Whether the log ends the run with exit code 0."""
    return any(record.WhichOneof("record_type") == "exit" and record.exit.exit_code == 0 for record in records)
