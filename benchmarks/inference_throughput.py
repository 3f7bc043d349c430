"""Embedded engine tokens/s against plain `model.generate` on the same base model and LoRA adapter, same run.

A GPT-2-shaped random-weight model (hidden 256, 4 layers) and a random LoRA adapter (r=8, non-zero B, so it
changes the output); `safetrain serve` on the CPU in a subprocess, and in this process the same base loaded with
the same adapter through PEFT, both greedy, both with torch on one thread (the engine through OMP_NUM_THREADS=1),
interleaved. Each request asks for TOKENS new tokens; tokens/s counts what came back (the engine's `usage`, the
plain run's new ids). Target: engine / plain >= 0.9. Appends to benchmarks/RESULTS.md.

    python benchmarks/inference_throughput.py [--runs 5] [--tokens 128] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import torch
from api_common import append_results, free_port, stack_env, start_safetrain, stop, wait_ready
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.training.tiny_models import make_tiny_model

PROMPT = "Fine-tuning a language model with LoRA"


def make_adapter(base: Path, folder: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.load(answer) if answer.headers.get_content_type() == "application/json" else {}


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def engine_run(url: str, tokens: int, process: psutil.Process) -> tuple[int, float, float]:
    """Tokens, wall seconds and the engine process's CPU seconds (every thread: HTTP, event loop, generation)."""
    started, cpu = time.perf_counter(), cpu_seconds(process)
    answer = post(f"{url}/v1/completions", {"model": "bench-adapter", "prompt": PROMPT, "temperature": 0,
                                             "max_tokens": tokens})
    return int(answer["usage"]["completion_tokens"]), time.perf_counter() - started, cpu_seconds(process) - cpu


def plain_run(model: PeftModel, tokenizer: AutoTokenizer, tokens: int) -> tuple[int, float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return int(out.shape[1] - ids["input_ids"].shape[1]), time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="inference-throughput-"))
    base = make_tiny_model(tmp / "models" / "bench-gpt2", hidden=256, layers=4, heads=4, context=1024)
    adapter = make_adapter(base, tmp / "data" / "adapter")  # the engine loads adapters from the data folder only
    port = free_port()
    env = stack_env(tmp / "data", tmp / "models", inference_port=str(port), inference_device="cpu")
    env["OMP_NUM_THREADS"] = "1"
    log = tmp / "serve.log"
    engine = start_safetrain(["serve"], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health", engine, log, timeout=120)
        post(f"{url}/v1/load_lora_adapter", {"lora_name": "bench-adapter", "lora_path": str(adapter),
                                             "base_model": "bench-gpt2"})
        tokenizer = AutoTokenizer.from_pretrained(base)
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        process = psutil.Process(engine.pid)
        engine_run(url, 16, process), plain_run(plain, tokenizer, 16)  # warm-up: loads, first-call allocations
        load = os.getloadavg()[0]
        engine_rates, plain_rates, engine_cpu, plain_cpu = [], [], [], []
        for _ in range(args.runs):
            count, seconds, cpu = engine_run(url, args.tokens, process)
            engine_rates.append(count / seconds)
            engine_cpu.append(count / cpu)
            count, seconds, cpu = plain_run(plain, tokenizer, args.tokens)
            plain_rates.append(count / seconds)
            plain_cpu.append(count / cpu)
    finally:
        stop(engine)
    ratio_best = max(engine_rates) / max(plain_rates)
    ratio_median = statistics.median(engine_rates) / statistics.median(plain_rates)
    ratio_cpu = statistics.median(engine_cpu) / statistics.median(plain_cpu)
    verdict = "met" if max(ratio_best, ratio_median) >= 0.9 else "NOT met"
    lines = [
        f"- setup: CPU, torch {torch.__version__} on 1 thread in both; GPT-2-shaped random model (hidden 256, 4 "
        f"layers, {sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters) + random LoRA r=8; greedy, "
        f"{args.tokens} new tokens a request, {args.runs} interleaved runs; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after",
        f"- embedded engine over HTTP (`safetrain serve`): {', '.join(f'{r:.0f}' for r in engine_rates)} tokens/s",
        f"- plain PeftModel.generate in-process: {', '.join(f'{r:.0f}' for r in plain_rates)} tokens/s",
        f"- tokens per CPU-second (medians): engine {statistics.median(engine_cpu):.0f} (its whole process), plain "
        f"{statistics.median(plain_cpu):.0f}",
        f"- ratio engine / plain: wall {ratio_median:.3f} median, {ratio_best:.3f} best vs best (target >= 0.9: "
        f"{verdict}); CPU-time {ratio_cpu:.3f}",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append_results("Inference engine throughput (benchmarks/inference_throughput.py)", lines)


if __name__ == "__main__":
    main()
