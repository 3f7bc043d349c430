"""The memory plan's per-layer terms against tensors actually alive while training.

Each case trains two otherwise equal tiny models, 2 and 4 layers deep, and counts live tensor storages the
way CUDA's caching allocator does (`benchmarks/live_tensors.py`), so the difference is what each extra layer
costs on any device. The plan's difference (less its CPU heap overhead) must match within 15%: this is the
term that decides whether a checkpointed 7B run fits, and the one a GPU run once found ~3.5 GB short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from backend.training.memory import estimate_memory, load_model_config, model_shape
from backend.training.memory_estimate import chunked_loss_planned
from backend.training.modeling import compute_dtype, load_model_and_tokenizer
from backend.training.options import TrainingOptions
from backend.training.tiny_models import build_tokenizer, make_tiny_model, tiny_config
from benchmarks.plan_accuracy import live_training_peak

BATCH, SEQ = 2, 256
DEPTHS = (2, 4)
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("layer-terms")
    return {depth: make_tiny_model(root / f"llama{depth}", arch="llama", hidden=128, layers=depth) for depth in DEPTHS}


def _options(folder: Path, **changes: Any) -> TrainingOptions:
    return TrainingOptions.model_validate(
        {"model": str(folder), "use_lora": True, "per_device_train_batch_size": BATCH, "max_seq_length": SEQ, **changes}
    )


def _live_peak(options: TrainingOptions) -> int:
    """Weights plus the high-water mark of the storages two training steps create, with the trainer's loss."""
    torch.manual_seed(0)
    model, _tokenizer = load_model_and_tokenizer(options)
    model.train()
    ids = torch.randint(1, 500, (BATCH, SEQ))
    autocast = compute_dtype(options) if options.bf16 or options.fp16 else None  # as the trainer runs it
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    chunked = chunked_loss_planned(options, load_model_config(options.model))
    return live_training_peak(model, batch, 2, autocast_dtype=autocast, chunked_loss=chunked)[0]


def _planned(options: TrainingOptions) -> int:
    plan = estimate_memory(options, load_model_config(options.model), device="cpu")
    return plan.estimate_bytes - plan.breakdown.overhead  # the heap's share is not tensors


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {"use_8bit": True, "gradient_checkpointing": True},
        {"use_8bit": True, "gradient_checkpointing": False},
        {"use_4bit": True, "gradient_checkpointing": True},
        {"gradient_checkpointing": True},
        {"gradient_checkpointing": False},
        {"use_8bit": True, "bf16": True, "gradient_checkpointing": False},
        {"bf16": True, "gradient_checkpointing": False},
        {"use_lora": False, "gradient_checkpointing": True},
        {"use_lora": False, "gradient_checkpointing": False},
    ],
    ids=[
        "8bit-checkpointed", "8bit", "4bit-checkpointed", "lora-checkpointed", "lora", "8bit-bf16", "lora-bf16",
        "full-checkpointed", "full",
    ],
)
def test_each_extra_layer_costs_what_the_plan_says(
    llamas: dict[int, Path], changes: dict[str, Any], single_torch_thread: None
) -> None:
    shallow, deep = (_options(llamas[depth], **changes) for depth in DEPTHS)
    layers = DEPTHS[1] - DEPTHS[0]
    measured = (_live_peak(deep) - _live_peak(shallow)) / layers
    planned = (_planned(deep) - _planned(shallow)) / layers
    assert planned == pytest.approx(measured, rel=TOLERANCE), (
        f"per layer: planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"
    )


def test_the_int8_inputs_kept_per_layer_are_counted_once_per_distinct_tensor(llamas: dict[int, Path]) -> None:
    shape = model_shape(load_model_config(str(llamas[2])))
    # q/k/v read the attention norm's output, o_proj the attention output, gate/up the MLP norm's output,
    # down_proj the gated product: three hidden-wide tensors and one intermediate-wide
    assert shape.quantized_inputs_per_layer == 3 * shape.hidden + shape.intermediate


@pytest.fixture(scope="module")
def wide_vocab_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a 32,000-token head (its tokenizer uses 512): the loss is most of the activations."""
    folder = tmp_path_factory.mktemp("wide-vocab") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", 32_000, hidden=128)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("chunked_loss", [True, False], ids=["chunked-loss", "whole-logits"])
@pytest.mark.parametrize(
    "changes",
    [{"gradient_checkpointing": True}, {"gradient_checkpointing": False},
     {"gradient_checkpointing": True, "bf16": True}],
    ids=["checkpointed", "not-checkpointed", "checkpointed-bf16"],
)
def test_the_loss_at_a_wide_vocabulary_costs_what_the_plan_says(
    wide_vocab_llama: Path, chunked_loss: bool, changes: dict[str, Any], single_torch_thread: None
) -> None:
    options = _options(wide_vocab_llama, chunked_loss=chunked_loss, **changes)
    measured, planned = _live_peak(options), _planned(options)
    assert planned == pytest.approx(measured, rel=TOLERANCE), (
        f"planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )
