"""Checkpoints: whole or absent, complete state restored exactly, incomplete ones skipped, rotation."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from backend.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    latest_complete_checkpoint,
    load_checkpoint,
    resolve_resume_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _trained(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One AdamW step on the model, so the optimizer has state worth saving."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def _lora(folder: Path) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(folder)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))


def _state(step: int) -> TrainerState:
    return TrainerState(step=step, epoch=1, examples_seen_in_epoch=6, micro_batch_size=1,
                        gradient_accumulation_steps=4, effective_batch_size=4, lr_scale=0.5, recent_losses=[2.5])


def test_a_checkpoint_holds_the_complete_state_and_no_temporary_folder(tiny_gpt2, tmp_path):
    model = _lora(tiny_gpt2)
    optimizer, scheduler = _trained(model)

    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=_state(7),
                           save_total_limit=3)

    assert path == tmp_path / "checkpoint-7"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pt",
            "trainer_state.json", COMPLETE_MARKER} <= {item.name for item in path.iterdir()}
    assert not [item for item in tmp_path.iterdir() if item.name.startswith(".")]
    saved = json.loads((path / "trainer_state.json").read_text())
    assert saved["step"] == 7 and saved["micro_batch_size"] == 1 and saved["lr_scale"] == 0.5


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_loading_restores_weights_optimizer_scheduler_and_rng(tiny_gpt2, tmp_path, kind):
    model = _lora(tiny_gpt2) if kind == "lora" else AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    optimizer, scheduler = _trained(model)
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=_state(3),
                           save_total_limit=2)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    expected_weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    fresh = _lora(tiny_gpt2) if kind == "lora" else AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    fresh_optimizer, fresh_scheduler = _trained(fresh)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)

    assert state.step == 3 and state.examples_seen_in_epoch == 6
    for name, parameter in fresh.named_parameters():
        if name in expected_weights:
            assert torch.equal(parameter, expected_weights[name]), name
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    original_state = optimizer.state_dict()["state"][0]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], original_state["exp_avg"])
    assert random.random() == expected_draws[0]
    assert np.random.rand() == expected_draws[1]
    assert torch.equal(torch.rand(3), expected_draws[2])


def test_incomplete_checkpoints_are_skipped(tiny_gpt2, tmp_path):
    model = _lora(tiny_gpt2)
    optimizer, scheduler = _trained(model)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=_state(4),
                    save_total_limit=5)
    # What a crash leaves: a half-written temporary folder, and a folder without its COMPLETE marker.
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / ".tmp-checkpoint-9")
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / COMPLETE_MARKER).unlink()

    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert resolve_resume_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-4"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)
    assert resolve_resume_checkpoint("latest", tmp_path / "empty") is None


def test_rotation_keeps_the_newest_and_a_replayed_step_replaces_its_checkpoint(tiny_gpt2, tmp_path):
    model = _lora(tiny_gpt2)
    optimizer, scheduler = _trained(model)
    for step in (2, 4, 6, 4):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=_state(step),
                        save_total_limit=2)

    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
