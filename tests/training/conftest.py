"""Shared fixtures for tests/training: tiny random-weight models made once per session (no Hub access)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from backend.training.events import TrainingEvent
from backend.training.tiny_models import make_tiny_model


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine, OpenMP threads spinning against other processes make a
    tiny model's steps many times slower than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (2 layers, 64 wide) with its tokenizer, as safetensors; treat it as read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-models") / "gpt2", arch="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (2 layers, 64 wide, grouped-query attention) with its tokenizer; treat it as read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-models") / "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_model_folders(tiny_gpt2: Path, tiny_llama: Path) -> dict[str, Path]:
    """Both tiny models by architecture name."""
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}


class EventLog(list[TrainingEvent]):
    """The events a run emitted, with helpers to pick them out; pass `events` itself as `on_event`."""

    def __call__(self, event: TrainingEvent) -> None:
        self.append(event)

    def of_kind(self, kind: str) -> list[TrainingEvent]:
        return [event for event in self if event.kind == kind]

    def metrics(self) -> list[dict[str, Any]]:
        return [event.data for event in self.of_kind("metrics")]

    def warnings(self) -> list[str]:
        return [event.message for event in self if event.level == "warn"]


@pytest.fixture
def events() -> EventLog:
    """A fresh event recorder for one run."""
    return EventLog()


@pytest.fixture
def make_events() -> Callable[[], EventLog]:
    """A factory of event recorders, for tests that run more than once."""
    return EventLog


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 distinct short texts with an easy pattern to learn (the multi-process runs train on it)."""
    path = tmp_path_factory.mktemp("data") / "counting.jsonl"
    rows = [{"text": f"Item {i}: {i} {i + 1} {i + 2} {i + 3} {i + 4} come in order."} for i in range(32)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
