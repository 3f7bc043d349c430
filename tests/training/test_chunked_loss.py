"""The chunked loss equals the plain full-logits cross-entropy, in value and gradients, and keeps no whole logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from backend.training.chunked_loss import (
    DEFAULT_BUDGET_BYTES,
    IGNORE_INDEX,
    ChunkedLossUnavailable,
    causal_lm_summed_loss,
    chunk_tokens_for,
    chunked_cross_entropy,
    chunked_loss_bytes,
    chunked_loss_head,
    final_hidden_states,
    fused_linear_cross_entropy,
    loss_backend_reason,
    select_loss_backend,
    shift_labels,
)
from benchmarks.live_tensors import LiveTensorPeak

FP32 = {"rtol": 1e-5, "atol": 1e-5}
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None):
    """The reference: every logit at once, upcast, one cross-entropy."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(
        logits.float().reshape(-1, weight.size(0)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def random_problem(*, tokens: int = 37, hidden: int = 16, vocab: int = 50, bias: bool = True, seed: int = 0):
    """Hidden states (2, tokens, hidden), a head, and labels with a padded tail and an ignored prompt."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(2, tokens, hidden, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    offset = torch.randn(vocab, generator=generator, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, (2, tokens), generator=generator)
    labels[0, :5] = IGNORE_INDEX  # a prompt not trained on
    labels[1, -9:] = IGNORE_INDEX  # padding
    return states, weight, offset, labels


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, None])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_equal_the_plain_loss(chunk_tokens: int | None, bias: bool) -> None:
    states, weight, offset, labels = random_problem(bias=bias)
    inputs = [tensor for tensor in (states, weight, offset) if tensor is not None]
    expected = plain_loss(states, weight, labels, offset)
    loss = chunked_cross_entropy(states, weight, labels, offset, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(loss, expected, **FP32)
    for got, want in zip(grads_of(loss, inputs), grads_of(expected, inputs), strict=True):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("chunk_tokens", [6, None], ids=["recomputed", "one-slice-kept"])
def test_a_scaled_loss_backpropagated_twice_gives_twice_the_scaled_gradients(chunk_tokens: int | None) -> None:
    states, weight, offset, labels = random_problem()
    inputs = [states, weight, offset]
    loss = chunked_cross_entropy(states, weight, labels, offset, chunk_tokens=chunk_tokens) / 3  # as the trainer
    loss.backward(retain_graph=True)
    loss.backward()  # the kept slice must not have been changed in place by the first backward
    for got, want in zip([t.grad for t in inputs], grads_of(plain_loss(states, weight, labels, offset), inputs),
                         strict=True):
        torch.testing.assert_close(got, want * 2 / 3, **FP32)


def test_all_tokens_ignored_is_zero_with_zero_gradients() -> None:
    states, weight, _, labels = random_problem(bias=False)
    loss = chunked_cross_entropy(states, weight, torch.full_like(labels, IGNORE_INDEX), chunk_tokens=4)
    grad_states, grad_weight = grads_of(loss, [states, weight])
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_states) == 0 and torch.count_nonzero(grad_weight) == 0
    assert torch.isfinite(grad_states).all() and torch.isfinite(grad_weight).all()


def test_frozen_weight_gets_no_gradient_and_hidden_still_matches() -> None:
    states, weight, _, labels = random_problem(bias=False)
    frozen = weight.detach()
    loss = chunked_cross_entropy(states, frozen, labels, chunk_tokens=5)
    loss.backward()
    reference = states.detach().requires_grad_()
    expected = torch.autograd.grad(plain_loss(reference, frozen, labels), reference)[0]
    assert frozen.grad is None
    torch.testing.assert_close(states.grad, expected, **FP32)


def test_bf16_hidden_states_match_the_upcast_reference() -> None:
    states, weight, _, labels = random_problem(bias=False, tokens=64, vocab=300)
    half_states = states.detach().bfloat16().requires_grad_()
    half_weight = weight.detach().bfloat16().requires_grad_()
    expected = plain_loss(half_states, half_weight, labels)
    loss = chunked_cross_entropy(half_states, half_weight, labels, chunk_tokens=9)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-2)
    got = grads_of(loss, [half_states, half_weight])
    for value, want in zip(got, grads_of(expected, [half_states, half_weight]), strict=True):
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_autocast_projects_in_the_autocast_dtype_like_lm_head() -> None:
    states, weight, _, labels = random_problem(bias=False, tokens=32, vocab=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_loss(states, weight, labels)
        loss = chunked_cross_entropy(states, weight, labels, chunk_tokens=10)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-2)
    for got, want in zip(grads_of(loss, [states, weight]), grads_of(expected, [states, weight]), strict=True):
        assert got.dtype == torch.float32  # gradients reach the fp32 master copies in their own dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_chunk_tokens_for_fits_the_budget() -> None:
    tokens = chunk_tokens_for(128_256, DEFAULT_BUDGET_BYTES)
    assert tokens == 174
    assert tokens * 128_256 * 6 <= DEFAULT_BUDGET_BYTES < (tokens + 1) * 128_256 * 6
    assert chunk_tokens_for(128_256, 1) == 1
    with pytest.raises(ValueError, match="positive"):
        chunk_tokens_for(0, DEFAULT_BUDGET_BYTES)


def test_cpu_uses_the_pytorch_backend_and_says_why() -> None:
    assert select_loss_backend("cpu") == "pytorch"
    assert "CUDA only" in loss_backend_reason(torch.device("cpu"))
    states, weight, offset, labels = random_problem()
    torch.testing.assert_close(fused_linear_cross_entropy(states, weight, labels, offset), plain_loss(
        states, weight, labels, offset), **FP32)


def test_shift_labels_aligns_next_tokens_and_ignores_the_last() -> None:
    labels = torch.tensor([[5, 6, 7], [IGNORE_INDEX, 8, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX], [8, 9, IGNORE_INDEX]]


def test_backward_keeps_no_whole_logits() -> None:
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(512, 32, generator=generator, requires_grad=True)
    weight = torch.randn(8192, 32, generator=generator)
    labels = torch.randint(0, 8192, (512,), generator=generator)
    peaks = []
    for loss_of in (plain_loss, lambda *args: chunked_cross_entropy(*args, chunk_tokens=32)):
        with LiveTensorPeak() as live:
            loss_of(states, weight, labels).backward()
        peaks.append(live.peak)
    one_logits = 512 * 8192 * 4  # 16 MiB; a 32-token slice is 1 MiB
    assert peaks[0] >= 2 * one_logits
    assert peaks[1] < one_logits / 4


@pytest.mark.parametrize(
    ("dtype", "chunk_tokens"), [(torch.float32, 32), (torch.bfloat16, 32), (torch.bfloat16, 1024)],
    ids=["fp32-sliced", "bf16-sliced", "bf16-one-slice-kept"],
)
def test_the_planned_bytes_match_the_live_tensor_peak(dtype: torch.dtype, chunk_tokens: int) -> None:
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(256, 32, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(4096, 32, generator=generator).to(dtype)
    labels = torch.randint(0, 4096, (256,), generator=generator)
    with LiveTensorPeak() as live:
        chunked_cross_entropy(states, weight, labels, chunk_tokens=chunk_tokens).backward()
    element = torch.finfo(dtype).bits // 8
    planned = chunked_loss_bytes(256, 4096, 32, element_bytes=element, budget_bytes=chunk_tokens * 4096 * 6)
    assert abs(live.peak / planned - 1) < 0.05, (live.peak, planned)


# ---------------------------------------------------------------------------------------------------------
# Through real models: tiny GPT-2 and Llama, LoRA by PEFT


def tiny_batch(*, prompt_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 23 tokens, the second padded by 6 (labels ignored there), the prompt optionally ignored."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, 500, (2, 23), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :prompt_tokens] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_model(folder: Path, arch: str, *, lora: bool) -> nn.Module:
    """The tiny model in eval mode (no dropout, so two forwards agree), LoRA with random B so A gets gradients."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[arch],
                            init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model.eval()


def plain_model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The trainer's loss today (loss.summed_loss without the chunked head): the whole shifted logits, upcast."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def trained_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    return dict(zip([name for name, _ in named], torch.autograd.grad(loss, [p for _, p in named]), strict=True))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("prompt_tokens", [0, 8], ids=["all-tokens", "completion-only"])
def test_lora_model_loss_and_gradients_equal_the_plain_loss(
    arch: str, prompt_tokens: int, tiny_model_folders: dict[str, Path], single_torch_thread: None
) -> None:
    model = load_model(tiny_model_folders[arch], arch, lora=True)
    batch = tiny_batch(prompt_tokens=prompt_tokens)
    expected = plain_model_loss(model, batch)
    loss = causal_lm_summed_loss(model, **batch, chunk_tokens=5)  # 5 divides neither 44 nor the trained count
    torch.testing.assert_close(loss, expected, **FP32)
    got, want = trained_grads(model, loss), trained_grads(model, expected)
    assert got.keys() == want.keys() and any("lora_A" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32, msg=lambda text, name=name: f"{name}: {text}")
    assert all(torch.count_nonzero(grad) > 0 for grad in got.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_fine_tune_gradients_equal_including_the_head(
    arch: str, tiny_model_folders: dict[str, Path], single_torch_thread: None
) -> None:
    model = load_model(tiny_model_folders[arch], arch, lora=False)
    batch = tiny_batch()
    expected = plain_model_loss(model, batch)
    loss = causal_lm_summed_loss(model, **batch, chunk_tokens=7)
    got, want = trained_grads(model, loss), trained_grads(model, expected)
    head = chunked_loss_head(model)
    # GPT-2 ties lm_head to the token embeddings: the one parameter gets both gradients summed.
    assert (head.weight is model.get_input_embeddings().weight) == (arch == "gpt2")
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32, msg=lambda text, name=name: f"{name}: {text}")


def test_final_hidden_states_are_what_lm_head_projects(tiny_llama: Path, single_torch_thread: None) -> None:
    model = load_model(tiny_llama, "llama", lora=True)
    batch = tiny_batch()
    with torch.no_grad():
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(chunked_loss_head(model)(hidden), logits, **FP32)


def test_a_lora_adapted_head_is_refused_with_the_reason(tiny_gpt2: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(ChunkedLossUnavailable, match="LoRA adapter"):
        chunked_loss_head(adapted)


def test_a_quantized_head_is_refused_with_the_reason(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(torch.zeros(head.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ChunkedLossUnavailable, match="quantized"):
        chunked_loss_head(model)


def test_checkpointed_llama_lora_gradients_equal_the_plain_loss(tiny_llama: Path, single_torch_thread: None) -> None:
    model = load_model(tiny_llama, "llama", lora=True)
    # Checkpointing runs only in training mode; the tiny Llama has no dropout, so two forwards still agree.
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = tiny_batch(prompt_tokens=8)
    expected = plain_model_loss(model, batch)
    loss = causal_lm_summed_loss(model, **batch, chunk_tokens=5)
    torch.testing.assert_close(loss, expected, **FP32)
    got, want = trained_grads(model, loss), trained_grads(model, expected)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32, msg=lambda text, name=name: f"{name}: {text}")
