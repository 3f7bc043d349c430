"""The worker's memory planning before a job runs: max_seq_length "auto" is resolved for the device it gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.devices import Device
from backend.training.memory import GIB
from backend.training.options import TrainingOptions
from backend.workers.jobs.preparation import JobRefused, plan_for_devices
from benchmarks.context_planning import LLAMA_31_8B, qlora_options


def _gpu(free_gib: int) -> Device:
    return Device(label="cuda:0", name="a GPU", total_bytes=free_gib * GIB, free_bytes=free_gib * GIB, uuid="GPU-0")


@pytest.fixture
def llama_8b(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return tmp_path


def _auto(folder: Path) -> TrainingOptions:
    return qlora_options(str(folder), max_seq_length="auto")


def test_auto_becomes_the_longest_length_the_gpu_fits(llama_8b):
    options, plan, notes = plan_for_devices(_auto(llama_8b), llama_8b, [_gpu(24)])

    assert isinstance(options.max_seq_length, int) and options.max_seq_length == plan.max_seq_length > 25_000
    assert plan.fits and plan.device == "cuda" and any("--max_seq_length auto" in note for note in notes)


def test_auto_on_a_gpu_that_fits_nothing_is_refused_naming_the_smallest_budget(llama_8b):
    with pytest.raises(JobRefused) as refused:
        plan_for_devices(_auto(llama_8b), llama_8b, [_gpu(5)])

    assert refused.value.code == "out_of_memory" and refused.value.param == "training.max_seq_length"
    assert "the smallest budget that fits is 7.55 GiB" in refused.value.message


def test_preference_lines_are_measured_for_truncation_by_their_longer_side(worker_models_dir, tmp_path):
    """A DPO file passes the worker's token check; its lines are measured prompt + longer completion."""
    from backend.workers.jobs.preparation import token_warnings

    def line(rejected: str) -> str:
        return json.dumps({
            "input": {"messages": [{"role": "user", "content": "Say yes."}]},
            "preferred_output": [{"role": "assistant", "content": "yes"}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}],
        })

    path = tmp_path / "preferences.jsonl"
    path.write_text(line("no") + "\n" + line("no " * 200) + "\n", encoding="utf-8")
    options = TrainingOptions(model=str(worker_models_dir / "tiny-gpt2"), max_seq_length=64)

    warnings = token_warnings(options, path, "preference")

    assert len(warnings) == 1 and warnings[0].startswith("1 of 2 examples checked are longer than max_seq_length=64")
