"""The memory plan: parameter counts, bit widths, checkpointing, recommendations and safe defaults.

Every config here is built in memory and saved as a lone config.json: nothing has weights to load.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from backend.training.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MemoryPlan,
    apply_safe_defaults,
    cublas_workspace_bytes,
    device_budget_bytes,
    estimate_memory,
    format_plan,
    load_model_config,
    plan_memory,
)
from backend.training.options import TrainingOptions

LLAMA_7B: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "vocab_size": 32000,
}
LLAMA_13B: dict[str, Any] = {
    "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
    "num_attention_heads": 40, "vocab_size": 32000,
}


def _config_folder(root: Path, name: str, config: PretrainedConfig) -> Path:
    folder = root / name
    config.save_pretrained(folder)
    assert [path.name for path in folder.iterdir()] == ["config.json"]  # no weights anywhere
    return folder


@pytest.fixture(scope="session")
def config_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    return {
        "llama7b": _config_folder(root, "llama7b", LlamaConfig(**LLAMA_7B)),
        "llama13b": _config_folder(root, "llama13b", LlamaConfig(**LLAMA_13B)),
        "gpt2small": _config_folder(root, "gpt2small", GPT2Config()),
    }


@pytest.fixture(scope="session")
def llama7b(config_folders: dict[str, Path]) -> PretrainedConfig:
    return load_model_config(str(config_folders["llama7b"]))


def _options(**changes: object) -> TrainingOptions:
    return TrainingOptions.model_validate({"per_device_train_batch_size": 1, "max_seq_length": 512, **changes})


def test_7b_llama_counts_and_bit_widths(llama7b: PretrainedConfig) -> None:
    started = time.perf_counter()
    fp16 = estimate_memory(_options(use_lora=True, fp16=True), llama7b, device="cuda")
    eight = estimate_memory(_options(use_lora=True, fp16=True, use_8bit=True), llama7b, device="cuda")
    four = estimate_memory(_options(use_lora=True, fp16=True, use_4bit=True), llama7b, device="cuda")
    assert time.perf_counter() - started < 20  # meta device only: a 7B model is never materialized

    assert fp16.n_parameters == pytest.approx(6.74e9, rel=0.005)
    assert fp16.breakdown.weights / GIB == pytest.approx(12.55, rel=0.01)
    # embed_tokens and lm_head (2 x 131M) stay unquantized, in fp32 after prepare_model_for_kbit_training
    unquantized = 4 * 2 * 32000 * 4096
    quantized_fp16 = fp16.breakdown.weights - 2 * 2 * 32000 * 4096
    assert (eight.breakdown.weights - unquantized) / quantized_fp16 == pytest.approx(0.5, rel=0.01)
    assert (four.breakdown.weights - unquantized) / quantized_fp16 == pytest.approx(0.25 + 0.008, rel=0.02)
    assert 0.5 < eight.breakdown.weights / fp16.breakdown.weights < 0.6
    assert 0.3 < four.breakdown.weights / fp16.breakdown.weights < 0.36


def test_lora_trains_only_adapters_and_full_keeps_fp32_master_weights(llama7b: PretrainedConfig) -> None:
    lora = estimate_memory(_options(use_lora=True, lora_r=8, lora_target_modules="q_proj,v_proj"), llama7b)
    assert lora.trainable_parameters == 32 * 2 * 8 * (4096 + 4096)  # 4.19M, as peft reports
    assert lora.breakdown.optimizer == 8 * lora.trainable_parameters
    assert lora.breakdown.gradients == 4 * lora.trainable_parameters

    full = estimate_memory(_options(fp16=True), llama7b, device="cuda")
    assert full.trainable_parameters == full.n_parameters
    assert full.breakdown.weights >= 4 * full.n_parameters  # fp32 master weights under mixed precision
    assert full.breakdown.optimizer == 8 * full.n_parameters


def test_checkpointing_reduces_activations(llama7b: PretrainedConfig) -> None:
    off = estimate_memory(_options(use_lora=True, bf16=True, gradient_checkpointing=False), llama7b, device="cuda")
    on = estimate_memory(_options(use_lora=True, bf16=True, gradient_checkpointing=True), llama7b, device="cuda")
    assert on.breakdown.activations < off.breakdown.activations / 4
    assert on.activations_with_checkpointing == off.activations_with_checkpointing == on.breakdown.activations
    assert on.estimate_bytes < off.estimate_bytes

    longer = estimate_memory(_options(use_lora=True, bf16=True, max_seq_length=2048), llama7b, device="cuda")
    assert longer.activations_without_checkpointing > 3 * off.activations_without_checkpointing


# Peak measured on an H200 on 2026-11-26 (torch.cuda.max_memory_allocated, benchmarks/RESULTS.md): the 7B-shaped
# Llama in 8-bit with LoRA r 8 on all seven projections, 2 x 512 tokens, fp32 compute, no checkpointing. (The
# checkpointed run then used non-reentrant checkpointing, which 8-bit no longer does.)
H200_PEAK_WITHOUT_CHECKPOINTING = 25.56e9


def test_the_8bit_7b_plan_matches_the_peak_an_h200_measured(llama7b: PretrainedConfig) -> None:
    options = _options(use_lora=True, lora_r=8, use_8bit=True, gradient_checkpointing=False,
                       per_device_train_batch_size=2)
    plan = estimate_memory(options, llama7b, device="cuda")
    allocator_view = plan.estimate_bytes - CUDA_CONTEXT_BYTES  # the allocator does not see the context
    assert allocator_view == pytest.approx(H200_PEAK_WITHOUT_CHECKPOINTING, rel=0.15)


def test_8bit_keeps_its_matmul_inputs_until_checkpointing_drops_them(llama7b: PretrainedConfig) -> None:
    """bitsandbytes keeps every 8-bit matmul's input, even for a frozen weight; 4-bit keeps none."""
    def activations(bits: int, checkpointing: bool) -> int:
        options = _options(use_lora=True, gradient_checkpointing=checkpointing, **{f"use_{bits}bit": True})
        return estimate_memory(options, llama7b).breakdown.activations

    # per layer and token, in fp32: the attention norm's output, the MLP norm's output and the gated product
    # (the attention output, o_proj's input, is counted for both)
    per_layer = 512 * 4 * (2 * 4096 + 11008)
    assert activations(8, checkpointing=False) - activations(4, checkpointing=False) == 32 * per_layer
    assert activations(8, checkpointing=True) - activations(4, checkpointing=True) == per_layer  # recomputed layer


def test_cublas_workspaces_are_two_per_training_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert cublas_workspace_bytes() == 2 * 4096 * 1024 * 8  # one for the forward's thread, one for autograd's
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2:16:8")
    assert cublas_workspace_bytes() == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    assert cublas_workspace_bytes() == 2 * 32 * 2**20  # no GPU here: PyTorch's Hopper default


def test_logits_dominate_activations_of_a_small_model(config_folders: dict[str, Path]) -> None:
    gpt2 = load_model_config(str(config_folders["gpt2small"]))
    options = _options(use_lora=True, gradient_checkpointing=True, per_device_train_batch_size=8, chunked_loss=False)
    plan = estimate_memory(options, gpt2)
    tokens = 8 * 512
    assert plan.breakdown.activations > tokens * 50257 * 4 * 3  # fp32 logits, log-softmax and gradients


def test_chunked_loss_plans_one_slice_of_the_logits(config_folders: dict[str, Path]) -> None:
    gpt2 = load_model_config(str(config_folders["gpt2small"]))
    options = _options(use_lora=True, gradient_checkpointing=True, per_device_train_batch_size=8)
    plain = estimate_memory(options.model_copy(update={"chunked_loss": False}), gpt2)
    chunked = estimate_memory(options, gpt2)
    tokens = 8 * 512
    # the whole logits' term is gone (what is left of the loss is one 128 MiB slice plus bytes per token): the
    # checkpointed peak is now one layer's recompute, not the loss
    assert chunked.breakdown.activations < plain.breakdown.activations - tokens * 50257 * 4
    assert chunked.savings["chunked_loss"] == plain.breakdown.activations - chunked.breakdown.activations
    assert "chunked_loss" in chunked.techniques and "chunked_loss" not in plain.techniques
    assert "--chunked_loss saves 1.4 GiB" in format_plan(chunked)


def test_small_budget_gets_a_recommendation_that_fits(llama7b: PretrainedConfig) -> None:
    options = _options(use_lora=True, bf16=True, per_device_train_batch_size=8, max_seq_length=1024)
    budget = 8 * GIB
    plan = plan_memory(options, llama7b, budget_bytes=budget, device="cuda")
    assert plan.fits is False and plan.budget_bytes == budget
    assert plan.recommendation and "GiB of 8.0 GiB" in plan.recommendation
    assert plan.recommended_changes.get("use_4bit") or plan.recommended_changes.get("use_8bit")

    replanned = plan_memory(options.model_copy(update=plan.recommended_changes), llama7b, budget_bytes=budget,
                            device="cuda")
    assert replanned.fits is True and replanned.estimate_bytes <= budget
    changed = options.model_copy(update=plan.recommended_changes)
    assert changed.effective_batch_size == options.effective_batch_size


def test_recommendation_prefers_the_cheapest_change(llama7b: PretrainedConfig) -> None:
    options = _options(use_lora=True, bf16=True, per_device_train_batch_size=4, max_seq_length=2048)
    off = estimate_memory(options, llama7b, device="cuda")
    budget = off.estimate_bytes - off.activations_without_checkpointing + off.activations_with_checkpointing + GIB
    plan = plan_memory(options, llama7b, budget_bytes=budget, device="cuda")
    assert plan.recommended_changes == {"gradient_checkpointing": True}
    assert plan.recommendation is not None and plan.recommendation.startswith("enable --gradient_checkpointing:")


def test_a_plan_that_fits_has_no_recommendation(llama7b: PretrainedConfig) -> None:
    plan = plan_memory(_options(use_lora=True, use_4bit=True), llama7b, budget_bytes=80 * GIB, device="cuda")
    assert plan.fits is True and plan.recommendation is None and plan.recommended_changes == {}
    assert plan.to_dict()["breakdown"]["weights"] == plan.breakdown.weights


def test_hopeless_budget_says_so(llama7b: PretrainedConfig) -> None:
    plan = plan_memory(_options(use_lora=True), llama7b, budget_bytes=GIB, device="cpu")
    assert plan.fits is False and plan.recommended_changes == {}
    assert plan.recommendation is not None and "does not fit even with every memory saver" in plan.recommendation


def test_safe_defaults_over_7b_use_8bit_and_device_map(config_folders: dict[str, Path]) -> None:
    config = load_model_config(str(config_folders["llama13b"]))
    options = _options(use_lora=True, bf16=True)
    changed, messages = apply_safe_defaults(options, config, budget_bytes=80 * GIB, device="cuda")
    assert changed.use_8bit is True and changed.device_map == "auto"
    assert options.use_8bit is None and options.device_map is None  # the input is never mutated
    assert any("over 7B" in message and "8-bit" in message for message in messages)

    told = _options(use_lora=True, bf16=True, use_8bit=False)
    kept, _ = apply_safe_defaults(told, config, budget_bytes=80 * GIB, device="cuda")
    assert kept.use_8bit is False


def test_safe_defaults_keep_7b_at_full_width(llama7b: PretrainedConfig) -> None:
    changed, messages = apply_safe_defaults(_options(use_lora=True, bf16=True), llama7b, budget_bytes=80 * GIB,
                                            device="cuda")
    assert not changed.use_8bit and changed.device_map is None
    assert changed.gradient_checkpointing is False  # plenty of room
    assert any("checkpointing off" in message for message in messages)


def test_safe_defaults_shrink_the_micro_batch_and_keep_the_effective_batch(llama7b: PretrainedConfig) -> None:
    options = _options(use_lora=True, bf16=True, use_4bit=True, per_device_train_batch_size=16,
                       gradient_accumulation_steps=2, max_seq_length=1024)
    changed, messages = apply_safe_defaults(options, llama7b, budget_bytes=12 * GIB, device="cuda")
    assert changed.gradient_checkpointing is True
    assert changed.per_device_train_batch_size in (1, 2)
    assert changed.effective_batch_size == options.effective_batch_size == 32
    assert plan_memory(changed, llama7b, budget_bytes=12 * GIB, device="cuda").fits
    assert any("effective batch 32 unchanged" in message for message in messages)
    assert any("tight" in message for message in messages)


def test_budget_from_options_or_host(monkeypatch: pytest.MonkeyPatch) -> None:
    budget, _device = device_budget_bytes(_options(memory_budget_gb=8))
    assert budget == 8 * GIB
    host, device = device_budget_bytes(_options())
    assert host > 0 and device in ("cpu", "cuda")


def test_config_from_a_folder_named_like_the_argument(
    config_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(config_folders["llama7b"].parent)
    assert load_model_config("llama7b").hidden_size == 4096
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model_config("no-such-org/no-such-model-for-safetrain")


def test_format_plan_shows_components_budget_and_recommendation(llama7b: PretrainedConfig) -> None:
    plan: MemoryPlan = plan_memory(_options(use_lora=True, bf16=True, per_device_train_batch_size=8), llama7b,
                                   budget_bytes=8 * GIB, device="cuda")
    text = format_plan(plan)
    for word in ("Weights", "Adapters", "Gradients", "Optimizer", "Activations", "Overhead", "Total", "Budget",
                 "DOES NOT FIT", "Recommendation:", "GiB", "MiB"):
        assert word in text


def test_the_chunked_loss_is_the_first_change_recommended(config_folders: dict[str, Path]) -> None:
    gpt2 = load_model_config(str(config_folders["gpt2small"]))
    options = _options(use_lora=True, gradient_checkpointing=True, per_device_train_batch_size=8, chunked_loss=False)
    chunked = estimate_memory(options.model_copy(update={"chunked_loss": True}), gpt2, device="cuda")

    plan = plan_memory(options, gpt2, budget_bytes=chunked.estimate_bytes, device="cuda")

    assert plan.fits is False and plan.recommended_changes == {"chunked_loss": True}
    assert plan.recommendation is not None and plan.recommendation.startswith("enable --chunked_loss")
