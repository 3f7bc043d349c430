"""Merge a LoRA adapter into its base model and save the result as a plain safetensors model folder.

The base is loaded unquantized on the CPU at the export's dtype: PEFT cannot merge into 8-bit or 4-bit
weights, so a job that trained quantized still merges into 16-bit weights here. The folder holds the sharded
weights, the config, the tokenizer (the adapter's own when it saved one: its chat template is the one the job
trained with) and `safetrain_export.json`, which lists every file with its sha256 and size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

EXPORT_MANIFEST = "safetrain_export.json"
EXPORT_MANIFEST_FORMAT = 1
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_SIZE = "2GB"
_HASH_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _load_base(base_dir: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"the base model in {base_dir} is stored quantized: merge needs its unquantized weights")
    return AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=getattr(torch, dtype), device_map={"": "cpu"}, low_cpu_mem_usage=True,
        trust_remote_code=False, use_safetensors=True,
    )


def _save_tokenizer(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    AutoTokenizer.from_pretrained(source, trust_remote_code=False).save_pretrained(out_dir)


def write_export_manifest(out_dir: Path, **fields: Any) -> dict[str, Any]:
    """List every file of `out_dir` with its sha256 and size, with `fields`, in safetrain_export.json."""
    files = {}
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and path.name != EXPORT_MANIFEST:
            sha256, size = file_digest(path)
            files[path.name] = {"sha256": sha256, "bytes": size}
    manifest = {"format": EXPORT_MANIFEST_FORMAT, **fields, "files": files}
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    base_model_name: str | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the LoRA adapter into the base at `dtype` on the CPU and save it to `out_dir`; return the manifest."""
    from peft import PeftModel

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = PeftModel.from_pretrained(_load_base(base_dir, dtype), str(adapter_dir), torch_device="cpu")
    merged = model.merge_and_unload()  # W + scale * B @ A, in the base's dtype; the LoRA modules are gone
    del model  # the wrapper holds no weights of its own now: free it before saving writes the shards
    merged.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    _save_tokenizer(base_dir, adapter_dir, out_dir)
    return write_export_manifest(out_dir, base_model=base_model_name or base_dir.name, dtype=dtype,
                                 **(extra_manifest or {}))
