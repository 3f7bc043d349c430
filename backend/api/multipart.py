"""A streaming multipart/form-data reader: file parts go to a sink chunk by chunk, never whole into memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from backend.services.errors import InvalidRequest, TooLarge

MAX_FIELD_BYTES = 64 * 1024
# An upload form has two parts (purpose, file) and a few optional ones: thousands of parts are an attack
# on memory (each text field is kept) and on time, so the form is refused long before that.
MAX_PARTS = 16
MAX_HEADER_BYTES = 16 * 1024


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    name: str = ""
    filename: str | None = None
    value: bytearray = field(default_factory=bytearray)


@dataclass
class StreamedForm:
    """The text fields of a form and the name of the (one) file part that was streamed."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    file_seen: bool = False


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary of a Content-Type header; InvalidRequest when the body is not multipart."""
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest("The body must be multipart/form-data with a file part.", param="file")
    return boundary


async def read_form(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    file_field: str,
    open_file: Callable[[], Callable[[bytes], Awaitable[None]]],
    max_body_bytes: int,
) -> StreamedForm:
    """Parse a multipart body: `file_field`'s bytes go to the writer `open_file()` returns, text fields are kept.

    Memory stays bounded whatever arrives: at most MAX_PARTS parts, MAX_HEADER_BYTES of headers and
    MAX_FIELD_BYTES of text per part, `max_body_bytes` in all (TooLarge past it, counted as the bytes come).
    A body that ends before its closing boundary (a truncated upload) is refused, never stored.
    """
    form = StreamedForm()
    parts = 0
    received = 0
    events: list[tuple[str, bytes]] = []
    callbacks = {
        "on_part_begin": lambda: events.append(("begin", b"")),
        "on_header_field": lambda data, start, end: events.append(("hfield", data[start:end])),
        "on_header_value": lambda data, start, end: events.append(("hvalue", data[start:end])),
        "on_header_end": lambda: events.append(("hend", b"")),
        "on_headers_finished": lambda: events.append(("headers", b"")),
        "on_part_data": lambda data, start, end: events.append(("data", data[start:end])),
        "on_part_end": lambda: events.append(("end", b"")),
    }
    parser = MultipartParser(boundary_of(content_type), callbacks)  # type: ignore[arg-type]
    part = _Part()
    writer: Callable[[bytes], Awaitable[None]] | None = None
    async for chunk in chunks:
        received += len(chunk)
        if received > max_body_bytes:
            raise TooLarge(f"The request body is larger than the limit of {max_body_bytes} bytes.")
        try:
            parser.write(chunk)
        except FormParserError as exc:
            raise InvalidRequest(f"Malformed multipart body: {exc}", param="file") from None
        for kind, data in events:
            if kind == "begin":
                parts += 1
                if parts > MAX_PARTS:
                    raise InvalidRequest(f"The form has more than {MAX_PARTS} parts.", param=None)
                part, writer = _Part(), None
            elif kind in ("hfield", "hvalue"):
                (part.header_field if kind == "hfield" else part.header_value).extend(data)
                if sum(len(k) + len(v) for k, v in part.headers) + len(part.header_field) + len(
                    part.header_value
                ) > MAX_HEADER_BYTES:
                    raise InvalidRequest("A form part's headers are too long.", param="file")
            elif kind == "hend":
                part.headers.append((bytes(part.header_field).lower(), bytes(part.header_value)))
                part.header_field.clear()
                part.header_value.clear()
            elif kind == "headers":
                _name_part(part)
                if part.name == file_field and part.filename is not None and not form.file_seen:
                    form.file_seen, form.filename, writer = True, part.filename, open_file()
            elif kind == "data":
                if writer is not None:
                    await writer(data)
                elif part.filename is None:
                    part.value += data
                    if len(part.value) > MAX_FIELD_BYTES:
                        raise InvalidRequest(f"The form field {part.name!r} is too long.", param=part.name)
            elif kind == "end" and part.filename is None:
                form.fields[part.name] = part.value.decode("utf-8", errors="replace")
        events.clear()
    parser.finalize()
    if parser.state != MultipartState.END:
        raise InvalidRequest("The multipart body ended before its closing boundary (a truncated upload).",
                             param="file")
    return form


def _name_part(part: _Part) -> None:
    for key, value in part.headers:
        if key == b"content-disposition":
            _, params = parse_options_header(value)
            part.name = params.get(b"name", b"").decode("utf-8", errors="replace")
            filename = params.get(b"filename")
            part.filename = filename.decode("utf-8", errors="replace") if filename is not None else None
