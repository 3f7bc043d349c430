"""Run one attempt's work in a child process and pump what it reports into SQL as it comes.

Every kind of leased work runs its child the same way: `python -m <module> <spec.json> <event_fd>` with the
device's environment, stdout and stderr in the attempt's log file, and one JSON object a line on the pipe
`event_fd`. This loop reads those lines with a timeout, so it also writes a heartbeat every
`heartbeat_seconds`. A write may return a requested action: `cancel` or `pause` sends SIGTERM (the child
checkpoints at its next step boundary and exits), and a child still alive `stop_grace_seconds` later is
killed. A refused write (StaleAttemptError: the attempt was requeued or reclaimed) kills the child at once,
since the next attempt may already be using the same work folder. Whatever the child wrote just before it
exited is drained and handled before the loop ends.
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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.db.fence import StaleAttemptError
from backend.devices import Device, DeviceLease, acquire_device, candidate_devices

logger = logging.getLogger(__name__)

STOP_ACTIONS = ("cancel", "pause")


@dataclass
class LineReader:
    """Whole lines from a pipe read with a timeout; `closed` once the writer is gone."""

    fd: int
    closed: bool = False
    _buffer: bytes = field(default=b"")

    def read(self, timeout: float) -> list[str]:
        """The lines that arrive within `timeout` seconds (none when nothing does)."""
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


@dataclass
class ChildExit:
    """How a child ended: its exit code, why it was stopped ("cancel", "pause", "stale" or None), its log."""

    returncode: int
    stop_reason: str | None
    pid: int
    log_path: Path

    def log_tail(self, chars: int) -> str:
        """The last `chars` characters of the child's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()


@dataclass(frozen=True)
class ChildSpec:
    """What to start: the child's module, its spec, the folder for its spec and log files, and its device."""

    module: str
    spec: dict[str, Any]
    folder: Path
    attempt: int
    device: Device
    allow_hub: bool = False


def spawn(child: ChildSpec) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start the child; return it, the read end of its event pipe and its log file."""
    child.folder.mkdir(parents=True, exist_ok=True)
    spec_path = child.folder / f"attempt-{child.attempt}.spec.json"
    spec_path.write_text(json.dumps({**child.spec, "parent_pid": os.getpid()}, indent=2), encoding="utf-8")
    log_path = child.folder / f"attempt-{child.attempt}.log"
    env = {**os.environ, **child.device.child_environment(), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if not child.allow_hub:
        env["HF_HUB_OFFLINE"] = "1"  # the child reads local folders: nothing reaches the Hub
    read_fd, write_fd = os.pipe()
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", child.module, str(spec_path), str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a Ctrl-C meant for the worker's terminal does not reach the child
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds its own copy; EOF on read_fd then means the child is gone
    return process, read_fd, log_path


class Supervisor:
    """Pumps one child's lines into `handle_line` and beats `heartbeat` until the child exits.

    Both callbacks return the row's requested action (or None) and raise StaleAttemptError when the attempt
    lost the row.
    """

    def __init__(
        self,
        child: ChildSpec,
        *,
        handle_line: Callable[[dict[str, Any]], str | None],
        heartbeat: Callable[[], str | None],
        heartbeat_seconds: float,
        stop_grace_seconds: float,
        label: str,
    ) -> None:
        self.process, fd, self.log_path = spawn(child)
        self.reader = LineReader(fd)
        self.handle_line = handle_line
        self.heartbeat = heartbeat
        self.heartbeat_seconds = heartbeat_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.label = label  # "job <id> attempt <n>", for the log
        self.stop_reason: str | None = None
        self.stop_sent_at: float | None = None

    def wait(self, first_write: Callable[[], str | None] | None = None) -> ChildExit:
        """Run `first_write`, then pump lines until the child exits; return how it ended."""
        next_beat = time.monotonic() + self.heartbeat_seconds
        try:
            if first_write is not None:
                self._act_on(self._guarded(first_write))
            while not self.reader.closed:
                timeout = next_beat - time.monotonic()
                if self.stop_sent_at is not None:
                    timeout = min(timeout, 0.5)
                for line in self.reader.read(timeout):
                    self._handle(line)
                if self.stop_reason != "stale" and time.monotonic() >= next_beat:
                    self._act_on(self._guarded(self.heartbeat))
                    next_beat = time.monotonic() + self.heartbeat_seconds
                self._enforce_grace()
                if self.process.poll() is not None:
                    for line in self.reader.drain():  # whatever the child wrote just before it exited
                        self._handle(line)
                    break
        except BaseException:
            self._signal(signal.SIGKILL)  # the attempt cannot record anything more: its child must not go on
            raise
        finally:
            os.close(self.reader.fd)
            returncode = self._reap()
        return ChildExit(returncode=returncode, stop_reason=self.stop_reason, pid=self.process.pid,
                         log_path=self.log_path)

    def _handle(self, line: str) -> None:
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: unreadable line from the child: %.200s", self.label, line)
            return
        if self.stop_reason == "stale" and payload.get("type") != "result":
            return  # a stale attempt records nothing more
        self._act_on(self._guarded(lambda: self.handle_line(payload)))

    def _guarded(self, write: Callable[[], str | None]) -> str | None:
        """Run a write; a refused fence marks the attempt stale and kills the child."""
        try:
            return write()
        except StaleAttemptError:
            logger.warning("%s is stale: killing its child", self.label)
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
            logger.warning("%s: the child ignored SIGTERM for %ss; killing it", self.label, self.stop_grace_seconds)
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


def hold_device(
    required_bytes: int, *, still_wanted: Callable[[], bool], interval: float, candidates: list[Device] | None = None
) -> DeviceLease | None:
    """The roomiest device that fits `required_bytes`, waiting while others hold them; between tries
    `still_wanted()` heartbeats (and may raise StaleAttemptError); None once it answers False."""
    while True:
        lease = acquire_device(required_bytes, candidates)
        if lease is not None:
            return lease
        if not still_wanted():
            return None
        time.sleep(interval)
        candidates = candidate_devices()


@contextlib.contextmanager
def beating(beat: Callable[[], bool], *, interval: float, name: str) -> Iterator[None]:
    """Call `beat` from thread `name` every `interval` seconds while the caller works, until it returns False."""
    stopping = threading.Event()

    def loop() -> None:
        while not stopping.wait(interval):
            if not beat():
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join()
