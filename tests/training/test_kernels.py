"""Liger Kernel's RMSNorm, RoPE and SwiGLU: when they are chosen, and what safetrain asks Liger to patch.

The real kernels are Triton and need CUDA: they run in benchmarks/gpu_session.sh (a tiny Llama trained with and
without them). Here liger_kernel's availability is monkeypatched, and a fake `liger_kernel.transformers` stands in
only to record the arguments of the instance patcher; the CPU run loads the real tiny Llama and checks that its
modules stay transformers' own.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from backend.training import kernels
from backend.training.kernels import (
    apply_liger_kernels,
    liger_kernels_choice,
    liger_kernels_message,
    planned_kernels,
)
from backend.training.memory_estimate import estimate_memory
from backend.training.modeling import load_model_and_tokenizer
from backend.training.options import TrainingOptions
from backend.training.train_safe import parse_options


@pytest.fixture
def liger_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """liger_kernel's transformers patches import, as on a GPU machine with liger-kernel installed."""
    monkeypatch.setattr(kernels, "_liger_import_problem", lambda: None)


@pytest.fixture
def llama_config(tiny_llama: Path) -> Any:
    return AutoConfig.from_pretrained(tiny_llama)


@pytest.fixture
def fresh_import_check() -> Any:
    """The import check recomputed in the test and forgotten after it (it is cached per process)."""
    kernels._liger_import_problem.cache_clear()
    yield
    kernels._liger_import_problem.cache_clear()


def test_on_cuda_with_liger_importable_a_llama_takes_the_kernels(llama_config: Any, liger_importable: None) -> None:
    assert liger_kernels_choice(TrainingOptions(), llama_config, "cuda") == (
        True, "liger_kernel is installed, the device is CUDA and llama is one of its models"
    )
    assert liger_kernels_choice(TrainingOptions(), llama_config, "cuda:0", device_map={"": 0})[0]


def test_without_cuda_the_pytorch_modules_stay(llama_config: Any, liger_importable: None) -> None:
    assert liger_kernels_choice(TrainingOptions(), llama_config, "cpu") == (
        False, "Liger Kernel is Triton, CUDA only (device is cpu)"
    )


def test_turned_off_the_pytorch_modules_stay(llama_config: Any, liger_importable: None) -> None:
    options = parse_options(["--no_liger_kernels"])
    assert options.liger_kernels is False and TrainingOptions().liger_kernels is True
    assert liger_kernels_choice(options, llama_config, "cuda") == (False, "--no_liger_kernels")


def test_not_installed_says_so(
    llama_config: Any, fresh_import_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *args: None)
    assert liger_kernels_choice(TrainingOptions(), llama_config, "cuda") == (False, "liger_kernel is not installed")


def test_an_install_that_fails_to_import_falls_back_with_the_error(
    llama_config: Any, fresh_import_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_import(name: str) -> types.ModuleType:
        raise ImportError(f"{name}: libcuda.so.1 not found")

    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *args: object())
    monkeypatch.setattr(kernels.importlib, "import_module", broken_import)
    chosen, reason = liger_kernels_choice(TrainingOptions(), llama_config, "cuda")
    assert not chosen
    assert reason == ("liger_kernel failed to import (ImportError: liger_kernel.transformers.monkey_patch: "
                      "libcuda.so.1 not found)")


def test_models_outside_the_llama_family_keep_their_modules(
    tiny_gpt2: Path, llama_config: Any, liger_importable: None
) -> None:
    chosen, reason = liger_kernels_choice(TrainingOptions(), AutoConfig.from_pretrained(tiny_gpt2), "cuda")
    assert not chosen and reason == "gpt2 is not one of the models they cover (llama, mistral, qwen2, qwen3)"
    gelu = llama_config.__class__.from_dict({**llama_config.to_dict(), "hidden_act": "gelu"})
    assert liger_kernels_choice(TrainingOptions(), gelu, "cuda") == (
        False, "this llama's MLP is gated by gelu, and Liger's SwiGLU computes SiLU"
    )


def test_layers_placed_on_the_cpu_keep_their_modules(llama_config: Any, liger_importable: None) -> None:
    placed = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "cpu"}
    assert liger_kernels_choice(TrainingOptions(), llama_config, "cuda", device_map=placed) == (
        False, "--device_map auto put layers on the CPU or disk, which Triton's kernels cannot run on"
    )


def test_loading_on_the_cpu_leaves_transformers_modules(tiny_llama: Path) -> None:
    options = TrainingOptions(model=str(tiny_llama), use_lora=True)
    model, _ = load_model_and_tokenizer(options)
    base = model.get_base_model().model
    norms = [base.norm, *(norm for layer in base.layers for norm in (layer.input_layernorm,
                                                                      layer.post_attention_layernorm))]
    assert len(norms) == 5 and all(type(norm) is LlamaRMSNorm for norm in norms)
    assert all("forward" not in vars(norm) and norm._get_name() == "LlamaRMSNorm" for norm in norms)
    assert all(type(layer.mlp) is LlamaMLP and "forward" not in vars(layer.mlp) for layer in base.layers)
    assert liger_kernels_message(options, model) == (
        "Liger kernels off, transformers' PyTorch RMSNorm, RoPE and MLP: Liger Kernel is Triton, CUDA only "
        "(device is cpu)"
    )


def _fake_liger(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in `liger_kernel.transformers` whose instance patcher only records its keyword arguments."""
    calls: list[dict[str, Any]] = []
    package, transformers_module = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    transformers_module._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    package.transformers = transformers_module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    return calls


def test_when_chosen_liger_patches_rope_norms_and_mlp_and_leaves_the_loss_alone(
    llama_config: Any, liger_importable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_liger(monkeypatch)
    monkeypatch.setattr(kernels, "training_device", lambda: "cuda")
    model = AutoModelForCausalLM.from_config(llama_config)
    assert apply_liger_kernels(model, TrainingOptions())[0]
    assert calls == [{"model": model, "rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                      "fused_linear_cross_entropy": False}]
    assert liger_kernels_message(TrainingOptions(), model) == (
        "Liger kernels on (RMSNorm, RoPE, SwiGLU: liger_kernel is installed, the device is CUDA and llama is one "
        "of its models)"
    )
    assert apply_liger_kernels(model, TrainingOptions(liger_kernels=False)) == (False, "--no_liger_kernels")
    assert len(calls) == 1  # turned off: Liger is not called at all


def test_the_plan_lists_the_kernels_only_where_they_are_taken(
    tiny_gpt2: Path, llama_config: Any, liger_importable: None
) -> None:
    options = TrainingOptions(use_lora=True, bf16=True)
    assert "liger_kernels" in estimate_memory(options, llama_config, device="cuda").techniques
    assert "liger_kernels" not in estimate_memory(options, llama_config, device="cpu").techniques
    off = options.model_copy(update={"liger_kernels": False})
    assert "liger_kernels" not in estimate_memory(off, llama_config, device="cuda").techniques
    assert planned_kernels(options, AutoConfig.from_pretrained(tiny_gpt2), "cuda") == []
