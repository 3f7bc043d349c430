"""Peak memory of `train_safe.py` against plain transformers Trainer + PEFT, same settings, same run (CPU).

Issue 11's setting: a tiny random-weight Llama (hidden 256, 2 layers) with Llama-3's 128,256-token vocabulary
(the tokenizer uses 512 of them; the head and the logits are full width), LoRA r=8 (alpha 16, dropout 0.05) on
q_proj and v_proj, micro-batch 2 x 1024 tokens (every example is exactly 1,024 tokens: long text lines
truncated), 3 steps, fp32, no gradient checkpointing, AdamW at 2e-4 with linear decay, the same data and seed.

Each run is its own fresh process:
- safetrain: `python backend/training/train_safe.py --model M --data D --output_dir O --use_lora --lora_r 8
  --lora_target_modules q_proj,v_proj --no_gradient_checkpointing --max_seq_length 1024
  --per_device_train_batch_size 2 --max_steps 3 ...` (the chunked loss is on by default);
- baseline: `AutoModelForCausalLM.from_pretrained`, `get_peft_model` with the same LoRA, `transformers.Trainer`
  on the same token ids (safetrain's tokenization of the same file, checked equal to the tokenizer's own).

Two measures, each run on its own:
- peak RSS: the child's `ru_maxrss` from `os.wait4` on that child alone (per run, never a maximum over runs);
- live-tensor peak (`benchmarks/live_tensors.LiveTensorPeak`, what torch.cuda.max_memory_allocated would count
  on a GPU) of the whole run, loading included, in a fresh process per run: `train_safe.main` in-process for
  safetrain, from_pretrained to the end of `Trainer.train` for the baseline. Both load the base weights with
  from_pretrained from safetensors, whose storages are not made by a torch operator, so neither counts them (the
  peaks are training memory: activations, logits, LoRA weights, gradients, optimizer states).

Runs are interleaved (safetrain, baseline, safetrain, ...) so a change in a shared machine's load falls on both.
Prints the ratios (target <= 0.5) and appends a section to benchmarks/RESULTS.md unless `--no-write`.

    python benchmarks/peak_vs_trainer.py [--repeats 2] [--hidden 256] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
VOCAB = 128_256
LORA_TARGETS = ["q_proj", "v_proj"]
LEARNING_RATE = 2e-4
SEED = 0


def make_model(folder: Path, hidden: int, layers: int, seq: int) -> None:
    """The tiny Llama with the 128,256-token head, random weights, saved as safetensors with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from backend.training.tiny_models import build_tokenizer, tiny_config

    config = tiny_config("llama", VOCAB, hidden=hidden, layers=layers, heads=4, context=max(seq, 2048))
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)


def make_data(path: Path, examples: int) -> None:
    """Text lines far longer than the sequence, each a different rotation of the words: all truncated."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(2400)) for i in range(examples)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")


def safetrain_argv(args: argparse.Namespace, work: Path, out: Path) -> list[str]:
    return [
        "--model", str(work / "model"), "--data", str(work / "data.jsonl"), "--output_dir", str(out),
        "--use_lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
        "--lora_target_modules", ",".join(LORA_TARGETS), "--no_gradient_checkpointing",
        "--max_seq_length", str(args.seq), "--per_device_train_batch_size", str(args.batch),
        "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--learning_rate", str(LEARNING_RATE),
        "--logging_steps", "1", "--seed", str(SEED), *(["--no_chunked_loss"] if args.plain_loss else []),
    ]


def training_ids(args: argparse.Namespace, work: Path) -> list[list[int]]:
    """The token ids safetrain trains on, checked against the tokenizer's own truncation of the same lines."""
    from transformers import AutoTokenizer

    from backend.training.datasets import load_examples, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    fmt, examples = load_examples(work / "data.jsonl")
    ours = [example.input_ids for example in tokenize_examples(examples, fmt, tokenizer, max_seq_length=args.seq)]
    texts = [json.loads(line)["text"] for line in (work / "data.jsonl").read_text().splitlines()]
    plain = tokenizer(texts, truncation=True, max_length=args.seq)["input_ids"]
    if any(len(ids) != args.seq for ids in ours):
        raise RuntimeError(f"every example must be exactly {args.seq} tokens")
    if ours != plain:
        raise RuntimeError("safetrain's tokenization differs from the tokenizer's: the runs would not see the same ids")
    return ours


def run_baseline(args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    """Plain transformers Trainer + PEFT with the same settings; its final loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    ids = training_ids(args, work)
    dataset = [{"input_ids": row, "attention_mask": [1] * len(row), "labels": row} for row in ids]
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=False,
        bf16=False, fp16=False, optim="adamw_torch", dataloader_num_workers=0, use_cpu=True, seed=SEED,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    model.save_pretrained(out / "adapter")
    # The last step's loss (train()'s training_loss is the mean over all steps; safetrain's is the last window).
    final = [row["loss"] for row in trainer.state.log_history if "loss" in row][-1]
    return {"final_loss": float(final)}


def run_safetrain_in_process(args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    from backend.training import train_safe

    code = train_safe.main(safetrain_argv(args, work, out))
    if code != 0:
        raise RuntimeError(f"train_safe.main exited {code}")
    return {"final_loss": json.loads((out / "safetrain.json").read_text())["metrics"]["train_loss"]}


def stage(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this (fresh) process, as `--stage` says."""
    import torch

    torch.set_num_threads(args.threads)
    work, out = args.work, args.work / f"out-{args.stage}-{os.getpid()}"
    if args.stage == "model":
        make_model(work / "model", args.hidden, args.layers, args.seq)
        make_data(work / "data.jsonl", examples=args.steps * args.batch)
        training_ids(args, work)
        return {"ok": True}
    if args.stage == "baseline":
        return run_baseline(args, work, out)
    from benchmarks.live_tensors import LiveTensorPeak

    with LiveTensorPeak() as live:
        if args.stage == "live-safetrain":
            result = run_safetrain_in_process(args, work, out)
        else:
            result = run_baseline(args, work, out)
    return {**result, "live_peak_bytes": live.peak}


def child_env(threads: int) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def measured(argv: list[str], cwd: Path, threads: int, log: Path) -> tuple[int, float, str]:
    """Run one fresh child; its own peak RSS in bytes (wait4's rusage of that child), wall seconds, stdout."""
    started = time.perf_counter()
    with log.open("w") as stderr, tempfile.TemporaryFile("w+") as stdout:
        child = subprocess.Popen(argv, cwd=cwd, env=child_env(threads), stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        text = stdout.read()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {child.returncode}:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024, wall, text  # ru_maxrss is in KiB on Linux


def common(args: argparse.Namespace) -> list[str]:
    return ["--work", str(args.work), "--hidden", str(args.hidden), "--layers", str(args.layers), "--seq",
            str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
            *(["--plain-loss"] if args.plain_loss else [])]


def rss_run(args: argparse.Namespace, who: str, index: int) -> dict[str, Any]:
    log = args.work / f"{who}-rss-{index}.log"
    if who == "safetrain":
        out = args.work / f"out-safetrain-rss-{index}"
        script = ROOT / "backend" / "training" / "train_safe.py"
        argv = [sys.executable, str(script), *safetrain_argv(args, args.work, out)]
        peak, wall, _ = measured(argv, ROOT / "backend", args.threads, log)
        loss = json.loads((out / "safetrain.json").read_text())["metrics"]["train_loss"]
    else:
        argv = [sys.executable, __file__, "--stage", "baseline", *common(args)]
        peak, wall, text = measured(argv, ROOT, args.threads, log)
        loss = json.loads(text.strip().splitlines()[-1])["final_loss"]
    return {"rss_bytes": peak, "wall_seconds": wall, "final_loss": loss}


def live_run(args: argparse.Namespace, who: str, index: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--stage", f"live-{who}", *common(args)]
    _, wall, text = measured(argv, ROOT, args.threads, args.work / f"{who}-live-{index}.log")
    return {**json.loads(text.strip().splitlines()[-1]), "wall_seconds": wall}


def load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], loads: tuple[str, str]) -> list[str]:
    def mib(values: list[int]) -> str:
        return ", ".join(f"{value / MIB:,.0f}" for value in values)

    rss = {who: [run["rss_bytes"] for run in runs[f"{who}-rss"]] for who in ("safetrain", "baseline")}
    live = {who: [run["live_peak_bytes"] for run in runs[f"{who}-live"]] for who in ("safetrain", "baseline")}
    # The lowest of each: what the run needs, with the least of a loaded machine's noise (the spread is shown).
    rss_ratio = min(rss["safetrain"]) / min(rss["baseline"])
    live_ratio = min(live["safetrain"]) / min(live["baseline"])
    loss = {who: runs[f"{who}-rss"][0]["final_loss"] for who in ("safetrain", "baseline")}
    wall = {who: min(run["wall_seconds"] for run in runs[f"{who}-rss"]) for who in ("safetrain", "baseline")}
    loss_name = "the plain loss (`--no_chunked_loss`)" if args.plain_loss else "the chunked loss (the default)"
    verdict = "met" if max(rss_ratio, live_ratio) <= 0.5 else "not met"
    return [
        f"Tiny Llama (hidden {args.hidden}, {args.layers} layers) with a {VOCAB:,}-token head (tokenizer 512), LoRA "
        f"r=8 alpha 16 dropout 0.05 on {'/'.join(LORA_TARGETS)}, micro-batch {args.batch} x {args.seq} tokens (every "
        f"example exactly {args.seq}), {args.steps} steps, fp32, no checkpointing, AdamW 2e-4, seed {SEED}, "
        f"{args.threads} torch thread(s); safetrain with {loss_name}; load average before {loads[0]}, after "
        f"{loads[1]}; {args.repeats} interleaved run(s) of each, each in a fresh process.",
        "",
        "| measure | train_safe.py | Trainer + PEFT | ratio (lowest of each) |",
        "| --- | ---: | ---: | ---: |",
        f"| peak RSS (wait4 of that child), MiB | {mib(rss['safetrain'])} | {mib(rss['baseline'])} | {rss_ratio:.3f} |",
        f"| live-tensor peak, whole run, MiB | {mib(live['safetrain'])} | {mib(live['baseline'])} | {live_ratio:.3f} |",
        f"| final loss (step {args.steps}) | {loss['safetrain']:.4f} | {loss['baseline']:.4f} | |",
        f"| wall, best run, s | {wall['safetrain']:.1f} | {wall['baseline']:.1f} | "
        f"{wall['safetrain'] / wall['baseline']:.2f} |",
        "",
        f"Target (issue 11) <= 0.5 for both: {verdict}.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads in every child")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each, per measure")
    parser.add_argument("--plain-loss", action="store_true", help="safetrain with --no_chunked_loss (for comparison)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--stage", choices=["model", "baseline", "live-safetrain", "live-baseline"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args)))
        return 0
    scratch = None if args.work else tempfile.mkdtemp(prefix="peak-vs-trainer-")
    args.work = args.work or Path(scratch)
    args.work.mkdir(parents=True, exist_ok=True)
    before = load()
    try:
        measured([sys.executable, __file__, "--stage", "model", *common(args)], ROOT, args.threads,
                 args.work / "model.log")
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key in
                                                 ("safetrain-rss", "baseline-rss", "safetrain-live", "baseline-live")}
        for index in range(args.repeats):
            for who in ("safetrain", "baseline"):
                runs[f"{who}-rss"].append(rss_run(args, who, index))
                print(f"{who} rss run {index + 1}: {runs[f'{who}-rss'][-1]}", flush=True)
        for index in range(args.repeats):
            for who in ("safetrain", "baseline"):
                runs[f"{who}-live"].append(live_run(args, who, index))
                print(f"{who} live run {index + 1}: {runs[f'{who}-live'][-1]}", flush=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    lines = report(args, runs, (before, load()))
    print("\n".join(lines))
    if not args.no_write:
        from benchmarks.plan_accuracy import machine_info

        results = ROOT / "benchmarks" / "RESULTS.md"
        heading = "## train_safe.py vs Trainer + PEFT, peak memory, same run (benchmarks/peak_vs_trainer.py)"
        block = "\n".join([heading, "", f"### {machine_info()}", *lines])
        results.write_text(results.read_text().rstrip("\n") + "\n\n" + block + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
