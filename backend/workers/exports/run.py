"""One claimed attempt of an export, from the adapter archive to the stored merged model.

The child (`python -m backend.workers.exports.child`) merges the adapter into the base on the CPU and writes the
model folder with its manifest; this process runs it under the shared supervisor, which heartbeats meanwhile and
stops the child (SIGTERM, then SIGKILL after the grace) when the export is cancelled. The folder is then zipped
entry by entry from disk (never whole in memory; safetensors stored, not compressed) into a temporary file,
fsynced and renamed into place, and recorded as a `fine-tune-results` file that the export's `file_id` names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from backend.config import Settings
from backend.db.fence import StaleAttemptError
from backend.db.statuses import ExportStatus
from backend.devices import cpu_device
from backend.services import export_runs
from backend.services.export_runs import ClaimedExport
from backend.services.storage import hash_file
from backend.training.merge import DEFAULT_MAX_SHARD_SIZE
from backend.workers.adapter_archive import add_file, unpack_beside_base, write_whole
from backend.workers.supervisor import ChildExit, ChildSpec, Supervisor, beating
from backend.workers.writes import with_retry

logger = logging.getLogger(__name__)

CHILD_MODULE = "backend.workers.exports.child"
LOG_TAIL_CHARS = 600
STOP_GRACE_SECONDS = 30.0  # a merge keeps nothing to save on the way out


class Cancelled(Exception):
    """The export was cancelled while its folder was being stored."""


def merge_dtype(base_dir: Path) -> str:
    """The 16-bit dtype to merge at: float16 for a base published in float16, else bfloat16."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    stored = config.get("torch_dtype") or config.get("dtype")
    return "float16" if stored == "float16" else "bfloat16"


class ExportRun:
    """One claimed attempt of an export, from the adapter archive to the stored merged model."""

    def __init__(self, claimed: ClaimedExport, settings: Settings) -> None:
        self.claimed = claimed
        self.settings = settings
        self.work_dir = (settings.job_dir(claimed.job_id) / "exports" / claimed.id).resolve()
        self.manifest: dict[str, Any] | None = None
        self.failure: str | None = None  # the message the child sent

    def run(self) -> None:
        """Prepare, run the child, store the folder; any unexpected error fails the export."""
        claimed = self.claimed
        try:
            spec = self._prepare()
            self.event(f"Export {claimed.id} started: merging the adapter into {claimed.model} at {spec['dtype']} "
                       "on the CPU")
            ended = self._supervise(spec)
            self._record(ended)
        except StaleAttemptError:
            logger.warning("export %s attempt %s went stale; its writes are refused", claimed.id, claimed.attempt)
        except Cancelled:
            self._cancelled()
        except Exception as error:
            logger.exception("export %s failed", claimed.id)
            self._fail(f"{type(error).__name__}: {error}")
        finally:
            for folder in ("adapter", "merged"):  # the logs stay; the archive lives under artifacts/
                shutil.rmtree(self.work_dir / folder, ignore_errors=True)

    # Writes.

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """An event on the exported job, naming this export."""
        claimed = self.claimed
        with_retry(lambda s: export_runs.append_job_event(
            session=s, job_id=claimed.job_id, attempt=claimed.job_attempt, message=message, level=level,
            data={"export_id": claimed.id, **(data or {})}))

    def _heartbeat(self) -> str | None:
        return with_retry(lambda s: export_runs.heartbeat(
            session=s, export_id=self.claimed.id, attempt=self.claimed.attempt))

    def _finish(self, status: ExportStatus, *, file_id: str | None = None, error: str | None = None) -> None:
        claimed = self.claimed
        with_retry(lambda s: export_runs.finish(session=s, export_id=claimed.id, attempt=claimed.attempt,
                                                status=status, file_id=file_id, error=error))

    def _fail(self, message: str) -> None:
        try:
            self._finish(ExportStatus.FAILED, error=message)
        except StaleAttemptError:
            return  # another attempt owns the export: its failure is not this one's to record
        self.event(f"Export {self.claimed.id} failed: {message}", level="error")

    def _cancelled(self) -> None:
        try:
            self._finish(ExportStatus.CANCELLED)
        except StaleAttemptError:
            return
        self.event(f"Export {self.claimed.id} cancelled: the merge stopped")

    # Steps.

    def _prepare(self) -> dict[str, Any]:
        """Unpack the adapter archive next to a spec for the child; the base model must still be there."""
        claimed, settings = self.claimed, self.settings
        adapter_dir = self.work_dir / "adapter"
        base = unpack_beside_base(settings, model=claimed.model, adapter_path=claimed.adapter_path, folder=adapter_dir)
        out_dir = self.work_dir / "merged"
        shutil.rmtree(out_dir, ignore_errors=True)  # a requeued attempt starts over
        return {
            "base_model": str(base), "adapter_dir": str(adapter_dir), "out_dir": str(out_dir),
            "dtype": merge_dtype(base), "max_shard_size": DEFAULT_MAX_SHARD_SIZE, "base_model_name": claimed.model,
            "manifest": {"job_id": claimed.job_id, "export_id": claimed.id},
        }

    def _supervise(self, spec: dict[str, Any]) -> ChildExit:
        # The CPU, not a GPU: the base is merged unquantized in host memory, so no device lock is held.
        child = ChildSpec(module=CHILD_MODULE, spec=spec, folder=self.work_dir, attempt=self.claimed.attempt,
                          device=cpu_device())
        supervisor = Supervisor(
            child, handle_line=self._handle, heartbeat=self._heartbeat,
            heartbeat_seconds=self.settings.heartbeat_seconds, stop_grace_seconds=STOP_GRACE_SECONDS,
            label=f"export {self.claimed.id} attempt {self.claimed.attempt}",
        )
        return supervisor.wait()

    def _handle(self, payload: dict[str, Any]) -> str | None:
        if payload.get("type") == "result":
            self.manifest = payload["manifest"]
        elif payload.get("type") == "error":
            self.failure = str(payload.get("message"))
        return self._heartbeat()

    def _record(self, ended: ChildExit) -> None:
        if ended.stop_reason == "stale":
            return
        if ended.stop_reason == "cancel":
            raise Cancelled
        if self.manifest is None:
            tail = ended.log_tail(LOG_TAIL_CHARS)
            self._fail(self.failure or f"the merge process ended without a model (exit code {ended.returncode}). "
                       f"{tail}".strip())
            return
        file_id, size = self._store(self.work_dir / "merged")
        self.event(f"Export {self.claimed.id} succeeded: the merged model is stored as {file_id} ({size} bytes, "
                   f"{len(self.manifest['files'])} files)", data={"file_id": file_id})

    def _store(self, folder: Path) -> tuple[str, int]:
        """Zip the folder into artifacts/ (whole or not at all), record it as a file and the export as succeeded;
        (file id, size)."""
        claimed = self.claimed
        relative = Path("artifacts") / claimed.job_id / f"export-{claimed.id}-attempt-{claimed.attempt}.zip"
        destination = self.settings.data_dir / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._keep_alive():
                archive_folder(folder, destination)
                sha256, size = hash_file(destination)
            file_id = with_retry(lambda s: _record_success(s, claimed, path=str(relative), sha256=sha256, size=size))
        except BaseException:
            destination.unlink(missing_ok=True)
            raise
        return file_id, size

    @contextlib.contextmanager
    def _keep_alive(self) -> Iterator[None]:
        """Heartbeat from a thread while the folder is zipped and hashed; a cancel or a lost row stops it."""
        stop: list[BaseException] = []

        def beat() -> bool:
            try:
                if self._heartbeat() == "cancel":
                    stop.append(Cancelled())
                    return False
            except Exception as error:  # stale or unreachable: stop storing what nobody will record
                stop.append(error)
                return False
            return True

        with beating(beat, interval=self.settings.heartbeat_seconds, name=f"heartbeat-{self.claimed.id}"):
            yield
        if stop:
            raise stop[0]


def _record_success(session: Session, claimed: ClaimedExport, *, path: str, sha256: str, size: int) -> str:
    """The stored archive as a file, and the export succeeded with it, in one transaction; the file's id."""
    file_id = export_runs.store_export_file(session=session, export_id=claimed.id, attempt=claimed.attempt,
                                            path=path, sha256=sha256, size=size,
                                            filename=f"{claimed.job_id}-merged.zip")
    export_runs.finish(session=session, export_id=claimed.id, attempt=claimed.attempt,
                       status=ExportStatus.SUCCEEDED, file_id=file_id)
    return file_id


def archive_folder(folder: Path, destination: Path) -> None:
    """Zip the folder's files (flat names) to `destination` via a fsynced temporary file renamed into place."""

    def fill(archive: zipfile.ZipFile) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                add_file(archive, path)

    write_whole(destination, destination.with_name(f".{destination.name}.part"), fill,
                compression=zipfile.ZIP_DEFLATED, allowZip64=True)
