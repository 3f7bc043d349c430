"""Serving through the API: proxy overhead, adapter switches, and 16 concurrent clients.

A live stack in subprocesses (SQLite, one worker, `safetrain api`, `safetrain serve` on the CPU) with the tiny
demo model and three adapters trained for one step each. Then:
- proxy overhead: time to first token of the same streamed chat request through the API and straight to the
  engine, interleaved; the API's extra is authentication, the model's lookup and the relay (target p50 <= 15 ms);
- adapter switch: the first request to an adapter the engine has not loaded (the archive unpacked, registered,
  loaded into the base) and the next one (cached), and switching between two cached adapters;
- 16 concurrent clients, each sending requests back to back: every request answered 200 or 429 (none lost),
  p50/p99 latency of the answered ones.
Appends to benchmarks/RESULTS.md.

    python benchmarks/inference_serving.py [--pairs 40] [--per-client 4] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from api_common import append_results, free_port, safetrain, stack_env, start_safetrain, stop, wait_ready

from backend.training.tiny_models import make_tiny_model

ASK = [{"role": "user", "content": "Count from 3:"}]


def first_token_seconds(client: httpx.Client, url: str, model: str, headers: dict[str, str]) -> float:
    body = {"model": model, "messages": ASK, "temperature": 0, "max_tokens": 8, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as answer:
        answer.raise_for_status()
        elapsed = None
        for line in answer.iter_lines():
            if elapsed is None and line.startswith("data: {") and '"content":' in line:
                elapsed = time.perf_counter() - started
    if elapsed is None:
        raise RuntimeError("no content chunk")
    return elapsed


def train_adapters(api: str, key: str, tmp: Path, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count from {n}:", "completion": f" {n + 1}"}) + "\n"
                            for n in range(8)))
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("train.jsonl", data.read_bytes())}).json()["id"]
        job = {"model": "tiny-gpt2", "training_file": file_id, "training": {"use_lora": True, "max_steps": 1}}
        jobs = [client.post("/v1/fine_tuning/jobs", json=job).json()["id"] for _ in range(count)]
        deadline = time.monotonic() + 600
        models: dict[str, str] = {}
        while len(models) < count and time.monotonic() < deadline:
            for job_id in jobs:
                job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if job["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"{job_id}: {job['error']}")
                if job["status"] == "succeeded":
                    models[job_id] = job["fine_tuned_model"]
            time.sleep(0.5)
    return [models[job_id] for job_id in jobs]


def timed_chat(client: httpx.Client, url: str, model: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    answer = client.post(url, json={"model": model, "messages": ASK, "temperature": 0, "max_tokens": 1},
                         headers=headers)
    answer.raise_for_status()
    return time.perf_counter() - started


def proxy_overhead(api: str, engine: str, key: str, model: str, pairs: int) -> dict[str, float]:
    auth = {"Authorization": f"Bearer {key}"}
    through, direct = [], []
    with httpx.Client(timeout=60) as client:
        for _ in range(3):  # warm-up: connections, caches
            first_token_seconds(client, f"{api}/v1/chat/completions", model, auth)
            first_token_seconds(client, f"{engine}/v1/chat/completions", model, {})
        for _ in range(pairs):
            through.append(first_token_seconds(client, f"{api}/v1/chat/completions", model, auth))
            direct.append(first_token_seconds(client, f"{engine}/v1/chat/completions", model, {}))
    differences = sorted(a - b for a, b in zip(through, direct, strict=True))
    return {"through_p50": statistics.median(through), "direct_p50": statistics.median(direct),
            "difference_p50": statistics.median(differences),
            "difference_of_p50": statistics.median(through) - statistics.median(direct)}


def concurrent_clients(api: str, key: str, model: str, clients: int, per_client: int) -> dict[str, Any]:
    statuses: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}) as client:
            for _ in range(per_client):
                started = time.perf_counter()
                try:
                    status = client.post(f"{api}/v1/completions", json={
                        "model": model, "prompt": "The quick", "temperature": 0, "max_tokens": 32}).status_code
                except httpx.HTTPError:
                    status = -1
                with lock:
                    statuses.append(status)
                    if status == 200:
                        latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    return {"sent": clients * per_client, "statuses": {code: statuses.count(code) for code in sorted(set(statuses))},
            "p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inference-serving-"))
    make_tiny_model(tmp / "models" / "tiny-gpt2")
    api_port, engine_port = free_port(), free_port()
    env = stack_env(tmp / "data", tmp / "models", inference_port=str(engine_port), inference_device="cpu",
                    heartbeat_seconds="1")
    env["OMP_NUM_THREADS"] = "1"
    safetrain(env, "migrate")
    key = safetrain(env, "keys", "create", "--project", "bench").strip()
    processes = [start_safetrain(["worker"], env, tmp / "worker.log"),
                 start_safetrain(["api", "--port", str(api_port)], env, tmp / "api.log"),
                 start_safetrain(["serve"], env, tmp / "serve.log")]
    api, engine = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{engine_port}"
    try:
        wait_ready(f"{api}/healthz", processes[1], tmp / "api.log", timeout=120)
        wait_ready(f"{engine}/health", processes[2], tmp / "serve.log", timeout=120)
        models = train_adapters(api, key, tmp, 3)
        load = os.getloadavg()[0]
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(timeout=120) as client:
            timed_chat(client, f"{api}/v1/chat/completions", "tiny-gpt2", auth)  # the base loads
            first = [timed_chat(client, f"{api}/v1/chat/completions", name, auth) for name in models[:2]]
            cached = [timed_chat(client, f"{api}/v1/chat/completions", name, auth) for name in models[:2] * 5]
            base = [timed_chat(client, f"{api}/v1/chat/completions", "tiny-gpt2", auth) for _ in range(10)]
        overhead = proxy_overhead(api, engine, key, models[0], args.pairs)
        crowd = concurrent_clients(api, key, models[2], 16, args.per_client)
    finally:
        for process in processes:
            stop(process)
    answered = sum(count for code, count in crowd["statuses"].items() if code in (200, 429))
    lines = [
        f"- setup: `safetrain api` + `safetrain serve` (CPU, torch on 1 thread) + one worker on SQLite; tiny-gpt2 "
        f"(hidden 64, 2 layers) and 3 LoRA adapters trained one step each; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after",
        f"- proxy overhead, time to first token of a streamed chat (ft model, cached), {args.pairs} interleaved "
        f"pairs: through the API p50 {overhead['through_p50'] * 1e3:.1f} ms, straight to the engine p50 "
        f"{overhead['direct_p50'] * 1e3:.1f} ms; difference p50 {overhead['difference_p50'] * 1e3:.1f} ms "
        f"(target <= 15 ms: {'met' if overhead['difference_p50'] <= 0.015 else 'NOT met'})",
        f"- adapter switch (1-token chat through the API): first request to a not-yet-loaded adapter "
        f"{', '.join(f'{s * 1e3:.0f}' for s in first)} ms (unpack, register, load into the base); cached, "
        f"alternating between two loaded adapters: p50 {statistics.median(cached) * 1e3:.1f} ms, max "
        f"{max(cached) * 1e3:.1f} ms; the base alone p50 {statistics.median(base) * 1e3:.1f} ms",
        f"- 16 concurrent clients x {args.per_client} completions (32 tokens, queue bound 8): {crowd['sent']} sent, "
        f"answered {crowd['statuses']} ({answered} of {crowd['sent']} answered 200 or 429: "
        f"{'none lost' if answered == crowd['sent'] else 'SOME LOST'}); 200s p50 {crowd['p50'] * 1e3:.0f} ms, "
        f"p99 {crowd['p99'] * 1e3:.0f} ms; {crowd['seconds']:.1f} s in all",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append_results("Inference serving through the API (benchmarks/inference_serving.py)", lines)


if __name__ == "__main__":
    main()
