"""One claimed attempt of an evaluation, from the adapter archive to the recorded results.

The child (`python -m backend.workers.evaluations.child`) loads the base model with the job's adapter and
checks every completion in the sandbox; this process runs it under the shared supervisor, which pumps its
reports into SQL (per-task events, the results, a metrics event with pass@k) and heartbeats meanwhile. The
results also go into the adapter archive's `safetrain.json`, under `evaluations.<id>`.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from typing import Any

from backend.config import Settings
from backend.db.fence import StaleAttemptError
from backend.db.models import now
from backend.db.statuses import EvaluationStatus
from backend.devices import DeviceLease
from backend.services import evaluation_runs
from backend.services.evaluation_runs import ClaimedEvaluation
from backend.services.storage import hash_file
from backend.workers.adapter_archive import rewrite_manifest, unpack_beside_base
from backend.workers.jobs.recorder import with_retry
from backend.workers.supervisor import ChildExit, ChildSpec, Supervisor, hold_device

logger = logging.getLogger(__name__)

CHILD_MODULE = "backend.workers.evaluations.child"
LOG_TAIL_CHARS = 600
STOP_GRACE_SECONDS = 120.0


class EvaluationRun:
    """One claimed attempt of an evaluation, from the adapter archive to the recorded results."""

    def __init__(self, claimed: ClaimedEvaluation, settings: Settings) -> None:
        self.claimed = claimed
        self.settings = settings
        self.work_dir = (settings.job_dir(claimed.job_id) / "evaluations" / claimed.id).resolve()
        self.report: dict[str, Any] | None = None
        self.failure: tuple[str, str] | None = None  # (code, message) sent by the child

    def run(self) -> None:
        """Prepare, run the child on a held device, record; any unexpected error fails the evaluation."""
        claimed = self.claimed
        options = claimed.options
        self.event(f"Evaluation {claimed.id} started: {options['mode']}, {options['n_samples']} samples per task, "
                   f"k={options['k']}")
        try:
            self._run_on_a_device()
        except StaleAttemptError:
            logger.warning("evaluation %s attempt %s went stale; its writes are refused", claimed.id,
                           claimed.attempt)
        except Exception as error:
            logger.exception("evaluation %s failed", claimed.id)
            self._fail(f"{type(error).__name__}: {error}")
        finally:
            shutil.rmtree(self.work_dir / "adapter", ignore_errors=True)

    def _run_on_a_device(self) -> None:
        spec = self._prepare()
        base = self.settings.models_dir / self.claimed.model
        required = 2 * sum(path.stat().st_size for path in base.glob("*.safetensors"))  # weights twice over
        lease = hold_device(required, still_wanted=self._still_wanted, interval=self.settings.heartbeat_seconds)
        if lease is None:
            return
        try:
            ended = self._supervise(spec, lease)
        finally:
            lease.release()
        if ended.stop_reason != "stale":
            self._record(ended)

    # Writes.

    def event(self, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        """An event on the evaluated job, naming this evaluation."""
        claimed = self.claimed
        with_retry(lambda s: evaluation_runs.append_job_event(
            session=s, job_id=claimed.job_id, attempt=claimed.job_attempt, message=message, level=level, type=type,
            data={"evaluation_id": claimed.id, **(data or {})}))

    def _heartbeat(self) -> None:
        with_retry(lambda s: evaluation_runs.heartbeat(
            session=s, evaluation_id=self.claimed.id, attempt=self.claimed.attempt))

    def _still_wanted(self) -> bool:
        self._heartbeat()  # a stale attempt raises: nothing more is wanted of it
        return True

    def _finish(self, status: EvaluationStatus, *, results: dict[str, Any] | None = None,
                error: str | None = None) -> None:
        claimed = self.claimed
        with_retry(lambda s: evaluation_runs.finish(
            session=s, evaluation_id=claimed.id, attempt=claimed.attempt, status=status, results=results,
            error=error))

    def _fail(self, message: str) -> None:
        try:
            self._finish(EvaluationStatus.FAILED, error=message)
        except StaleAttemptError:
            return  # another attempt owns the evaluation: its failure is not this one's to record
        self.event(f"Evaluation {self.claimed.id} failed: {message}", level="error")

    # Steps.

    def _prepare(self) -> dict[str, Any]:
        """Unpack the adapter archive next to a spec for the child; the base model must still be there."""
        claimed, settings = self.claimed, self.settings
        adapter_dir = self.work_dir / "adapter"
        base = unpack_beside_base(settings, model=claimed.model, adapter_path=claimed.adapter_path, folder=adapter_dir)
        return {
            "base_model": str(base), "adapter_dir": str(adapter_dir),
            "eval_data": str((settings.data_dir / claimed.eval_path).resolve()), "options": claimed.options,
        }

    def _supervise(self, spec: dict[str, Any], lease: DeviceLease) -> ChildExit:
        child = ChildSpec(module=CHILD_MODULE, spec=spec, folder=self.work_dir, attempt=self.claimed.attempt,
                          device=lease.device)
        supervisor = Supervisor(
            child, handle_line=self._handle, heartbeat=self._heartbeat,
            heartbeat_seconds=self.settings.heartbeat_seconds, stop_grace_seconds=STOP_GRACE_SECONDS,
            label=f"evaluation {self.claimed.id} attempt {self.claimed.attempt}",
        )
        return supervisor.wait()

    def _handle(self, payload: dict[str, Any]) -> None:
        if payload.get("type") == "task":
            task = payload["task"]
            scores = ", ".join(f"{key} {value:.3f}" for key, value in task["pass_at_k"].items())
            self.event(f"Evaluation {self.claimed.id}: task {task['task_id']}: {task['correct']} of {task['n']} "
                       f"samples passed ({scores})", data={"task": task})
        elif payload.get("type") == "result":
            self.report = payload["report"]
        elif payload.get("type") == "error":
            self.failure = (str(payload.get("code")), str(payload.get("message")))

    def _record(self, ended: ChildExit) -> None:
        if self.report is None:
            if self.failure is not None:
                self._fail(self.failure[1])
                return
            tail = ended.log_tail(LOG_TAIL_CHARS)
            self._fail(f"the evaluation process ended without a report (exit code {ended.returncode}). {tail}".strip())
            return
        report = self.report
        summary = {key: value for key, value in report.items() if key != "tasks"}
        summary["tasks"] = [{k: v for k, v in task.items() if k != "samples"} for task in report["tasks"]]
        self._write_manifest(summary)
        self._finish(EvaluationStatus.SUCCEEDED, results=report)
        scores = ", ".join(f"{key} {value:.3f}" for key, value in report["pass_at_k"].items())
        self.event(f"Evaluation {self.claimed.id} succeeded on {len(report['tasks'])} tasks ({report['mode']}): "
                   f"{scores}")
        self.event(f"Evaluation {self.claimed.id}: {scores}", type="metrics",
                   data={**report["pass_at_k"], "n_samples": report["n_samples"], "n_tasks": len(report["tasks"]),
                         "mode": report["mode"]})

    def _write_manifest(self, summary: dict[str, Any]) -> None:
        """Add the results to the stored archive's safetrain.json (rewritten whole, then renamed into place)."""
        claimed = self.claimed
        path = self.settings.data_dir / claimed.adapter_path
        entry = {**summary, "id": claimed.id, "options": claimed.options, "finished_at": now()}
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two evaluations of one adapter must not lose each other's entry
            rewrite_manifest(path, lambda manifest: manifest.setdefault("evaluations", {}).update({claimed.id: entry}))
            sha256, size = hash_file(path)
            with_retry(lambda s: evaluation_runs.update_artifact_digest(
                session=s, job_id=claimed.job_id, path=claimed.adapter_path, sha256=sha256, size=size))
