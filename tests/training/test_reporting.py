"""reporting.py: OpenAI's metric names (token accuracy, valid_*, full_valid_*), the summary's memory line, and a CLI
run that prints no library warning (the filters themselves: tests/test_library_noise.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from backend.library_noise import BNB_CPU_KERNEL_NOTICE
from backend.training.checkpoints import TRAINER_STATE_FILE, latest_complete_checkpoint
from backend.training.chunked_loss import chunked_argmax_hits, chunked_cross_entropy
from backend.training.datasets import BUILTIN_DATASET, IGNORE_INDEX, collate
from backend.training.options import TrainingOptions
from backend.training.preflight import setup_data
from backend.training.reporting import OPENAI_METRICS, mean_token_accuracy, memory_against_plan
from backend.training.trainer import _epoch_order, run_training

from .conftest import EventLog

pytestmark = pytest.mark.usefixtures("single_torch_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def _direct_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels)[labels != IGNORE_INDEX].float().mean())


def _planted(rows: int = 40, vocab: int = 11, hidden: int = 8) -> tuple[torch.Tensor, ...]:
    """Hidden states, a head and labels of which about half are the argmax: accuracy far from 0 and 1."""
    torch.manual_seed(0)
    states, weight = torch.randn(rows, hidden), torch.randn(vocab, hidden)
    labels = (states @ weight.T).argmax(-1)
    labels[::2] = torch.randint(0, vocab, (rows // 2,))
    labels[::5] = IGNORE_INDEX
    return states, weight, labels


def test_mean_token_accuracy_is_the_share_of_trained_tokens_predicted():
    states, weight, labels = _planted()
    logits = states @ weight.T
    expected = _direct_accuracy(logits, labels)
    assert 0.3 < expected < 0.9
    assert mean_token_accuracy(logits, labels) == pytest.approx(expected)
    assert math.isnan(mean_token_accuracy(logits, torch.full_like(labels, IGNORE_INDEX)))


@pytest.mark.parametrize("chunk_tokens", [3, 64], ids=["sliced", "one-slice"])
def test_the_chunked_loss_counts_the_same_hits_in_its_slices(chunk_tokens):
    states, weight, labels = _planted()
    expected = _direct_accuracy(states @ weight.T, labels)
    sink: list[torch.Tensor] = []

    loss = chunked_cross_entropy(states, weight, labels, chunk_tokens=chunk_tokens, token_hits=sink)

    (hits,) = sink
    assert hits.tolist()[1] == int((labels != IGNORE_INDEX).sum())
    assert hits.tolist()[0] / hits.tolist()[1] == pytest.approx(expected)
    assert loss == pytest.approx(float(F.cross_entropy(states @ weight.T, labels, reduction="sum")), rel=1e-5)
    assert chunked_argmax_hits(states, weight, labels, chunk_tokens=chunk_tokens).tolist() == hits.tolist()


@pytest.fixture(scope="module")
def learned_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama fully fine-tuned a little on the built-in data, so its token accuracy is well above 0."""
    folder = tmp_path_factory.mktemp("learned") / "llama"
    result = run_training(TrainingOptions(
        model=str(tiny_llama), output_dir=str(folder), max_steps=10, per_device_train_batch_size=4,
        max_seq_length=48, logging_steps=10, learning_rate=5e-3, use_8bit=False,
    ))
    assert result.status == "succeeded", result.error_message
    return folder


def _step_one_accuracy(options: TrainingOptions, model_folder: Path) -> float:
    """Token accuracy of the base on the run's first step's examples, computed directly from whole logits."""
    data = setup_data(options)
    order = _epoch_order(len(data.train), options.seed, 0)[: options.effective_batch_size]
    batch = collate([data.train[i] for i in order], data.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _direct_accuracy(logits[:, :-1], batch["labels"][:, 1:])


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-loss", "whole-logits"])
def test_a_run_reports_openai_metrics_and_the_first_step_accuracy_is_exact(learned_llama, tmp_path, chunked):
    events = EventLog()
    # LoRA's B starts at zero, so step 1's forward is the base's: its accuracy can be checked directly.
    options = TrainingOptions(
        model=str(learned_llama), output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
        max_seq_length=48, logging_steps=1, save_steps=2, learning_rate=1e-3, use_8bit=False, use_lora=True,
        chunked_loss=chunked, validation_data=str(BUILTIN_DATASET),
    )

    result = run_training(options, on_event=events)

    assert result.status == "succeeded", result.error_message
    logged = events.metrics()
    assert [entry["step"] for entry in logged] == [1, 2]
    expected = _step_one_accuracy(options, learned_llama)
    assert expected > 0.05  # far from a trivially zero accuracy
    assert logged[0]["train_mean_token_accuracy"] == pytest.approx(expected, abs=1e-6)
    for entry in logged:
        assert 0 < entry["valid_loss"] < 20 and 0 <= entry["valid_mean_token_accuracy"] <= 1
    state = json.loads((latest_complete_checkpoint(tmp_path / "out") / TRAINER_STATE_FILE).read_text())
    _assert_openai_metrics(state["metrics"])
    (checkpoint,) = [event.data for event in events.of_kind("checkpoint")]
    _assert_openai_metrics(checkpoint["metrics"])
    _assert_openai_metrics(result.metrics)
    assert result.metrics["full_valid_loss"] == result.metrics["eval_loss"]  # the old name is kept beside it


def _assert_openai_metrics(metrics: dict[str, Any]) -> None:
    assert set(OPENAI_METRICS) <= set(metrics), sorted(metrics)
    assert metrics["step"] == 2
    for name in ("train_loss", "valid_loss", "full_valid_loss"):
        assert 0 < metrics[name] < 20, (name, metrics[name])
    for name in ("train_mean_token_accuracy", "valid_mean_token_accuracy", "full_valid_mean_token_accuracy"):
        assert 0 <= metrics[name] <= 1, (name, metrics[name])


def test_cpu_memory_is_compared_like_with_like():
    metrics = {"peak_memory_bytes": int(0.51 * GIB), "start_rss_bytes": int(0.33 * GIB),
               "estimate_bytes": int(0.17 * GIB), "memory_source": "rss"}
    assert memory_against_plan(metrics) == (
        "peak process RSS 0.51 GiB, 0.18 GiB of it above the 0.33 GiB held before the data, model and their libraries "
        "loaded, against a plan of 0.17 GiB"
    )
    gpu = {**metrics, "memory_source": "torch"}
    assert memory_against_plan(gpu) == "peak memory 0.51 GiB against a plan of 0.17 GiB"


def test_the_cli_prints_openai_names_and_no_library_warnings(tiny_gpt2, tmp_path):
    """GPT-2 (Conv1D layers) with LoRA and checkpointing: the run peft and transformers used to warn on."""
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "backend" / "training" / "train_safe.py"), "--model", str(tiny_gpt2),
               "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1", "--use_lora",
               "--gradient_checkpointing", "--max_seq_length", "32", "--validation_data", str(BUILTIN_DATASET)]

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    step_line = next(line for line in done.stdout.splitlines() if line.startswith("step 2/2"))
    for name in ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"):
        assert f"{name} " in step_line, step_line
    done_line = next(line for line in done.stdout.splitlines() if line.startswith("Done: 2 steps"))
    assert "full_valid_loss" in done_line and "peak process RSS" in done_line and "above the" in done_line
    assert BNB_CPU_KERNEL_NOTICE not in output  # bitsandbytes warns it at import on CPUs with AVX512-BF16
    assert "Warning:" not in done.stderr, done.stderr[-3000:]  # fan_in_fan_out, is_gradient_checkpointing
