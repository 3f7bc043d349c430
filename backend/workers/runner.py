"""Run the trainer of one attempt in a child process and persist what it reports as it comes.

The child (`python -m backend.workers.child`) writes JSON lines on a pipe; this loop reads them with a
timeout so it also writes a heartbeat every `heartbeat_seconds`. Every write returns the job's
requested_action: `cancel` or `pause` sends SIGTERM (the trainer checkpoints at the next step boundary
and exits 75), and a child still alive `stop_grace_seconds` later is killed. A refused write (the
attempt went stale: requeued or reclaimed) kills the child at once, since the next attempt may already
be resuming from the same work folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.services.job_runs import StaleAttemptError
from backend.training.events import TrainingEvent
from backend.workers.gpu import Device
from backend.workers.recorder import AttemptRecorder

logger = logging.getLogger(__name__)

STOP_ACTIONS = ("cancel", "pause")
LOG_TAIL_CHARS = 2000


@dataclass
class TrainerOutcome:
    """How the child ended: its exit code, its TrainResult (as a dict) if it sent one, and why it stopped."""

    returncode: int
    result: dict[str, Any] | None
    stop_reason: str | None  # "cancel", "pause", "stale" or None
    pid: int
    log_path: Path
    peak_bytes: int | None = None

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-LOG_TAIL_CHARS:].strip()


@dataclass
class _LineReader:
    """Whole lines from a pipe read with a timeout; `closed` once the writer is gone."""

    fd: int
    closed: bool = False
    _buffer: bytes = field(default=b"")

    def read(self, timeout: float) -> list[str]:
        if self.closed:
            return []
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return []
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.closed = True
            chunk, self._buffer = self._buffer + b"\n", b""
        else:
            chunk, self._buffer = self._buffer + chunk, b""
        *lines, self._buffer = chunk.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines if line.strip()]

    def drain(self) -> list[str]:
        """Every line still in the pipe (the writer has exited), without waiting for more."""
        lines: list[str] = []
        while not self.closed:
            more = self.read(0)
            if not more and not select.select([self.fd], [], [], 0)[0]:
                break
            lines += more
        return lines


CHILD_MODULE = "backend.workers.child"


def stop_trainers() -> list[int]:
    """SIGTERM every trainer below this process (a worker shutting down): each checkpoints and exits 75."""
    import psutil

    stopped = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if CHILD_MODULE in process.cmdline():
                process.send_signal(signal.SIGTERM)
                stopped.append(process.pid)
    return stopped


def spawn_trainer(
    *, spec: dict[str, Any], work_dir: Path, attempt: int, device: Device, allow_hub: bool
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start the child; return it, the read end of its event pipe and its log file."""
    # The worker's own files go in a subfolder: the work folder's top level is the adapter the job archives.
    attempt_dir = work_dir / "worker"
    attempt_dir.mkdir(parents=True, exist_ok=True)
    spec_path = attempt_dir / f"attempt-{attempt}.spec.json"
    spec_path.write_text(json.dumps({**spec, "parent_pid": os.getpid()}, indent=2), encoding="utf-8")
    log_path = attempt_dir / f"attempt-{attempt}.log"
    env = {**os.environ, **device.child_environment(), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not allow_hub:
        env["HF_HUB_OFFLINE"] = "1"  # a job trains a local folder: nothing reaches the Hub
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(spec_path), str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a Ctrl-C meant for the worker's terminal does not reach the trainer
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds its own copy; EOF on read_fd then means the child is gone
    return process, read_fd, log_path


class TrainerRun:
    """The loop that pumps one child's events into SQL until it exits."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        read_fd: int,
        log_path: Path,
        recorder: AttemptRecorder,
        *,
        heartbeat_seconds: float,
        stop_grace_seconds: float,
    ) -> None:
        self.process = process
        self.reader = _LineReader(read_fd)
        self.log_path = log_path
        self.recorder = recorder
        self.heartbeat_seconds = heartbeat_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.result: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.stop_sent_at: float | None = None

    def wait(self, started_message: str) -> TrainerOutcome:
        """Record `started_message`, then pump events until the child exits; return how it ended."""
        next_beat = time.monotonic() + self.heartbeat_seconds
        pid = self.process.pid
        try:
            self._act_on(self._guarded(lambda: self.recorder.message(started_message, data={"pid": pid})))
            while not self.reader.closed:
                timeout = next_beat - time.monotonic()
                if self.stop_sent_at is not None:
                    timeout = min(timeout, 0.5)
                for line in self.reader.read(timeout):
                    self._handle_line(line)
                if self.stop_reason != "stale" and time.monotonic() >= next_beat:
                    self._act_on(self._guarded(self.recorder.heartbeat))
                    next_beat = time.monotonic() + self.heartbeat_seconds
                self._enforce_grace()
                if self.process.poll() is not None:
                    for line in self.reader.drain():  # whatever the child wrote just before it exited
                        self._handle_line(line)
                    break
        except BaseException:
            self._signal(signal.SIGKILL)  # the attempt cannot record anything more: its trainer must not go on
            raise
        finally:
            os.close(self.reader.fd)
            returncode = self._reap()
        return TrainerOutcome(
            returncode=returncode, result=self.result, stop_reason=self.stop_reason, pid=self.process.pid,
            log_path=self.log_path, peak_bytes=self.recorder.peak_bytes,
        )

    def _handle_line(self, line: str) -> None:
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("job %s: unreadable line from the trainer: %.200s", self.recorder.job_id, line)
            return
        if payload.get("type") == "result":
            self.result = payload.get("result")
        elif payload.get("type") == "event" and self.stop_reason != "stale":
            event = TrainingEvent.from_dict(payload["event"])
            self._act_on(self._guarded(lambda: self.recorder.event(event)))

    def _guarded(self, write: Any) -> str | None:
        """Run a recorder write; a refused fence marks the attempt stale and kills the child."""
        try:
            result: str | None = write()
            return result
        except StaleAttemptError:
            logger.warning("job %s attempt %s is stale: killing its trainer", self.recorder.job_id,
                           self.recorder.attempt)
            self.stop_reason = "stale"
            self._signal(signal.SIGKILL)
            return None

    def _act_on(self, action: str | None) -> None:
        if action in STOP_ACTIONS and self.stop_reason is None:
            self.stop_reason = action
            self.stop_sent_at = time.monotonic()
            self._signal(signal.SIGTERM)

    def _enforce_grace(self) -> None:
        if self.stop_sent_at is not None and time.monotonic() - self.stop_sent_at > self.stop_grace_seconds:
            logger.warning("job %s: trainer ignored SIGTERM for %ss; killing it", self.recorder.job_id,
                           self.stop_grace_seconds)
            self._signal(signal.SIGKILL)
            self.stop_sent_at = None

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def _reap(self) -> int:
        try:
            return self.process.wait(timeout=self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.process.wait()


def run_trainer(
    *,
    spec: dict[str, Any],
    work_dir: Path,
    device: Device,
    recorder: AttemptRecorder,
    heartbeat_seconds: float,
    stop_grace_seconds: float = 120.0,
    allow_hub: bool = False,
) -> TrainerOutcome:
    """Spawn the trainer for `spec` on `device` and persist its reports until it exits."""
    process, read_fd, log_path = spawn_trainer(
        spec=spec, work_dir=work_dir, attempt=recorder.attempt, device=device, allow_hub=allow_hub
    )
    run = TrainerRun(
        process, read_fd, log_path, recorder, heartbeat_seconds=heartbeat_seconds,
        stop_grace_seconds=stop_grace_seconds,
    )
    return run.wait(f"Trainer started (pid {process.pid}) on {device.label}")
