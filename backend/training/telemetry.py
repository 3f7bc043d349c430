"""Memory and throughput while training: samples from torch and NVML (process RSS without NVIDIA),
written one JSON line per record to `telemetry.jsonl`."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

TELEMETRY_FILENAME = "telemetry.jsonl"
RSS_NOTE = "no NVIDIA GPU: process RSS"

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"tried": False, "module": None}


def _nvml() -> Any | None:
    """The initialised pynvml module, or None where NVML (the NVIDIA driver) is missing; tried once."""
    with _nvml_lock:
        if not _nvml_state["tried"]:
            _nvml_state["tried"] = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["module"] = pynvml
            except Exception:  # ImportError, OSError, NVMLError_LibraryNotFound, driver errors: all mean "no NVML"
                _nvml_state["module"] = None
        return _nvml_state["module"]


def _visible_nvml_handles(pynvml: Any) -> list[tuple[int, Any]]:
    """NVML handles of the GPUs this process may use, honouring CUDA_VISIBLE_DEVICES as CUDA does."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(index, pynvml.nvmlDeviceGetHandleByIndex(index)) for index in range(pynvml.nvmlDeviceGetCount())]
    handles: list[tuple[int, Any]] = []
    for entry in (part.strip() for part in visible.split(",")):
        try:
            if entry.startswith(("GPU-", "MIG-")):
                handles.append((len(handles), pynvml.nvmlDeviceGetHandleByUUID(entry)))
            else:
                handles.append((len(handles), pynvml.nvmlDeviceGetHandleByIndex(int(entry))))
        except (ValueError, pynvml.NVMLError):
            break  # CUDA ignores everything from the first invalid entry on
    return handles


def _peak_rss_bytes(process: psutil.Process) -> int:
    if sys.platform == "win32":
        return int(getattr(process.memory_info(), "peak_wset", 0))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


class MemorySampler:
    """Samples this process's memory: torch CUDA counters and NVML per visible GPU, or process RSS.

    A sample holds `timestamp`, `source` ("nvml", "torch" or "rss"), `rss_bytes`, `peak_rss_bytes`,
    `gpus` (NVML: index, name, used_bytes, total_bytes), `torch` (per CUDA device: allocated_bytes,
    reserved_bytes, peak_allocated_bytes), and the summary `used_bytes` / `peak_bytes` (GPU when there
    is one, else RSS). Without NVIDIA it says so in `note`.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()

    def sample(self) -> dict[str, Any]:
        """One memory sample; never raises for a missing GPU or driver."""
        rss = int(self._process.memory_info().rss)
        record: dict[str, Any] = {
            "timestamp": time.time(),
            "rss_bytes": rss,
            "peak_rss_bytes": max(rss, _peak_rss_bytes(self._process)),
        }
        cuda = _torch_cuda_sample()
        gpus = _nvml_sample()
        if cuda:
            record["torch"] = cuda
        if gpus:
            record["gpus"] = gpus
        if gpus:
            record["source"] = "nvml"
            record["used_bytes"] = sum(gpu["used_bytes"] for gpu in gpus)
        elif cuda:
            record["source"] = "torch"
            record["used_bytes"] = sum(device["reserved_bytes"] for device in cuda)
        else:
            record.update(source="rss", note=RSS_NOTE, used_bytes=rss)
        record["peak_bytes"] = (
            sum(device["peak_allocated_bytes"] for device in cuda) if cuda else record["peak_rss_bytes"]
        )
        return record


def _torch_cuda_sample() -> list[dict[str, int]]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []  # never initialise CUDA just to sample it: that alone costs hundreds of MiB per process
    return [
        {
            "device": index,
            "allocated_bytes": int(torch.cuda.memory_allocated(index)),
            "reserved_bytes": int(torch.cuda.memory_reserved(index)),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(index)),
        }
        for index in range(torch.cuda.device_count())
    ]


def _nvml_sample() -> list[dict[str, Any]]:
    pynvml = _nvml()
    if pynvml is None:
        return []
    try:
        gpus = []
        for index, handle in _visible_nvml_handles(pynvml):
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "used_bytes": int(memory.used),
                    "total_bytes": int(memory.total),
                }
            )
        return gpus
    except pynvml.NVMLError:
        return []


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null: strict JSON readers (browsers, PostgreSQL) reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def to_json_line(record: dict[str, Any]) -> str:
    """One record as a strict JSON line (non-finite floats as null, unknown objects as strings)."""
    return json.dumps(_json_safe(record), allow_nan=False, default=str, separators=(",", ":"))


class TelemetryWriter:
    """Appends records to `telemetry.jsonl`, one JSON line each, flushed as written; a context manager.

    `path` is the output folder (the file goes inside it) or a path ending in `.jsonl`.
    """

    def __init__(self, path: str | Path) -> None:
        target = Path(path)
        self.path = target if target.suffix == ".jsonl" else target / TELEMETRY_FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stream = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it, so a crash loses at most the line being written."""
        line = to_json_line(record) + "\n"
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if not self._stream.closed:
                self._stream.close()

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def read_telemetry(path: str | Path) -> list[dict[str, Any]]:
    """The records of a telemetry file (or of the one in an output folder), skipping a torn last line."""
    target = Path(path)
    file = target if target.suffix == ".jsonl" else target / TELEMETRY_FILENAME
    records = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


class ThroughputMeter:
    """Tokens per second over the last `window_seconds`, and over the whole run."""

    def __init__(self, window_seconds: float = 30.0, clock: Callable[[], float] = time.perf_counter) -> None:
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive (got {window_seconds})")
        self.window_seconds = window_seconds
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Start counting afresh (after a resume or a pause that should not count)."""
        self.total_tokens = 0
        self._started = self._clock()
        # (time, tokens counted so far): the rate is the difference between the newest and oldest points
        self._points: deque[tuple[float, int]] = deque([(self._started, 0)])

    def update(self, tokens: int) -> None:
        """Count `tokens` processed just now."""
        now = self._clock()
        self.total_tokens += int(tokens)
        self._points.append((now, self.total_tokens))
        # keep one point at or before the window's start, so the window is always fully covered
        while len(self._points) > 2 and self._points[1][0] <= now - self.window_seconds:
            self._points.popleft()

    def tokens_per_second(self) -> float:
        """The rate over the last window (0.0 before any time has passed)."""
        (oldest_time, oldest_tokens), (newest_time, newest_tokens) = self._points[0], self._points[-1]
        elapsed = newest_time - oldest_time
        return (newest_tokens - oldest_tokens) / elapsed if elapsed > 0 else 0.0

    def overall_tokens_per_second(self) -> float:
        """The rate since the start (or the last reset), measured up to now."""
        elapsed = self._clock() - self._started
        return self.total_tokens / elapsed if elapsed > 0 else 0.0
