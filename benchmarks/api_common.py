"""What the API benchmarks share: servers in subprocesses, a lean keep-alive load generator, RESULTS.md."""

from __future__ import annotations

import asyncio
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stack_env(data_dir: Path, models_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a safetrain process: this machine's, minus other SAFETRAIN_*, plus these."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAFETRAIN_")}
    env.update(SAFETRAIN_DATA_DIR=str(data_dir), SAFETRAIN_MODELS_DIR=str(models_dir), PYTHONUNBUFFERED="1")
    env.update({f"SAFETRAIN_{key.upper()}": value for key, value in settings.items()})
    return env


def safetrain(env: dict[str, str], *args: str) -> str:
    """Run a `safetrain` subcommand; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"safetrain {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def start_uvicorn(app: str, port: int, env: dict[str, str], log: Path, app_dir: Path | None = None) -> subprocess.Popen:
    """One uvicorn process (uvloop + httptools, no access log) serving the app factory `module:function`."""
    argv = [sys.executable, "-m", "uvicorn", "--factory", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"]
    if app_dir is not None:
        argv += ["--app-dir", str(app_dir)]
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/healthz", process, log)
    return process


def start_safetrain(args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backend.cli", *args], env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class LoadResult:
    """Latencies (seconds) of the requests answered in the measured window."""

    latencies: list[float]
    seconds: float
    errors: int
    error_codes: tuple[int, ...] = ()
    answered: int = 0  # every 200, warm-up included (server CPU is counted over the whole slice)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def summary(self) -> str:
        return (
            f"{self.requests_per_second:8.0f} req/s  p50 {self.percentile(0.5) * 1000:6.1f} ms  "
            f"p99 {self.percentile(0.99) * 1000:6.1f} ms  ({len(self.latencies)} requests, {self.errors} errors"
            + (f" {list(self.error_codes)})" if self.error_codes else ")")
        )


async def _client(
    port: int,
    request: bytes,
    start: float,
    stop_at: float,
    interval: float | None,
    record: LoadRecord,
) -> None:
    """Send `request` back to back, or (with `interval`) once every `interval` seconds from a random phase.

    With an interval a latency counts from the moment the request was due, not from when it was sent: a late
    answer also delays the next request, and that wait is part of what a polling client sees.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    due = time.perf_counter() + (random.uniform(0, interval) if interval else 0.0)
    try:
        while True:
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent = due if interval else time.perf_counter()
            if sent >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if interval:
                due += interval
            if head[9:12] != b"200":
                record.errors.append(int(head[9:12]))
                continue
            record.answered += 1
            if sent >= start:
                record.latencies.append(done - sent)
    finally:
        writer.close()


@dataclass
class LoadRecord:
    latencies: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    answered: int = 0


def hammer(
    port: int,
    path: str,
    headers: dict[str, str],
    *,
    clients: int,
    seconds: float,
    warmup: float,
    interval: float | None = None,
) -> LoadResult:
    """`clients` keep-alive connections sending GET path, back to back or every `interval` s; latencies after
    the warm-up."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    record = LoadRecord()

    async def run() -> None:
        start = time.perf_counter() + warmup
        stop_at = start + seconds
        connections = [_client(port, request, start, stop_at, interval, record) for _ in range(clients)]
        await asyncio.gather(*connections)

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    errors = record.errors
    return LoadResult(record.latencies, seconds, len(errors), tuple(sorted(set(errors))), record.answered)


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def append_results(heading: str, lines: Sequence[str]) -> None:
    """Add a dated section to benchmarks/RESULTS.md."""
    stamp = datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    block = [f"## {heading}", "", f"- date: {stamp}", f"- machine: {machine()}", *lines, ""]
    with RESULTS.open("a") as results:
        if results.tell() == 0:
            results.write("# Benchmark results\n\n")
        results.write("\n".join(block) + "\n")
