"""Ring the workers' doorbell for an evaluation: send `safetrain.run_evaluation` with only its id."""

from __future__ import annotations

import logging

from backend.config import get_settings
from backend.workers import dispatch
from backend.workers.celery_app import QUEUE

EVALUATION_TASK_NAME = "safetrain.run_evaluation"

logger = logging.getLogger(__name__)


def enqueue_evaluation(evaluation_id: str) -> None:
    """Send the task for a committed evaluation; a broker that is down is logged, not raised."""
    try:
        sender = dispatch._sender(get_settings().resolved_broker_url)  # the job doorbell's pooled producer
        sender.send_task(EVALUATION_TASK_NAME, args=[evaluation_id], queue=QUEUE, retry=True,
                         retry_policy=dispatch._PUBLISH_RETRY)
    except Exception:
        logger.exception("could not send evaluation %s to the broker", evaluation_id)
