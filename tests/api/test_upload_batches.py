"""Uploads of several 1 MiB batches: the sink checks one batch while the next arrives, faults still come in order."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.config import Settings
from tests.api.conftest import GOOD_CHAT, bearer

MIB = 1024**2
BOUNDARY = "safetrain-batches-boundary"
BAD_LINE = b'{"messages": [{"role": "bot", "content": "x"}]}\n'


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test settings with room for uploads of several batches."""
    return settings.model_copy(update={"max_upload_bytes": 6 * MIB})


def _stored_files(settings: Settings) -> list[Path]:
    folder = settings.data_dir / "files"
    return sorted(folder.iterdir()) if folder.exists() else []


def _chat_lines(approx_bytes: int) -> bytes:
    return GOOD_CHAT * (approx_bytes // len(GOOD_CHAT))


def _line_after(lines: bytes) -> int:
    return lines.count(b"\n") + 1


def _post(client: TestClient, key: str, content: bytes) -> dict[str, object]:
    response = client.post(
        "/v1/files", headers=bearer(key), files={"file": ("big.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    return {"http_status": response.status_code, **response.json()}


def test_an_upload_of_several_batches_is_stored_whole(client: TestClient, key_a: str, settings: Settings) -> None:
    content = _chat_lines(int(3.5 * MIB)) + b'{"messages": [{"role": "assistant", "content": "no newline"}]}'
    answer = _post(client, key_a, content)
    assert answer["http_status"] == 200
    assert answer["bytes"] == len(content) and answer["sha256"] == hashlib.sha256(content).hexdigest()
    assert answer["n_examples"] == _line_after(content) and answer["format"] == "chat"
    assert [path.read_bytes() for path in _stored_files(settings)] == [content]


def test_a_bad_line_in_a_later_batch_is_named_and_nothing_is_kept(
    client: TestClient, key_a: str, settings: Settings
) -> None:
    before = _chat_lines(int(2.5 * MIB))
    answer = _post(client, key_a, before + BAD_LINE + _chat_lines(MIB))
    assert answer["http_status"] == 400
    assert answer["error"]["message"] == f'Line {_line_after(before)}: unknown role "bot"'  # type: ignore[index]
    assert _stored_files(settings) == []


def test_a_bad_line_is_named_even_when_the_body_is_then_cut_short(
    client: TestClient, key_a: str, settings: Settings
) -> None:
    # The batch holding the bad line is still being checked when the reader finds the body truncated:
    # the client hears of the first fault in the stream, as when each batch was checked before reading on.
    before = _chat_lines(MIB // 2)
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()
    response = client.post(
        "/v1/files",
        headers={**bearer(key_a), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        content=head + before + BAD_LINE + _chat_lines(MIB),  # no closing boundary
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f'Line {_line_after(before)}: unknown role "bot"'
    assert _stored_files(settings) == []
