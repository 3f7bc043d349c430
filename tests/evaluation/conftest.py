"""Shared fixtures: a tiny model that always ends its completion at once, with a LoRA adapter, and eval tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from backend.training.tiny_models import make_tiny_model

SOLVED = {
    "task_id": "tiny/solved",
    "prompt": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
UNSOLVED = {
    "task_id": "tiny/unsolved",
    "prompt": 'def sub(a, b):\n    """Subtract b from a."""\n',
    "test": "def check(candidate):\n    assert candidate(5, 3) == 2\n",
    "entry_point": "sub",
}


@pytest.fixture(scope="session")
def silent_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose final norm is zeroed: every logit is equal, so greedy decoding picks token 0 (EOS)."""
    folder = make_tiny_model(tmp_path_factory.mktemp("models") / "silent-llama", arch="llama", layers=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def silent_adapter_dir(silent_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for the silent model (B starts at zero, so it keeps the model's behaviour)."""
    model = AutoModelForCausalLM.from_pretrained(silent_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("adapters") / "silent-lora"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture()
def eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "evals.jsonl"
    path.write_text("\n".join(json.dumps(task) for task in (SOLVED, UNSOLVED)) + "\n")
    return path
