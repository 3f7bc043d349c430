"""Where the engine runs: the CPU, a chosen GPU (`cuda:1`), or (`auto`) the GPU with the most free memory."""

from __future__ import annotations

import re

import torch


def pick_device(choice: str) -> str:
    """A torch device string for `choice` (`auto`, `cpu`, `cuda`, `cuda:N`); ValueError for one this machine lacks."""
    choice = (choice or "auto").strip().lower()
    if choice == "cpu":
        return "cpu"
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "auto":
        if not available:
            return "cpu"
        free = [torch.cuda.mem_get_info(index)[0] for index in range(available)]
        return f"cuda:{free.index(max(free))}"
    match = re.fullmatch(r"cuda(?::(\d+))?", choice)
    if match is None:
        raise ValueError(f"SAFETRAIN_INFERENCE_DEVICE must be auto, cpu, cuda or cuda:N (got {choice!r})")
    index = int(match[1] or 0)
    if index >= available:
        raise ValueError(f"{choice} was asked for but this machine has {available} CUDA device(s)")
    return f"cuda:{index}"
