"""Bodies and query strings no route expects: oversized JSON (413, read no further, bounded memory), deep nesting,
non-objects, wrong content types, NUL characters. Each a clear 4xx; nothing stored changes."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import Callable, Iterable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.security.conftest import Stored, assert_refused, bearer, seed_objects


async def _asgi(app: FastAPI, method: str, path: str, headers: dict[str, str], chunks: Iterable[bytes]) -> int:
    iterator = iter(chunks)
    status: list[int] = []

    async def receive() -> dict[str, object]:
        chunk = next(iterator, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))  # type: ignore[call-overload]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    await app(scope, receive, send)
    return status[0]


def test_an_endless_json_body_is_413_in_bounded_memory(
    app: FastAPI, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    pulled = [0]

    def chunks() -> Iterable[bytes]:  # 64 MiB of metadata offered without Content-Length
        yield b'{"model": "tiny-gpt2", "training_file": "file-x", "metadata": {"k": "'
        for _ in range(1024):
            pulled[0] += 1
            yield b"v" * 65536

    headers = {**bearer(key_a), "Content-Type": "application/json"}
    tracemalloc.start()
    try:
        status = asyncio.run(_asgi(app, "POST", "/v1/fine_tuning/jobs", headers, chunks()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    assert pulled[0] <= 20 and peak < 8 * 1024**2, (pulled[0], peak)
    unchanged(before)


def test_a_declared_huge_body_is_413_before_it_is_read(
    client: TestClient, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    body = json.dumps({"model": "tiny-gpt2", "training_file": "file-x", "metadata": {"k": "v" * 2 * 1024**2}})
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/estimate"):
        error = assert_refused(client.post(path, headers={**bearer(key_a), "Content-Type": "application/json"},
                                           content=body), 413)
        assert error["code"] == "request_too_large"
    unchanged(before)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        (b'{"model": {"a": ' * 5000 + b"1" + b"}" * 5001, "application/json"),
        (b"[]", "application/json"),
        (b'"tiny-gpt2"', "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
        (b'{"model": "tiny-gpt2", "training_file": "file-x"', "application/json"),
        (b"\xff\xfe{\x00}", "application/json"),
        (b"model=tiny-gpt2&training_file=file-x", "application/x-www-form-urlencoded"),
        (b"<job><model>tiny-gpt2</model></job>", "application/xml"),
        (b'{"model": "tiny-gpt2", "model": "../etc", "training_file": "file-x"}', "application/json"),
    ],
    ids=["deep-array", "deep-object", "array", "string", "null", "empty", "truncated", "utf16-garbage", "form",
         "xml", "duplicate-key"],
)
def test_job_bodies_that_are_not_one_json_object_are_400(
    client: TestClient, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
    content: bytes, content_type: str,
) -> None:
    before = snapshot()
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/estimate"):
        assert_refused(client.post(path, headers={**bearer(key_a), "Content-Type": content_type}, content=content), 400)
    unchanged(before)


def test_nul_characters_in_paths_and_queries_are_400(
    client: TestClient, key_a: str, session, snapshot: Callable[[], Stored],  # type: ignore[no-untyped-def]
    unchanged: Callable[[Stored], None],
) -> None:
    owned = seed_objects(client, key_a, session)
    before = snapshot()
    for path in ["/v1/files/file-a%00b", "/v1/files?after=a%00b", "/v1/files?purpose=fine-tune%00",
                 "/v1/fine_tuning/jobs/ftjob-x%00y", "/v1/fine_tuning/jobs?metadata[a%00b]=x",
                 f"/v1/fine_tuning/jobs/{owned.job_id}/events?after=%00", "/v1/models/a%00b",
                 f"/v1/files/{owned.file_id}/content?x=%00"]:
        assert_refused(client.get(path, headers=bearer(key_a)), 400)
    assert_refused(client.delete(f"/v1/files/{owned.file_id}%00", headers=bearer(key_a)), 400)
    assert_refused(client.post(f"/v1/fine_tuning/jobs/{owned.job_id}%00/cancel", headers=bearer(key_a)), 400)
    unchanged(before)


def test_out_of_range_cursors_are_400_not_a_database_overflow(
    client: TestClient, key_a: str, session, snapshot: Callable[[], Stored],  # type: ignore[no-untyped-def]
    unchanged: Callable[[Stored], None],
) -> None:
    owned = seed_objects(client, key_a, session)
    before = snapshot()
    job = f"/v1/fine_tuning/jobs/{owned.job_id}"
    for path in [f"{job}/telemetry?after=99999999999999999999999", f"{job}/telemetry?after=-1",
                 f"{job}/telemetry?limit=0", "/v1/files?limit=100001", "/v1/fine_tuning/jobs?limit=-1",
                 f"{job}/events?after={'x' * 5000}", f"/v1/files?after={'../' * 30}"]:
        assert_refused(client.get(path, headers=bearer(key_a)), 400)
    for last_event_id in ["9" * 30, "-1", "abc", "1e5"]:
        assert_refused(client.get(f"{job}/events?stream=true",
                                  headers={**bearer(key_a), "Last-Event-ID": last_event_id}), 400, "Last-Event-ID")
    unchanged(before)
