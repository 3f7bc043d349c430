"""Padding-free packing: whole examples in one row, position ids restarting at 0, attention never across examples.

The exactness check: every packed example's summed loss equals that example's loss run alone (fp32, 1e-5), on
tiny GPT-2 and Llama, through the plain head and the chunked loss, with completion-only labels, with padding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.training.checkpoints import read_trainer_state
from backend.training.chunked_loss import (
    chunked_loss_head,
    final_hidden_states,
    fused_linear_cross_entropy,
    shift_labels,
)
from backend.training.datasets import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    load_examples,
    pack_examples,
    tokenize_examples,
)
from backend.training.memory_estimate import estimate_memory, packed_mask_bytes
from backend.training.modeling import ModelSourceError, attention_inputs, check_packing_supported
from backend.training.options import TrainingOptions
from backend.training.tiny_models import tiny_config
from backend.training.trainer import run_training
from benchmarks.live_tensors import LiveTensorPeak

EXAMPLES = [
    {"prompt": "Add 2 and 3.", "completion": " The sum is 5."},
    {"prompt": "Name a colour:", "completion": " blue"},
    {"prompt": "Say hello in French, please, as briefly as you can.", "completion": " Bonjour."},
    {"prompt": "2 * 4 =", "completion": " 8"},
    {"prompt": "The capital of Italy?", "completion": " Rome, of course."},
]


def _tokenized(folder: Path, *, completions_only: bool, packing: bool, block: int = 64) -> list[TokenizedExample]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenize_examples(EXAMPLES, "prompt_completion", tokenizer, max_seq_length=block,
                             train_on_completions_only=completions_only, packing=packing)


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token losses, [rows, width]: entry t is the loss of predicting label t (0 where it is ignored)."""
    attention_mask, position_ids = attention_inputs(batch, torch.device("cpu"))
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=position_ids).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return F.pad(losses, (1, 0))


def _spans(block: TokenizedExample) -> list[tuple[int, int]]:
    starts = [index for index, position in enumerate(block.position_ids or []) if position == 0]
    return list(zip(starts, [*starts[1:], len(block.input_ids)], strict=True))


def _model(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False  # as the trainer loads it: transformers looks for packed rows only without a cache
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("completions_only", [False, True])
def test_each_packed_example_has_its_unpacked_loss(tiny_model_folders, arch, completions_only):
    folder = tiny_model_folders[arch]
    model = _model(folder)
    single = _tokenized(folder, completions_only=completions_only, packing=False, block=40)
    packed = _tokenized(folder, completions_only=completions_only, packing=True, block=40)
    assert len(packed) < len(single)  # several examples share a row
    pad = AutoTokenizer.from_pretrained(folder).pad_token_id
    with torch.no_grad():
        rows = _token_losses(model, collate(packed, pad))  # rows of different lengths: padding after the short one
        alone = [float(_token_losses(model, collate([example], pad)).sum()) for example in single]
    per_example = [float(rows[row, start:end].sum()) for row, block in enumerate(packed)
                   for start, end in _spans(block)]
    assert per_example == pytest.approx(alone, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_chunked_loss_of_a_packed_batch_is_the_sum_of_the_unpacked_ones(tiny_model_folders, arch):
    folder = tiny_model_folders[arch]
    model = _model(folder)
    pad = AutoTokenizer.from_pretrained(folder).pad_token_id
    single = _tokenized(folder, completions_only=True, packing=False, block=40)
    batch = collate(_tokenized(folder, completions_only=True, packing=True, block=40), pad)
    head = chunked_loss_head(model)
    with torch.no_grad():
        attention_mask, position_ids = attention_inputs(batch, torch.device("cpu"))
        hidden = final_hidden_states(model, batch["input_ids"], attention_mask, position_ids)
        packed = fused_linear_cross_entropy(hidden, head.weight, shift_labels(batch["labels"]), head.bias)
        alone = sum(float(_token_losses(model, collate([example], pad)).sum()) for example in single)
    assert float(packed) == pytest.approx(alone, abs=1e-5, rel=1e-5)


def test_labels_never_cross_an_example_boundary():
    examples = [TokenizedExample([1, 2, 3], [1, 2, 3]), TokenizedExample([4, 5], [IGNORE_INDEX, 5]),
                TokenizedExample([6, 7, 8, 9], [6, 7, 8, 9])]
    blocks = pack_examples(examples, 6)
    assert [block.input_ids for block in blocks] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert [block.position_ids for block in blocks] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    # The first token of each example is never a target: it would be predicted from the previous example.
    assert [block.labels for block in blocks] == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, 7, 8, 9]]

    batch = collate(blocks, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # the padding: a sequence apart
    assert batch["labels"][1, -1] == IGNORE_INDEX
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert "position_ids" not in collate(examples, pad_token_id=0)  # unpacked batches keep the 2D mask


def test_examples_are_whole_in_their_block_and_longer_ones_truncated(tiny_gpt2):
    single = _tokenized(tiny_gpt2, completions_only=False, packing=False, block=24)
    packed = _tokenized(tiny_gpt2, completions_only=False, packing=True, block=24)
    assert all(len(block.input_ids) <= 24 for block in packed)
    pieces = [block.input_ids[start:end] for block in packed for start, end in _spans(block)]
    assert pieces == [example.input_ids for example in single]


class _OwnMaskModel(torch.nn.Module):
    """A model whose module does not use transformers' create_causal_mask (as custom code may)."""


def test_packing_is_refused_for_a_model_that_builds_its_own_mask(tiny_llama):
    check_packing_supported(AutoModelForCausalLM.from_pretrained(tiny_llama))
    with pytest.raises(ModelSourceError, match="--packing needs a model whose attention follows packed position"):
        check_packing_supported(_OwnMaskModel())


def test_a_packed_run_trains(tiny_llama, learnable_data, tmp_path, single_torch_thread):
    options = TrainingOptions(
        model=str(tiny_llama), data=str(learnable_data), output_dir=str(tmp_path / "run"), packing=True,
        use_lora=True, lora_dropout=0.0, learning_rate=5e-3, max_seq_length=64, per_device_train_batch_size=2,
        max_steps=6, logging_steps=1, gradient_checkpointing=True,
    )
    result = run_training(options)
    assert result.status == "succeeded", result.error_message
    losses = read_trainer_state(tmp_path / "run" / "checkpoint-6").recent_losses
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    # Rows hold several examples: each step reads more tokens than two of the longest examples could.
    _, rows = load_examples(learnable_data)
    single = tokenize_examples(rows, "text", AutoTokenizer.from_pretrained(tiny_llama), max_seq_length=64)
    assert result.trained_tokens > 6 * 2 * max(len(example.input_ids) for example in single)


def test_the_plan_counts_the_packed_mask_within_15_percent_of_live_tensors(single_torch_thread):
    tokens = 1024
    config = tiny_config("llama", 512, hidden=256, layers=4, heads=4, context=tokens)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    model.config.use_cache = False
    rows = pack_examples([TokenizedExample([1 + i % 400 for i in range(256)], list(range(1, 257)))] * 4, tokens)
    batch = collate(rows, pad_token_id=0)
    attention_mask, position_ids = attention_inputs(batch, torch.device("cpu"))
    with LiveTensorPeak() as live:
        loss = model(input_ids=batch["input_ids"], position_ids=position_ids, labels=batch["labels"]).loss
        loss.backward()
        del loss
    options = TrainingOptions(packing=True, per_device_train_batch_size=1, max_seq_length=tokens,
                              gradient_checkpointing=False, chunked_loss=False)
    plan = estimate_memory(options, config, device="cpu").breakdown
    planned = plan.activations + plan.gradients  # no optimizer here: the live peak is activations and gradients
    assert attention_mask is None and packed_mask_bytes(options, device="cpu") == tokens**2 * 5
    assert 0.85 < planned / live.peak < 1.15, (planned, live.peak)
