"""The adapter archive a job stores: written whole or not at all, and rewritten when an evaluation adds results.

Both writes go to a temporary file beside the archive, fsync it and rename it into place, so a reader (or a
crash) only ever sees the old archive or the new one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend.config import Settings
from backend.training.manifest import MANIFEST_FILENAME

# What the output folder holds besides the adapter: never part of the archive.
_NOT_ARCHIVED = ("telemetry.jsonl",)
_COPY_CHUNK = 1 << 20


def _manifest_bytes(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"


def write_whole(destination: Path, temporary: Path, fill: Callable[[zipfile.ZipFile], None], **zip_args: Any) -> None:
    """Write a zip with `fill` to `temporary`, fsync it and rename it to `destination`; nothing left on failure."""
    try:
        with zipfile.ZipFile(temporary, "w", **zip_args) as archive:
            fill(archive)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def add_file(archive: zipfile.ZipFile, path: Path) -> None:
    """Add one file under its own name, streamed from disk; safetensors stored, the rest deflated."""
    # safetensors do not compress: store them and spare the CPU.
    method = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
    archive.write(path, arcname=path.name, compress_type=method)


def archive_adapter(adapter_dir: Path, destination: Path, *, extra_manifest: dict[str, Any]) -> None:
    """Zip the adapter folder's files (adapter, tokenizer, safetrain.json) to `destination`, whole or not at all."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = adapter_dir / MANIFEST_FILENAME
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    manifest.update(extra_manifest)

    def fill(archive: zipfile.ZipFile) -> None:
        for path in sorted(adapter_dir.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.name in (*_NOT_ARCHIVED, MANIFEST_FILENAME):
                continue
            add_file(archive, path)
        archive.writestr(MANIFEST_FILENAME, _manifest_bytes(manifest))

    write_whole(destination, destination.with_name(f".{destination.name}.part"), fill,
                compression=zipfile.ZIP_DEFLATED)


def rewrite_manifest(archive_path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite the archive with `change(manifest)` applied to its safetrain.json; other entries copied as they are."""
    with zipfile.ZipFile(archive_path) as source:
        names = source.namelist()
        manifest = json.loads(source.read(MANIFEST_FILENAME)) if MANIFEST_FILENAME in names else {}
        change(manifest)

        def fill(target: zipfile.ZipFile) -> None:
            for info in source.infolist():
                if info.filename != MANIFEST_FILENAME:
                    # A copy: writing resets the entry's offsets and CRC, which the reader's info must keep.
                    with source.open(info) as reader, target.open(copy.copy(info), "w") as writer:
                        shutil.copyfileobj(reader, writer, _COPY_CHUNK)
            target.writestr(MANIFEST_FILENAME, _manifest_bytes(manifest), compress_type=zipfile.ZIP_DEFLATED)

        write_whole(archive_path, archive_path.with_name(f".{archive_path.name}.rewrite"), fill)


def unpack_adapter(archive_path: Path, folder: Path) -> None:
    """Unpack a stored adapter archive (flat names only) into a fresh `folder`, streaming each entry."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with zipfile.ZipFile(archive_path) as archive:
        for member in archive.namelist():
            if "/" in member or "\\" in member or member.startswith("."):  # the archiver writes flat names
                raise ValueError(f"unexpected entry {member!r} in the adapter archive")
            with archive.open(member) as source, open(folder / member, "wb") as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)  # adapters can be large: never whole in memory


def unpack_beside_base(settings: Settings, *, model: str, adapter_path: str, folder: Path) -> Path:
    """Unpack the stored adapter archive into `folder`; the base model's folder, which must still be there."""
    base = (settings.models_dir / model).resolve()
    if base.parent != settings.models_dir.resolve() or not (base / "config.json").is_file():
        raise FileNotFoundError(f"the base model {model!r} is no longer in the models directory")
    unpack_adapter(settings.data_dir / adapter_path, folder)
    return base
