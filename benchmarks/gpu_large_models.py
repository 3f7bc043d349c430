"""On a GPU: the guide's memory-saving command on a 7B-shaped Llama (8-bit) and a larger one (4-bit), against a
plain transformers Trainer + PEFT run with the same settings, same process tree, same data: peak memory and
tokens/s.

The model is random-weight (nothing downloads): a Llama config of the named shape, initialised on the GPU in
bfloat16 and saved as safetensors with a tokenizer trained on the spot. Then, each in a fresh process:
- safetrain: `python backend/training/train_safe.py --model M --data D --output_dir O --use_8bit --use_lora
  --lora_r 8 --gradient_checkpointing` (or `--use_4bit`), the LoRA targets named (the seven projections, Llama's
  default) plus the run's length (`--max_steps`,
  `--max_seq_length`, `--per_device_train_batch_size`, `--logging_steps 1`);
- baseline: `AutoModelForCausalLM.from_pretrained` with the same BitsAndBytesConfig and weight dtype,
  `prepare_model_for_kbit_training`, `get_peft_model` with the same LoRA (r 8, alpha 16, dropout 0.05, the
  same target modules), and `transformers.Trainer` with gradient checkpointing, the same micro-batch,
  sequence length, steps and learning rate.
Peak memory is torch.cuda.max_memory_allocated in both (safetrain's `peak_memory_bytes`); tokens/s is the
tokens of steps after the first `--warmup` over their wall-clock time, from each step's end time (safetrain's
telemetry.jsonl, a TrainerCallback for the baseline). Every example is truncated to exactly
`--max_seq_length` tokens, so both count the same tokens. safetrain's memory plan for the run is printed
beside its measured peak.

    python benchmarks/gpu_large_models.py --shape 7b --bits 8 [--steps 12] [--out DIR]
    python benchmarks/gpu_large_models.py --shape 13b --bits 4
    python benchmarks/gpu_large_models.py --shape 7b --bits 8 --plan-only   # no GPU needed: the plan alone

Issue 11's runs, on a Llama-3.1-8B-shaped model (vocabulary 128,256, 8 KV heads, MLP 14,336, 131,072 positions),
QLoRA r=32 (alpha 32, dropout 0) on all seven linear projections, bf16, checkpointing (`--qlora`):

    python benchmarks/gpu_large_models.py --shape 8b --qlora --batch 2 --seq 2048 --keep-model   # tokens/s vs Trainer
    python benchmarks/gpu_large_models.py --shape 8b --qlora --batch 1 --seq auto --steps 2 --reuse-model

`--seq auto` runs safetrain alone (Trainer has no such option) with `--max_seq_length auto`: a `--dry_run --json`
first says which length the plan picks for the budget (`--budget_gb`, else what is free on the device), the data is
made long enough for it, then the real run trains at that length and its torch.cuda.max_memory_allocated is set
beside the plan. `--smoke` runs every Python part on the CPU with a tiny model (4-bit through bitsandbytes' CPU
backend, a few steps), so the script is exercised where there is no GPU.
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
GIB = 1024**3
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
    # Llama-3.1-8B's shape (the config of meta-llama/Llama-3.1-8B, without its rope scaling: memory is the same).
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rms_norm_eps": 1e-5},
    # The same vocabulary and KV grouping at toy size, for --smoke on the CPU.
    "tiny-8b": {"hidden_size": 128, "intermediate_size": 448, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 1, "vocab_size": 128256, "max_position_embeddings": 256, "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4


def shape_config(shape: str) -> Any:
    """The LlamaConfig of `shape` (vocabulary 32,000, 4,096 positions and no KV grouping unless it says)."""
    from transformers import LlamaConfig

    settings = {"vocab_size": 32000, "max_position_embeddings": 4096,
                "num_key_value_heads": SHAPES[shape]["num_attention_heads"], **SHAPES[shape]}
    return LlamaConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, **settings)


def make_model(folder: Path, shape: str) -> None:
    """A random-weight Llama of `shape`, initialised on the GPU when there is one, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    from backend.training.tiny_models import build_tokenizer

    config = shape_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def make_data(path: Path, examples: int, seq: int = 512) -> None:
    """Long text lines (well over the sequence length in tokens), so every example is truncated to it."""
    sentence = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing"
    words = sentence.split()
    count = max(900, seq + 64)  # every word is at least one token
    lines = [" ".join(words[(i + j) % len(words)] for j in range(count)) for i in range(examples)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))


def tokens_per_second(step_times: dict[int, float], tokens_per_step: int, warmup: int) -> float:
    steps = sorted(step for step in step_times if step >= warmup)
    if len(steps) < 2:
        return float("nan")
    return (steps[-1] - steps[0]) * tokens_per_step / (step_times[steps[-1]] - step_times[steps[0]])


def lora_alpha(args: argparse.Namespace) -> int:
    return args.lora_r if args.lora_alpha is None else args.lora_alpha


def safetrain_command(args: argparse.Namespace, model: Path, data: Path, out: Path) -> list[str]:
    command = [
        sys.executable, str(ROOT / "backend" / "training" / "train_safe.py"), "--model", str(model),
        "--data", str(data), "--output_dir", str(out), f"--use_{args.bits}bit", "--use_lora",
        "--lora_r", str(args.lora_r), "--lora_alpha", str(lora_alpha(args)), "--lora_dropout", str(args.lora_dropout),
        "--lora_target_modules", ",".join(LORA_TARGETS), "--gradient_checkpointing", "--max_steps", str(args.steps),
        "--max_seq_length", str(args.seq), "--per_device_train_batch_size", str(args.batch), "--logging_steps", "1",
        "--save_steps", "100000", "--learning_rate", str(LEARNING_RATE), *(["--bf16"] if args.bf16 else []),
    ]
    if args.budget_gb is not None:
        command += ["--memory_budget_gb", str(args.budget_gb)]
    if args.every_saver:  # what benchmarks/context_planning.py's "every saver" column plans with
        command += ["--tiled_mlp", "--offload_activations", "--offload_embeddings", "--optim", "paged_adamw_8bit"]
    return command


def plan_auto_length(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    """`--max_seq_length auto --dry_run --json`: the length and the plan the real run will use."""
    command = [*safetrain_command(args, model, data, out), "--dry_run", "--json"]
    done = subprocess.run(command, cwd=ROOT / "backend", capture_output=True, text=True, check=False)
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0 or not plan.get("fits"):
        raise RuntimeError(f"the dry run exited {done.returncode}: {plan}")
    return plan


def run_safetrain(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    command = safetrain_command(args, model, data, out)
    done = subprocess.run(command, cwd=ROOT / "backend", capture_output=True, text=True, check=False)
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"train_safe.py exited {done.returncode}")
    recorded = json.loads((out / "safetrain.json").read_text())
    manifest, options = recorded["metrics"], recorded["options"]
    samples = map(json.loads, (out / "telemetry.jsonl").read_text().splitlines())
    times = {row["step"]: row["timestamp"] for row in samples}
    seq, batch = int(options["max_seq_length"]), int(options["per_device_train_batch_size"])  # as resolved
    return {
        "peak_bytes": manifest["peak_memory_bytes"], "estimate_bytes": manifest["estimate_bytes"],
        "tokens_per_second": tokens_per_second(times, batch * seq, args.warmup), "seq": seq, "batch": batch,
        "device_map": options.get("device_map"), "gradient_checkpointing": options.get("gradient_checkpointing"),
        "final_loss": manifest["train_loss"], "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_baseline(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    """Plain transformers Trainer + PEFT (runs in its own process: see main)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    started = time.perf_counter()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization, dtype=dtype,
                                                device_map=device_map)
    # The usual QLoRA recipe (PEFT's docs): norms, embeddings and head cast to float32, checkpointing on.
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    peft_model = get_peft_model(base, LoraConfig(
        r=args.lora_r, lora_alpha=lora_alpha(args), lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    encoded = tokenizer(texts, truncation=True, max_length=args.seq)["input_ids"]
    assert all(len(ids) == args.seq for ids in encoded), "every example must fill the sequence"
    dataset = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids} for ids in encoded]
    step_times: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, _args: Any, state: Any, _control: Any, **_: Any) -> None:
            step_times[state.global_step] = time.time()

    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=LEARNING_RATE, logging_steps=1, save_strategy="no", report_to=[],
        gradient_checkpointing=True, bf16=args.bf16, fp16=False, optim="adamw_torch", dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=dataset, callbacks=[StepClock()])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    # The last step's loss, as safetrain reports it (train()'s training_loss is the mean over the run).
    final = [row["loss"] for row in trainer.state.log_history if "loss" in row][-1]
    return {
        "peak_bytes": int(peak), "tokens_per_second": tokens_per_second(step_times, args.batch * args.seq, args.warmup),
        "final_loss": float(final), "wall_seconds": round(time.perf_counter() - started, 1),
    }


def in_subprocess(stage: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, __file__, "--stage", stage, *stage_flags(args, work)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    print(done.stderr[-4000:], flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_flags(args: argparse.Namespace, work: Path) -> list[str]:
    """The flags that carry this run's settings to a stage's process."""
    flags = ["--work", str(work), "--shape", args.shape, "--bits", str(args.bits), "--steps", str(args.steps),
             "--seq", str(args.seq), "--batch", str(args.batch), "--warmup", str(args.warmup),
             "--lora_r", str(args.lora_r), "--lora_alpha", str(lora_alpha(args)),
             "--lora_dropout", str(args.lora_dropout)]
    if args.bf16:
        flags.append("--bf16")
    if args.budget_gb is not None:
        flags += ["--budget_gb", str(args.budget_gb)]
    return flags


def seq_length(value: str) -> int | str:
    return value if value == "auto" else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--seq", type=seq_length, default=512, help="tokens per example, or 'auto' (safetrain alone)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, help="default: 2 x r (r with --qlora)")
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute and weights in both")
    parser.add_argument("--qlora", action="store_true",
                        help="issue 11's setting: --bits 4 --bf16 --lora_r 32 --lora_alpha 32 --lora_dropout 0")
    parser.add_argument("--budget_gb", type=float, help="--memory_budget_gb for safetrain (default: what is free)")
    parser.add_argument("--every-saver", action="store_true",
                        help="safetrain with --tiled_mlp --offload_activations --offload_embeddings --optim "
                             "paged_adamw_8bit (the longest-context setting of benchmarks/context_planning.py)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/safetrain-gpu-bench"))
    parser.add_argument("--reuse-model", action="store_true", help="keep a model of this shape already in --work")
    parser.add_argument("--keep-model", action="store_true", help="leave the model in --work for a later run")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--plan-only", action="store_true", help="print the memory plan in the peak's terms and stop")
    parser.add_argument("--smoke", action="store_true",
                        help="a check of the script itself on the CPU: tiny 128k-vocabulary Llama, --qlora, 3 steps, "
                             "then --seq auto")
    parser.add_argument("--stage", choices=["model", "safetrain", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.qlora:
        args.bits, args.bf16, args.lora_r, args.lora_dropout = 4, True, 32, 0.0
        args.lora_alpha = 32 if args.lora_alpha is None else args.lora_alpha
    if args.lora_alpha is None:
        args.lora_alpha = 2 * args.lora_r
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return smoke(args)
    if args.plan_only:
        print(plan_only(args))
        return 0
    model, data = args.work / f"llama-{args.shape}", args.work / "data.jsonl"
    if args.stage == "model":
        make_model(model, args.shape)
        print(json.dumps({"ok": True}))
        return 0
    if args.stage == "safetrain":
        print(json.dumps(run_safetrain(args, model, data, args.work / "run-safetrain")))
        return 0
    if args.stage == "baseline":
        print(json.dumps(run_baseline(args, model, data, args.work / "run-baseline")))
        return 0
    result = run(args, model, data)
    print(summary(result) if args.seq != "auto" else summary_auto(result))
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def run(args: argparse.Namespace, model: Path, data: Path) -> dict[str, Any]:
    """Make (or reuse) the model, then safetrain and the baseline, each in its own process."""
    marker = model / "shape.json"
    reused = args.reuse_model and marker.exists() and json.loads(marker.read_text()) == SHAPES[args.shape]
    for path in args.work.iterdir() if args.work.exists() else []:
        if not (reused and path == model):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not reused:
        in_subprocess("model", args, args.work)
        marker.write_text(json.dumps(SHAPES[args.shape]))
    made = time.perf_counter() - started
    result: dict[str, Any] = {
        "shape": args.shape, "bits": args.bits, "bf16": args.bf16, "lora_r": args.lora_r,
        "lora_alpha": lora_alpha(args), "lora_dropout": args.lora_dropout, "steps": args.steps, "seq": args.seq,
        "batch": args.batch, "model_seconds": round(made, 1), "model_reused": reused, "device": device_name(),
    }
    try:
        if args.seq == "auto":
            # The dry run sees the same free memory the real run will (both plan before loading anything).
            make_data(data, examples=4 * args.steps * args.batch)
            plan = plan_auto_length(args, model, data, args.work / "run-plan")
            result["plan"] = {key: plan.get(key) for key in ("max_seq_length", "estimate_bytes", "budget_bytes",
                                                               "fits", "techniques", "breakdown")}
            result["position_limit"] = SHAPES[args.shape].get("max_position_embeddings", 4096)
            make_data(data, examples=4 * args.steps * args.batch, seq=int(plan["max_seq_length"]))
            result["safetrain"] = in_subprocess("safetrain", args, args.work)
        else:
            make_data(data, examples=4 * args.steps * args.batch, seq=args.seq)
            result["safetrain"] = in_subprocess("safetrain", args, args.work)
            result["baseline"] = in_subprocess("baseline", args, args.work)
    finally:
        for path in args.work.iterdir():
            if not (args.keep_model and path == model):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    return result


def smoke(args: argparse.Namespace) -> int:
    """Every Python part of the GPU runs on the CPU at toy size: the 8B runs' settings, then --seq auto."""
    work = Path(tempfile.mkdtemp(prefix="gpu-large-smoke-"))
    common = ["--shape", "tiny-8b", "--qlora", "--steps", "3", "--warmup", "1", "--work", str(work)]
    try:
        code = main([*common, "--batch", "2", "--seq", "64", "--keep-model", "--out", str(work / "speed.json")])
        speed = json.loads((work / "speed.json").read_text())
        assert speed["safetrain"]["seq"] == 64 and speed["baseline"]["tokens_per_second"] > 0, speed
        code |= main([*common, "--batch", "1", "--seq", "auto", "--steps", "2", "--reuse-model", "--every-saver",
                      "--keep-model", "--out", str(work / "auto.json")])
        auto = json.loads((work / "auto.json").read_text())
        assert auto["model_reused"] and auto["safetrain"]["seq"] == auto["plan"]["max_seq_length"], auto
        code |= main(["--shape", "8b", "--qlora", "--batch", "2", "--seq", "2048", "--plan-only"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("smoke: every stage ran" if code == 0 else f"smoke: exit {code}")
    return code


def plan_only(args: argparse.Namespace) -> str:
    """The plan for this shape, with and without checkpointing, as torch.cuda.max_memory_allocated would see it."""
    from backend.training.memory import CUDA_CONTEXT_BYTES, estimate_memory
    from backend.training.options import TrainingOptions

    config = shape_config(args.shape)
    lines = []
    for checkpointing in (False, True):
        options = TrainingOptions.model_validate({
            "use_lora": True, "lora_r": args.lora_r, "lora_alpha": lora_alpha(args), "lora_dropout": args.lora_dropout,
            "lora_target_modules": LORA_TARGETS, f"use_{args.bits}bit": True, "bf16": args.bf16,
            "gradient_checkpointing": checkpointing, "per_device_train_batch_size": args.batch,
            "max_seq_length": args.seq,
        })
        plan = estimate_memory(options, config, device="cuda")
        parts = ", ".join(f"{name} {size / 1e9:.2f}" for name, size in plan.breakdown.to_dict().items())
        lines.append(
            f"{args.shape} {args.bits}-bit LoRA r {args.lora_r}{', bf16' if args.bf16 else ''}, checkpointing "
            f"{'on' if checkpointing else 'off'}, {args.batch} x {args.seq}: "
            f"{(plan.estimate_bytes - CUDA_CONTEXT_BYTES) / 1e9:.2f} GB less the CUDA context ({parts} GB)"
        )
    return "\n".join(lines)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def setting(result: dict[str, Any]) -> str:
    precision = "bf16" if result["bf16"] else "fp32 compute"
    return (f"{result['shape']} Llama, {result['bits']}-bit + LoRA r {result['lora_r']} (alpha {result['lora_alpha']}, "
            f"dropout {result['lora_dropout']}, all linear) + gradient checkpointing, {precision}")


def summary(result: dict[str, Any]) -> str:
    from backend.training.memory import CUDA_CONTEXT_BYTES

    ours, base = result["safetrain"], result["baseline"]
    peak_ratio = f"{ours['peak_bytes'] / base['peak_bytes']:.2f}" if result["device"] != "cpu" else "n/a"
    # The plan counts the CUDA context, which torch's allocator (the measured peak) does not see.
    plan = ours["estimate_bytes"] - (CUDA_CONTEXT_BYTES if result["device"] != "cpu" else 0)
    return (
        f"{setting(result)}, micro-batch {result['batch']} x {result['seq']} tokens, {result['steps']} steps on "
        f"{result['device']}:\n"
        f"  safetrain: peak {ours['peak_bytes'] / GIB:.2f} GiB (plan {plan / GIB:.2f} GiB without the CUDA context, "
        f"{plan / max(ours['peak_bytes'], 1) - 1:+.1%}), "
        f"{ours['tokens_per_second']:.0f} tokens/s, final loss {ours['final_loss']:.3f}, {ours['wall_seconds']} s\n"
        f"  baseline:  peak {base['peak_bytes'] / GIB:.2f} GiB, {base['tokens_per_second']:.0f} tokens/s, "
        f"final loss {base['final_loss']:.3f}, {base['wall_seconds']} s\n"
        f"  ratios safetrain/baseline: peak {peak_ratio}, "
        f"tokens/s {ours['tokens_per_second'] / base['tokens_per_second']:.2f}"
        + ("\n  (on the CPU safetrain's peak is its process RSS and the baseline's is not measured)"
           if result["device"] == "cpu" else "")
    )


def summary_auto(result: dict[str, Any]) -> str:
    """The --seq auto run: the length the plan chose, and the measured peak against the plan and the budget."""
    from backend.training.memory import CUDA_CONTEXT_BYTES

    ours, plan = result["safetrain"], result["plan"]
    context = CUDA_CONTEXT_BYTES if result["device"] != "cpu" else 0
    planned = ours["estimate_bytes"] - context
    used = ours["peak_bytes"] + context
    measure = "torch.cuda.max_memory_allocated" if context else "process RSS"
    capped = " (the model's position limit)" if ours["seq"] == result["position_limit"] else ""
    return (
        f"{setting(result)}, micro-batch {ours['batch']}, --max_seq_length auto, {result['steps']} steps on "
        f"{result['device']}:\n"
        f"  planned {plan['max_seq_length']:,} tokens for a budget of {plan['budget_bytes'] / GIB:.2f} GiB; trained at "
        f"{ours['seq']:,}{capped}; device_map {ours['device_map']}\n"
        f"  peak {ours['peak_bytes'] / GIB:.2f} GiB ({measure}) against a plan of "
        f"{planned / GIB:.2f} GiB without the CUDA context ({planned / max(ours['peak_bytes'], 1) - 1:+.1%}); "
        f"with the context {used / GIB:.2f} of {plan['budget_bytes'] / GIB:.2f} GiB: "
        f"{'fits' if used <= plan['budget_bytes'] else 'over the budget'}\n"
        f"  {ours['tokens_per_second']:.0f} tokens/s, final loss {ours['final_loss']:.3f}, {ours['wall_seconds']} s"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
