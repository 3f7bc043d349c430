"""The export task: claim the export in SQL and run it (run.py)."""

from __future__ import annotations

import logging
from functools import partial

from backend.config import get_settings
from backend.services import export_runs
from backend.workers.celery_app import app
from backend.workers.exports.run import ExportRun
from backend.workers.writes import claim_attempt

logger = logging.getLogger(__name__)


@app.task(name=export_runs.RUN_EXPORT, ignore_result=True)
def run_export(export_id: str) -> None:
    """Run export `export_id` (the message carries nothing else)."""
    settings = get_settings()
    claimed = claim_attempt(partial(export_runs.claim_export, export_id=export_id), settings=settings, log=logger,
                            label=f"export {export_id}")
    if claimed is not None:
        ExportRun(claimed, settings).run()
