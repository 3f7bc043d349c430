"""The API process freezes its startup heap once, so full collections stop walking it (the listing's p99)."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.config import Settings
from tests.api.conftest import bearer


def test_serving_freezes_the_startup_heap_once(client: TestClient, key_a: str, settings: Settings) -> None:
    frozen = gc.get_freeze_count()
    assert frozen > 10_000, frozen  # modules, the app, ORM and schema machinery
    assert client.get("/v1/fine_tuning/jobs?limit=100", headers=bearer(key_a)).json()["data"] == []
    with TestClient(create_app(settings)) as second:  # another app in this process freezes nothing more
        assert second.get("/v1/fine_tuning/jobs", headers=bearer(key_a)).status_code == 200
    assert gc.get_freeze_count() <= frozen  # (frozen objects freed by refcount leave the count)
