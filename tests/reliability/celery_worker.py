"""The reliability tests' Celery worker: `python -m tests.reliability.celery_worker <concurrency> <name>`.

It is the real worker (backend.workers.celery_app, prefork pool, the reconciler thread) started as the
workers tests start it. `RELIABILITY_VISIBILITY_SECONDS`, when set, gives the Redis transport a visibility
timeout of that many seconds and has kombu sweep for overdue unacknowledged messages every second (its
default sweep runs about every 100 s), so a job longer than the timeout is really delivered a second time
while it runs. The setting bypasses Settings' own check (visibility timeout > heartbeat expiry) on purpose:
the test shows that even then no job runs twice.
"""

from __future__ import annotations

import os
import sys

from backend.workers.celery_app import QUEUE, app


def main(argv: list[str]) -> None:
    concurrency, name = argv
    visibility = os.environ.get("RELIABILITY_VISIBILITY_SECONDS")
    if visibility:
        app.conf.broker_transport_options = {
            "visibility_timeout": int(visibility), "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
        }
    app.worker_main([
        "worker", "--loglevel=INFO", f"--concurrency={concurrency}", "--pool=prefork", f"--queues={QUEUE}",
        "--without-mingle", "--without-gossip", f"--hostname={name}@%h",
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
