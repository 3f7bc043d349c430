"""The output folder: the adapter (or full model) and `safetrain.json`, which says what produced it."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from backend.training.telemetry import to_json_line

MANIFEST_FILENAME = "safetrain.json"
MANIFEST_FORMAT = 1
VERSIONED_LIBRARIES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "safetensors",
    "tokenizers",
)
ADAPTER_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")
_CORE_FIELDS = frozenset({"format", "base_model", "base_weight_sha256", "options", "metrics", "versions", "created_at"})


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape a run (None where absent), and Python's."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the whole new one, never a part."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_manifest(
    output_dir: str | Path,
    *,
    base_model: str,
    base_weight_sha256: dict[str, str],
    options: Any,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `safetrain.json` atomically: base model and its weights' sha256, options, metrics, versions."""
    resolved_options = options.model_dump(mode="json") if hasattr(options, "model_dump") else dict(options)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "base_model": base_model,
        "base_weight_sha256": dict(base_weight_sha256),
        "options": resolved_options,
        "metrics": dict(metrics),
        "versions": library_versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    clashes = _CORE_FIELDS.intersection(extra or {})
    if clashes:
        raise ValueError(f"extra manifest fields would overwrite {', '.join(sorted(clashes))}")
    manifest.update(extra or {})
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_FILENAME
    # Strict JSON (a NaN metric becomes null) so any client can parse it.
    pretty = json.dumps(json.loads(to_json_line(manifest)), indent=2, sort_keys=True)
    _atomic_write_text(path, pretty + "\n")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The `safetrain.json` of an output (or adapter) folder."""
    path = Path(folder) / MANIFEST_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a safetrain output folder")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a JSON object")
    return loaded


def _model_base_folder(model: Any) -> Path | None:
    """The folder the model's base weights were loaded from, as the model itself records it."""
    peft_config = getattr(model, "peft_config", None)
    candidates: list[Any] = []
    if isinstance(peft_config, dict):
        candidates += [getattr(config, "base_model_name_or_path", None) for config in peft_config.values()]
    config = getattr(model, "config", None)
    candidates += [getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def assert_not_base_folder(output_dir: str | Path, base_folder: str | Path | None) -> None:
    """Refuse an output folder that is the base model's folder or inside it: source weights are never written."""
    if base_folder is None:
        return
    output = Path(output_dir).expanduser().resolve()
    base = Path(base_folder).expanduser().resolve()
    if output == base or base in output.parents:
        raise ValueError(
            f"--output_dir {output_dir} is inside the base model folder {base}: refusing to write next to "
            "the source weights; choose another output folder"
        )


def _is_peft_model(model: Any) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) and hasattr(model, "get_base_model")


def save_adapter(
    model: Any,
    tokenizer: Any,
    output_dir: str | Path,
    *,
    base_folder: str | Path | None = None,
    state_dict: dict[str, Any] | None = None,
    base_model_name: str | None = None,
) -> Path:
    """Save the LoRA adapter (or, for a full fine-tune, the whole model) and the tokenizer to `output_dir`.

    Refuses an `output_dir` that is, or is inside, the base model's folder (taken from the model, or
    `base_folder` when given). Files are written to a temporary folder first and moved in when complete.
    `state_dict`: the weights to write instead of the model's own (gathered from DeepSpeed ZeRO-3 shards).
    adapter_config.json names the base by `base_model_name` (default: the name peft recorded, made portable),
    never by this machine's path: the path and the weights' hashes are in safetrain.json.
    """
    for base in (base_folder, _model_base_folder(model)):
        assert_not_base_folder(output_dir, base)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".saving-"))
    try:
        if _is_peft_model(model):
            model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
            (staging / "README.md").unlink(missing_ok=True)  # peft's model card: boilerplate with local paths
            name_base_portably(staging / "adapter_config.json", base_model_name)
        else:
            _save_full_model(model, staging, state_dict)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, output / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def name_base_portably(config_path: Path, base_model_name: str | None) -> None:
    """Rewrite adapter_config.json's base_model_name_or_path as the model's name (the in-memory config is kept)."""
    from backend.training.modeling import portable_model_name

    config = json.loads(config_path.read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    name = base_model_name or (portable_model_name(recorded) if recorded else None)
    if name is not None and name != recorded:
        config["base_model_name_or_path"] = name
        _atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_full_model(model: Any, folder: Path, state_dict: dict[str, Any] | None = None) -> None:
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    config.use_cache = True  # training turned the KV cache off; the saved model should generate normally
    try:
        model.save_pretrained(folder, state_dict=state_dict)  # transformers 5 always writes safetensors
    finally:
        config.use_cache = use_cache
    if not any(path.suffix == ".safetensors" for path in folder.iterdir()):
        raise RuntimeError(f"saving the full model wrote no safetensors file to {folder}")
