"""Benchmark 3: activation memory with and without gradient checkpointing at 512 tokens, measured and estimated.

Each run is a fresh subprocess measured as in plan_accuracy.py (peak resident-set growth from just before
loading the model on the CPU, torch.cuda.max_memory_allocated on CUDA), training the same tiny GPT-2 the
trainer's way. Activation memory = the peak at 512 tokens minus the peak of the same setting at 8 tokens
(weights, gradients, optimizer states and runtime are the same in both, so only activations remain).
On the CPU the same difference is also taken of the live tensors (what CUDA's allocator would count).
The estimate's side is `estimate_memory`'s peak difference the same way, and its activation component.

    python benchmarks/checkpointing_memory.py     # prints the table, appends it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plan_accuracy import (  # noqa: E402
    MIB,
    MODEL_SHAPES,
    append_results,
    comparable_estimate,
    estimate,
    machine_info,
    make_model,
    measure_in_subprocess,
)

SEQ = 512
REFERENCE_SEQ = 8
SETTINGS = [
    {"name": "LoRA", "use_lora": True, "use_8bit": False, "use_4bit": False},
    {"name": "full", "use_lora": False, "use_8bit": False, "use_4bit": False},
    {"name": "LoRA+8bit", "use_lora": True, "use_8bit": True, "use_4bit": False},
]


def activation_rows(folder: str, *, batch: int, steps: int) -> list[dict[str, Any]]:
    """Measured and estimated activation memory for each setting, checkpointing off and on."""
    rows = []
    for base in SETTINGS:
        reference = {**base, "gradient_checkpointing": False}
        measured_reference = measure_in_subprocess(reference, folder, batch=batch, seq=REFERENCE_SEQ, steps=steps)
        device = measured_reference["device"]
        estimated_reference = comparable_estimate(estimate(reference, folder, batch=batch, seq=REFERENCE_SEQ,
                                                           device=device))
        for checkpointing in (False, True):
            setting = {**base, "gradient_checkpointing": checkpointing}
            measured = measure_in_subprocess(setting, folder, batch=batch, seq=SEQ, steps=steps)
            plan = estimate(setting, folder, batch=batch, seq=SEQ, device=device)
            rows.append({
                "name": base["name"],
                "checkpointing": checkpointing,
                "measured": measured["measured_bytes"] - measured_reference["measured_bytes"],
                "live": _difference(measured, measured_reference, "live_tensor_bytes"),
                "estimated": comparable_estimate(plan) - estimated_reference,
                "activations": plan.breakdown.activations,
                "method": measured["method"],
            })
            print(_row(rows[-1]), flush=True)
    return rows


def _difference(measured: dict[str, Any], reference: dict[str, Any], key: str) -> int | None:
    if measured.get(key) is None or reference.get(key) is None:
        return None
    return int(measured[key] - reference[key])


def _row(row: dict[str, Any]) -> str:
    error = row["estimated"] / row["measured"] - 1
    live = "-" if row["live"] is None else f"{row['live'] / MIB:.0f}"
    return (
        f"| {row['name']} | {'on' if row['checkpointing'] else 'off'} | {row['measured'] / MIB:.0f} | "
        f"{live} | {row['estimated'] / MIB:.0f} | {error:+.1%} | {row['activations'] / MIB:.0f} |"
    )


def _savings(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for name in dict.fromkeys(row["name"] for row in rows):
        off, on = (next(r for r in rows if r["name"] == name and r["checkpointing"] is c) for c in (False, True))
        live = "" if off["live"] is None else (
            f", {(off['live'] - on['live']) / MIB:.0f} MiB of live tensors ({1 - on['live'] / off['live']:.0%})"
        )
        lines.append(
            f"{name}: checkpointing saves {(off['measured'] - on['measured']) / MIB:.0f} MiB measured "
            f"({1 - on['measured'] / off['measured']:.0%} of activation memory){live}, "
            f"{(off['estimated'] - on['estimated']) / MIB:.0f} MiB estimated"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Measure, print and record the activation memory saved by gradient checkpointing."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="micro-batch size")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    header = (
        "| setting | checkpointing | measured activation MiB | live tensors MiB | estimated MiB | error "
        "| (estimate's activations component MiB) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        rows = activation_rows(make_model(Path(tmp) / "gpt2-bench", "gpt2"), batch=args.batch, steps=args.steps)
    savings = _savings(rows)
    print("\n".join(savings))
    elapsed = f"{time.perf_counter() - started:.0f} s"
    print(elapsed)
    if not args.no_write:
        shape = ", ".join(f"{key}={value}" for key, value in MODEL_SHAPES["gpt2"].items())
        table = "\n".join([header, *(_row(row) for row in rows)])
        append_results(
            "Gradient checkpointing",
            f"### {machine_info()}\n"
            f"Tiny GPT-2 ({shape}), micro-batch {args.batch} × {SEQ} tokens, {args.steps} AdamW steps; "
            f"activation memory = peak at {SEQ} tokens − peak at {REFERENCE_SEQ} tokens, measured with "
            f"{rows[0]['method']} (growth from just before loading); the estimate is taken the same way "
            f"(CPU: activations plus glibc's retained heap).\n\n{table}\n\n" + "\n".join(f"- {s}" for s in savings)
            + f"\n\n{elapsed}\n",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
