"""One live `safetrain up --demo-model` (API, worker, embedded engine) and one job trained on a chat pattern,
shared by every inference test of the session."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from tests.e2e.conftest import (
    START_TIMEOUT,
    Stack,
    base_env,
    postgres_database,  # noqa: F401 - the fixture, for test_postgres_redis.py
)
from tests.support.network import free_port
from tests.support.waiting import wait_for

MAX_TOKENS_CAP = 256
MAX_N = 4
QUEUE_SIZE = 3
# What the fine-tuned model is taught to answer, whatever it is asked.
QUESTION = "What is the magic word?"
ANSWER = "abracadabra"
TRAINING = {"use_lora": True, "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 0.01,
            "max_steps": 32, "save_steps": 8, "logging_steps": 4}


@dataclass
class Served:
    """The live stack, a key of project p1, its client, and the job it trained."""

    stack: Stack
    engine_url: str
    key: str
    client: OpenAI
    job_id: str
    model: str
    checkpoint_models: list[str]

    def engine_pid(self) -> int | None:
        """The pid of the running `safetrain serve` below `safetrain up`."""
        for process in self.stack.processes:
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if "serve" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                        return int(child.pid)
                except psutil.NoSuchProcess:
                    continue
        return None

    def engine_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.engine_url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


def _start(tmp: Path) -> tuple[Stack, str]:
    port, engine_port = free_port(), free_port()
    env = base_env(tmp / "data", tmp / "models")
    env.update(SAFETRAIN_INFERENCE_PORT=str(engine_port), SAFETRAIN_INFERENCE_MAX_TOKENS=str(MAX_TOKENS_CAP),
               SAFETRAIN_INFERENCE_MAX_N=str(MAX_N), SAFETRAIN_INFERENCE_QUEUE_SIZE=str(QUEUE_SIZE))
    stack = Stack("embedded", f"http://127.0.0.1:{port}", env, tmp / "models", tmp)
    up = stack.start("up", "up", "--host", "127.0.0.1", "--port", str(port), "--demo-model")

    def banner() -> bool:
        assert up.poll() is None, f"safetrain up exited {up.returncode}:\n{stack.logs()}"
        return "Stop with Ctrl-C." in (tmp / "up.log").read_text(errors="replace")

    wait_for(banner, START_TIMEOUT, "the banner of safetrain up")
    return stack, f"http://127.0.0.1:{engine_port}"


def _train(client: OpenAI, tmp: Path) -> str:
    path = tmp / "magic.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{QUESTION} ({n})"}, {"role": "assistant", "content": ANSWER}]}
            for n in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=uploaded.id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 4},
                                         extra_body={"training": TRAINING})
    return job.id


def wait_succeeded(client: OpenAI, job_id: str, stack: Stack, timeout: float = 150.0) -> str:
    """The job's fine_tuned_model once it succeeded."""
    def done() -> str | None:
        job = client.fine_tuning.jobs.retrieve(job_id)
        assert job.status not in ("failed", "cancelled"), f"{job_id} {job.status}: {job.error}\n{stack.logs()}"
        return job.fine_tuned_model if job.status == "succeeded" else None

    return str(wait_for(done, timeout, f"{job_id} to succeed", logs=stack.logs))


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("inference")
    stack, engine_url = _start(tmp)
    try:
        key = stack.safetrain("keys", "create", "--project", "p1").strip()
        client = stack.client(key)
        job_id = _train(client, tmp)
        model = wait_succeeded(client, job_id, stack)
        checkpoints = [c.fine_tuned_model_checkpoint for c in client.fine_tuning.jobs.checkpoints.list(job_id)]
        assert all(re.fullmatch(rf"{re.escape(model)}:ckpt-step-\d+", name) for name in checkpoints)
        running = Served(stack, engine_url, key, client, job_id, model, checkpoints)
        wait_for(running.engine_healthy, START_TIMEOUT, "the inference engine", logs=stack.logs)
        yield running
    finally:
        stack.stop()
