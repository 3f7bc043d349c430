"""On a GPU: the guide's memory-saving command on a 7B-shaped Llama (8-bit) and a larger one (4-bit), against a
plain transformers Trainer + PEFT run with the same settings, same process tree, same data: peak memory and
tokens/s.

The model is random-weight (nothing downloads): a Llama config of the named shape, initialised on the GPU in
bfloat16 and saved as safetensors with a tokenizer trained on the spot. Then, each in a fresh process:
- safetrain: `python backend/training/train_safe.py --model M --data D --output_dir O --use_8bit --use_lora
  --lora_r 8 --gradient_checkpointing` (or `--use_4bit`) plus the run's length (`--max_steps`,
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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4


def make_model(folder: Path, shape: str) -> None:
    """A random-weight Llama of `shape`, initialised on the GPU when there is one, saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from backend.training.tiny_models import build_tokenizer

    config = LlamaConfig(
        vocab_size=32000, max_position_embeddings=4096, num_key_value_heads=SHAPES[shape]["num_attention_heads"],
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def make_data(path: Path, examples: int) -> None:
    """Long text lines (well over the sequence length in tokens), so every example is truncated to it."""
    sentence = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing"
    words = sentence.split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(900)) for i in range(examples)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))


def tokens_per_second(step_times: dict[int, float], tokens_per_step: int, warmup: int) -> float:
    steps = sorted(step for step in step_times if step >= warmup)
    if len(steps) < 2:
        return float("nan")
    return (steps[-1] - steps[0]) * tokens_per_step / (step_times[steps[-1]] - step_times[steps[0]])


def run_safetrain(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    command = [
        sys.executable, str(ROOT / "backend" / "training" / "train_safe.py"), "--model", str(model),
        "--data", str(data), "--output_dir", str(out), f"--use_{args.bits}bit", "--use_lora", "--lora_r", "8",
        "--gradient_checkpointing", "--max_steps", str(args.steps), "--max_seq_length", str(args.seq),
        "--per_device_train_batch_size", str(args.batch), "--logging_steps", "1", "--save_steps", "100000",
        "--learning_rate", str(LEARNING_RATE),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT / "backend", capture_output=True, text=True, check=False)
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"train_safe.py exited {done.returncode}")
    manifest = json.loads((out / "safetrain.json").read_text())["metrics"]
    samples = map(json.loads, (out / "telemetry.jsonl").read_text().splitlines())
    times = {row["step"]: row["timestamp"] for row in samples}
    return {
        "peak_bytes": manifest["peak_memory_bytes"], "estimate_bytes": manifest["estimate_bytes"],
        "tokens_per_second": tokens_per_second(times, args.batch * args.seq, args.warmup),
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
    if args.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    base = AutoModelForCausalLM.from_pretrained(
        model, quantization_config=quantization, dtype=torch.float32, device_map=device_map
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    peft_model = get_peft_model(base, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
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
        gradient_checkpointing=True, bf16=False, fp16=False, optim="adamw_torch", dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=dataset, callbacks=[StepClock()])
    result = trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {
        "peak_bytes": int(peak), "tokens_per_second": tokens_per_second(step_times, args.batch * args.seq, args.warmup),
        "final_loss": float(result.training_loss), "wall_seconds": round(time.perf_counter() - started, 1),
    }


def in_subprocess(stage: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--shape", args.shape,
            "--bits", str(args.bits), "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch),
            "--warmup", str(args.warmup)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    print(done.stderr[-4000:], flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/safetrain-gpu-bench"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--plan-only", action="store_true", help="print the memory plan in the peak's terms and stop")
    parser.add_argument("--stage", choices=["model", "safetrain", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan_only:
        print(plan_only(args))
        return 0
    model, data = args.work / f"llama-{args.shape}", args.work / "data.jsonl"
    if args.stage == "model":
        make_model(model, args.shape)
        make_data(data, examples=4 * args.steps * args.batch)
        print(json.dumps({"ok": True}))
        return 0
    if args.stage == "safetrain":
        print(json.dumps(run_safetrain(args, model, data, args.work / "run-safetrain")))
        return 0
    if args.stage == "baseline":
        print(json.dumps(run_baseline(args, model, data, args.work / "run-baseline")))
        return 0
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.perf_counter()
    in_subprocess("model", args, args.work)
    made = time.perf_counter() - started
    ours = in_subprocess("safetrain", args, args.work)
    baseline = in_subprocess("baseline", args, args.work)
    result = {"shape": args.shape, "bits": args.bits, "steps": args.steps, "seq": args.seq, "batch": args.batch,
              "model_seconds": round(made, 1), "safetrain": ours, "baseline": baseline, "device": device_name()}
    print(summary(result))
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


def plan_only(args: argparse.Namespace) -> str:
    """The plan for this shape, with and without checkpointing, as torch.cuda.max_memory_allocated would see it."""
    from transformers import LlamaConfig

    from backend.training.memory import CUDA_CONTEXT_BYTES, estimate_memory
    from backend.training.options import TrainingOptions

    config = LlamaConfig(vocab_size=32000, num_key_value_heads=SHAPES[args.shape]["num_attention_heads"],
                         tie_word_embeddings=False, **SHAPES[args.shape])
    lines = []
    for checkpointing in (False, True):
        options = TrainingOptions.model_validate({
            "use_lora": True, "lora_r": 8, f"use_{args.bits}bit": True, "gradient_checkpointing": checkpointing,
            "per_device_train_batch_size": args.batch, "max_seq_length": args.seq,
        })
        plan = estimate_memory(options, config, device="cuda")
        parts = ", ".join(f"{name} {size / 1e9:.2f}" for name, size in plan.breakdown.to_dict().items())
        lines.append(
            f"{args.shape} {args.bits}-bit LoRA, checkpointing {'on' if checkpointing else 'off'}, {args.batch} x "
            f"{args.seq}: {(plan.estimate_bytes - CUDA_CONTEXT_BYTES) / 1e9:.2f} GB less the CUDA context ({parts} GB)"
        )
    return "\n".join(lines)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def summary(result: dict[str, Any]) -> str:
    from backend.training.memory import CUDA_CONTEXT_BYTES

    ours, base = result["safetrain"], result["baseline"]
    # The plan counts the CUDA context, which torch's allocator (the measured peak) does not see.
    plan = ours["estimate_bytes"] - (CUDA_CONTEXT_BYTES if result["device"] != "cpu" else 0)
    return (
        f"{result['shape']} Llama, {result['bits']}-bit + LoRA r 8 + gradient checkpointing, micro-batch "
        f"{result['batch']} x {result['seq']} tokens, {result['steps']} steps on {result['device']}:\n"
        f"  safetrain: peak {ours['peak_bytes'] / GIB:.2f} GiB (plan {plan / GIB:.2f} GiB without the CUDA context, "
        f"{plan / ours['peak_bytes'] - 1:+.1%}), "
        f"{ours['tokens_per_second']:.0f} tokens/s, final loss {ours['final_loss']:.3f}, {ours['wall_seconds']} s\n"
        f"  baseline:  peak {base['peak_bytes'] / GIB:.2f} GiB, {base['tokens_per_second']:.0f} tokens/s, "
        f"final loss {base['final_loss']:.3f}, {base['wall_seconds']} s\n"
        f"  ratios safetrain/baseline: peak {ours['peak_bytes'] / max(base['peak_bytes'], 1):.2f}, "
        f"tokens/s {ours['tokens_per_second'] / base['tokens_per_second']:.2f}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
