"""The two library notices every run printed are dropped in every safetrain process, and nothing else is."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

from backend.library_noise import BNB_CPU_KERNEL_LOGGER, BNB_CPU_KERNEL_NOTICE, silence_peft_checkpointing_aliases


def test_only_the_kernel_notice_is_silenced(caplog):
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)  # the logger bitsandbytes' CPU backend warns on at import
    with caplog.at_level(logging.WARNING):
        logger.warning(f"{BNB_CPU_KERNEL_NOTICE}: %s. Please make sure you already `pip install kernels`", "no kernels")
        logger.warning("a real warning")
    assert caplog.messages == ["a real warning"]


def test_only_the_checkpointing_aliases_peft_calls_are_silenced():
    def warned_by_transformers(message: str) -> None:
        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_peft_checkpointing_aliases()
        warned_by_transformers("`is_gradient_checkpointing` is deprecated and will be removed in v6.")
        warned_by_transformers("`gradient_checkpointing_enable` is deprecated and will be removed in v6.")
        warned_by_transformers("`use_cache` is deprecated")  # any other deprecation still shows
        # and the alias itself, warned by another module
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["`use_cache` is deprecated",
                                                            "`is_gradient_checkpointing` is deprecated"]


def test_a_worker_process_imports_bitsandbytes_without_the_kernel_notice():
    """What a worker's pool process imports (its task modules, warmed at fork), then bitsandbytes itself."""
    program = (
        "import logging, backend.workers.celery_app, backend.workers.jobs.preparation, bitsandbytes\n"
        f"print([type(f).__name__ for f in logging.getLogger({BNB_CPU_KERNEL_LOGGER!r}).filters])"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['_DropBitsandbytesCpuKernelNotice']"
    assert BNB_CPU_KERNEL_NOTICE not in done.stderr  # bitsandbytes warns it at import on CPUs with AVX512-BF16
