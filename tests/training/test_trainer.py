"""run_training on tiny models: every weight/adapter setup, learning, resume, self-healing and stopping."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from backend.training.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint
from backend.training.datasets import BUILTIN_DATASET
from backend.training.deepspeed_presets import deepspeed_available
from backend.training.modeling import check_precision_supported, weight_files_sha256
from backend.training.options import TrainingOptions
from backend.training.telemetry import read_telemetry
from backend.training.tiny_models import build_tokenizer, tiny_config
from backend.training.trainer import run_training
from benchmarks.live_tensors import LiveTensorPeak

from .conftest import EventLog

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SETUPS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"use_lora": True},
    "lora-8bit": {"use_lora": True, "use_8bit": True},
    "lora-4bit": {"use_lora": True, "use_4bit": True},
}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "safetrain.json"}


def _options(model: Path, output_dir: Path, **overrides: Any) -> TrainingOptions:
    """Small, fast settings; each test overrides what it is about."""
    settings: dict[str, Any] = {
        "model": str(model),
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "max_seq_length": 48,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "use_8bit": False,  # tri-state: tiny models would never get 8-bit by default anyway
        **overrides,
    }
    return TrainingOptions(**settings)


def _losses(events: EventLog) -> list[float]:
    return [metrics["train_loss"] for metrics in events.metrics()]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "grad-ckpt"])
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_setup_trains_and_writes_its_output(tiny_model_folders, tmp_path, events, arch, setup, checkpointing):
    base = tiny_model_folders[arch]
    hashes_before = weight_files_sha256(base)
    options = _options(base, tmp_path / "out", gradient_checkpointing=checkpointing, **SETUPS[setup])

    result = run_training(options, on_event=events)

    assert result.status == "succeeded", result.error_message
    assert result.steps == 3
    assert [metrics["step"] for metrics in events.metrics()] == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in _losses(events))
    files = {path.name for path in (tmp_path / "out").iterdir()}
    if options.use_lora:
        assert files >= ADAPTER_FILES
        assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    else:
        assert {"config.json", "model.safetensors", "safetrain.json"} <= files
    manifest = json.loads((tmp_path / "out" / "safetrain.json").read_text())
    assert manifest["base_weight_sha256"] == hashes_before
    assert weight_files_sha256(base) == hashes_before  # the base folder is never written


def test_bf16_mixed_precision_trains_where_the_cpu_runs_it(tiny_llama, tmp_path, events):
    try:
        check_precision_supported(TrainingOptions(bf16=True))
    except ValueError as refusal:
        pytest.skip(f"this machine cannot run bf16: {refusal}")

    result = run_training(_options(tiny_llama, tmp_path / "out", use_lora=True, bf16=True), on_event=events)

    assert result.status == "succeeded", result.error_message
    assert all(math.isfinite(loss) for loss in _losses(events)) and len(_losses(events)) == 3


def test_loss_falls_on_the_builtin_dataset(tiny_gpt2, tmp_path, events):
    options = _options(tiny_gpt2, tmp_path / "out", max_steps=40, per_device_train_batch_size=4)

    result = run_training(options, on_event=events)

    losses = _losses(events)
    assert result.status == "succeeded" and len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_adapter_loads_with_peft_and_changes_the_logits(tiny_llama, tmp_path, events):
    options = _options(
        tiny_llama, tmp_path / "out", use_lora=True, max_steps=6, save_steps=3, logging_steps=2,
        validation_data=str(BUILTIN_DATASET),
    )

    result = run_training(options, on_event=events)

    assert result.status == "succeeded"
    inputs = torch.tensor([[5, 17, 42, 99, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        base_logits = base(inputs).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "out").eval()
        tuned_logits = tuned(inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    # validation loss at each save, telemetry at each logging step
    saved = [event.data for event in events.of_kind("checkpoint")]
    assert [entry["step"] for entry in saved] == [3, 6]
    assert all(math.isfinite(entry["metrics"]["eval_loss"]) for entry in saved)
    records = read_telemetry(tmp_path / "out")
    assert [record["step"] for record in records] == [2, 4, 6]
    assert all(record["peak_bytes"] > 0 for record in records)
    assert len(events.of_kind("telemetry")) == 3 and len(events.of_kind("plan")) == 1


def test_resume_continues_at_the_step_and_matches_an_uninterrupted_run(tiny_gpt2, tmp_path, make_events):
    settings: dict[str, Any] = {"use_lora": True, "max_steps": 8, "save_steps": 4, "learning_rate": 5e-3}
    straight = make_events()
    assert run_training(_options(tiny_gpt2, tmp_path / "straight", **settings), on_event=straight).status == (
        "succeeded"
    )

    interrupted = make_events()
    halfway = run_training(
        _options(tiny_gpt2, tmp_path / "resumed", **settings), on_event=interrupted,
        stop_requested=lambda: any(metrics["step"] >= 4 for metrics in interrupted.metrics()),
    )
    assert halfway.status == "stopped" and halfway.steps == 4
    assert latest_complete_checkpoint(tmp_path / "resumed") == tmp_path / "resumed" / "checkpoint-4"

    resumed = make_events()
    result = run_training(
        _options(tiny_gpt2, tmp_path / "resumed", resume_from_checkpoint="latest", **settings), on_event=resumed
    )

    assert result.status == "succeeded" and result.steps == 8
    assert [metrics["step"] for metrics in resumed.metrics()] == [5, 6, 7, 8]
    assert _losses(resumed) == pytest.approx(_losses(straight)[4:], rel=1e-5)  # measured: identical


def test_out_of_memory_halves_the_micro_batch_keeping_the_effective_batch(tiny_llama, tmp_path, make_events):
    # No dropout anywhere (tiny Llama has none; LoRA's is set to 0): how a step is split into micro-batches
    # then changes nothing but float rounding, so the recovered run must follow the uninterrupted one.
    settings: dict[str, Any] = {"use_lora": True, "lora_dropout": 0.0, "max_steps": 5, "save_steps": 2,
                                "per_device_train_batch_size": 4}
    straight = make_events()
    run_training(_options(tiny_llama, tmp_path / "straight", **settings), on_event=straight)
    events = make_events()

    result = run_training(_options(tiny_llama, tmp_path / "out", inject_oom_at_step=3, **settings), on_event=events)

    assert result.status == "succeeded", result.error_message
    assert result.steps == 5
    assert result.metrics["micro_batch_size"] == 2 and result.metrics["gradient_accumulation_steps"] == 2
    assert result.metrics["oom_recoveries"] == 1
    (warning,) = events.warnings()
    assert "micro-batch 4" in warning and "effective batch 4 unchanged" in warning and "checkpoint-2" in warning
    # the attempt after the OOM resumed at step 3, from checkpoint-2, and trained as if nothing happened
    assert [metrics["step"] for metrics in events.metrics()] == [1, 2, 3, 4, 5]
    assert _losses(events) == pytest.approx(_losses(straight), rel=1e-4)


def test_out_of_memory_fails_with_the_numbers_when_retries_run_out(tiny_gpt2, tmp_path, events):
    options = _options(tiny_gpt2, tmp_path / "out", use_lora=True, inject_oom_at_step=2, max_oom_retries=0)

    result = run_training(options, on_event=events)

    assert result.status == "failed" and result.error_code == "out_of_memory"
    assert "step 2" in (result.error_message or "") and "micro-batch 2" in (result.error_message or "")


def test_nan_loss_rolls_back_to_the_last_checkpoint_with_a_lower_learning_rate(tiny_gpt2, tmp_path, events):
    options = _options(tiny_gpt2, tmp_path / "out", use_lora=True, max_steps=5, save_steps=2, inject_nan_at_step=3)

    result = run_training(options, on_event=events)

    assert result.status == "succeeded", result.error_message
    assert result.metrics["lr_scale"] == 0.5 and result.metrics["divergence_recoveries"] == 1
    (warning,) = events.warnings()
    assert "step 3" in warning and "checkpoint-2" in warning and "halved" in warning
    assert all(math.isfinite(loss) for loss in _losses(events))


def test_nan_loss_fails_as_diverged_when_no_rollback_is_allowed(tiny_gpt2, tmp_path, events):
    options = _options(tiny_gpt2, tmp_path / "out", use_lora=True, inject_nan_at_step=2, max_divergence_retries=0)

    result = run_training(options, on_event=events)

    assert result.status == "failed" and result.error_code == "diverged"
    assert "step 2" in (result.error_message or "") and "loss nan" in (result.error_message or "")


def test_stop_before_the_first_step_still_leaves_a_complete_checkpoint(tiny_gpt2, tmp_path, events):
    result = run_training(_options(tiny_gpt2, tmp_path / "out", use_lora=True), on_event=events,
                          stop_requested=lambda: True)

    assert result.status == "stopped" and result.steps == 0
    assert (tmp_path / "out" / "checkpoint-0" / COMPLETE_MARKER).is_file()


def test_deepspeed_is_refused_before_loading_without_deepspeed(tiny_gpt2, tmp_path, events):
    result = run_training(_options(tiny_gpt2, tmp_path / "out", deepspeed="zero2"), on_event=events)

    assert result.status == "failed" and result.error_code == "invalid_options"
    message = result.error_message or ""
    assert "needs DeepSpeed and more than one GPU" in message
    assert ("DeepSpeed is not installed" in message) is not deepspeed_available()  # else: no GPUs here
    assert not events.of_kind("plan") and not (tmp_path / "out").exists()


def test_a_bad_dataset_fails_with_its_line_before_the_model_loads(tiny_gpt2, tmp_path, events):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')

    result = run_training(_options(tiny_gpt2, tmp_path / "out", data=str(data)), on_event=events)

    assert result.status == "failed" and result.error_code == "invalid_training_file"
    assert (result.error_message or "").startswith("Line 2:")
    assert not any(event.message.startswith("Loaded") for event in events)


EVAL_TASKS = [
    {"task_id": "tiny/even", "prompt": "def is_even(n):\n", "test": "def check(f):\n    assert f(2) is True\n",
     "entry_point": "is_even"},
]


def test_eval_data_is_evaluated_in_the_sandbox_after_training(tiny_gpt2, tmp_path, events):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(task) + "\n" for task in EVAL_TASKS))

    result = run_training(_options(tiny_gpt2, tmp_path / "out", use_lora=True, max_steps=2,
                                   eval_data=str(eval_file)), on_event=events)

    assert result.status == "succeeded", result.error_message
    evaluation = json.loads((tmp_path / "out" / "safetrain.json").read_text())["evaluation"]
    assert evaluation["mode"] == "sandbox" and [task["task_id"] for task in evaluation["tasks"]] == ["tiny/even"]
    assert result.metrics["pass_at_k"]["pass@1"] == evaluation["pass_at_k"]["pass@1"]  # a random model: 0.0


def test_a_bad_eval_file_fails_before_training(tiny_gpt2, tmp_path, events):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"task_id": "x"}\n')

    result = run_training(_options(tiny_gpt2, tmp_path / "out", eval_data=str(eval_file)), on_event=events)

    assert result.status == "failed" and result.error_code == "invalid_training_file"
    assert "--eval_data" in (result.error_message or "") and "Line 1" in (result.error_message or "")
    assert not events.metrics()


def test_output_inside_the_base_folder_is_refused(tiny_gpt2, events):
    result = run_training(_options(tiny_gpt2, tiny_gpt2 / "runs"), on_event=events)

    assert result.status == "failed" and result.error_code == "invalid_options"
    assert not (tiny_gpt2 / "runs").exists()


@pytest.fixture(scope="session")
def wide_vocab_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GPT-2 and Llama with a 32,000-token head (the tokenizer uses 512 of them): logits dominate."""
    root = tmp_path_factory.mktemp("wide-vocab")
    folders = {}
    for arch in ("gpt2", "llama"):
        folder = root / arch
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config(arch, 32_000)).save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
        folders[arch] = folder
    return folders


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_loss_trains_as_the_plain_loss_with_a_lower_live_peak(wide_vocab_models, tmp_path, make_events, arch):
    runs: dict[bool, tuple[list[float], float, int, list[str]]] = {}
    for chunked in (True, False):
        events = make_events()
        options = _options(wide_vocab_models[arch], tmp_path / f"chunked-{chunked}", use_lora=True,
                           chunked_loss=chunked, validation_data=str(BUILTIN_DATASET))
        with LiveTensorPeak() as live:
            result = run_training(options, on_event=events)
        assert result.status == "succeeded", result.error_message
        said = [event.message for event in events if event.message and "chunked loss" in event.message]
        runs[chunked] = (_losses(events), result.metrics["eval_loss"], live.peak, said)

    (chunked_losses, chunked_eval, chunked_peak, said), (plain_losses, plain_eval, plain_peak, _) = (
        runs[True], runs[False]
    )
    assert len(chunked_losses) == 3 and chunked_losses == pytest.approx(plain_losses, rel=1e-5)
    assert chunked_eval == pytest.approx(plain_eval, rel=1e-5)
    assert chunked_peak < 0.8 * plain_peak  # 2 x 48 tokens x 32,000 fp32 logits and their copies never exist
    assert said == ["chunked loss on (pytorch: Liger Kernel's fused cross-entropy is Triton, CUDA only "
                    "(device is cpu))"]


def test_max_seq_length_auto_trains_at_the_longest_length_the_budget_fits(tiny_gpt2, tmp_path, events):
    from backend.training.memory import GIB, estimate_memory, load_model_config

    config = load_model_config(str(tiny_gpt2))
    planned = _options(tiny_gpt2, tmp_path / "plan", gradient_checkpointing=True, max_seq_length=300)
    budget = estimate_memory(planned, config, device="cpu").estimate_bytes

    result = run_training(_options(tiny_gpt2, tmp_path / "out", max_seq_length="auto", plan_device="cpu",
                                   memory_budget_gb=budget / GIB, max_steps=1), on_event=events)

    assert result.status == "succeeded", result.error_message
    used = events.of_kind("plan")[0].data["options"]
    length = used["max_seq_length"]
    assert used["gradient_checkpointing"] is True and 300 <= length < 512  # below GPT-2's 512 positions
    assert estimate_memory(planned.model_copy(update={"max_seq_length": length}), config, device="cpu"
                           ).estimate_bytes <= budget
    assert estimate_memory(planned.model_copy(update={"max_seq_length": length + 1}), config, device="cpu"
                           ).estimate_bytes > budget
    assert f"--max_seq_length auto: {length:,} tokens fit" in " ".join(event.message or "" for event in events)
