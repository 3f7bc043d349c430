"""schemathesis against /openapi.json, every phase it has (examples, coverage, fuzzing, stateful), as two projects.

The run is bounded (a fixed seed, few examples per operation) so it finishes in about a minute; it must find no
5xx, no response that disagrees with the OpenAPI document, and no object one project can read of another's.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import File, Project
from backend.services import files as file_service
from backend.services.errors import NotFound
from tests.security.conftest import bearer, seed_objects

MAX_EXAMPLES = 6


PHASES = ("examples", "coverage", "fuzzing", "stateful")


def _config(auth_file: Path, max_examples: int, phases: tuple[str, ...]) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": 20261125,
        "cache": {"enabled": False},  # every run starts from nothing: CI and a laptop test the same thing
        "generation": {"max-examples": max_examples, "database": "none"},
        "phases": {
            "examples": {"enabled": "examples" in phases},
            # Every undeclared method of every path answers alike (405 + Allow); one such method is enough.
            "coverage": {"enabled": "coverage" in phases, "unexpected-methods": ["PATCH"]},
            "fuzzing": {"enabled": "fuzzing" in phases},
            "stateful": {"enabled": "stateful" in phases, "max-steps": 20},
        },
        "checks": {"positive_data_acceptance": {"enabled": False}},
        "auth": {"wfc": {"path": str(auth_file), "peers": ["project-a", "project-b"]}},
        # A live SSE stream follows a job until it ends; the stream is tested on its own (test_auth, tests/api).
        "operations": [{"include-path": "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
                        "parameters": {"stream": False}}],
        "max-stream-events": 3,
        "request-timeout": 20,
        "workers": 1,
    })


def run_schemathesis(
    app: FastAPI,
    auth_file: Path,
    max_examples: int = MAX_EXAMPLES,
    path_regex: str | None = None,
    phases: tuple[str, ...] = PHASES,
) -> dict[str, Any]:
    """Run every phase in-process over ASGI (the operations under `path_regex`, or all); what it found."""
    calls = Counter[str]()

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        calls[scope.get("method", scope["type"])] += 1
        await app(scope, receive, send)

    schema = schemathesis.openapi.from_asgi("/openapi.json", counted, config=_config(auth_file, max_examples, phases))
    if path_regex is not None:
        schema = schema.include(path_regex=path_regex)
    found: dict[str, Any] = {
        "failures": [], "errors": [], "statuses": Counter(), "phases": Counter(), "checks": Counter(),
    }
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            found["phases"][str(event.phase)] += 1
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    found["statuses"][interaction.response.status_code] += 1
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    found["checks"][node.name] += 1
                    if node.failure_info is not None:
                        found["failures"].append(f"{event.recorder.label}: {node.name}: {node.failure_info.failure}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            found["errors"].append(repr(getattr(event, "value", getattr(event, "exception", event))))
    found["calls"] = sum(calls.values())
    return found


def _two_projects(client: TestClient, key_a: str, key_b: str, session: Session, folder: Path) -> Path:
    """Objects of both projects to read, and the WFC auth document naming the two as peers."""
    seed_objects(client, key_a, session, status="cancelled")
    seed_objects(client, key_b, session, status="succeeded")
    auth_file = folder / "wfc-auth.json"
    auth_file.write_text(json.dumps({"auth": [
        {"name": name, "fixedHeaders": [{"name": "Authorization", "value": bearer(key)["Authorization"]}]}
        for name, key in (("project-a", key_a), ("project-b", key_b))
    ]}))
    return auth_file


def test_schemathesis_finds_no_server_error_schema_violation_or_leak(
    app: FastAPI, client: TestClient, key_a: str, key_b: str, session: Session, tmp_path: Path,
    healthy: Callable[[], None],
) -> None:
    auth_file = _two_projects(client, key_a, key_b, session, tmp_path)
    started = time.monotonic()
    found = run_schemathesis(app, auth_file)
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {found['calls']} requests, {sum(found['statuses'].values())} responses in {elapsed:.0f}s, "
          f"statuses {dict(found['statuses'])}, phases {dict(found['phases'])}, checks {dict(found['checks'])}")
    assert not found["errors"], found["errors"][:5]
    assert not found["failures"], "\n".join(found["failures"][:20])
    assert not [status for status in found["statuses"] if status >= 500]
    assert {"examples", "coverage", "fuzzing", "stateful"} <= set(found["phases"])
    assert sum(found["statuses"].values()) > 500
    healthy()


def test_the_authorization_check_catches_a_planted_leak(
    app: FastAPI, client: TestClient, key_a: str, key_b: str, session: Session, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run above is only worth its zero if it can see a leak: plant one (a file lookup that forgets the
    project filter) and schemathesis must report project B reading project A's file."""
    auth_file = _two_projects(client, key_a, key_b, session, tmp_path)

    def leaky_get_file(*, session: Session, project: Project, file_id: str) -> File:
        row = session.scalar(select(File).where(File.id == file_id))
        if row is None:
            raise NotFound(f"No such file: {file_id}", param="file_id")
        return row

    monkeypatch.setattr(file_service, "get_file", leaky_get_file)
    found = run_schemathesis(app, auth_file, max_examples=3, path_regex="^/v1/files", phases=("fuzzing",))
    leaks = [failure for failure in found["failures"] if "object_level_authorization" in failure]
    assert leaks and "`project-b` received the `FileObject` that `project-a` owns" in leaks[0], found["failures"]
