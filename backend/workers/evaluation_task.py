"""The evaluation task: claim the evaluation in SQL, run the harness in a child process, record the outcome.

The message carries only the evaluation's id. The child loads the base model with the job's adapter (from
the stored archive) and checks every completion in the sandbox; this process only pumps its reports into
SQL (per-task events, the results, a metrics event with pass@k) and writes a heartbeat meanwhile. The
results also go into the adapter archive's `safetrain.json`, under `evaluations.<id>`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from backend.config import Settings, get_settings
from backend.db.models import now
from backend.services import evaluations
from backend.services.evaluations import ClaimedEvaluation
from backend.services.storage import hash_file
from backend.training.manifest import MANIFEST_FILENAME
from backend.workers.celery_app import app
from backend.workers.evaluation_dispatch import EVALUATION_TASK_NAME, enqueue_evaluation
from backend.workers.gpu import DeviceLease, acquire_device, candidate_devices
from backend.workers.recorder import with_retry

logger = logging.getLogger(__name__)

CHILD_MODULE = "backend.workers.evaluation_child"
LOG_TAIL_CHARS = 600
_COPY_CHUNK = 1 << 20


@app.task(name=EVALUATION_TASK_NAME, ignore_result=True)
def run_evaluation(evaluation_id: str) -> None:
    """Run evaluation `evaluation_id` (the message carries nothing else)."""
    settings = get_settings()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    stale_before = now() - int(settings.heartbeat_expiry_seconds)
    claimed = with_retry(lambda s: evaluations.claim_evaluation(
        session=s, evaluation_id=evaluation_id, worker=worker, stale_before=stale_before))
    if isinstance(claimed, str):
        logger.info("evaluation %s: not run (%s)", evaluation_id, claimed)
        return
    EvaluationRun(claimed, settings).run()


def follow_training(job_id: str) -> None:
    """After an attempt: send the job's waiting evaluations once it succeeded, fail them if it ended otherwise."""
    from sqlalchemy import select

    from backend.db.models import TERMINAL_JOB_STATUSES, Job

    def pending(session: Any) -> list[str]:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status == "succeeded":
            return evaluations.queued_for_job(session=session, job_id=job_id)
        if status is None or status in TERMINAL_JOB_STATUSES:
            evaluations.fail_queued(session=session, job_id=job_id,
                                    reason=f"The job {status or 'was deleted'}: there is no adapter to evaluate.")
        return []

    for evaluation_id in with_retry(pending):
        enqueue_evaluation(evaluation_id)


class EvaluationRun:
    """One claimed attempt of an evaluation, from the adapter archive to the recorded results."""

    def __init__(self, claimed: ClaimedEvaluation, settings: Settings) -> None:
        self.claimed = claimed
        self.settings = settings
        self.work_dir = (settings.job_dir(claimed.job_id) / "evaluations" / claimed.id).resolve()
        self.report: dict[str, Any] | None = None
        self.failure: tuple[str, str] | None = None  # (code, message) sent by the child
        self.stale = False

    def run(self) -> None:
        """Prepare, run the child on a held device, record; any unexpected error fails the evaluation."""
        claimed = self.claimed
        options = claimed.options
        self.event(f"Evaluation {claimed.id} started: {options['mode']}, {options['n_samples']} samples per task, "
                   f"k={options['k']}")
        try:
            spec = self._prepare()
            lease = self._hold_device()
            if lease is None:
                return
            try:
                returncode, log_path = self._run_child(spec, lease)
            finally:
                lease.release()
            if not self.stale:
                self._record(returncode, log_path)
        except Exception as error:
            logger.exception("evaluation %s failed", claimed.id)
            self._fail(f"{type(error).__name__}: {error}")
        finally:
            shutil.rmtree(self.work_dir / "adapter", ignore_errors=True)

    # Writes.

    def event(self, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
        claimed = self.claimed
        with_retry(lambda s: evaluations.append_job_event(
            session=s, job_id=claimed.job_id, attempt=claimed.job_attempt, message=message, level=level, type=type,
            data={"evaluation_id": claimed.id, **(data or {})}))

    def _heartbeat(self) -> bool:
        alive = with_retry(lambda s: evaluations.heartbeat(
            session=s, evaluation_id=self.claimed.id, attempt=self.claimed.attempt))
        self.stale = self.stale or not alive
        return alive

    def _finish(self, status: str, *, results: dict[str, Any] | None = None, error: str | None = None) -> bool:
        claimed = self.claimed
        return with_retry(lambda s: evaluations.finish(
            session=s, evaluation_id=claimed.id, attempt=claimed.attempt, status=status, results=results,
            error=error))

    def _fail(self, message: str) -> None:
        if self._finish("failed", error=message):
            self.event(f"Evaluation {self.claimed.id} failed: {message}", level="error")

    # Steps.

    def _prepare(self) -> dict[str, Any]:
        """Unpack the adapter archive next to a spec for the child; the base model must still be there."""
        claimed, settings = self.claimed, self.settings
        base = (settings.models_dir / claimed.model).resolve()
        if base.parent != settings.models_dir.resolve() or not (base / "config.json").is_file():
            raise FileNotFoundError(f"the base model {claimed.model!r} is no longer in the models directory")
        adapter_dir = self.work_dir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        adapter_dir.mkdir(parents=True)
        with zipfile.ZipFile(settings.data_dir / claimed.adapter_path) as archive:
            for member in archive.namelist():
                if "/" in member or "\\" in member or member.startswith("."):  # the archiver writes flat names
                    raise ValueError(f"unexpected entry {member!r} in the adapter archive")
                with archive.open(member) as source, open(adapter_dir / member, "wb") as target:
                    shutil.copyfileobj(source, target, _COPY_CHUNK)  # adapters can be large: never whole in memory
        return {
            "base_model": str(base), "adapter_dir": str(adapter_dir),
            "eval_data": str((settings.data_dir / claimed.eval_path).resolve()), "options": claimed.options,
            "parent_pid": os.getpid(),
        }

    def _hold_device(self) -> DeviceLease | None:
        """A device with room for inference (weights twice over), waiting with heartbeats; None if gone stale."""
        base = self.settings.models_dir / self.claimed.model
        required = 2 * sum(path.stat().st_size for path in base.glob("*.safetensors"))
        while True:
            lease = acquire_device(required, candidate_devices())
            if lease is not None:
                return lease
            if not self._heartbeat():
                return None
            time.sleep(self.settings.heartbeat_seconds)

    def _run_child(self, spec: dict[str, Any], lease: DeviceLease) -> tuple[int, Path]:
        spec_path = self.work_dir / f"attempt-{self.claimed.attempt}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        log_path = self.work_dir / f"attempt-{self.claimed.attempt}.log"
        env = {**os.environ, **lease.device.child_environment(), "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        read_fd, write_fd = os.pipe()
        try:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", CHILD_MODULE, str(spec_path), str(write_fd)], pass_fds=(write_fd,),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                )
        finally:
            os.close(write_fd)
        try:
            self._pump(process, read_fd)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            raise
        finally:
            os.close(read_fd)
        return process.wait(), log_path

    def _pump(self, process: subprocess.Popen[bytes], read_fd: int) -> None:
        """Read the child's lines until it closes the pipe, with a heartbeat every heartbeat_seconds."""
        buffer = b""
        next_beat = time.monotonic() + self.settings.heartbeat_seconds
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, next_beat - time.monotonic()))
            if ready:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    self._handle(line)
            if time.monotonic() >= next_beat:
                if not self._heartbeat():
                    logger.warning("evaluation %s went stale: killing its child", self.claimed.id)
                    process.send_signal(signal.SIGKILL)
                    return
                next_beat = time.monotonic() + self.settings.heartbeat_seconds
        if buffer.strip():
            self._handle(buffer)

    def _handle(self, line: bytes) -> None:
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("evaluation %s: unreadable line from the child: %.200r", self.claimed.id, line)
            return
        if payload.get("type") == "task":
            task = payload["task"]
            scores = ", ".join(f"{key} {value:.3f}" for key, value in task["pass_at_k"].items())
            self.event(f"Evaluation {self.claimed.id}: task {task['task_id']}: {task['correct']} of {task['n']} "
                       f"samples passed ({scores})", data={"task": task})
        elif payload.get("type") == "result":
            self.report = payload["report"]
        elif payload.get("type") == "error":
            self.failure = (str(payload.get("code")), str(payload.get("message")))

    def _record(self, returncode: int, log_path: Path) -> None:
        if self.report is None:
            if self.failure is not None:
                self._fail(self.failure[1])
                return
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:].strip()
            self._fail(f"the evaluation process ended without a report (exit code {returncode}). {tail}".strip())
            return
        report = self.report
        summary = {key: value for key, value in report.items() if key != "tasks"}
        summary["tasks"] = [{k: v for k, v in task.items() if k != "samples"} for task in report["tasks"]]
        self._write_manifest(summary)
        if not self._finish("succeeded", results=report):
            return
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
            with_retry(lambda s: evaluations.update_artifact_digest(
                session=s, job_id=claimed.job_id, path=claimed.adapter_path, sha256=sha256, size=size))


def rewrite_manifest(archive_path: Path, change: Any) -> None:
    """Rewrite the archive with `change(manifest)` applied to its safetrain.json; other entries copied as they are."""
    temporary = archive_path.with_name(f".{archive_path.name}.rewrite")
    try:
        with zipfile.ZipFile(archive_path) as source, zipfile.ZipFile(temporary, "w") as target:
            names = source.namelist()
            manifest = json.loads(source.read(MANIFEST_FILENAME)) if MANIFEST_FILENAME in names else {}
            change(manifest)
            for info in source.infolist():
                if info.filename != MANIFEST_FILENAME:
                    # A copy: writing resets the entry's offsets and CRC, which the reader's info must keep.
                    with source.open(info) as reader, target.open(copy.copy(info), "w") as writer:
                        shutil.copyfileobj(reader, writer, _COPY_CHUNK)
            target.writestr(MANIFEST_FILENAME, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                            compress_type=zipfile.ZIP_DEFLATED)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, archive_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
