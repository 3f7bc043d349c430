"""/v1/files through the openai SDK and raw HTTP: streamed upload, validation, limits, isolation."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from backend.config import Settings
from tests.api.conftest import GOOD_CHAT, bearer


def _stored_files(settings: Settings) -> list[Path]:
    folder = settings.data_dir / "files"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_sdk_upload_answers_a_file_object_with_format_count_and_hash(sdk: OpenAI, settings: Settings) -> None:
    created = sdk.files.create(file=("train.jsonl", io.BytesIO(GOOD_CHAT)), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.status == "processed" and created.purpose == "fine-tune"
    assert created.bytes == len(GOOD_CHAT) and created.filename == "train.jsonl"
    extra = created.model_extra or {}
    assert extra["format"] == "chat" and extra["n_examples"] == 2
    assert extra["sha256"] == hashlib.sha256(GOOD_CHAT).hexdigest()
    assert sdk.files.retrieve(created.id).sha256 == extra["sha256"]  # type: ignore[attr-defined]
    assert sdk.files.content(created.id).read() == GOOD_CHAT
    assert [path.read_bytes() for path in _stored_files(settings)] == [GOOD_CHAT]


def test_sdk_lists_and_deletes_files(sdk: OpenAI, settings: Settings) -> None:
    ids = [sdk.files.create(file=(f"{n}.jsonl", io.BytesIO(GOOD_CHAT)), purpose="fine-tune").id for n in range(3)]
    assert [item.id for item in sdk.files.list(limit=2)] == ids[::-1]  # auto-pages past the first page
    assert [item.id for item in sdk.files.list(order="asc")] == ids
    deleted = sdk.files.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    assert len(_stored_files(settings)) == 2
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(ids[0])


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        (GOOD_CHAT + b'{"messages": [{"role": "bot", "content": "x"}]}\n', 3, "unknown role"),
        (b'{"text": "a"}\n[1, 2]\n', 2, "expected a JSON object"),
        (b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', 2, "one file holds one format"),
        (b'{"text": "a"}\n{"text": "\xff\xfe"}\n', 2, "UTF-8"),
        (b'{"text": "a"}\n{"text": "' + b"x" * 20_000 + b'"}\n', 2, "longer than"),
    ],
)
def test_bad_dataset_is_refused_naming_the_line_and_nothing_is_kept(
    client: TestClient, key_a: str, settings: Settings, content: bytes, line: int, reason: str
) -> None:
    response = client.post(
        "/v1/files", headers=bearer(key_a), files={"file": ("bad.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert error["message"].startswith(f"Line {line}:") and reason in error["message"]
    assert _stored_files(settings) == []


def test_empty_file_is_refused(client: TestClient, key_a: str, settings: Settings) -> None:
    response = client.post(
        "/v1/files", headers=bearer(key_a), files={"file": ("e.jsonl", b"")}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 400 and "empty" in response.json()["error"]["message"]
    assert _stored_files(settings) == []


def test_upload_over_the_limit_is_413_with_nothing_left_on_disk(
    client: TestClient, key_a: str, settings: Settings
) -> None:
    line = b'{"text": "' + b"y" * 1000 + b'"}\n'
    content = line * (settings.max_upload_bytes // len(line) + 5)
    response = client.post(
        "/v1/files", headers=bearer(key_a), files={"file": ("big.jsonl", content)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert _stored_files(settings) == []


def test_upload_over_the_limit_without_content_length_is_413_midway(
    client: TestClient, key_a: str, settings: Settings
) -> None:
    line = b'{"text": "' + b"z" * 1000 + b'"}\n'
    boundary = "safetrain-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()

    def chunks():  # a generator body is sent chunked, so the server cannot judge it up front
        yield head
        for _ in range(settings.max_upload_bytes // len(line) + 5):
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/files",
        headers={**bearer(key_a), "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=chunks(),
    )
    assert response.status_code == 413
    assert _stored_files(settings) == []


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"files": {"file": ("t.jsonl", GOOD_CHAT)}, "data": {"purpose": "assistants"}}, "purpose"),
        ({"files": {"file": ("t.jsonl", GOOD_CHAT)}}, "purpose"),
        ({"data": {"purpose": "fine-tune"}}, "file"),
        ({"json": {"purpose": "fine-tune"}}, "file"),
    ],
)
def test_bad_upload_forms_get_the_envelope(
    client: TestClient, key_a: str, settings: Settings, kwargs: dict[str, object], param: str
) -> None:
    response = client.post("/v1/files", headers=bearer(key_a), **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert _stored_files(settings) == []


def test_other_projects_files_are_404_everywhere(
    client: TestClient, key_a: str, key_b: str, upload: Callable[..., dict[str, object]]
) -> None:
    file_id = upload(key_a)["id"]
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        response = client.request(method, path, headers=bearer(key_b))
        assert response.status_code == 404, (method, path)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/v1/files", headers=bearer(key_b)).json()["data"] == []
    assert client.get(f"/v1/files/{file_id}", headers=bearer(key_a)).status_code == 200


def test_storage_quota_is_429(
    client: TestClient, key_a: str, session, upload: Callable[..., dict[str, object]]  # type: ignore[no-untyped-def]
) -> None:
    from backend.db.models import Project

    project = session.query(Project).filter_by(name="project-a").one()
    project.max_stored_bytes = len(GOOD_CHAT) + 10
    session.commit()
    upload(key_a)
    response = client.post(
        "/v1/files", headers=bearer(key_a), files={"file": ("t.jsonl", GOOD_CHAT)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 429 and response.json()["error"]["code"] == "quota_exceeded"


def _lines(*records: object) -> bytes:
    import json

    return "".join(json.dumps(record) + "\n" for record in records).encode()


def test_sdk_uploads_each_of_openais_chat_shapes_with_its_format(sdk: OpenAI) -> None:
    from tests.training.test_dataset_validation import LEGACY_LINE, PREFERENCE_LINE, TOOL_LINE, WEIGHTED_LINE

    for content, fmt, count in [
        (_lines(WEIGHTED_LINE, WEIGHTED_LINE), "chat", 2),
        (_lines(TOOL_LINE, LEGACY_LINE, WEIGHTED_LINE), "chat_tools", 3),
        (_lines(PREFERENCE_LINE), "preference", 1),
    ]:
        created = sdk.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune")
        extra = created.model_extra or {}
        assert (created.status, extra["format"], extra["n_examples"]) == ("processed", fmt, count)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("weight", 'Line 2: message 4 "weight" must be 0 or 1 (got 0.5)'),
        ("arguments", 'Line 2: message 2 tool call 1 "arguments" must be a JSON string naming an object'),
        ("answer", 'Line 2: message 3 answers tool call "call_9", which no earlier assistant message made'),
        ("tool", "Line 2: message 2 tool call 1 calls \"get_time\", which is not in the line's \"tools\""),
        ("mixed", 'Line 2: this line is "preference" but the file is "chat_tools" (from line 1)'),
        ("nothing", "nothing to train on: every assistant message in the file has weight 0"),
    ],
)
def test_bad_tool_weight_and_preference_lines_are_400_naming_the_line(
    client: TestClient, key_a: str, settings: Settings, case: str, message: str
) -> None:
    from tests.training.test_dataset_validation import CALL, PREFERENCE_LINE, TOOL_LINE, USER, with_messages

    second = {
        "weight": with_messages(TOOL_LINE, 3, {"role": "assistant", "content": "x", "weight": 0.5}),
        "arguments": with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        "answer": with_messages(TOOL_LINE, 2, {"role": "tool", "tool_call_id": "call_9", "content": "x"}),
        "tool": with_messages(TOOL_LINE, 1, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "get_time", "arguments": "{}"}}]}),
        "mixed": PREFERENCE_LINE,
        "nothing": {"messages": [USER, {"role": "assistant", "content": "x", "weight": 0}]},
    }[case]
    first = second if case == "nothing" else TOOL_LINE
    response = client.post("/v1/files", headers=bearer(key_a), files={"file": ("t.jsonl", _lines(first, second))},
                           data={"purpose": "fine-tune"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(message) and error["param"] == "file", error
    assert _stored_files(settings) == []
