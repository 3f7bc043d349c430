"""Hostile uploads: each is a clear 4xx in the envelope, nothing stored changes, the service stays healthy."""

from __future__ import annotations

import asyncio
import json
import os
import tracemalloc
from collections.abc import Callable, Iterable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.models import File, Job, Project
from tests.security.conftest import GOOD_CHAT, Stored, assert_refused, bearer

BOUNDARY = "sec-boundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _field(name: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def _file_head(filename: str = "train.jsonl", name: str = "file") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()


END = f"\r\n--{BOUNDARY}--\r\n".encode()


def _form(content: bytes, purpose: str = "fine-tune") -> bytes:
    return _field("purpose", purpose) + _file_head() + content + END


def _post_raw(client: TestClient, key: str, body: bytes, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return client.post("/v1/files", headers={**bearer(key), **MULTIPART, **(headers or {})}, content=body)


async def _asgi_post(app: FastAPI, headers: dict[str, str], chunks: Iterable[bytes]) -> tuple[int, bytes]:
    """POST /v1/files straight through ASGI, body chunk by chunk and never whole (no client-side buffer)."""
    iterator = iter(chunks)
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        chunk = next(iterator, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/files", "raw_path": b"/v1/files", "root_path": "", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    return int(status), body  # type: ignore[call-overload]


def _peak_while(run: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes, int]:
    tracemalloc.start()
    try:
        status, body = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return status, body, peak


def test_over_the_limit_with_content_length_is_413_before_reading(
    client: TestClient, key_a: str, settings: Settings, snapshot: Callable[[], Stored],
    unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    body = _form(b'{"text": "x"}\n' * (settings.max_upload_bytes // 14 + 100))
    assert_refused(_post_raw(client, key_a, body), 413, "file")
    unchanged(before)


def test_over_the_limit_streamed_is_413_midway_in_bounded_memory_leaving_nothing(
    app: FastAPI, client: TestClient, key_a: str, settings: Settings, snapshot: Callable[[], Stored],
    unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    line = b'{"text": "' + b"v" * 4000 + b'"}\n'
    sent = [0]

    def chunks() -> Iterable[bytes]:  # 32 MiB offered with no Content-Length: the server must count as it reads
        yield _field("purpose", "fine-tune") + _file_head()
        for _ in range(32 * 1024**2 // (len(line) * 16)):
            sent[0] += len(line) * 16
            yield line * 16

    headers = {**bearer(key_a), **MULTIPART}
    status, body, peak = _peak_while(lambda: asyncio.run(_asgi_post(app, headers, chunks())))
    assert status == 413 and json.loads(body)["error"]["code"] == "file_too_large"
    assert sent[0] < settings.max_upload_bytes + 2 * 1024**2  # it stopped reading soon after the limit
    assert peak < 4 * 1024**2, peak
    assert not list((settings.data_dir / "files").glob("*"))  # no partial file, no .part left behind
    unchanged(before)


def test_thousands_of_form_fields_are_refused_in_bounded_memory(
    app: FastAPI, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    read = [0]

    def chunks() -> Iterable[bytes]:  # 20 000 fields of 1 KiB each (20 MiB), streamed without Content-Length
        for index in range(20_000):
            read[0] += 1
            yield _field(f"f{index}", "x" * 1024)
        yield _form(GOOD_CHAT)

    headers = {**bearer(key_a), **MULTIPART}
    status, body, peak = _peak_while(lambda: asyncio.run(_asgi_post(app, headers, chunks())))
    assert status == 400, body
    assert "form" in json.loads(body)["error"]["message"]
    assert read[0] < 1000 and peak < 4 * 1024**2, (read[0], peak)
    unchanged(before)


def test_an_enormous_part_header_is_refused(
    client: TestClient, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{"n" * 200_000}"\r\n\r\n').encode()
    assert_refused(_post_raw(client, key_a, _field("purpose", "fine-tune") + head + GOOD_CHAT + END), 400)
    unchanged(before)


def test_a_truncated_multipart_body_is_refused_and_nothing_is_kept(
    client: TestClient, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    before = snapshot()
    # The client died mid-upload: whole JSONL lines arrived, but never the closing boundary.
    assert_refused(_post_raw(client, key_a, _field("purpose", "fine-tune") + _file_head() + GOOD_CHAT), 400, "file")
    # Cut inside the part headers.
    assert_refused(_post_raw(client, key_a, _field("purpose", "fine-tune") + _file_head()[:40]), 400, "file")
    # Cut inside the closing boundary.
    assert_refused(_post_raw(client, key_a, _form(GOOD_CHAT)[:-6]), 400, "file")
    unchanged(before)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"text": "caf\xe9"}\n', "UTF-8"),
        (os.urandom(4096) + b"\x00\xff\xfe", None),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, None),
        (b"", "empty"),
        (b"\n\n\n", None),
        (b'{"text": "' + b"a" * 64 * 1024 + b'"}\n', "Line 1"),
        (b'{"text": "' + b"a" * 64 * 1024, "Line 1"),  # one enormous line, no newline at all
        (b'{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n', "Line 2"),
        (b'[1, 2, 3]\n', "Line 1"),
        (b'{"text": "\\ud800"}\n' * 2 + b'{"text": NaN}\n', None),
    ],
    ids=["latin1", "random-binary", "png", "empty", "blank-lines", "enormous-line", "enormous-unterminated-line",
         "mixed-formats", "not-an-object", "nan-and-lone-surrogate"],
)
def test_bad_dataset_bytes_are_400_naming_the_file(
    client: TestClient, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
    content: bytes, reason: str | None,
) -> None:
    before = snapshot()
    error = assert_refused(_post_raw(client, key_a, _form(content)), 400, "file")
    if reason is not None:
        assert reason in str(error["message"]), error
    unchanged(before)


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        (_form(GOOD_CHAT, purpose="assistants"), None, "purpose"),
        (_form(GOOD_CHAT, purpose="fine-tune-results"), None, "purpose"),
        (_form(GOOD_CHAT, purpose="evals\x00"), None, "purpose"),
        (_file_head() + GOOD_CHAT + END, None, "purpose"),
        (_field("purpose", "fine-tune") + END, None, "file"),
        (_field("purpose", "fine-tune") + _file_head(name="data") + GOOD_CHAT + END, None, "file"),
        (json.dumps({"purpose": "fine-tune", "file": "x"}).encode(), {"Content-Type": "application/json"}, "file"),
        (_form(GOOD_CHAT), {"Content-Type": "multipart/form-data"}, "file"),  # no boundary
        (b"garbage without any boundary", None, "file"),
    ],
    ids=["wrong-purpose", "results-purpose", "nul-purpose", "no-purpose", "no-file", "file-under-another-name",
         "json-body", "no-boundary", "not-multipart-at-all"],
)
def test_malformed_forms_are_400_naming_the_field(
    client: TestClient, key_a: str, snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
    body: bytes, headers: dict[str, str] | None, param: str,
) -> None:
    before = snapshot()
    assert_refused(_post_raw(client, key_a, body, headers), 400, param)
    unchanged(before)


def test_hostile_filenames_are_only_names(
    client: TestClient, key_a: str, settings: Settings, snapshot: Callable[[], Stored],
) -> None:
    """A filename is a label: path parts and NULs never reach the disk path, and it reads back as stored."""
    for name in ["../../../etc/passwd", "/abs/olute.jsonl", "nul\x00byte.jsonl", "x" * 600]:
        body = _field("purpose", "fine-tune") + _file_head(filename=name) + GOOD_CHAT + END
        response = _post_raw(client, key_a, body)
        assert response.status_code == 200, response.text
        row = response.json()
        assert "\x00" not in row["filename"] and len(row["filename"]) <= 512
        assert sorted(p.name for p in (settings.data_dir / "files").iterdir()).count(row["id"]) == 1
    assert not (settings.data_dir.parent / "etc").exists()
    assert {p.parent for p in settings.data_dir.rglob("*") if p.is_file()} == {settings.data_dir / "files"}
    assert snapshot().rows["files"] == 4


def test_deleting_a_dataset_while_jobs_are_created_on_it_never_leaves_a_job_without_its_file(
    live_url: str, key_a: str, upload: Callable[..., dict[str, object]], session: Session,
) -> None:
    file_ids = [str(upload(key_a)["id"]) for _ in range(6)]
    session.execute(update(Project).where(Project.name == "project-a").values(max_concurrent_jobs=10))
    session.commit()  # the job quota (4 by default) is not what this race is about

    async def race(http: httpx.AsyncClient, file_id: str) -> tuple[int, int]:
        create = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": file_id})
        delete = http.delete(f"/v1/files/{file_id}")
        created, deleted = await asyncio.gather(create, delete)
        return created.status_code, deleted.status_code

    async def all_races() -> list[tuple[int, int]]:
        async with httpx.AsyncClient(base_url=live_url, headers=bearer(key_a), timeout=60) as http:
            return list(await asyncio.gather(*(race(http, file_id) for file_id in file_ids)))

    outcomes = asyncio.run(all_races())
    # One of the two wins each race: a job on a file that stays, or a deleted file and a refused job.
    assert set(outcomes) <= {(200, 400), (400, 200)}, outcomes
    session.expire_all()
    jobs = session.scalars(select(Job)).all()
    files = set(session.scalars(select(File.id)))
    assert all(job.training_file_id in files for job in jobs)
