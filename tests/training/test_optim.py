"""--optim: torch's AdamW or bitsandbytes' 8-bit AdamW (on the CPU since bitsandbytes 0.50), and the plan's term."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from backend.training import options as options_module
from backend.training import trainer
from backend.training.checkpoints import read_trainer_state
from backend.training.memory_estimate import estimate_memory, optimizer_state_bytes
from backend.training.model_shape import load_model_config, lora_layers, lora_targets, model_shape
from backend.training.options import TrainingOptions
from backend.training.tiny_models import tiny_config
from backend.training.trainer import new_optimizer, run_training

pytest.importorskip("bitsandbytes")


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0  # the step counter is a scalar
    )


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(1, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
def test_planned_optimizer_states_equal_the_live_ones(tiny_model_folders, arch, optim):
    folder = tiny_model_folders[arch]
    options = TrainingOptions(model=str(folder), optim=optim)
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = new_optimizer([p for p in model.parameters() if p.requires_grad], options)
    _one_step(model, optimizer)

    shape = model_shape(load_model_config(str(folder)))
    planned = optimizer_state_bytes(options, shape, [])
    assert planned == _state_bytes(optimizer)
    if optim != "adamw_torch":
        big = [p for p in model.parameters() if p.numel() >= 4096]
        assert all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in big)
        assert all(optimizer.state[p]["state2"].dtype == torch.uint8 for p in big)


def test_planned_lora_optimizer_states_equal_the_live_ones(tiny_llama):
    from peft import LoraConfig, get_peft_model

    options = TrainingOptions(model=str(tiny_llama), use_lora=True, lora_r=64, optim="adamw_8bit")
    config = load_model_config(str(tiny_llama))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=64, target_modules=lora_targets(options, config)))
    optimizer = new_optimizer([p for p in model.parameters() if p.requires_grad], options)
    _one_step(model, optimizer)

    adapted = lora_layers(model_shape(config), lora_targets(options, config))
    assert optimizer_state_bytes(options, model_shape(config), adapted) == _state_bytes(optimizer)


def test_eight_bit_states_are_a_quarter_in_the_plan_at_a_real_width():
    config = tiny_config("llama", 32_000, hidden=1024, layers=4, heads=8)  # planned only: nothing is allocated
    fp32 = estimate_memory(TrainingOptions(), config, device="cpu").breakdown.optimizer
    eight = estimate_memory(TrainingOptions(optim="adamw_8bit"), config, device="cpu").breakdown.optimizer
    assert 0.25 < eight / fp32 < 0.26
    saved = estimate_memory(TrainingOptions(optim="adamw_8bit"), config, device="cpu").savings["optim"]
    assert saved == fp32 - eight


def test_a_full_fine_tune_with_adamw_8bit_lowers_the_loss(tiny_llama, learnable_data, tmp_path, single_torch_thread):
    options = TrainingOptions(
        model=str(tiny_llama), data=str(learnable_data), output_dir=str(tmp_path / "run"), optim="adamw_8bit",
        learning_rate=3e-3, max_seq_length=32, per_device_train_batch_size=4, max_steps=12, logging_steps=1,
        gradient_checkpointing=False,
    )
    captured: list[torch.optim.Optimizer] = []
    with pytest.MonkeyPatch.context() as patch:

        def recording(parameters: list[torch.nn.Parameter], opts: TrainingOptions) -> torch.optim.Optimizer:
            captured.append(new_optimizer(parameters, opts))
            return captured[-1]

        patch.setattr(trainer, "new_optimizer", recording)
        result = run_training(options)
    assert result.status == "succeeded", result.error_message
    losses = read_trainer_state(tmp_path / "run" / "checkpoint-12").recent_losses
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    (optimizer,) = captured
    big = [state for parameter, state in optimizer.state.items() if parameter.numel() >= 4096]
    assert big and all(state["state1"].dtype == state["state2"].dtype == torch.uint8 for state in big)
    assert "bitsandbytes" in type(optimizer).__module__


def test_eight_bit_optimizers_are_refused_without_bitsandbytes(monkeypatch):
    real = options_module.importlib.util.find_spec
    monkeypatch.setattr(options_module.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "bitsandbytes" else real(name, *rest))
    with pytest.raises(ValueError, match="--optim paged_adamw_8bit needs bitsandbytes"):
        TrainingOptions(optim="paged_adamw_8bit")
    assert TrainingOptions(optim="adamw_torch").optim == "adamw_torch"


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="adamw_torch"):
        TrainingOptions(optim="sgd")  # type: ignore[arg-type]


def test_a_resumed_8bit_run_continues_as_if_uninterrupted(tiny_llama, learnable_data, tmp_path, single_torch_thread):
    import shutil

    def options(output_dir: Path, **extra: object) -> TrainingOptions:
        return TrainingOptions(
            model=str(tiny_llama), data=str(learnable_data), output_dir=str(output_dir), optim="adamw_8bit",
            learning_rate=3e-3, max_seq_length=32, per_device_train_batch_size=4, max_steps=4, save_steps=2,
            logging_steps=1, gradient_checkpointing=False, **extra,
        )

    whole = tmp_path / "whole"
    assert run_training(options(whole)).status == "succeeded"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")  # the 8-bit states are in optimizer.pt
    result = run_training(options(resumed, resume_from_checkpoint="latest"))
    assert result.status == "succeeded", result.error_message
    expected = read_trainer_state(whole / "checkpoint-4").recent_losses
    assert read_trainer_state(resumed / "checkpoint-4").recent_losses == pytest.approx(expected, abs=1e-5)
