"""Trainer overhead: run_training's tokens/s against a minimal hand-written PyTorch+PEFT loop.

Same GPT-2-shaped model (20-50M parameters, random weights, made locally), same packed data, same LoRA
setup, same number of steps, in the same process, interleaved and repeated. Only the steady-state steps
are timed (after `--warmup_steps`), for both: model loading, tokenization and the final save are not
training throughput. The trainer's time includes everything it does per step (telemetry samples and
JSONL lines at each logging step, the progress bar, loss bookkeeping, gradient clipping, the schedule).
Both wall-clock tokens/s and tokens per CPU-second (process time, all threads) are measured: on a shared
machine the wall clock also counts other people's work, CPU time counts only this process's. Prints the
ratios (target >= 0.9) and appends them to benchmarks/RESULTS.md under "Trainer overhead".

    python benchmarks/trainer_overhead.py [--steps 16] [--repeats 2] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from api_common import append_results
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.training.datasets import collate, load_examples, tokenize_examples
from backend.training.events import TrainingEvent
from backend.training.modeling import default_lora_targets
from backend.training.options import TrainingOptions
from backend.training.tiny_models import make_tiny_model
from backend.training.trainer import run_training

HIDDEN, LAYERS, HEADS = 512, 8, 8
WORDS = [
    "memory",
    "adapter",
    "gradient",
    "checkpoint",
    "quantized",
    "weights",
    "layer",
    "token",
    "batch",
    "model",
    "train",
    "loss",
    "step",
    "rank",
    "alpha",
    "dropout",
    "device",
    "offload",
    "optimizer",
    "schedule",
    "warmup",
    "decay",
    "sequence",
    "packing",
    "the",
    "a",
    "of",
    "to",
    "and",
]


@dataclass
class Setup:
    model_dir: Path
    data: Path
    work: Path
    steps: int
    warmup_steps: int
    batch: int
    seq: int
    lora_r: int

    def options(self, output_dir: Path) -> TrainingOptions:
        return TrainingOptions(
            model=str(self.model_dir),
            data=str(self.data),
            output_dir=str(output_dir),
            use_lora=True,
            lora_r=self.lora_r,
            lora_alpha=2 * self.lora_r,
            lora_dropout=0.0,
            per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=1,
            max_steps=self.steps,
            max_seq_length=self.seq,
            packing=True,
            gradient_checkpointing=False,
            logging_steps=self.warmup_steps,
            learning_rate=2e-4,
            seed=0,
        )


def _write_text_dataset(path: Path, lines: int) -> Path:
    rng = random.Random(0)
    records = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30)))} for _ in range(lines)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@dataclass
class Throughput:
    wall: float  # tokens per wall-clock second
    cpu: float  # tokens per CPU-second of this process


def _clocks() -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _throughput(tokens: float, start: tuple[float, float], end: tuple[float, float]) -> Throughput:
    return Throughput(wall=tokens / (end[0] - start[0]), cpu=tokens / (end[1] - start[1]))


def trainer_throughput(setup: Setup, run_index: int) -> Throughput:
    """run_training's throughput between its metrics events at warmup_steps and at the last step."""
    stamps: dict[int, tuple[float, float]] = {}

    def on_event(event: TrainingEvent) -> None:
        if event.kind == "metrics":
            stamps[int(event.data["step"])] = _clocks()

    result = run_training(setup.options(setup.work / f"trainer-{run_index}"), on_event=on_event)
    if result.status != "succeeded":
        raise RuntimeError(f"run_training {result.status}: {result.error_code} {result.error_message}")
    # Packed blocks are all max_seq_length long (at most one shorter last block): tokens per step is constant.
    tokens_per_step = result.trained_tokens / result.steps
    timed_steps = setup.steps - setup.warmup_steps
    return _throughput(tokens_per_step * timed_steps, stamps[setup.warmup_steps], stamps[setup.steps])


def baseline_throughput(setup: Setup) -> Throughput:
    """The same training, hand-written: PEFT LoRA on the model, AdamW, forward/backward/step, nothing else."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(setup.model_dir)
    fmt, examples = load_examples(setup.data)
    blocks = tokenize_examples(examples, fmt, tokenizer, max_seq_length=setup.seq, packing=True)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, use_safetensors=True).to(device)
    model.config.use_cache = False
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=setup.lora_r,
        lora_alpha=2 * setup.lora_r,
        lora_dropout=0.0,
        target_modules=default_lora_targets(model),
    )
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    order = list(range(len(blocks)))
    random.Random(0).shuffle(order)
    tokens = 0
    started = _clocks()
    for step in range(setup.steps):
        if step == setup.warmup_steps:
            started, tokens = _clocks(), 0
        picked = [blocks[order[(step * setup.batch + i) % len(order)]] for i in range(setup.batch)]
        batch = {key: value.to(device) for key, value in collate(picked, tokenizer.pad_token_id).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return _throughput(tokens, started, _clocks())


def machine_line() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__} with {torch.get_num_threads()} threads"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup_steps", type=int, default=4, help="untimed steps; also the logging interval")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best of each counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    load_before = _load()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="trainer-overhead-") as temporary:
        work = Path(temporary)
        model_dir = make_tiny_model(
            work / "gpt2-bench", arch="gpt2", hidden=HIDDEN, layers=LAYERS, heads=HEADS, context=max(256, args.seq)
        )
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        lines = max(400, args.steps * args.batch * args.seq // 25)
        setup = Setup(
            model_dir,
            _write_text_dataset(work / "data.jsonl", lines),
            work,
            args.steps,
            args.warmup_steps,
            args.batch,
            args.seq,
            args.lora_r,
        )
        trainer_runs: list[Throughput] = []
        baseline_runs: list[Throughput] = []
        for index in range(args.repeats):
            trainer_runs.append(trainer_throughput(setup, index))
            baseline_runs.append(baseline_throughput(setup))
            print(
                f"run {index + 1}: trainer {_show(trainer_runs[-1])}; baseline {_show(baseline_runs[-1])}", flush=True
            )

    wall_ratio = max(run.wall for run in trainer_runs) / max(run.wall for run in baseline_runs)
    cpu_ratio = max(run.cpu for run in trainer_runs) / max(run.cpu for run in baseline_runs)
    shape = (
        f"GPT-2-shaped random-weight model, hidden {HIDDEN}, {LAYERS} layers, {parameters / 1e6:.1f}M parameters; "
        f"LoRA r={args.lora_r} on c_attn, c_proj, c_fc; packed text, micro-batch {args.batch} x {args.seq} tokens; "
        f"{args.steps} steps, the first {args.warmup_steps} untimed; {args.repeats} interleaved runs each"
    )
    print(shape)
    print(f"ratio (best of each): wall-clock {wall_ratio:.3f}, CPU-time {cpu_ratio:.3f} (target >= 0.9)")
    if not args.no_record:
        append_results(
            "Trainer overhead",
            [
                f"- setup: {machine_line()}; load average before {load_before}, after {_load()}; {shape}",
                f"- run_training: {'; '.join(_show(run) for run in trainer_runs)}",
                f"- hand-written PyTorch+PEFT loop: {'; '.join(_show(run) for run in baseline_runs)}",
                f"- ratio, best run of each: wall-clock {wall_ratio:.3f}, CPU-time {cpu_ratio:.3f} "
                f"(target >= 0.9: {'met' if min(wall_ratio, cpu_ratio) >= 0.9 else 'see note'})",
            ],
        )
    return 0


def _show(run: Throughput) -> str:
    return f"{run.wall:.0f} tokens/s wall, {run.cpu:.0f} tokens/CPU-s"


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


if __name__ == "__main__":
    raise SystemExit(main())
