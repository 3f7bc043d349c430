"""Benchmark 2: the memory plan's estimate against the measured peak of real training steps.

For each setting (full, LoRA, LoRA+8-bit, LoRA+4-bit, each with and without gradient checkpointing) a fresh
subprocess imports the libraries, then notes its resident memory, loads the model exactly as the trainer
does (`backend.training.modeling.load_model_and_tokenizer`: BitsAndBytesConfig, prepare_model_for_kbit_training,
get_peft_model), and runs a few optimizer steps the way the trainer's loop does (forward, summed
cross-entropy on the shifted fp32 logits, backward, AdamW, zero_grad(set_to_none=True)).

Measured peak on the CPU: the kernel's resident-set high-water mark (VmHWM) after the steps, minus the
resident set just before loading; the high-water mark is reset first (`5` into /proc/self/clear_refs) so
the imports' own peak does not count. Where that reset is refused, ru_maxrss stands in. On CUDA:
torch.cuda.max_memory_allocated, compared with the estimate less the CUDA context (which the allocator
does not see).

On the CPU each setting is also measured the way CUDA's allocator counts: the live tensors (weights, then the
high-water mark of every storage the steps create, `live_tensors.LiveTensorPeak`), against the estimate less
its CPU overhead (runtime and heap), judged by the GPU's ±15%. That checks the activation terms a GPU run
checks, on a machine without one.

    python benchmarks/plan_accuracy.py            # prints the table, appends it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MIB = 1024**2
TOLERANCE_CPU = 0.25
TOLERANCE_CUDA = 0.15
STEPS = 2
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": {"arch": "gpt2", "hidden": 256, "layers": 4, "heads": 4, "context": 512},  # 3.4M parameters
    "llama": {"arch": "llama", "hidden": 256, "layers": 4, "heads": 4, "context": 512},  # gated MLP, GQA, RMSNorm
}
SETTINGS: list[dict[str, Any]] = [
    {"name": name, "use_lora": lora, "use_8bit": bits == 8, "use_4bit": bits == 4, "gradient_checkpointing": gc}
    for name, lora, bits in (("full", False, 0), ("LoRA", True, 0), ("LoRA+8bit", True, 8), ("LoRA+4bit", True, 4))
    for gc in (False, True)
] + [  # issue 11's techniques, each on checkpointed LoRA (the longest-context setting)
    {"name": name, "use_lora": True, "use_8bit": False, "use_4bit": bits == 4, "gradient_checkpointing": True,
     switch: True}
    for name, bits, switch in (("LoRA+tiled MLP", 0, "tiled_mlp"), ("LoRA+4bit+tiled MLP", 4, "tiled_mlp"),
                               ("LoRA+offload", 0, "offload_activations"))
]


# ---------------------------------------------------------------------------------------------------------
# One measurement, in its own process


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss(reset_worked: bool) -> int:
    if reset_worked:
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def training_options(setting: dict[str, Any], folder: str, *, batch: int, seq: int) -> Any:
    """The TrainingOptions of one benchmark setting."""
    from backend.training.options import TrainingOptions

    return TrainingOptions.model_validate(
        {
            "model": folder,
            "use_lora": setting["use_lora"],
            "use_8bit": setting["use_8bit"],
            "use_4bit": setting["use_4bit"],
            "gradient_checkpointing": setting["gradient_checkpointing"],
            "per_device_train_batch_size": batch,
            "max_seq_length": seq,
            "bf16": setting.get("bf16", False),
            "fp16": setting.get("fp16", False),
            "chunked_loss": setting.get("chunked_loss", True),
            "tiled_mlp": setting.get("tiled_mlp", False),
            "offload_activations": setting.get("offload_activations", False),
        }
    )


def train_steps(
    model: Any, batch: dict[str, Any], steps: int, *, autocast_dtype: Any = None, chunked_loss: bool = False
) -> float:
    """A few optimizer steps as the trainer runs them (its chunked loss, or the plain one); returns the last loss."""
    import torch

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_value = float("nan")
    for _ in range(steps):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = _summed_loss(model, batch, chunked_loss=chunked_loss)
        loss = loss / (batch["input_ids"][:, 1:].numel())
        loss.backward()
        loss_value = float(loss.detach())
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_value


def _summed_loss(model: Any, batch: dict[str, Any], *, chunked_loss: bool) -> Any:
    """The summed next-token loss: the trainer's chunked one (no whole logits), or the plain one on full logits."""
    import torch.nn.functional as F

    from backend.training.chunked_loss import causal_lm_summed_loss

    if chunked_loss:
        return causal_lm_summed_loss(model, batch["input_ids"], batch["attention_mask"], batch["input_ids"])
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = outputs.logits[:, :-1]
    del outputs
    labels = batch["input_ids"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), reduction="sum")


def live_training_peak(
    model: Any, batch: dict[str, Any], steps: int, *, autocast_dtype: Any = None, chunked_loss: bool = False
) -> tuple[int, float]:
    """The weights plus the live-tensor high-water mark of `steps` training steps, and the last loss."""
    from benchmarks.live_tensors import LiveTensorPeak, storage_bytes

    weights = storage_bytes(list(model.parameters()) + list(model.buffers()))
    with LiveTensorPeak() as live:
        loss = train_steps(model, batch, steps, autocast_dtype=autocast_dtype, chunked_loss=chunked_loss)
    return weights + live.peak, loss


def measure_peak(setting: dict[str, Any], folder: str, *, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Peak memory of loading the model as the trainer does and running `steps` steps (runs in a subprocess)."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: library code is not training memory)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from backend.training.memory import load_model_config
    from backend.training.memory_estimate import chunked_loss_planned
    from backend.training.modeling import compute_dtype, load_model_and_tokenizer

    options = training_options(setting, folder, batch=batch, seq=seq)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    ids = torch.randint(1, 500, (batch, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cuda:
        inputs = {key: value.cuda() for key, value in inputs.items()}
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    reset_worked = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    started = time.perf_counter()
    model, _tokenizer = load_model_and_tokenizer(options)
    model.train()
    autocast = compute_dtype(options) if options.fp16 or options.bf16 else None
    chunked = chunked_loss_planned(options, load_model_config(folder))  # the loss the trainer would use
    if cuda:  # CUDA's allocator counts for itself
        live_bytes, loss = None, train_steps(model, inputs, steps, autocast_dtype=autocast, chunked_loss=chunked)
    else:
        live_bytes, loss = live_training_peak(model, inputs, steps, autocast_dtype=autocast, chunked_loss=chunked)
    measured = (torch.cuda.max_memory_allocated() - baseline) if cuda else _peak_rss(reset_worked) - rss_before
    return {
        "measured_bytes": int(measured),
        "live_tensor_bytes": live_bytes,
        "device": "cuda" if cuda else "cpu",
        "method": "cuda.max_memory_allocated" if cuda else ("VmHWM" if reset_worked else "ru_maxrss"),
        "seconds": round(time.perf_counter() - started, 1),
        "loss": loss,
    }


def measure_in_subprocess(setting: dict[str, Any], folder: str, *, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Run `measure_peak` in a fresh interpreter, so each setting starts from the same memory."""
    request = json.dumps({"setting": setting, "folder": folder, "batch": batch, "seq": seq, "steps": steps})
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", request],
        capture_output=True, text=True, env=env, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"measuring {setting['name']} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Estimates, the table and RESULTS.md


def estimate(setting: dict[str, Any], folder: str, *, batch: int, seq: int, device: str) -> Any:
    """The memory plan's estimate for one setting."""
    from backend.training.memory import estimate_memory, load_model_config

    options = training_options(setting, folder, batch=batch, seq=seq)
    return estimate_memory(options, load_model_config(folder), device=device)


def comparable_estimate(plan: Any) -> int:
    """The estimate in the measurement's terms: CUDA's allocator does not see the CUDA context."""
    from backend.training.memory import CUDA_CONTEXT_BYTES

    return plan.estimate_bytes - (CUDA_CONTEXT_BYTES if plan.device == "cuda" else 0)


def machine_info() -> str:
    """Date (UTC), architecture, cores and CPU model, for RESULTS.md."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return f"{now}; {platform.machine()}, {os.cpu_count()} cores, {cpu}{gpu}"


def append_results(section: str, body: str) -> None:
    """Append one dated block under `## section` in RESULTS.md (the section is created when missing)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    heading = f"## {section}"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    start = text.index(heading) + len(heading)
    following = text.find("\n## ", start)
    end = len(text) if following == -1 else following
    rest = text[end:].lstrip("\n")
    text = text[:end].rstrip("\n") + "\n\n" + body.strip("\n") + "\n" + ("\n" + rest if rest else "")
    RESULTS.write_text(text)


def make_model(folder: Path, arch: str) -> str:
    """The tiny-but-not-trivial model every setting trains."""
    from backend.training.tiny_models import make_tiny_model

    return str(make_tiny_model(folder, **MODEL_SHAPES[arch]))


def run(
    *, arch: str, batch: int, seq: int, steps: int, write: bool, chunked_loss: bool = True,
    only: set[str] | None = None,
) -> int:
    """Measure every setting, print the table, append it to RESULTS.md; 0 when all are within tolerance."""
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / f"{arch}-bench", arch)
        chosen = [setting for setting in SETTINGS if only is None or setting["name"] in only]
        for setting in ({**setting, "chunked_loss": chunked_loss} for setting in chosen):
            measured = measure_in_subprocess(setting, folder, batch=batch, seq=seq, steps=steps)
            plan = estimate(setting, folder, batch=batch, seq=seq, device=measured["device"])
            rows.append((setting, plan, measured))
            print(_row(setting, plan, measured), flush=True)
    device = rows[0][2]["device"]
    tolerance = TOLERANCE_CUDA if device == "cuda" else TOLERANCE_CPU
    errors = [comparable_estimate(plan) / measured["measured_bytes"] - 1 for _, plan, measured in rows]
    within = sum(abs(error) <= tolerance for error in errors)
    table = "\n".join([_header(), *(_row(*row) for row in rows)])
    summary = f"{within}/{len(rows)} within ±{tolerance:.0%}; worst {max(errors, key=abs):+.1%}"
    if device == "cpu":
        live_errors = [_live_error(plan, measured) for _, plan, measured in rows]
        live_within = sum(abs(error) <= TOLERANCE_CUDA for error in live_errors)
        within += live_within - len(rows)  # both measurements must hold
        summary += (
            f"; live tensors {live_within}/{len(rows)} within ±{TOLERANCE_CUDA:.0%}, "
            f"worst {max(live_errors, key=abs):+.1%}"
        )
    summary += f"; {time.perf_counter() - started:.0f} s"
    print(summary)
    if write:
        shape = ", ".join(f"{key}={value}" for key, value in MODEL_SHAPES[arch].items())
        append_results(
            "Memory plan accuracy",
            f"### {machine_info()}\n"
            f"Tiny {arch} ({shape}), micro-batch {batch} × {seq} tokens, {steps} AdamW steps, "
            f"{'the chunked loss (the default)' if chunked_loss else 'the plain loss on full logits'}; "
            f"measured with {rows[0][2]['method']} (growth from just before loading) and, on the CPU, as live "
            f"tensors against the estimate less its CPU overhead. Estimate: `estimate_memory` on the config "
            f"alone.\n\n{table}\n\n{summary}\n",
        )
    return 0 if within == len(rows) else 1


def _header() -> str:
    return (
        "| setting | checkpointing | estimate MiB | (activations MiB) | measured MiB | error "
        "| live tensors MiB | estimate less overhead MiB | error |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )


def _live_error(plan: Any, measured: dict[str, Any]) -> float:
    """The estimate less its CPU overhead against the live tensors' peak (what CUDA's allocator counts)."""
    return (plan.estimate_bytes - plan.breakdown.overhead) / measured["live_tensor_bytes"] - 1


def _row(setting: dict[str, Any], plan: Any, measured: dict[str, Any]) -> str:
    estimate_bytes = comparable_estimate(plan)
    error = estimate_bytes / measured["measured_bytes"] - 1
    return (
        f"| {setting['name']} | {'on' if setting['gradient_checkpointing'] else 'off'} | "
        f"{estimate_bytes / MIB:.0f} | {plan.breakdown.activations / MIB:.0f} | "
        f"{measured['measured_bytes'] / MIB:.0f} | {error:+.1%} |{_live_cells(plan, measured)}"
    )


def _live_cells(plan: Any, measured: dict[str, Any]) -> str:
    if measured.get("live_tensor_bytes") is None:
        return " - | - | - |"
    allocator_view = plan.estimate_bytes - plan.breakdown.overhead
    return (
        f" {measured['live_tensor_bytes'] / MIB:.0f} | {allocator_view / MIB:.0f} | "
        f"{_live_error(plan, measured):+.1%} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, or (with --measure) one measurement for the parent process."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(MODEL_SHAPES), default="gpt2", help="the tiny model trained")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch size")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per setting")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--plain-loss", action="store_true", help="train and plan with --no_chunked_loss")
    parser.add_argument("--only", help="comma-separated setting names (e.g. 'LoRA+tiled MLP,LoRA+offload')")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        request = json.loads(args.measure)
        print(json.dumps(measure_peak(request["setting"], request["folder"], batch=request["batch"],
                                      seq=request["seq"], steps=request["steps"])))
        return 0
    only = {name.strip() for name in args.only.split(",")} if args.only else None
    return run(arch=args.arch, batch=args.batch, seq=args.seq, steps=args.steps, write=not args.no_write,
               chunked_loss=not args.plain_loss, only=only)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
