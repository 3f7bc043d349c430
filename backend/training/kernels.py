"""Liger Kernel's fused RMSNorm, RoPE and SwiGLU (Triton) in a loaded model, on CUDA, when installed.

Where `liger_kernels_choice` says yes, Liger's instance patcher rebinds the `forward` of each RMSNorm and MLP
module and swaps the rotary function of the model's transformers module (so every model of that architecture
built later in the process gets it too: a training child holds one model). Everywhere else, and with
`--no_liger_kernels`, the model keeps transformers' PyTorch modules: the same maths, without the fusion.

Only those three kernels: Liger's cross-entropy patches (which replace the model's forward) stay off, so the loss
remains safetrain's own (backend/training/loss.py, which picks Liger's fused linear cross-entropy by itself).
The linear layers are not touched: Liger's SwiGLU forward calls the module's own gate_proj, up_proj and down_proj,
so bitsandbytes' 8/4-bit linears and the LoRA wrappers peft puts around them later run as before; the norms'
weights stay where they are and in their dtype (bfloat16, or float32 after prepare_model_for_kbit_training).
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Any

import torch

from backend.training.options import TrainingOptions

# The decoders whose Liger patch takes rope, rms_norm and swiglu: RMSNorm, rotary embeddings and a SiLU-gated MLP
# (gate_proj, up_proj, down_proj). Gemma's MLP is GELU-gated (Liger's GEGLU) and Phi-3's fuses gate and up.
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Liger's SwiGLU computes SiLU whatever the config says, so it stands in only for these activations.
SWIGLU_ACTIVATIONS = frozenset({"silu", "swish"})
TECHNIQUE = "liger_kernels"


def training_device() -> str:
    """The device the trainer computes on: 'cuda' where torch sees a GPU (DeepSpeed moves the weights there later)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def _liger_import_problem() -> str | None:
    """None when liger_kernel's transformers patches import here, else why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    try:
        patches = importlib.import_module("liger_kernel.transformers.monkey_patch")
    except Exception as error:  # a broken Triton or CUDA toolchain, or a transformers it refuses: PyTorch runs
        return f"liger_kernel failed to import ({type(error).__name__}: {error})"
    if not hasattr(patches, "_apply_liger_kernel_to_instance"):
        return "this liger_kernel has no instance patcher (_apply_liger_kernel_to_instance)"
    return None


def _model_problem(options: TrainingOptions, config: Any, device_type: str, device_map: Any) -> str | None:
    """Why these options, this model or this device rule Liger's kernels out, or None."""
    if not options.liger_kernels:
        return "--no_liger_kernels"
    if device_type != "cuda":
        return f"Liger Kernel is Triton, CUDA only (device is {device_type})"
    model_type = getattr(config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        return f"{model_type} is not one of the models they cover ({', '.join(sorted(LIGER_MODEL_TYPES))})"
    activation = getattr(config, "hidden_act", None)
    if activation not in SWIGLU_ACTIVATIONS:
        return f"this {model_type}'s MLP is gated by {activation}, and Liger's SwiGLU computes SiLU"
    if isinstance(device_map, dict) and {"cpu", "disk"} & {str(place) for place in device_map.values()}:
        return "--device_map auto put layers on the CPU or disk, which Triton's kernels cannot run on"
    return None


def liger_kernels_choice(
    options: TrainingOptions, config: Any, device: torch.device | str, *, device_map: Any = None
) -> tuple[bool, str]:
    """Whether Liger's RMSNorm, RoPE and SwiGLU replace this model's PyTorch modules on `device`, and why."""
    problem = _model_problem(options, config, torch.device(device).type, device_map) or _liger_import_problem()
    if problem is not None:
        return False, problem
    return True, f"liger_kernel is installed, the device is CUDA and {config.model_type} is one of its models"


def _loaded_model_choice(options: TrainingOptions, model: Any) -> tuple[bool, str]:
    """`liger_kernels_choice` for a loaded model, on the device the trainer computes on, placed as it is."""
    return liger_kernels_choice(options, model.config, training_device(),
                                device_map=getattr(model, "hf_device_map", None))


def apply_liger_kernels(model: Any, options: TrainingOptions) -> tuple[bool, str]:
    """Patch Liger's RMSNorm, RoPE and SwiGLU into `model` where `liger_kernels_choice` says so; its answer."""
    chosen, reason = _loaded_model_choice(options, model)
    if chosen:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # The loss kernels off: they would replace the model's forward, and safetrain's chunked loss owns the loss.
        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    return chosen, reason


def liger_kernels_message(options: TrainingOptions, model: Any) -> str:
    """The run's line on which path RMSNorm, RoPE and the MLP took, and why."""
    chosen, reason = _loaded_model_choice(options, model)
    if chosen:
        return f"Liger kernels on (RMSNorm, RoPE, SwiGLU: {reason})"
    return f"Liger kernels off, transformers' PyTorch RMSNorm, RoPE and MLP: {reason}"


def planned_kernels(options: TrainingOptions, config: Any, device: str) -> list[str]:
    """The plan's technique name for Liger's kernels when they would be taken on `device`, else nothing."""
    return [TECHNIQUE] if liger_kernels_choice(options, config, device)[0] else []
