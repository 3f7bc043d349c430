"""The export task: claim the export in SQL and run it (run.py)."""

from __future__ import annotations

import logging
import os
import socket

from backend.config import get_settings
from backend.db.models import now
from backend.services import export_runs
from backend.workers.celery_app import app
from backend.workers.exports.run import ExportRun
from backend.workers.writes import with_retry

logger = logging.getLogger(__name__)


@app.task(name=export_runs.RUN_EXPORT, ignore_result=True)
def run_export(export_id: str) -> None:
    """Run export `export_id` (the message carries nothing else)."""
    settings = get_settings()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    stale_before = now() - int(settings.heartbeat_expiry_seconds)
    claimed = with_retry(lambda s: export_runs.claim_export(
        session=s, export_id=export_id, worker=worker, stale_before=stale_before))
    if isinstance(claimed, str):
        logger.info("export %s: not run (%s)", export_id, claimed)
        return
    ExportRun(claimed, settings).run()
