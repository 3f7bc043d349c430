"""Ring the workers' doorbell: send a task by name with only the row's id, after the row is committed.

Every kind of leased work is sent the same way (`send(task_name, row_id)`); a message that is lost or never
sent is sent again by the reconciler, so a broker that is down is logged here, never raised to the caller.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery

from backend.config import get_settings
from backend.services.evaluation_runs import RUN_EVALUATION
from backend.services.job_runs import RUN_JOB
from backend.workers.celery_app import QUEUE, celery_config

logger = logging.getLogger(__name__)

# A send that cannot reach the broker gives up quickly: the row is already in SQL, and the reconciler
# sends its message again once it has waited unclaimed for a while.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


@lru_cache(maxsize=4)
def _sender(broker_url: str) -> Celery:
    """A producer-only Celery app for `broker_url` (connections pooled, no task modules imported)."""
    sender = Celery("safetrain-dispatch", set_as_current=False)
    config: dict[str, Any] = celery_config(get_settings())
    config.update(broker_url=broker_url, broker_connection_timeout=2.0)
    sender.conf.update(config)
    return sender


def send_or_raise(task_name: str, row_id: str) -> None:
    """Send the task `task_name` with only `row_id`; raises when the broker cannot be reached."""
    sender = _sender(get_settings().resolved_broker_url)
    sender.send_task(task_name, args=[row_id], queue=QUEUE, retry=True, retry_policy=_PUBLISH_RETRY)


def send(task_name: str, row_id: str) -> None:
    """Send the task for a committed row; a broker that is down is logged, not raised (the reconciler re-sends)."""
    try:
        send_or_raise(task_name, row_id)
    except Exception:
        logger.exception("could not send %s for %s to the broker; the reconciler will send it again", task_name,
                         row_id)


def enqueue_job(job_id: str) -> None:
    """Send `safetrain.run_job` for a committed job."""
    send(RUN_JOB, job_id)


def enqueue_evaluation(evaluation_id: str) -> None:
    """Send `safetrain.run_evaluation` for a committed evaluation."""
    send(RUN_EVALUATION, evaluation_id)


def queue_depth() -> int | None:
    """Messages waiting in the queue (every kind shares it), or None when the broker cannot say."""
    sender = _sender(get_settings().resolved_broker_url)
    try:
        with sender.connection_for_write() as connection:
            declared = connection.default_channel.queue_declare(queue=QUEUE, passive=True)
            return int(declared.message_count)
    except Exception:
        return None
