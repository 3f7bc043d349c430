"""enqueue_job: only the job id travels, by task name; a broker that is down never fails the caller."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
import redis

from backend.config import get_settings
from backend.services.job_runs import RUN_JOB as TASK_NAME
from backend.workers.celery_app import QUEUE
from backend.workers.dispatch import enqueue_job, queue_depth, send_or_raise

DISPATCH_REDIS_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("SAFETRAIN_BROKER_URL", DISPATCH_REDIS_URL)
    get_settings.cache_clear()
    client = redis.Redis.from_url(DISPATCH_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    get_settings.cache_clear()


def test_message_carries_only_the_job_id(broker: redis.Redis) -> None:
    enqueue_job("ftjob-abc")
    (raw,) = broker.lrange(QUEUE, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == TASK_NAME
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == ["ftjob-abc"] and kwargs == {}
    assert queue_depth() == 1


def test_broker_down_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SAFETRAIN_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    get_settings.cache_clear()
    try:
        started = time.monotonic()
        enqueue_job("ftjob-lost")  # the API has committed the job: it must answer, the reconciler re-sends
        assert time.monotonic() - started < 15
        assert "reconciler will send it again" in caplog.text
        with pytest.raises(Exception):  # noqa: B017 - kombu raises its own connection errors
            send_or_raise(TASK_NAME, "ftjob-lost")
        assert queue_depth() is None
    finally:
        get_settings.cache_clear()
