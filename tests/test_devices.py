"""Device choice: the roomiest device that fits, one trainer per GPU (lock files), the CPU without NVIDIA."""

from __future__ import annotations

import uuid

from backend.devices import Device, acquire_device, candidate_devices, list_gpus


def _gpu(free_gib: int) -> Device:
    return Device(f"cuda:{free_gib}", "test GPU", 80 * 2**30, free_gib * 2**30, f"GPU-test-{uuid.uuid4()}")


def test_cpu_when_there_is_no_nvidia_gpu() -> None:
    devices = candidate_devices()
    if list_gpus():  # on a GPU machine the GPUs come first, roomiest first
        assert all(device.is_gpu for device in devices)
        assert [device.free_bytes for device in devices] == sorted((d.free_bytes for d in devices), reverse=True)
    else:
        (cpu,) = devices
        assert cpu.label == "cpu" and not cpu.is_gpu and 0 < cpu.free_bytes <= cpu.total_bytes
        assert cpu.child_environment() == {"CUDA_VISIBLE_DEVICES": ""}  # the trainer sees no GPU at all


def test_roomiest_fitting_gpu_is_held_once() -> None:
    roomy, small = _gpu(40), _gpu(10)
    first = acquire_device(20 * 2**30, [roomy, small])
    assert first is not None and first.device == roomy
    assert first.device.child_environment() == {"CUDA_VISIBLE_DEVICES": roomy.uuid}
    # The roomy GPU is held by a trainer: a second job that needs 20 GiB finds nothing that fits...
    assert acquire_device(20 * 2**30, [roomy, small]) is None
    # ...while a small job gets the other GPU.
    second = acquire_device(5 * 2**30, [roomy, small])
    assert second is not None and second.device == small
    first.release()
    again = acquire_device(20 * 2**30, [roomy, small])
    assert again is not None and again.device == roomy
    again.release()
    second.release()


def test_nothing_fits_a_plan_larger_than_every_device() -> None:
    assert acquire_device(10**18, candidate_devices()) is None
