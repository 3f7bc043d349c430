"""The same serving on PostgreSQL + Redis: `safetrain api`, `safetrain worker` and `safetrain serve` apart."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Stack, base_env, flush_redis
from tests.inference.conftest import wait_succeeded
from tests.support.network import free_port
from tests.support.waiting import wait_for

ASK = [{"role": "user", "content": "Count from 3:"}]
REDIS_URL = os.environ.get("SAFETRAIN_INFERENCE_TEST_REDIS", "redis://127.0.0.1:6379/9")  # db 9: this suite's own


@pytest.fixture(scope="module")
def split_stack(tmp_path_factory: pytest.TempPathFactory, postgres_database: str) -> Iterator[Stack]:
    from backend.training.tiny_models import make_tiny_model

    tmp = tmp_path_factory.mktemp("inference-pg")
    make_tiny_model(tmp / "models" / "tiny-gpt2")
    port, engine_port = free_port(), free_port()
    env = base_env(tmp / "data", tmp / "models")
    env.update(SAFETRAIN_DATABASE_URL=postgres_database, SAFETRAIN_BROKER_URL=REDIS_URL,
               SAFETRAIN_INFERENCE_URL=f"http://127.0.0.1:{engine_port}")
    stack = Stack("redis_postgres", f"http://127.0.0.1:{port}", env, tmp / "models", tmp)
    flush_redis(REDIS_URL)
    stack.safetrain("migrate")
    stack.start("worker", "worker", "--concurrency", "1")
    stack.start("serve", "serve", "--port", str(engine_port), "--device", "cpu")
    stack.start("api", "api", "--host", "127.0.0.1", "--port", str(port))
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop()
        flush_redis(REDIS_URL)


def test_a_fine_tuned_model_is_served_on_postgres_and_redis(split_stack: Stack, tmp_path: Path) -> None:
    client = split_stack.client(split_stack.safetrain("keys", "create", "--project", "pg1").strip())
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Count from {n}:", "completion": f" {n + 1}"}) + "\n"
                            for n in range(8)))
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-gpt2", training_file=uploaded.id,
                                         extra_body={"training": {"use_lora": True, "max_steps": 2, "save_steps": 1}})
    model = wait_succeeded(client, job.id, split_stack)

    def answered() -> object:
        try:
            return client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=4)
        except openai.InternalServerError:  # the engine is still importing torch
            return None

    answer = wait_for(answered, 90, "the engine to answer", logs=split_stack.logs)
    assert answer.model == model and answer.usage.completion_tokens >= 1
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    assert client.completions.create(model=checkpoint, prompt="Count from 3:", max_tokens=2).choices

    other = split_stack.client(split_stack.safetrain("keys", "create", "--project", "pg2").strip())
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=model, messages=ASK, max_tokens=2)
    client.files.delete(client.fine_tuning.jobs.retrieve(job.id).result_files[0])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=ASK, max_tokens=2)
