"""Files on disk under data_dir: uploads written through a hashing, size-capped, validating sink."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from backend.services.errors import TooLarge
from backend.training.merge import file_digest


class UploadSink:
    """Writes a stream to a temporary file beside its destination, counting, hashing and checking each chunk."""

    def __init__(
        self,
        *,
        destination: Path,
        max_bytes: int,
        check_chunk: Callable[[bytes], None] | None = None,
    ) -> None:
        self.destination = destination
        self.max_bytes = max_bytes
        self.check_chunk = check_chunk
        self.bytes = 0
        self._hash = hashlib.sha256()
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = destination.with_name(f".{destination.name}.part")
        self._stream = open(self.temporary, "wb")  # noqa: SIM115 - closed in commit() or abort()

    def write(self, chunk: bytes) -> None:
        """Take the next bytes; raises TooLarge past the limit, or whatever check_chunk raises."""
        self.bytes += len(chunk)
        if self.bytes > self.max_bytes:
            raise TooLarge(f"The file is larger than the limit of {self.max_bytes} bytes.")
        if self.check_chunk is not None:
            self.check_chunk(chunk)
        self._hash.update(chunk)
        self._stream.write(chunk)

    @property
    def sha256(self) -> str:
        """The hex digest of everything written so far."""
        return self._hash.hexdigest()

    def commit(self) -> Path:
        """Flush to disk and move the file into place whole."""
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.temporary, self.destination)
        return self.destination

    def abort(self) -> None:
        """Remove everything written: nothing partial stays on disk."""
        self._stream.close()
        self.temporary.unlink(missing_ok=True)


def hash_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest and size of a file, read in chunks."""
    return file_digest(path)  # the export manifest's digest: training may not import services, so it lives there


def copy_into(source: Path, destination: Path) -> None:
    """Copy `source` to `destination` through a temporary name, so readers never see half a file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.part")
    shutil.copyfile(source, temporary)
    os.replace(temporary, destination)


def remove_quietly(path: Path) -> None:
    """Delete a stored file; a file already gone is fine."""
    path.unlink(missing_ok=True)
