"""DPO on preference pairs: the loss and LoRA gradients equal TRL's, and a short run learns a preference."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.training.chunked_loss import chunked_loss_head
from backend.training.datasets import IGNORE_INDEX
from backend.training.dpo import RewardTally, collate_pairs, dpo_sigmoid_losses, pair_logps
from backend.training.model_shape import model_shape
from backend.training.options import TrainingOptions
from backend.training.preference_data import PreferenceExample, tokenize_preferences
from backend.training.trainer import run_training
from tests.training.conftest import EventLog

BETA = 0.1


def _line(question: str, good: str, bad: str) -> dict[str, Any]:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


TWO_PAIRS = [_line("Add 2 and 3.", "5", "It is 23, I think."), _line("Say hi.", "Hello there!", "No.")]


def _pairs(folder: Path) -> list[PreferenceExample]:
    return tokenize_preferences(TWO_PAIRS, AutoTokenizer.from_pretrained(folder), max_seq_length=64)


def _ours(model: Any, pairs: list[PreferenceExample], chunked: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    head = chunked_loss_head(model) if chunked else None
    logps = pair_logps(model, collate_pairs(pairs, 0), head, contextlib.nullcontext())
    loss = dpo_sigmoid_losses(*logps, BETA)[0].mean()
    loss.backward()
    return loss.detach(), _lora_grads(model)


def _trl_trainer(folder: Path, tmp_path: Path) -> Any:
    """TRL 1.16's DPOTrainer (sigmoid loss) adding a new LoRA adapter itself, so its reference is the adapter off.

    (Given a PeftModel instead, TRL would take a frozen copy of that adapter as the reference.)"""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)  # random B: the policy differs from the reference from the start
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), peft_config=lora,
        processing_class=AutoTokenizer.from_pretrained(folder),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid"], report_to=[],
                       use_cpu=True),
        train_dataset=Dataset.from_list([{"prompt": "p", "chosen": " c", "rejected": " r"}]),
    )


def _trl(trainer: Any, pairs: list[PreferenceExample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's loss and LoRA gradients on the same padded [chosen; rejected] batch as ours."""
    model = trainer.model
    batch = collate_pairs(pairs, 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}
    model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), _lora_grads(model)


def _lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if "lora_" in name}


@pytest.mark.usefixtures("single_torch_thread")
def test_loss_and_lora_gradients_equal_trls_dpo_loss(tiny_llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    pairs = _pairs(tiny_llama)
    assert {len(pair.chosen_ids) for pair in pairs} != {len(pair.rejected_ids) for pair in pairs}  # padding matters
    trainer = _trl_trainer(tiny_llama, tmp_path)
    model = trainer.model
    assert isinstance(model, PeftModel) and list(model.peft_config) == ["default"]
    expected_loss, expected_grads = _trl(trainer, pairs)
    assert abs(float(expected_loss) - 0.6931) > 1e-3  # the policy and the reference really differ

    for chunked in (True, False):
        loss, grads = _ours(model, pairs, chunked)
        assert float(loss) == pytest.approx(float(expected_loss), abs=1e-5)
        assert grads.keys() == expected_grads.keys() and len(grads) == 8
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        assert max(float(grad.abs().max()) for grad in grads.values()) > 1e-4  # gradients that mean something


def _preference_file(path: Path) -> Path:
    """A learnable preference: always answer the number, never the refusal."""
    rows = [_line(f"What is {i} plus one?", f"{i + 1}", "I cannot say.") for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _options(model: Path, output_dir: Path, data: Path, **overrides: Any) -> TrainingOptions:
    settings: dict[str, Any] = {
        "model": str(model), "output_dir": str(output_dir), "data": str(data), "method": "dpo", "dpo_beta": BETA,
        "use_lora": True, "max_steps": 8, "per_device_train_batch_size": 2, "max_seq_length": 48,
        "logging_steps": 1, "learning_rate": 5e-3, "use_8bit": False, **overrides,
    }
    return TrainingOptions(**settings)


def _rewards(events: EventLog) -> list[dict[str, Any]]:
    return [metrics for metrics in events.metrics() if "rewards/margin" in metrics]


@pytest.mark.usefixtures("single_torch_thread")
def test_a_dpo_run_learns_the_preference_and_writes_an_adapter_that_loads(
    tiny_llama: Path, tmp_path: Path, events: EventLog
) -> None:
    data = _preference_file(tmp_path / "prefs.jsonl")
    options = _options(tiny_llama, tmp_path / "out", data, save_steps=4, validation_data=str(data))

    result = run_training(options, on_event=events)

    assert result.status == "succeeded", result.error_message
    rewards = _rewards(events)
    assert len(rewards) == 8
    assert rewards[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts as the base
    assert rewards[-1]["rewards/margin"] > 0.5 and rewards[-1]["rewards/accuracy"] == 1.0
    assert rewards[-1]["rewards/chosen"] > rewards[-1]["rewards/rejected"]
    losses = [metrics["train_loss"] for metrics in events.metrics()]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < 0.45
    assert result.metrics["rewards/accuracy"] == 1.0
    checkpoints = [event.data for event in events.of_kind("checkpoint")]
    assert [c["step"] for c in checkpoints] == [4, 8] and "rewards/margin" in checkpoints[-1]["metrics"]
    assert {"train_loss", "valid_loss", "full_valid_loss"} <= checkpoints[-1]["metrics"].keys()
    assert all(0 < metrics["valid_loss"] < 1 for metrics in events.metrics())
    assert result.metrics["full_valid_loss"] == checkpoints[-1]["metrics"]["full_valid_loss"] < losses[0]

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(input_ids=ids).logits
    trained = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    assert not torch.allclose(trained(input_ids=ids).logits, before, atol=1e-4)


@pytest.mark.usefixtures("single_torch_thread")
def test_a_dpo_run_reports_rewards_in_place_of_a_token_accuracy_and_never_nan(
    tiny_llama: Path, tmp_path: Path, events: EventLog
) -> None:
    """A pair has no token accuracy to report (OpenAI's DPO metrics are the loss and the rewards): no
    train_mean_token_accuracy anywhere, no NaN in any event's JSON, no "nan" in any line a user reads."""
    data = _preference_file(tmp_path / "prefs.jsonl")

    result = run_training(_options(tiny_llama, tmp_path / "out", data, max_steps=2, save_steps=2), on_event=events)

    assert result.status == "succeeded", result.error_message
    checkpoint = events.of_kind("checkpoint")[-1].data["metrics"]
    for metrics in [*events.metrics(), checkpoint, result.metrics]:
        assert "train_mean_token_accuracy" not in metrics and "valid_mean_token_accuracy" not in metrics
        assert {"train_loss", "rewards/accuracy", "rewards/margin"} <= metrics.keys()
    for event in events:
        json.dumps(event.data, allow_nan=False)
        assert not re.search(r"\bnan\b", event.message, re.IGNORECASE), event.message
    assert "rewards/margin" in events.metrics()[-1] and "rewards/accuracy" in events.of_kind("message")[-1].message


def test_dpo_is_refused_without_lora_naming_both_flags() -> None:
    with pytest.raises(ValueError, match="--method dpo needs --use_lora"):
        TrainingOptions(method="dpo")
    with pytest.raises(ValueError, match="--dpo_beta must be positive"):
        TrainingOptions(method="dpo", use_lora=True, dpo_beta=0)


def test_a_file_of_the_other_method_fails_as_an_invalid_training_file(
    tiny_llama: Path, tmp_path: Path, learnable_data: Path
) -> None:
    dpo_on_text = run_training(_options(tiny_llama, tmp_path / "a", learnable_data))
    assert dpo_on_text.error_code == "invalid_training_file"
    assert "--method dpo trains on preference lines" in str(dpo_on_text.error_message)

    supervised = _options(tiny_llama, tmp_path / "b", _preference_file(tmp_path / "prefs.jsonl"), method="supervised")
    supervised_on_pairs = run_training(supervised)
    assert supervised_on_pairs.error_code == "invalid_training_file"
    assert 'method "dpo"' in str(supervised_on_pairs.error_message)


def test_the_plan_counts_both_sequences_of_each_pair(tiny_llama: Path) -> None:
    from backend.training.memory import load_model_config
    from backend.training.memory_estimate import estimate_memory, reference_forward_bytes

    config = load_model_config(str(tiny_llama))
    settings: dict[str, Any] = {"model": str(tiny_llama), "use_lora": True, "use_8bit": False, "max_seq_length": 64}
    dpo = estimate_memory(TrainingOptions(**settings, method="dpo", per_device_train_batch_size=2), config,
                          device="cpu")
    doubled = estimate_memory(TrainingOptions(**settings, per_device_train_batch_size=4), config, device="cpu")
    single = estimate_memory(TrainingOptions(**settings, per_device_train_batch_size=2), config, device="cpu")

    assert dpo.activations_without_checkpointing == doubled.activations_without_checkpointing
    assert dpo.activations_without_checkpointing > single.activations_without_checkpointing
    # the reference forward keeps nothing for a backward: below the policy's kept activations, not added to them
    reference = reference_forward_bytes(TrainingOptions(**settings, method="dpo", per_device_train_batch_size=2),
                                        model_shape(config), [], device="cpu", chunked_loss=True)
    assert 0 < reference < dpo.activations_without_checkpointing
    assert dpo.estimate_bytes > single.estimate_bytes


@pytest.mark.usefixtures("single_torch_thread")
def test_a_dpo_run_heals_an_out_of_memory_and_a_nan_as_supervised_runs_do(tiny_llama: Path, tmp_path: Path) -> None:
    data = _preference_file(tmp_path / "prefs.jsonl")
    options = _options(tiny_llama, tmp_path / "out", data, max_steps=4, save_steps=2, gradient_accumulation_steps=1,
                       inject_oom_at_step=2, inject_nan_at_step=3)

    result = run_training(options)

    assert result.status == "succeeded", result.error_message
    assert result.metrics["oom_recoveries"] == 1 and result.metrics["divergence_recoveries"] == 1
    assert result.metrics["micro_batch_size"] == 1 and result.steps == 4


@pytest.mark.usefixtures("single_torch_thread")
def test_a_stopped_dpo_run_resumes_to_the_uninterrupted_runs_losses(
    tiny_llama: Path, tmp_path: Path, make_events: Any
) -> None:
    data = _preference_file(tmp_path / "prefs.jsonl")
    straight = make_events()
    uninterrupted = run_training(_options(tiny_llama, tmp_path / "a", data, max_steps=4), on_event=straight)
    assert uninterrupted.status == "succeeded" and len(straight.metrics()) == 4

    calls = iter(range(100))
    first, second = make_events(), make_events()
    stopped = run_training(_options(tiny_llama, tmp_path / "b", data, max_steps=4), on_event=first,
                           stop_requested=lambda: next(calls) == 2)  # asked before step 3
    assert stopped.status == "stopped" and stopped.steps == 2
    resumed = run_training(_options(tiny_llama, tmp_path / "b", data, max_steps=4, resume_from_checkpoint="latest"),
                           on_event=second)

    assert resumed.status == "succeeded" and resumed.steps == 4
    losses = [m["train_loss"] for m in first.metrics() + second.metrics()]
    assert losses == pytest.approx([m["train_loss"] for m in straight.metrics()], abs=1e-5)


class _TwoRanks:
    """Ranks.sum as two ranks give it: this rank's totals plus the other rank's (which counted `other`)."""

    world_size = 2

    def __init__(self, other: list[float]) -> None:
        self.other = other
        self.calls = 0

    def sum(self, values: list[float]) -> list[float]:
        self.calls += 1
        return [mine + theirs for mine, theirs in zip(values, self.other, strict=True)]


def test_reward_means_count_every_ranks_pairs() -> None:
    from backend.training.distributed import Ranks

    tally = RewardTally()
    tally.add(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 4.0]))  # this rank: 2 pairs, 1 won, margin 0
    other_rank = [4.0, 0.0, 2.0, 4.0, 2.0]  # chosen, rejected, won, margin, pairs summed on the other rank
    ranks = _TwoRanks(other_rank)
    means = tally.means(ranks)
    assert ranks.calls == 1
    assert means == {"rewards/chosen": 2.0, "rewards/rejected": 1.0, "rewards/accuracy": 0.75, "rewards/margin": 1.0}
    assert tally.means(ranks) == {} and ranks.calls == 1, "an empty window syncs nothing"
    tally.add(torch.tensor([2.0]), torch.tensor([1.0]))
    assert tally.means(Ranks()) == {"rewards/chosen": 2.0, "rewards/rejected": 1.0, "rewards/accuracy": 1.0,
                                    "rewards/margin": 1.0}
