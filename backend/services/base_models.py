"""Base models: a job names a folder under models_dir (or a Hub id where allowed), never a path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backend.config import Settings
from backend.services.errors import InvalidRequest

_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class BaseModelRef:
    """A model a job may train: a local folder (`path`) or a Hub id (`path` None)."""

    name: str
    path: Path | None


def is_model_folder(path: Path) -> bool:
    """Whether `path` holds a loadable model: config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_base_model(name: str, *, settings: Settings) -> BaseModelRef:
    """The model called `name`; InvalidRequest (param `model`) for paths, URLs and unknown names."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model must be the name of a base model.", param="model")
    if _FOLDER_NAME.fullmatch(name) and ".." not in name:
        root = settings.models_dir.resolve()
        folder = (root / name).resolve()
        # resolve() follows symlinks, so a link pointing out of models_dir lands outside root and is refused.
        if folder.parent == root and is_model_folder(folder):
            return BaseModelRef(name=name, path=folder)
    elif settings.allow_hub_models and _HUB_ID.fullmatch(name) and ".." not in name:
        return BaseModelRef(name=name, path=None)
    raise InvalidRequest(
        f"Unknown model {name!r}: use the name of a base model folder under the models directory "
        "(see GET /v1/models); paths and URLs are not accepted.",
        param="model",
        code="model_not_found",
    )


def list_base_models(*, settings: Settings) -> list[tuple[str, int]]:
    """(name, created_at) of each model folder under models_dir."""
    root = settings.models_dir
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if _FOLDER_NAME.fullmatch(child.name) and child.resolve().parent == root.resolve() and is_model_folder(child):
            found.append((child.name, int(child.stat().st_mtime)))
    return found
