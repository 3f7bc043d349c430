"""The app under test (FastAPI TestClient, and the real openai SDK over it) with two projects' keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy.orm import Session

from backend.api.app import create_app
from backend.config import Settings
from backend.services.keys import create_key, get_or_create_project

GOOD_CHAT = (
    b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
    b'{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, '
    b'{"role": "assistant", "content": "4"}]}\n'
)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    """A fresh app on the test settings."""
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A raw HTTP client for the app (no key)."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def make_key(session: Session) -> Callable[[str], str]:
    """A new API key for the named project (created when new)."""

    def make(name: str) -> str:
        key = create_key(session=session, project=get_or_create_project(session=session, name=name))
        session.commit()
        return key

    return make


@pytest.fixture
def key_a(make_key: Callable[[str], str]) -> str:
    """Project A's key."""
    return make_key("project-a")


@pytest.fixture
def key_b(make_key: Callable[[str], str]) -> str:
    """Project B's key."""
    return make_key("project-b")


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def sdk(client: TestClient, key_a: str) -> OpenAI:
    """The official openai SDK speaking to the app as project A (no retries: each call is seen once)."""
    return OpenAI(base_url="http://testserver/v1", api_key=key_a, http_client=client, max_retries=0)


@pytest.fixture
def upload(client: TestClient) -> Callable[..., dict[str, object]]:
    """Upload bytes as a fine-tune file with `key`; the FileObject."""

    def do(key: str, content: bytes = GOOD_CHAT, filename: str = "train.jsonl") -> dict[str, object]:
        response = client.post(
            "/v1/files", headers=bearer(key), files={"file": (filename, content)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    return do
