"""/v1/files: upload (streamed, validated), list, retrieve, content, delete."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from backend.api.deps import BEARER, ProjectDep, SessionDep, SettingsDep, page_response, release_connection
from backend.api.multipart import read_form
from backend.api.schemas import FileDeleted, FileObject, ListResponse, error_responses
from backend.services import files as file_service
from backend.services.errors import InvalidRequest, NotFound, TooLarge

router = APIRouter(
    prefix="/v1/files", tags=["files"], dependencies=[BEARER],
    responses=error_responses(400, 401, 404, 429, 503),
)

# Room for the multipart framing around the file part when judging Content-Length up front.
_FORM_OVERHEAD_BYTES = 64 * 1024
_WRITE_BATCH_BYTES = 1 << 20
# The body is parsed as a stream (not by FastAPI), so its shape is declared here for /docs.
_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "A JSONL dataset."},
                    "purpose": {"type": "string", "enum": list(file_service.UPLOAD_PURPOSES)},
                },
            }
        }
    },
}


class _Batches:
    """Hands the upload's sink ~1 MiB batches in a worker thread: one batch in flight while the next arrives.

    Batches are written in order, one at a time; overlapping the network with the check (and the sink's
    hashing and writing, which release the GIL) keeps the socket read while a batch is validated.
    """

    def __init__(self, write_batch: Callable[[bytes], None]) -> None:
        self._write_batch = write_batch
        self._chunks: list[bytes] = []
        self._size = 0
        self._in_flight: asyncio.Future[None] | None = None

    async def write(self, chunk: bytes) -> None:
        """Take the next bytes of the file; one thread hop per MiB, not per 64 KiB network read."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size >= _WRITE_BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        """Wait for the batch in flight (raising its error), then start the next one."""
        await self.wait()
        if self._chunks:
            # One join, one copy: growing a bytearray and copying it out cost ~60 times more per MiB.
            batch = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            self._in_flight = asyncio.ensure_future(run_in_threadpool(self._write_batch, batch))

    async def wait(self) -> None:
        """Wait for the batch in flight; its error (a bad line, the quota, the size limit) is raised here."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            await in_flight

    async def settle(self) -> Exception | None:
        """After a failure elsewhere: wait until no thread writes to the sink; the batch's own error if any."""
        try:
            await self.wait()
        except Exception as exc:
            return exc
        return None


@router.post(
    "",
    response_model=FileObject,
    summary="Upload a JSONL dataset (multipart: file, purpose)",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=error_responses(413),
)
async def upload_file(request: Request, session: SessionDep, settings: SettingsDep, project: ProjectDep) -> FileObject:
    """Stream the file to disk, hashing and validating each line; nothing is kept if it is refused."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_upload_bytes + _FORM_OVERHEAD_BYTES:
        raise TooLarge(f"The file is larger than the limit of {settings.max_upload_bytes} bytes.")

    def start() -> file_service.PendingUpload:
        try:
            return file_service.start_upload(session=session, settings=settings, project=project)
        finally:
            release_connection(session)  # no pooled connection is held while the body streams in

    pending = await run_in_threadpool(start)

    batches = _Batches(pending.write)
    try:
        form = await read_form(
            request.stream(),
            content_type=request.headers.get("content-type"),
            file_field="file",
            open_file=lambda: batches.write,
            max_body_bytes=settings.max_upload_bytes + _FORM_OVERHEAD_BYTES,
        )
        await batches.flush()
        await batches.wait()
        if not form.file_seen:
            raise InvalidRequest("The form has no `file` part.", param="file")
        row = await run_in_threadpool(
            file_service.finish_upload,
            session=session,
            pending=pending,
            filename=form.filename,
            purpose=form.fields.get("purpose"),
        )
    except BaseException as exc:
        try:
            earlier = await batches.settle()
        finally:
            pending.abort()
            if pending.done and (settings.data_dir / pending.relative_path).exists():
                (settings.data_dir / pending.relative_path).unlink(missing_ok=True)
        if earlier is not None and isinstance(exc, Exception):
            raise earlier from None  # its bytes came first: the client hears of the first fault in the stream
        raise
    return FileObject.of(row)


@router.get("", response_model=ListResponse[FileObject], summary="List the project's files")
def list_files(
    session: SessionDep,
    project: ProjectDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, object]:
    """Files, newest first by default; continue with `after=<last_id>`."""
    page = file_service.list_files(
        session=session, project=project, purpose=purpose, after=after, limit=limit, order=order
    )
    return page_response(session, page, FileObject.of)


@router.get("/{file_id}", response_model=FileObject, summary="Retrieve a file")
def retrieve_file(file_id: str, session: SessionDep, project: ProjectDep) -> FileObject:
    """One file of the project."""
    row = file_service.get_file(session=session, project=project, file_id=file_id)
    release_connection(session)
    return FileObject.of(row)


_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/{file_id}/content",
    summary="Download a file's bytes",
    response_class=FileResponse,
    responses={200: {"description": "The bytes.", "content": {"application/octet-stream": _BINARY,
                                                             "application/zip": _BINARY}}},
)
def file_content(file_id: str, session: SessionDep, settings: SettingsDep, project: ProjectDep) -> FileResponse:
    """The stored bytes, streamed from disk (datasets and adapter archives alike)."""
    row = file_service.get_file(session=session, project=project, file_id=file_id)
    release_connection(session)
    path = file_service.file_path(settings=settings, row=row)
    if not path.is_file():
        raise NotFound(f"The content of file {file_id} is no longer stored.", param="file_id")
    media_type = "application/zip" if row.filename.endswith(".zip") else "application/octet-stream"
    return FileResponse(path, media_type=media_type, filename=row.filename)


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file")
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, project: ProjectDep) -> FileDeleted:
    """Delete a file and its bytes; refused while an unfinished job uses it."""
    file_service.delete_file(session=session, settings=settings, project=project, file_id=file_id)
    return FileDeleted(id=file_id, deleted=True)
