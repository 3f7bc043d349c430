"""Filters for two notices the libraries print on every run that a user can do nothing about.

Installed when the `backend` package is first imported, so every process (CLI trainer, API, worker and its
pool processes, inference engine) has them before bitsandbytes or peft is imported. Each filter matches one
message where its library emits it; every other warning still shows.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes tries a Hub kernel for 4-bit CPU matmuls at import on CPUs with AVX512-BF16; without network
# access or the `kernels` package it warns on every run, then uses its own kernel (nothing is lost).
BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

# peft (0.21) still calls transformers 4's names for activation checkpointing, which transformers 5 keeps as
# deprecated aliases that warn on every LoRA run. The calls are peft's: nothing a user could change. Only these
# aliases are matched, and only where transformers' modeling_utils warns them.
PEFT_CHECKPOINTING_ALIASES = r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"
TRANSFORMERS_MODELING_MODULE = r"transformers\.modeling_utils"


class _DropBitsandbytesCpuKernelNotice(logging.Filter):
    """Drops that one bitsandbytes notice; every other record of its logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_CPU_KERNEL_NOTICE)


def silence_bitsandbytes_cpu_kernel_notice() -> None:
    """Install the filter on bitsandbytes' CPU-ops logger (before bitsandbytes is imported; idempotent)."""
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)
    if not any(isinstance(existing, _DropBitsandbytesCpuKernelNotice) for existing in logger.filters):
        logger.addFilter(_DropBitsandbytesCpuKernelNotice())


def silence_peft_checkpointing_aliases() -> None:
    """Ignore transformers' FutureWarning for the checkpointing aliases peft calls (idempotent)."""
    warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_ALIASES, category=FutureWarning,
                            module=TRANSFORMERS_MODELING_MODULE)


def silence_library_noise() -> None:
    """Both filters (idempotent)."""
    silence_bitsandbytes_cpu_kernel_notice()
    silence_peft_checkpointing_aliases()
