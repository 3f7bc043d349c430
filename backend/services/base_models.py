"""Base models: a job names a folder under models_dir (or a Hub id where allowed), never a path."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from backend.config import Settings
from backend.services.errors import InvalidRequest

# One path component of letters, digits, '.', '_' and '-' (no "..", no "--": the Hub cache spells a repo
# `models--org--name`, so a name holding "--" could stand for a cached Hub model rather than a folder).
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Keys through which a config asks transformers to import code shipped with the model.
_CUSTOM_CODE_KEYS = ("auto_map", "custom_pipelines")
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json")
_MAX_CONFIG_BYTES = 4 * 1024**2


@dataclass(frozen=True)
class BaseModelRef:
    """A model a job may train: a local folder (`path`) or a Hub id (`path` None)."""

    name: str
    path: Path | None


def _safe_name(name: str, pattern: re.Pattern[str]) -> bool:
    return bool(pattern.fullmatch(name)) and ".." not in name and "--" not in name


def model_folder_problem(path: Path, *, root: Path) -> str | None:
    """Why the folder `path` is not a base model safetrain will load, or None when it is.

    A model is config.json plus safetensors weights (pickle `.bin` weights can run code when loaded, so a
    pickle-only folder is refused), every file inside the models directory (no symlink out of it), and no
    custom code: no `auto_map` in its configs and no Python files (trust_remote_code stays False anyway).
    """
    if not path.is_dir() or not (path / "config.json").is_file():
        return "it is not a model folder (no config.json)"
    if not any(path.glob("*.safetensors")):
        return "it has no safetensors weights (pickle .bin weights are never loaded)"
    root = root.resolve()
    for item in path.iterdir():
        if not item.resolve().is_relative_to(root):
            return f"{item.name} links outside the models directory"
        if item.suffix == ".py":
            return f"it carries custom code ({item.name})"
    for name in _CONFIG_FILES:
        config = path / name
        if not config.is_file():
            continue
        if config.stat().st_size > _MAX_CONFIG_BYTES:
            return f"{name} is too large"
        try:
            data = json.loads(config.read_bytes())
        except (ValueError, UnicodeDecodeError):
            return f"{name} is not valid JSON"
        if not isinstance(data, dict):
            return f"{name} is not a JSON object"
        for key in _CUSTOM_CODE_KEYS:
            if key in data:
                return f"{name} asks for custom code ({key}); remote code is never run"
    return None


def is_model_folder(path: Path, *, root: Path | None = None) -> bool:
    """Whether `path` holds a model safetensors-only, code-free model (see model_folder_problem)."""
    return model_folder_problem(path, root=root or path.parent) is None


def resolve_base_model(name: str, *, settings: Settings) -> BaseModelRef:
    """The model called `name`; InvalidRequest (param `model`) for paths, URLs, unknown names and unsafe folders."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model must be the name of a base model.", param="model")
    if _safe_name(name, _FOLDER_NAME):
        root = settings.models_dir.resolve()
        folder = (root / name).resolve()
        # resolve() follows symlinks, so a link pointing out of models_dir lands outside root and is refused.
        if folder.parent == root and folder.is_dir():
            problem = model_folder_problem(folder, root=root)
            if problem is not None:
                raise InvalidRequest(f"Model {name!r} cannot be trained: {problem}.", param="model",
                                     code="model_not_supported")
            return BaseModelRef(name=name, path=folder)
    elif settings.allow_hub_models and _safe_name(name, _HUB_ID):
        return BaseModelRef(name=name, path=None)
    raise InvalidRequest(
        f"Unknown model {name[:200]!r}: use the name of a base model folder under the models directory "
        "(see GET /v1/models); paths and URLs are not accepted.",
        param="model",
        code="model_not_found",
    )


def list_base_models(*, settings: Settings) -> list[tuple[str, int]]:
    """(name, created_at) of each model folder under models_dir that a job may train."""
    root = settings.models_dir
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if (
            _safe_name(child.name, _FOLDER_NAME)
            and child.resolve().parent == root.resolve()
            and is_model_folder(child.resolve(), root=root)
        ):
            found.append((child.name, int(child.stat().st_mtime)))
    return found
