"""The loss's memory and time: the trainer's full-logits cross-entropy against the chunked one, same run.

A Llama-3-sized vocabulary (128,256 tokens) over hidden states 256 wide, micro-batch 2 x 1024 tokens, fp32 on
the CPU. The hidden states stand in for the decoder body's output (they require grad); the head is frozen
(LoRA: only the hidden states' gradient is needed) or trained (full fine-tuning: the head's gradient too). The
plain loss is the trainer's without the chunked head (`loss.summed_loss`: shifted logits, upcast, one
`F.cross_entropy`); the chunked one is `chunked_loss.fused_linear_cross_entropy` on the unshifted hidden
states with `shift_labels`.

Memory is the high-water mark of live tensors during forward + backward (`live_tensors.LiveTensorPeak`: what
torch.cuda.max_memory_allocated would count; the weights and the hidden states exist before and are not
counted). Time is the best of a few forward + backward runs outside the counting mode, plain and chunked interleaved,
one torch thread.

    python benchmarks/chunked_loss_memory.py [--vocab 128256] [--hidden 256] [--batch 2] [--seq 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.training.chunked_loss import (  # noqa: E402
    BYTES_PER_LOGIT,
    IGNORE_INDEX,
    chunk_tokens_for,
    chunked_loss_bytes,
    fused_linear_cross_entropy,
    loss_backend_reason,
    select_loss_backend,
    shift_labels,
)
from benchmarks.live_tensors import LiveTensorPeak  # noqa: E402
from benchmarks.plan_accuracy import append_results, machine_info  # noqa: E402

MIB = 2**20
REPEATS = 3
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The trainer's loss today: the whole shifted logits, upcast, one cross-entropy."""
    logits = F.linear(hidden, weight)[:, :-1]
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss a slice of tokens at a time."""
    return fused_linear_cross_entropy(hidden, weight, shift_labels(labels))


def live_peak(loss_of: Loss, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    """The live-tensor high-water mark of one forward + backward, and the loss."""
    with LiveTensorPeak() as live:
        loss = loss_of(hidden, weight, labels)
        loss.backward()
    value = loss.item()
    hidden.grad = weight.grad = None
    return live.peak, value


def seconds(loss_of: Loss, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward + backward, timed."""
    started = time.perf_counter()
    loss_of(hidden, weight, labels).backward()
    elapsed = time.perf_counter() - started
    hidden.grad = weight.grad = None
    return elapsed


def measure(head_trained: bool, args: argparse.Namespace) -> dict[str, float]:
    """Peaks and times of the plain and the chunked loss for one setting, interleaved."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=generator).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) * 0.02).requires_grad_(head_trained)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    result: dict[str, float] = {}
    for name, loss_of in (("plain", plain_loss), ("chunked", chunked_loss)):
        result[f"{name}_peak"], result[f"{name}_loss"] = live_peak(loss_of, hidden, weight, labels)
    times: dict[str, list[float]] = {"plain": [], "chunked": []}
    for _ in range(REPEATS):  # interleaved, so a change in the shared machine's load falls on both alike
        for name, loss_of in (("plain", plain_loss), ("chunked", chunked_loss)):
            times[name].append(seconds(loss_of, hidden, weight, labels))
    result.update({f"{name}_seconds": min(values) for name, values in times.items()})
    return result


def report_lines(results: dict[str, dict[str, float]], args: argparse.Namespace) -> list[str]:
    tokens = args.batch * args.seq
    chunk = chunk_tokens_for(args.vocab)
    lines = [
        f"- {args.batch} x {args.seq} tokens, vocabulary {args.vocab:,}, hidden {args.hidden}, fp32, "
        f"{torch.get_num_threads()} torch thread(s); backend {select_loss_backend('cpu')} "
        f"({loss_backend_reason('cpu')}); {chunk} tokens a slice (default 128 MiB budget at "
        f"{BYTES_PER_LOGIT} bytes a logit)",
        f"- the plan's loss term today, tokens x V x (2 x 4 + 12): {tokens * args.vocab * 20 / MIB:,.0f} MiB; "
        f"the chunked loss's term (`chunked_loss_bytes`): "
        f"{chunked_loss_bytes(tokens, args.vocab, args.hidden) / MIB:,.0f} MiB",
    ]
    for setting, r in results.items():
        lines.append(
            f"- {setting}: live-tensor peak plain {r['plain_peak'] / MIB:,.0f} MiB, chunked "
            f"{r['chunked_peak'] / MIB:,.0f} MiB, ratio {r['chunked_peak'] / r['plain_peak']:.3f}; time plain "
            f"{r['plain_seconds']:.2f} s, chunked {r['chunked_seconds']:.2f} s, ratio "
            f"{r['chunked_seconds'] / r['plain_seconds']:.2f}; loss {r['plain_loss']:.2f} vs {r['chunked_loss']:.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared cores)")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {
        "frozen head (LoRA)": measure(False, args),
        "trained head (full fine-tuning)": measure(True, args),
    }
    lines = report_lines(results, args)
    print("\n".join(lines))
    if not args.no_write:
        append_results(
            "Chunked loss memory (benchmarks/chunked_loss_memory.py)", f"### {machine_info()}\n" + "\n".join(lines)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
