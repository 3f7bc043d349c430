"""The openai SDK over real HTTP against the app under uvicorn (a thread), as a deployed client sees it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from openai import OpenAI

from backend.config import Settings
from tests.api.conftest import GOOD_CHAT, bearer
from tests.support.network import served


@pytest.fixture
def base_url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free local port."""
    with served(app, lifespan="on") as url:
        yield url


def test_sdk_session_over_http(base_url: str, key_a: str, key_b: str, settings: Settings) -> None:
    client = OpenAI(base_url=f"{base_url}/v1", api_key=key_a, max_retries=0)
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(GOOD_CHAT)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-gpt2", training_file=uploaded.id, hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"training": {"use_lora": True, "lora_r": 8, "gradient_checkpointing": True}},
    )
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with httpx.stream("GET", f"{base_url}/v1/fine_tuning/jobs/{job.id}/events?stream=true", headers=bearer(key_a),
                      timeout=10) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert [json.loads(line[5:])["message"] for line in lines[:-1]] == [
        f"Created fine-tuning job: {job.id}", "Job cancelled"]
    assert lines[-1] == "data: [DONE]"
    other = httpx.get(f"{base_url}/v1/fine_tuning/jobs/{job.id}/events?stream=true", headers=bearer(key_b))
    assert other.status_code == 404


def test_oversized_upload_over_a_socket_is_413_and_leaves_nothing(base_url: str, key_a: str,
                                                                  settings: Settings) -> None:
    line = b'{"text": "' + b"w" * 4000 + b'"}\n'
    content = line * (settings.max_upload_bytes // len(line) + 20)
    response = httpx.post(f"{base_url}/v1/files", headers=bearer(key_a), files={"file": ("big.jsonl", content)},
                          data={"purpose": "fine-tune"}, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    folder = settings.data_dir / "files"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_oversized_chunked_upload_is_refused_midway(base_url: str, key_a: str, settings: Settings) -> None:
    boundary = "live-boundary"
    line = b'{"text": "' + b"v" * 4000 + b'"}\n'
    sent = [0]

    def body() -> Iterator[bytes]:  # no Content-Length: the server must count as the bytes come
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n').encode()
        for _ in range(settings.max_upload_bytes // len(line) * 4):
            sent[0] += len(line)
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(f"{base_url}/v1/files", content=body(), timeout=30,
                          headers={**bearer(key_a), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    folder = settings.data_dir / "files"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_concurrent_polls_never_starve_a_small_connection_pool(settings: Settings, key_a: str, sdk: OpenAI,
                                                               upload) -> None:  # type: ignore[no-untyped-def]
    """More requests in flight than pooled connections: each thread hop returns its connection before it ends."""
    import asyncio

    from sqlalchemy import create_engine

    from backend.api.app import create_app

    job_id = sdk.fine_tuning.jobs.create(model="tiny-gpt2", training_file=str(upload(key_a)["id"])).id
    engine = create_engine(settings.database_url, pool_size=2, max_overflow=0, pool_timeout=5)
    app = create_app(settings, engine=engine)

    async def poll_all(base_url: str) -> list[int]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, headers=bearer(key_a), limits=limits, timeout=30) as client:
            paths = [f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events", "/v1/files"] * 20
            responses = await asyncio.gather(*(client.get(path) for path in paths))
            return [response.status_code for response in responses]

    try:
        with served(app) as base_url:
            assert asyncio.run(poll_all(base_url)) == [200] * 60
    finally:
        engine.dispose()
