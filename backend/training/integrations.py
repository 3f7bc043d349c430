"""Where a run's metrics go besides its events: TensorBoard, MLflow and Weights & Biases (--report_to).

Each sink is the library itself, imported only when a run names it, so a run without --report_to loads none of
them. The main rank opens the sinks once the options are known sane (`open_sinks`); the Reporter hands them each
logging step's metrics, each checkpoint's whole-file validation and DPO's rewards (`MetricSinks.record`); they
close with the run's status. A sink that fails to open or to write is reported once and dropped: the training
goes on, and its events still carry every number.

Credentials never travel in the options (which the adapter's safetrain.json records): W&B logs online only when
WANDB_API_KEY is in this process's environment, else offline into the output folder; MLflow writes to
SAFETRAIN_MLFLOW_TRACKING_URI from the environment, else to a file store in the output folder. A job's child
process inherits both from its worker.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from backend.training.options import API_TRAINING_FIELDS, TrainingOptions

if TYPE_CHECKING:
    from backend.training.events import TrainResult
    from backend.training.reporting import Reporter

MLFLOW_TRACKING_URI_VARIABLE = "SAFETRAIN_MLFLOW_TRACKING_URI"
WANDB_API_KEY_VARIABLE = "WANDB_API_KEY"
MLFLOW_EXPERIMENT = "safetrain"
WANDB_DEFAULT_PROJECT = "safetrain"
# The x axis of every W&B chart: the optimizer step, logged as a metric. W&B's own step only rises, so a run that
# healed by rolling back would lose its retried steps if they were logged as W&B steps.
WANDB_STEP_METRIC = "train/global_step"
TENSORBOARD_FOLDER = "tensorboard"
MLFLOW_FOLDER = "mlruns"
# The run ids a resumed run continues (a paused job's next attempt is a new process); hidden, so the adapter
# archive leaves it out.
RUN_IDS_FILE = ".report_runs.json"
# Checkpoints add the whole validation file's numbers, which the logging steps' metrics do not carry.
CHECKPOINT_ONLY_METRICS = ("eval_loss", "full_valid_loss", "full_valid_mean_token_accuracy")
NOT_LOGGED = frozenset({"step", "total_steps"})


class MetricSink(Protocol):
    """One library's run: numbers at a step, then the end."""

    name: str

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


class MetricSinks:
    """The run's open sinks; none (every call a no-op) without --report_to and on the ranks other than the main."""

    def __init__(self, sinks: list[MetricSink] | None = None, report: Reporter | None = None) -> None:
        self._sinks = list(sinks or [])
        self._report = report
        self.status = "failed"  # until the run returns a result: an exception ends it as failed

    @property
    def names(self) -> list[str]:
        """The sinks still open."""
        return [sink.name for sink in self._sinks]

    def record(self, kind: str, data: dict[str, Any]) -> None:
        """Log the numbers of one metrics, checkpoint or DPO rewards event to every sink."""
        picked = sunk_values(kind, data) if self._sinks else None
        if picked is None:
            return
        step, values = picked
        for sink in list(self._sinks):
            try:
                sink.log(values, step)
            except Exception as error:  # a metrics backend's trouble must not end the training
                self._drop(sink, "write to", error)

    def ended(self, result: TrainResult) -> TrainResult:
        """Remember how the run ended (the sinks close with it) and pass the result on."""
        self.status = result.status
        return result

    def close(self) -> None:
        """End every sink's run with the run's status."""
        for sink in list(self._sinks):
            try:
                sink.close(self.status)
            except Exception as error:
                self._drop(sink, "close", error)
        self._sinks.clear()

    def _drop(self, sink: MetricSink, action: str, error: Exception) -> None:
        self._sinks.remove(sink)
        if self._report is not None:
            self._report.message(f"--report_to {sink.name}: could not {action} it ({type(error).__name__}: {error}); "
                                 "its metrics are not reported there any more", level="warn")


def sunk_values(kind: str, data: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """The step and finite numbers an event gives the sinks, or None when it gives none."""
    if kind == "metrics":
        chosen = {name: value for name, value in data.items() if name not in NOT_LOGGED}
    elif kind == "checkpoint":
        metrics = data.get("metrics") or {}
        chosen = {name: metrics[name] for name in CHECKPOINT_ONLY_METRICS if name in metrics}
    else:
        return None
    values = {name: float(value) for name, value in chosen.items() if _is_number(value)}
    step = data.get("step")
    return (int(step), values) if values and isinstance(step, int) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@contextmanager
def open_sinks(options: TrainingOptions, report: Reporter, *, main: bool = True) -> Iterator[MetricSinks]:
    """The sinks --report_to names, open for the run and attached to `report`; closed at the end."""
    names = list(dict.fromkeys(options.report_to or [])) if main else []
    run_ids = RunIds(Path(options.output_dir) / RUN_IDS_FILE)
    opened: list[MetricSink] = []
    for name in names:
        try:
            opened.append(_OPENERS[name](options, report, run_ids))
        except Exception as error:  # a metrics backend's trouble must not stop the training
            report.message(f"--report_to {name}: could not start ({type(error).__name__}: {error}); "
                           "training goes on without it", level="warn")
    run_ids.save()
    sinks = MetricSinks(opened, report)
    previous, report.sinks = report.sinks, sinks
    try:
        yield sinks
    finally:
        report.sinks = previous
        sinks.close()


class RunIds:
    """Each sink's run id in the output folder, so that a resumed run continues the same runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def save(self) -> None:
        if self.ids:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.ids, sort_keys=True))


def run_config(options: TrainingOptions) -> dict[str, Any]:
    """The options a sink records with its run: the API's training fields (no paths of this machine)."""
    shown = options.model_dump(mode="json", include=set(API_TRAINING_FIELDS))
    shown["learning_rate"] = options.resolved_learning_rate
    return shown


def run_name(options: TrainingOptions) -> str:
    """--wandb_name, else the output folder's name (a job's id in the service)."""
    return options.wandb_name or Path(options.output_dir).resolve().name


# ---------------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardSink:
    """Scalars in event files under the output folder's tensorboard/ (torch's SummaryWriter)."""

    name = "tensorboard"

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.folder = folder
        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()  # a TensorBoard watching the folder sees each logging step as it happens

    def close(self, status: str) -> None:
        self._writer.close()


def _open_tensorboard(options: TrainingOptions, report: Reporter, run_ids: RunIds) -> TensorBoardSink:
    sink = TensorBoardSink(Path(options.output_dir) / TENSORBOARD_FOLDER)
    report.message(f"TensorBoard: event files in {sink.folder} (tensorboard --logdir {sink.folder})")
    return sink


# ---------------------------------------------------------------------------------------------------------
# MLflow


MLFLOW_STATUS = {"succeeded": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


class MlflowSink:
    """One MLflow run of the experiment "safetrain", through MlflowClient (no global active run)."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, options: TrainingOptions, run_ids: RunIds) -> None:
        from mlflow.tracking import MlflowClient

        with _file_store_allowed(tracking_uri):  # MLflow builds (and caches) the store here
            self._client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = self._continued_run(run_ids.ids.get(self.name)) or self._new_run(options)
        run_ids.ids[self.name] = self.run_id

    def _continued_run(self, run_id: str | None) -> str | None:
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            self._client.update_run(run_id, status="RUNNING")
        except MlflowException:  # not in this tracking store (SAFETRAIN_MLFLOW_TRACKING_URI changed)
            return None
        return run_id

    def _new_run(self, options: TrainingOptions) -> str:
        from mlflow.entities import Param

        experiment = self._client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(MLFLOW_EXPERIMENT)
        run = self._client.create_run(experiment_id, run_name=run_name(options))
        params = [Param(key, json.dumps(value)) for key, value in sorted(run_config(options).items())]
        self._client.log_batch(run.info.run_id, params=params)
        return str(run.info.run_id)

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, step) for key, value in values.items()])

    def close(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


@contextmanager
def _file_store_allowed(tracking_uri: str) -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set: set it while the store is built."""
    if not tracking_uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


def mlflow_tracking_uri(options: TrainingOptions) -> str:
    """SAFETRAIN_MLFLOW_TRACKING_URI, else a file store in the output folder."""
    return os.environ.get(MLFLOW_TRACKING_URI_VARIABLE) or (Path(options.output_dir) / MLFLOW_FOLDER).resolve().as_uri()


def without_credentials(uri: str) -> str:
    """The URI as an event may show it: no user or password."""
    parts = urlsplit(uri)
    if parts.hostname is None or "@" not in parts.netloc:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def _open_mlflow(options: TrainingOptions, report: Reporter, run_ids: RunIds) -> MlflowSink:
    sink = MlflowSink(mlflow_tracking_uri(options), options, run_ids)
    report.message(f"MLflow: run {sink.run_id} of experiment {MLFLOW_EXPERIMENT!r} at "
                   f"{without_credentials(sink.tracking_uri)}")
    return sink


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases


class WandbSink:
    """One W&B run: online with WANDB_API_KEY in the environment, else offline into the output folder."""

    name = "wandb"

    def __init__(self, options: TrainingOptions, run_ids: RunIds, *, online: bool) -> None:
        import wandb

        self.online = online
        self._run = wandb.init(
            project=options.wandb_project or WANDB_DEFAULT_PROJECT, entity=options.wandb_entity,
            name=run_name(options), tags=options.wandb_tags, config=run_config(options),
            dir=str(Path(options.output_dir).resolve()), mode="online" if online else "offline",
            id=run_ids.ids.get(self.name), resume="allow",
            settings=wandb.Settings(console="off", silent=True),  # the trainer's own events say where it is
        )
        run_ids.ids[self.name] = self._run.id
        self._run.define_metric(WANDB_STEP_METRIC)
        self._run.define_metric("*", step_metric=WANDB_STEP_METRIC)

    @property
    def where(self) -> str:
        """The run's page online, else its offline folder."""
        return str(self._run.url) if self.online else str(Path(self._run.dir).parent)

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log({**values, WANDB_STEP_METRIC: step})  # retried steps too (see WANDB_STEP_METRIC)

    def close(self, status: str) -> None:
        self._run.finish(exit_code=1 if status == "failed" else 0)


def _open_wandb(options: TrainingOptions, report: Reporter, run_ids: RunIds) -> WandbSink:
    online = bool(os.environ.get(WANDB_API_KEY_VARIABLE))
    sink = WandbSink(options, run_ids, online=online)
    if online:
        report.message(f"Weights & Biases: online run {sink.where}")
    else:
        report.message(f"Weights & Biases: offline run in {sink.where} (no {WANDB_API_KEY_VARIABLE} in the "
                       f"trainer's environment); upload it with `wandb sync {sink.where}`")
    return sink


_OPENERS: dict[str, Any] = {"tensorboard": _open_tensorboard, "mlflow": _open_mlflow, "wandb": _open_wandb}
