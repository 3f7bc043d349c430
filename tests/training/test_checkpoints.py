"""Checkpoints: whole or absent, complete state restored exactly, incomplete ones skipped, rotation, and a
complete copy found after a crash at any point of a save (unsharded and DeepSpeed's sharded kind alike)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from backend.training import checkpoints
from backend.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    latest_complete_checkpoint,
    load_checkpoint,
    read_trainer_state,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from backend.training.distributed import DEEPSPEED_STATE_DIR, Ranks

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


def test_a_lora_checkpoint_names_its_base_by_name_and_loads_elsewhere_and_resumes(tiny_gpt2, tmp_path):
    model = _lora(tiny_gpt2)
    optimizer, scheduler = _trained(model)

    path = save_checkpoint(tmp_path / "run", model=model, optimizer=optimizer, scheduler=scheduler, state=_state(5),
                           save_total_limit=2)

    text = (path / "adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == tiny_gpt2.name  # "gpt2", as the final adapter names it
    assert str(tiny_gpt2) not in text and str(tmp_path) not in text and '"/' not in text
    assert not (path / "README.md").exists()  # peft's model card would carry the path again
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_gpt2)  # the live model is untouched
    moved = shutil.copytree(tiny_gpt2, tmp_path / "elsewhere" / tiny_gpt2.name)  # the base on another machine
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved), path)
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    fresh = _lora(tiny_gpt2)
    fresh_optimizer, fresh_scheduler = _trained(fresh)
    assert load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler).step == 5
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-6)


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


class OneRankWritingAShard(Ranks):
    """DeepSpeed's part of a sharded checkpoint, without DeepSpeed: this rank's shard is one small file."""

    def __init__(self, content: str) -> None:
        self.content = content

    def save_sharded_state(self, folder: Path) -> None:
        (folder / DEEPSPEED_STATE_DIR).mkdir()
        (folder / DEEPSPEED_STATE_DIR / "shard.bin").write_text(self.content)


def _save_sharded(output_dir: Path, step: int, content: str) -> Path:
    return save_sharded_checkpoint(output_dir, ranks=OneRankWritingAShard(content),
                                   state=TrainerState(step=step, metrics={"write": content}), save_total_limit=2)


def _shard(path: Path) -> str:
    return (path / DEEPSPEED_STATE_DIR / "shard.bin").read_text()


def test_a_sharded_checkpoint_is_fsynced_before_its_marker_and_renamed_complete(tmp_path, monkeypatch):
    synced: list[set[str]] = []
    real_fsync_tree = checkpoints._fsync_tree

    def recording_fsync_tree(folder: Path) -> None:
        synced.append({str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()})
        real_fsync_tree(folder)

    monkeypatch.setattr(checkpoints, "_fsync_tree", recording_fsync_tree)

    path = _save_sharded(tmp_path, 5, "first")

    shard = f"{DEEPSPEED_STATE_DIR}/shard.bin"
    assert synced == [{shard, "trainer_state.json"}, {shard, "trainer_state.json", COMPLETE_MARKER}]
    assert path == tmp_path / "checkpoint-5" and (path / COMPLETE_MARKER).read_text() == "5\n"
    assert read_trainer_state(path).metrics == {"write": "first"} and _shard(path) == "first"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["checkpoint-5"]


def _replay_step_4_and_die(output_dir: Path, kill_point: str) -> None:
    """In a child: write checkpoint-4 again (a replayed step) and exit hard at `kill_point`, as a crash would."""
    real_rename = os.rename

    def rename_then_die(source: str | Path, target: str | Path) -> None:
        real_rename(source, target)
        moved_aside = Path(target).name.startswith(checkpoints.ASIDE_PREFIX)
        if (kill_point == "old copy moved aside") == moved_aside:
            os._exit(17)

    if kill_point == "before any rename":
        checkpoints._replace_folder = lambda source, target: os._exit(17)  # type: ignore[assignment]
    else:
        checkpoints.os.rename = rename_then_die  # type: ignore[assignment]
    _save_sharded(output_dir, 4, "replay")
    os._exit(0)


@pytest.mark.parametrize(
    ("kill_point", "found"),
    [("before any rename", "first"), ("old copy moved aside", "first"), ("new copy renamed in", "replay")],
)
def test_a_crash_while_a_checkpoint_replaces_its_older_copy_leaves_one_complete(tmp_path, kill_point, found):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the crash is a forked child's os._exit")
    _save_sharded(tmp_path, 2, "older")
    _save_sharded(tmp_path, 4, "first")

    child = multiprocessing.get_context("fork").Process(target=_replay_step_4_and_die, args=(tmp_path, kill_point))
    child.start()
    child.join(60)

    assert child.exitcode == 17
    if kill_point == "old copy moved aside":  # the crash landed between the two renames
        assert not (tmp_path / "checkpoint-4").exists() and (tmp_path / ".old-checkpoint-4" / COMPLETE_MARKER).exists()
    resumed = resolve_resume_checkpoint("latest", tmp_path)
    assert resumed == tmp_path / "checkpoint-4" and (resumed / COMPLETE_MARKER).is_file()
    assert read_trainer_state(resumed).metrics == {"write": found} and _shard(resumed) == found
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert not (tmp_path / ".old-checkpoint-4").exists()
