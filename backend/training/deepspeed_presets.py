"""DeepSpeed ZeRO presets for `--deepspeed`, and the `accelerate launch` command that runs the trainer under one.

The presets leave "auto" values. The trainer fills the batch sizes and clipping of its run with
`deepspeed_run_config` (it hands Accelerate no DataLoader to read them from); Accelerate fills the rest when
the trainer calls `accelerator.prepare(...)`: bf16/fp16 from the mixed precision, bucket sizes from the
model's hidden size.
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import sys
from functools import cache
from pathlib import Path
from typing import Any

from backend.training.options import DEEPSPEED_PRESETS

TRAIN_SAFE_PATH = Path(__file__).resolve().parent / "train_safe.py"

_COMMON: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,  # 0: dynamic loss scaling
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step prints would interleave
    "wall_clock_breakdown": False,
}
_ZERO2: dict[str, Any] = {
    "stage": 2,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "allgather_partitions": True,
    "reduce_scatter": True,
    "reduce_bucket_size": "auto",
    "allgather_bucket_size": 200_000_000,
}
_ZERO3: dict[str, Any] = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "sub_group_size": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    # Gather the full 16-bit weights when saving, so a full fine-tune writes a loadable model.
    "stage3_gather_16bit_weights_on_model_save": True,
}
# Pinned host memory makes the CPU<->GPU copies of offloaded states asynchronous.
_CPU_OFFLOAD: dict[str, Any] = {"device": "cpu", "pin_memory": True}


def deepspeed_config(preset: str) -> dict[str, Any]:
    """The DeepSpeed config of a preset: zero2, zero2-offload, zero3 or zero3-offload."""
    if preset not in DEEPSPEED_PRESETS:
        raise ValueError(f"--deepspeed {preset!r} is not a preset: choose one of {', '.join(DEEPSPEED_PRESETS)}")
    zero = copy.deepcopy(_ZERO3 if preset.startswith("zero3") else _ZERO2)
    config = copy.deepcopy(_COMMON)
    if preset.endswith("-offload"):
        zero["offload_optimizer"] = dict(_CPU_OFFLOAD)
        if zero["stage"] == 3:
            zero["offload_param"] = dict(_CPU_OFFLOAD)  # ZeRO-2 cannot offload parameters, only ZeRO-3
        # Lets the trainer keep its own torch AdamW with offload instead of requiring DeepSpeedCPUAdam.
        config["zero_force_ds_cpu_optimizer"] = False
    config["zero_optimization"] = zero
    return config


def deepspeed_run_config(
    preset: str, *, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int, clipping: float = 1.0
) -> dict[str, Any]:
    """The preset's config with the batch sizes and clipping of this run filled in.

    The trainer keeps its own data order instead of handing Accelerate a DataLoader, so the values Accelerate
    would read off one are set here; precision and bucket sizes stay "auto" for `accelerator.prepare`.
    """
    config = deepspeed_config(preset)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * world_size
    config["gradient_clipping"] = clipping
    return config


def write_deepspeed_config(preset: str, folder: str | Path) -> Path:
    """Write the preset's config as `deepspeed_<preset>.json` in `folder`; return its path."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"deepspeed_{preset}.json"
    path.write_text(json.dumps(deepspeed_config(preset), indent=2) + "\n", encoding="utf-8")
    return path


def _flag_value(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def accelerate_executable() -> str:
    """The `accelerate` script next to this Python (the venv's), else whichever is on PATH."""
    beside = Path(sys.executable).parent / ("accelerate.exe" if sys.platform == "win32" else "accelerate")
    return str(beside) if beside.exists() else (shutil.which("accelerate") or "accelerate")


def accelerate_launch_command(
    preset: str,
    train_args: list[str],
    num_processes: int,
    *,
    config_dir: str | Path | None = None,
    machine_flags: list[str] | None = None,
) -> list[str]:
    """The `accelerate launch --use_deepspeed ...` command running train_safe.py with `train_args`.

    Writes the preset's config to `config_dir` (default: the `--output_dir` in `train_args`, else the
    working directory). Mixed precision follows `--bf16`/`--fp16` in `train_args`. The launched trainer
    sees `ACCELERATE_USE_DEEPSPEED=true` in its environment, which tells it it is already launched.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1 (got {num_processes})")
    folder = config_dir if config_dir is not None else (_flag_value(train_args, "--output_dir") or ".")
    config_file = write_deepspeed_config(preset, folder)
    precision = "bf16" if "--bf16" in train_args else "fp16" if "--fp16" in train_args else "no"
    return [
        accelerate_executable(),
        "launch",
        "--use_deepspeed",
        "--deepspeed_config_file",
        str(config_file),
        "--num_processes",
        str(num_processes),
        *(machine_flags or ["--num_machines", "1"]),  # distributed.machine_flags for a multi-node run
        "--mixed_precision",
        precision,
        str(TRAIN_SAFE_PATH),
        *train_args,
    ]


@cache
def deepspeed_available() -> bool:
    """Whether DeepSpeed imports here (it needs CUDA; it is absent from CPU machines)."""
    try:
        importlib.import_module("deepspeed")
    except Exception:  # ImportError, or DeepSpeed's own errors when it finds no CUDA toolkit
        return False
    return True
