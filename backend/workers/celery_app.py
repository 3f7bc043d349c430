"""The Celery app of the training workers, configured from the settings when first used.

Settings for hour-long GPU jobs (DESIGN.md): a message is acknowledged only after the task returns
(`acks_late`) and re-queued when its pool process dies (`task_reject_on_worker_lost`); each pool
process reserves one message at a time (`worker_prefetch_multiplier=1`); results are not stored (the
state is in SQL); the broker redelivers an unacknowledged message only after a visibility timeout longer
than the heartbeat expiry, and a redelivered message is harmless anyway because the task's claim is a
conditional UPDATE. One pool process per GPU (`--concurrency`), each holding its GPU's lock while its
trainer runs, gives one training process at a time per GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from backend.config import Settings, get_settings

QUEUE = "safetrain"

logger = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings for `settings`' broker."""
    broker_url = settings.resolved_broker_url
    transport_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_seconds}
    if broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands every transport option to create_engine(), which refuses
        # unknown keywords (TypeError): send none. It polls once a second; nothing here needs faster.
        transport_options = {}
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker outlives a Redis restart, however long
        "broker_heartbeat": 0,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A Redis restart must not cancel a running training: its trainer goes on and SQL holds the state.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_max_tasks_per_child": None,
        "worker_send_task_events": True,  # Flower shows the tasks
        "worker_hijack_root_logger": False,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_time_limit": None,
        "task_soft_time_limit": None,
        "timezone": "UTC",
    }


app = Celery("safetrain", include=["backend.workers.jobs.task", "backend.workers.evaluations.task",
                                   "backend.workers.exports.task"])
app.add_defaults(lambda: celery_config(get_settings()))


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process drops the parent's pooled connections and warms the modules a job needs."""
    from backend.db.session import dispose_engine

    dispose_engine()
    try:
        import backend.workers.jobs.preparation  # noqa: F401  (imports the trainer's planning modules once)
    except Exception:  # a broken import surfaces in the task with its traceback
        logger.exception("warming the job modules failed")


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    from backend.workers.reconciler import start_reconciler

    start_reconciler(get_settings())


@signals.worker_shutting_down.connect
def _hand_back_jobs(**_: Any) -> None:
    """On shutdown, stop the trainers cleanly: each checkpoints, and its job is requeued to resume elsewhere."""
    from backend.workers.jobs.runner import stop_trainers

    stopped = stop_trainers()
    if stopped:
        logger.warning("shutting down: asked trainers %s to checkpoint and stop; their jobs go back to the queue",
                       stopped)


@signals.worker_shutdown.connect
def _stop_reconciler(**_: Any) -> None:
    from backend.workers.reconciler import stop_reconciler

    stop_reconciler()


def run_worker(concurrency: int = 1) -> None:
    """Run one Celery worker with `concurrency` pool processes: give it one per GPU (`safetrain worker`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.worker_main(
        [
            "worker",
            "--loglevel=INFO",
            f"--concurrency={max(1, concurrency)}",
            "--pool=prefork",
            f"--hostname=safetrain-{os.getpid()}@%h",
            f"--queues={QUEUE}",
            "--without-mingle",  # no revokes to sync: cancel and pause go through SQL
            "--without-gossip",
        ]
    )
