"""Telemetry: memory samples (NVML or process RSS), the JSONL writer, and the tokens/s meter."""

from __future__ import annotations

import json
import mmap
import time

import psutil
import pytest

from backend.training import telemetry
from backend.training.telemetry import (
    RSS_NOTE,
    MemorySampler,
    TelemetryWriter,
    ThroughputMeter,
    read_telemetry,
)


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def test_sample_falls_back_to_rss_and_says_why():
    sample = MemorySampler().sample()

    assert abs(sample["timestamp"] - time.time()) < 5
    rss_now = psutil.Process().memory_info().rss
    assert 0.5 * rss_now < sample["rss_bytes"] < 2 * rss_now
    assert sample["peak_rss_bytes"] >= sample["rss_bytes"]
    json.dumps(sample)  # JSON-ready as it is
    if _has_nvidia_gpu():
        assert sample["source"] == "nvml"
        assert all(0 < gpu["used_bytes"] <= gpu["total_bytes"] for gpu in sample["gpus"])
    else:
        assert sample["source"] == "rss"
        assert sample["note"] == RSS_NOTE == "no NVIDIA GPU: process RSS"
        assert "gpus" not in sample
        assert sample["used_bytes"] == sample["rss_bytes"]
        assert sample["peak_bytes"] == sample["peak_rss_bytes"]


def test_rss_sample_sees_memory_this_process_touches():
    # A fresh anonymous mapping, written page by page: an allocator's cached, already resident pages (which a
    # tensor may reuse) cannot hide the growth.
    size = 64 * 1024 * 1024
    sampler = MemorySampler()
    with mmap.mmap(-1, size) as block:
        before = sampler.sample()
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        after = sampler.sample()
    assert after["rss_bytes"] - before["rss_bytes"] > 48 * 1024 * 1024
    assert after["peak_rss_bytes"] >= after["rss_bytes"]


def test_nvml_is_initialised_once_and_lazily():
    sampler = MemorySampler()
    sampler.sample()
    first = telemetry._nvml()
    sampler.sample()
    assert telemetry._nvml() is first  # the same module (or None) each time: nvmlInit ran once
    assert telemetry._nvml_state["tried"] is True


def test_hidden_gpus_are_not_sampled(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sample = MemorySampler().sample()
    assert "gpus" not in sample
    assert sample["rss_bytes"] > 0


def test_writer_appends_one_flushed_json_line_per_record(tmp_path):
    with TelemetryWriter(tmp_path / "run") as writer:
        writer.write({"step": 1, "loss": 2.5, "memory": MemorySampler().sample()})
        writer.write({"step": 2, "loss": float("nan")})
        # flushed as written: a reader sees both lines before the writer closes
        lines = (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()
        assert len(lines) == 2
    assert writer._stream.closed

    with TelemetryWriter(tmp_path / "run" / "telemetry.jsonl") as writer:  # reopening appends
        writer.write({"step": 3})
    records = [json.loads(line) for line in (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    assert records[1]["loss"] is None  # NaN is not JSON: written as null
    assert records[0]["memory"]["rss_bytes"] > 0


def test_reader_skips_a_torn_last_line(tmp_path):
    with TelemetryWriter(tmp_path) as writer:
        writer.write({"step": 1})
    with (tmp_path / "telemetry.jsonl").open("a") as stream:
        stream.write('{"step": 2, "lo')
    assert read_telemetry(tmp_path) == [{"step": 1}]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_over_a_window():
    clock = _Clock()
    meter = ThroughputMeter(window_seconds=5.0, clock=clock)
    assert meter.tokens_per_second() == 0.0
    for _ in range(10):  # 100 tokens/s for 10 s
        clock.now += 1.0
        meter.update(100)
    assert meter.tokens_per_second() == pytest.approx(100.0)
    for _ in range(10):  # then 300 tokens/s: the window forgets the slower past
        clock.now += 1.0
        meter.update(300)
    assert meter.tokens_per_second() == pytest.approx(300.0)
    assert meter.total_tokens == 4000
    assert meter.overall_tokens_per_second() == pytest.approx(200.0)
    meter.reset()
    assert meter.total_tokens == 0 and meter.tokens_per_second() == 0.0


def test_throughput_with_the_real_clock():
    meter = ThroughputMeter(window_seconds=10.0)
    time.sleep(0.05)
    meter.update(1000)
    assert 0 < meter.tokens_per_second() < 1000 / 0.05 * 1.01
    with pytest.raises(ValueError, match="window_seconds"):
        ThroughputMeter(window_seconds=0)
