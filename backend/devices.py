"""Which device a job trains on: the NVIDIA GPU with the most free memory (pynvml), else the CPU.

Both sides use it: the API plans an estimate against the roomiest GPU, a worker holds one for its child.

One training process at a time per GPU: a worker holds an exclusive lock file per GPU (named by its
UUID, in the machine's temporary folder) for as long as its trainer runs, so two pool processes of the
same machine never pick the same GPU even when both read the free memory before either has allocated.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

LOCK_DIR = Path(tempfile.gettempdir()) / "safetrain-gpu-locks"


@dataclass(frozen=True)
class Device:
    """A place to train: a GPU (`uuid` set) or the CPU."""

    label: str  # "cuda:0" (the NVML index) or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    uuid: str | None = None

    @property
    def is_gpu(self) -> bool:
        return self.uuid is not None

    def child_environment(self) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES for the trainer: this GPU alone (by UUID: NVML and CUDA order GPUs differently)."""
        return {"CUDA_VISIBLE_DEVICES": self.uuid or ""}


@dataclass
class DeviceLease:
    """A device held for one trainer; release() when the trainer has exited."""

    device: Device
    _lock_fd: int | None = None

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library, no GPU: the CPU it is
        return None


def _visible(uuid: str, index: int) -> bool:
    """Whether CUDA_VISIBLE_DEVICES (when set for the worker) includes this GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return True
    wanted = {part.strip() for part in visible.split(",") if part.strip()}
    return str(index) in wanted or uuid in wanted or any(uuid.startswith(part) for part in wanted if "-" in part)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_gpus() -> list[Device]:
    """The NVIDIA GPUs this worker may use, with their free memory now; empty without an NVIDIA driver."""
    pynvml = _nvml()
    if pynvml is None:
        return []
    devices = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            if not _visible(uuid, index):
                continue
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            devices.append(Device(f"cuda:{index}", name, int(memory.total), int(memory.free), uuid))
    finally:
        pynvml.nvmlShutdown()
    return devices


def cpu_device() -> Device:
    """The CPU, with the memory the machine has available now."""
    memory = psutil.virtual_memory()
    return Device("cpu", "cpu", int(memory.total), int(memory.available))


def candidate_devices() -> list[Device]:
    """Unlocked GPUs (all of them when every one is held), most free memory first; else the CPU alone."""
    gpus = list_gpus()
    if not gpus:
        return [cpu_device()]
    free = [gpu for gpu in gpus if not _is_locked(gpu)] or gpus
    return sorted(free, key=lambda gpu: gpu.free_bytes, reverse=True)


def acquire_device(required_bytes: int, candidates: list[Device] | None = None) -> DeviceLease | None:
    """Hold the GPU with the most free memory that fits `required_bytes` (or the CPU); None when none fits now."""
    for device in candidates if candidates is not None else candidate_devices():
        if device.free_bytes < required_bytes:
            continue
        if not device.is_gpu:
            return DeviceLease(device)
        lock_fd = _try_lock(device)
        if lock_fd is not None:
            return DeviceLease(device, lock_fd)
    return None


def _lock_path(device: Device) -> Path:
    return LOCK_DIR / f"{device.uuid}.lock"


def _try_lock(device: Device) -> int | None:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(device), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _is_locked(device: Device) -> bool:
    fd = _try_lock(device)
    if fd is None:
        return True
    os.close(fd)
    return False
