"""Auth and isolation: missing, wrong and revoked keys are 401 on every /v1 route; another project's objects are 404
on every route (file content and the SSE stream included); keys are found by hash and compared in constant time;
per-project quotas answer 429 without slowing other projects."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import statistics
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session

from backend.db.models import Job, Project
from backend.services import keys as key_service
from tests.security.conftest import GOOD_CHAT, Owned, Stored, assert_refused, bearer, seed_objects


def _v1_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every /v1 route the app publishes in its OpenAPI document."""
    paths = app.openapi()["paths"]
    return [(method.upper(), path) for path, item in paths.items() if path.startswith("/v1") for method in item]


def _fill(path: str, owned: Owned) -> str:
    return (path.replace("{file_id}", owned.file_id).replace("{fine_tuning_job_id}", owned.job_id)
            .replace("{model_id}", owned.model_id).replace("{evaluation_id}", owned.evaluation_id)
            .replace("{export_id}", owned.export_id))


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    if path == "/v1/files" and method == "POST":
        return client.post(path, headers=headers, files={"file": ("t.jsonl", GOOD_CHAT)}, data={"purpose": "fine-tune"})
    if method == "POST":
        return client.post(path, headers=headers, json={"model": "tiny-gpt2", "training_file": "file-x"})
    return client.request(method, path, headers=headers)


def test_every_route_is_covered(app: FastAPI) -> None:
    routes = _v1_routes(app)
    assert len(routes) >= 15, routes  # the tests below walk this list, so a new route is covered automatically
    assert ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/telemetry") in routes


def test_missing_wrong_malformed_and_revoked_keys_are_401_on_every_route(
    app: FastAPI, client: TestClient, key_a: str, make_key: Callable[[str], str], session: Session,
    snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    owned = seed_objects(client, key_a, session)
    revoked = make_key("project-a")
    assert key_service.revoke_key(session=session, key=revoked)
    session.commit()
    bad_headers = [
        {}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
        {"Authorization": f"Basic {key_a}"}, {"Authorization": key_a}, {"Authorization": "Bearer sk-st-wrong"},
        {"Authorization": f"Bearer {key_a}x"}, {"Authorization": f"Bearer {key_a[:-1]}"},
        {"Authorization": f"Bearer {key_a.upper()}"}, {"Authorization": f"Bearer {revoked}"},
        {"Authorization": "Bearer " + "k" * 65536},
        {"Authorization": f"Bearer {hashlib.sha256(key_a.encode()).hexdigest()}"},  # the stored hash is no key
        {"X-Api-Key": key_a}, {"Authorization": "Bearer ' OR '1'='1"},
    ]
    before = snapshot()
    for method, template in _v1_routes(app):
        path = _fill(template, owned)
        for headers in bad_headers:
            error = assert_refused(_call(client, method, path, headers), 401)
            assert error["code"] == "invalid_api_key", (method, path)
        assert_refused(client.get(f"/v1/fine_tuning/jobs/{owned.job_id}/events?stream=true",
                                  headers={"Authorization": f"Bearer {revoked}"}), 401)
    unchanged(before)


def test_another_projects_objects_are_404_on_every_route(
    app: FastAPI, client: TestClient, key_a: str, key_b: str, session: Session,
    snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    owned = seed_objects(client, key_a, session, status="running")
    mine = seed_objects(client, key_b, session)
    object_routes = [(m, t) for m, t in _v1_routes(app) if "{" in t]
    assert len(object_routes) >= 11
    # Project A reaches each read route of its own objects; project B gets 404 on every route, reads and writes.
    for method, template in object_routes:
        if method == "GET":
            assert _call(client, method, _fill(template, owned), bearer(key_a)).status_code == 200, template
    before = snapshot()
    for method, template in object_routes:
        error = assert_refused(_call(client, method, _fill(template, owned), bearer(key_b)), 404)
        assert owned.job_id not in str(error) or "No such" in str(error["message"])
    for stream in ("true", "1"):
        assert_refused(client.get(f"/v1/fine_tuning/jobs/{owned.job_id}/events?stream={stream}",
                                  headers={**bearer(key_b), "Last-Event-ID": "0"}), 404)
    # B's lists hold only B's objects, and A's ids are no cursor into them.
    for path, own_id in [("/v1/files", mine.file_id), ("/v1/fine_tuning/jobs", mine.job_id)]:
        assert [row["id"] for row in client.get(path, headers=bearer(key_b)).json()["data"]] == [own_id]
        cursor = owned.file_id if "files" in path else owned.job_id
        assert_refused(client.get(f"{path}?after={cursor}", headers=bearer(key_b)), 400, "after")
    for path in [f"/v1/fine_tuning/jobs/{mine.job_id}/events", f"/v1/fine_tuning/jobs/{mine.job_id}/checkpoints"]:
        events = client.get(f"{path}?after={owned.job_id}", headers=bearer(key_b))
        assert_refused(events, 400, "after")
    assert owned.model_id not in {m["id"] for m in client.get("/v1/models", headers=bearer(key_b)).json()["data"]}
    # B may not train on A's file either.
    body = {"model": "tiny-gpt2", "training_file": owned.file_id}
    assert_refused(client.post("/v1/fine_tuning/jobs", headers=bearer(key_b), json=body), 400, "training_file")
    after = snapshot()
    assert after.rows == before.rows and after.disk == before.disk and after.recorded == before.recorded
    job = session.scalars(select(Job).where(Job.id == owned.job_id).execution_options(populate_existing=True)).one()
    assert (job.status, job.requested_action) == ("running", None)  # B's cancel/pause reached nothing
    unchanged(before)


def test_keys_are_found_by_hash_and_compared_in_constant_time(
    key_a: str, session: Session, db_engine: Engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    statements: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append((statement, parameters))

    monkeypatch.setattr(key_service.hmac, "compare_digest", spy)
    event.listen(db_engine, "before_cursor_execute", record)
    try:
        project = key_service.project_for_key(session, key_a)
        missing = key_service.project_for_key(session, key_a + "x")
    finally:
        event.remove(db_engine, "before_cursor_execute", record)
    digest = hashlib.sha256(key_a.encode()).hexdigest()
    assert project is not None and project.name == "project-a" and missing is None
    assert compared == [(digest, digest)]  # the final check is hmac.compare_digest on the stored hash
    # The database is asked for a hash (an index lookup, not a scan comparing secrets); the key itself never leaves.
    assert len(statements) == 2 and all("key_hash" in sql for sql, _ in statements)
    assert all(key_a not in repr(params) for _, params in statements)
    assert digest in repr(statements[0][1])


def test_polling_a_job_is_one_query_that_checks_the_key_like_any_other_route(
    app: FastAPI, client: TestClient, key_a: str, key_b: str, make_key: Callable[[str], str], session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owned = seed_objects(client, key_a, session)
    revoked = make_key("project-a")
    assert key_service.revoke_key(session=session, key=revoked)
    session.commit()
    compared: list[str] = []
    real = hmac.compare_digest
    monkeypatch.setattr(key_service.hmac, "compare_digest", lambda a, b: compared.append(a) or real(a, b))
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    app_engine = app.state.session_factory.kw["bind"]
    event.listen(app_engine, "before_cursor_execute", record)
    try:
        assert client.get(f"/v1/fine_tuning/jobs/{owned.job_id}", headers=bearer(key_a)).json()["id"] == owned.job_id
        reads = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
        assert len(reads) == 1 and "key_hash" in reads[0] and "jobs" in reads[0]  # key and job in one query
        assert compared == [hashlib.sha256(key_a.encode()).hexdigest()]
        # The fast path's miss falls back to the ordinary checks: a revoked key is 401, another project's job 404.
        assert_refused(client.get(f"/v1/fine_tuning/jobs/{owned.job_id}", headers=bearer(revoked)), 401)
        assert_refused(client.get(f"/v1/fine_tuning/jobs/{owned.job_id}", headers=bearer(key_b)), 404)
    finally:
        event.remove(app_engine, "before_cursor_execute", record)
    assert key_service.job_for_key(session, revoked, owned.job_id) is None
    assert key_service.job_for_key(session, key_b, owned.job_id) is None
    assert key_service.job_for_key(session, key_a, "../" + owned.job_id) is None


def _median_seconds(request: Callable[[], object], times: int = 15) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        request()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def test_quotas_are_429_per_project_without_slowing_the_others(
    client: TestClient, key_a: str, key_b: str, session: Session, upload: Callable[..., dict[str, object]],
    snapshot: Callable[[], Stored], unchanged: Callable[[Stored], None],
) -> None:
    session.execute(update(Project).where(Project.name == "project-a").values(
        max_concurrent_jobs=2, max_stored_bytes=3 * len(GOOD_CHAT)))
    session.commit()
    file_a, file_b = upload(key_a)["id"], upload(key_b)["id"]

    def b_polls() -> None:
        assert client.get("/v1/fine_tuning/jobs", headers=bearer(key_b)).status_code == 200

    baseline = _median_seconds(b_polls)
    job = {"model": "tiny-gpt2", "training_file": file_a}
    for _ in range(2):
        assert client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json=job).status_code == 200
    upload(key_a)
    upload(key_a)  # three datasets: the byte quota is full
    before = snapshot()
    refusals = []
    for _ in range(3):
        error = assert_refused(client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json=job), 429)
        refusals.append(error)
        error = assert_refused(client.post("/v1/files", headers=bearer(key_a), files={"file": ("t.jsonl", GOOD_CHAT)},
                                           data={"purpose": "fine-tune"}), 429)
        refusals.append(error)
    assert all(e["type"] == "rate_limit_error" and e["code"] == "quota_exceeded" for e in refusals)

    def a_then_b() -> None:  # A keeps knocking at its quota between each of B's requests
        assert client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json=job).status_code == 429
        b_polls()

    a_refused = _median_seconds(lambda: client.post("/v1/fine_tuning/jobs", headers=bearer(key_a), json=job))
    while_full = _median_seconds(b_polls)
    unchanged(before)
    # B works normally: it still creates jobs and uploads, at the speed it had before A was full.
    assert client.post("/v1/fine_tuning/jobs", headers=bearer(key_b),
                       json={"model": "tiny-gpt2", "training_file": file_b}).status_code == 200
    upload(key_b)
    assert while_full < max(3 * baseline, baseline + 0.05), (baseline, while_full)
    assert a_refused < 0.5, a_refused  # a refusal is answered at once, never held open
    a_then_b()


def test_quotas_hold_under_concurrent_requests(
    live_url: str, key_a: str, session: Session, upload: Callable[..., dict[str, object]],
) -> None:
    """Twelve creates and twelve uploads at once against a quota of three: exactly three of each get through."""
    file_id = upload(key_a)["id"]
    session.execute(update(Project).where(Project.name == "project-a").values(
        max_concurrent_jobs=3, max_stored_bytes=4 * len(GOOD_CHAT)))
    session.commit()

    async def burst() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=live_url, headers=bearer(key_a), timeout=60) as http:
            jobs = [http.post("/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": file_id})
                    for _ in range(12)]
            uploads = [http.post("/v1/files", files={"file": ("t.jsonl", GOOD_CHAT)}, data={"purpose": "fine-tune"})
                       for _ in range(12)]
            created = await asyncio.gather(*jobs)
            stored = await asyncio.gather(*uploads)
            return sorted(r.status_code for r in created), sorted(r.status_code for r in stored)

    created, stored = asyncio.run(burst())
    assert created == [200] * 3 + [429] * 9, created
    assert stored == [200] * 3 + [429] * 9, stored
    session.expire_all()
    project = session.scalars(select(Project).where(Project.name == "project-a")).one()
    assert len(session.scalars(select(Job).where(Job.project_id == project.id)).all()) == 3
