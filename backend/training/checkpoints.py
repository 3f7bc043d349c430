"""Checkpoints that are either whole or absent: written to a temporary folder, renamed once complete.

A checkpoint folder `checkpoint-<step>` holds the trainable weights (the adapter with LoRA, the full model
otherwise) saved with `save_pretrained`, the optimizer and scheduler state, every RNG state, the trainer
state (`trainer_state.json`) and a `COMPLETE` marker written last. Under DeepSpeed it holds every rank's
shard instead of the weights and optimizer files. Everything loaded back goes through
`torch.load(..., weights_only=True)` or safetensors, so a checkpoint folder cannot run code.

Both kinds follow one protocol: a fresh temporary folder, every file and the folder fsynced, the marker, then
a rename into place. A step written twice (a replay after a rollback) moves the older copy aside before the
rename and deletes it only after: a crash in between leaves the older copy aside, and resolving the resume
checkpoint puts it back (`restore_interrupted_replace`), so a complete copy is found after a crash at any point.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from backend.training.distributed import Ranks

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
ASIDE_PREFIX = ".old-"  # an older copy of the same step, moved aside while its replacement is renamed in
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or not a checkpoint)."""


@dataclass
class TrainerState:
    """Where the loop stands: enough to continue at the exact step, data position and settings."""

    step: int = 0
    epoch: int = 0  # the epoch the next optimizer step reads from
    examples_seen_in_epoch: int = 0  # position in that epoch's seeded shuffle
    effective_batch_size: int = 1  # examples per optimizer step: kept through every OOM recovery
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scale: float = 1.0  # halved at each rollback after a divergence
    total_steps: int = 0
    trained_tokens: int = 0
    recent_losses: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> TrainerState:
        known = {name: payload[name] for name in cls.__dataclass_fields__ if name in payload}
        return cls(**known)


def checkpoint_step(path: Path) -> int | None:
    """The step a `checkpoint-<step>` folder name carries, or None for any other name."""
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Whether a folder is a checkpoint whose writing finished."""
    return path.is_dir() and checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first; anything half-written is left out."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if is_complete(path)]
    return sorted(found, key=lambda path: checkpoint_step(path) or 0)


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None when there is none."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume_checkpoint(spec: str | None, output_dir: str | Path) -> Path | None:
    """The folder `--resume_from_checkpoint` names: 'latest' (None when there is none yet) or a complete PATH."""
    if spec is None:
        return None
    if spec == "latest":
        restore_interrupted_replace(output_dir)
        return latest_complete_checkpoint(output_dir)
    path = Path(spec)
    restore_interrupted_replace(path.parent)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: no such folder")
    if not (path / COMPLETE_MARKER).is_file() or not (path / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {spec}: the checkpoint is incomplete (no {COMPLETE_MARKER})")
    return path


def read_trainer_state(path: Path) -> TrainerState:
    """The trainer state of a checkpoint, without touching its weights."""
    return TrainerState.from_dict(json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8")))


def save_checkpoint(
    output_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    save_total_limit: int,
    ranks: Ranks | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically, then keep only the newest `save_total_limit`; return its path.

    Across `ranks` every rank calls this, and none returns before the checkpoint is complete: under DeepSpeed
    each rank writes its shard, otherwise the main rank writes the one copy (DDP keeps identical states).
    """
    ranks = ranks or Ranks()
    if ranks.deepspeed:
        return save_sharded_checkpoint(output_dir, ranks=ranks, state=state, save_total_limit=save_total_limit)
    temporary, final = _checkpoint_paths(Path(output_dir), state.step)
    if ranks.is_main:
        _fresh_temporary_folder(temporary)
        model.save_pretrained(temporary)  # type: ignore[operator]  # safetensors: PEFT and transformers 5 default
        _name_adapter_base_portably(temporary)
        torch.save(optimizer.state_dict(), temporary / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), temporary / SCHEDULER_FILE)
        torch.save(_rng_states(), temporary / RNG_FILE)
        _complete_and_rename(temporary, final, state, save_total_limit=save_total_limit)
    ranks.barrier()  # no rank goes on, or rolls back to it, before the checkpoint is complete
    return final


def _name_adapter_base_portably(folder: Path) -> None:
    """A LoRA checkpoint names its base as the final adapter does (by name, not this machine's path), so
    `PeftModel.from_pretrained` loads it elsewhere too; resuming reads the weights alone and is unaffected."""
    from backend.training.manifest import name_base_portably

    if (folder / "adapter_config.json").is_file():
        (folder / "README.md").unlink(missing_ok=True)  # peft's model card: boilerplate with local paths
        name_base_portably(folder / "adapter_config.json", None)


def save_sharded_checkpoint(
    output_dir: str | Path, *, ranks: Ranks, state: TrainerState, save_total_limit: int
) -> Path:
    """DeepSpeed: every rank writes its shard into the temporary folder; the main rank completes and renames it.

    Every rank calls this, and none returns before the checkpoint is complete.
    """
    temporary, final = _checkpoint_paths(Path(output_dir), state.step)
    if ranks.is_main:
        _fresh_temporary_folder(temporary)
    ranks.barrier()  # no rank writes its shard before the folder is there
    ranks.save_sharded_state(temporary)
    ranks.barrier()  # every shard is written before the main rank completes the folder
    if ranks.is_main:
        _complete_and_rename(temporary, final, state, save_total_limit=save_total_limit)
    ranks.barrier()
    return final


def _checkpoint_paths(root: Path, step: int) -> tuple[Path, Path]:
    """The temporary folder a checkpoint of `step` is written in, and the name it is renamed to."""
    return root / f"{TEMP_PREFIX}{step}", root / f"{CHECKPOINT_PREFIX}{step}"


def _fresh_temporary_folder(temporary: Path) -> None:
    """An empty temporary folder (what a crash mid-write left there is deleted first)."""
    temporary.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()


def _complete_and_rename(temporary: Path, final: Path, state: TrainerState, *, save_total_limit: int) -> None:
    """The trainer state, fsync, the marker, fsync, then the rename into place and the rotation."""
    (temporary / TRAINER_STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2), encoding="utf-8")
    _fsync_tree(temporary)  # the data is on disk before the marker says it is complete
    (temporary / COMPLETE_MARKER).write_text(f"{state.step}\n", encoding="utf-8")
    _fsync_tree(temporary)
    _replace_folder(temporary, final)
    _fsync_dir(final.parent)
    rotate_checkpoints(final.parent, keep=save_total_limit)


def rotate_checkpoints(output_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; return what was deleted."""
    doomed = complete_checkpoints(output_dir)[: -keep or None] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states from a complete checkpoint; return its trainer state."""
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} is incomplete (no {COMPLETE_MARKER})")
    load_trainable_weights(path, model)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    _restore_rng_states(torch.load(path / RNG_FILE, weights_only=True))
    return read_trainer_state(path)


def load_trainable_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the adapter (PEFT model) or the full weights saved in a checkpoint folder into `model`."""
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise CheckpointError(f"{path} holds no safetensors weights")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{path} does not match the model: unexpected {result.unexpected_keys[:3]}")
    tied = _names_allowed_missing(model)
    missing = [name for name in result.missing_keys if name not in tied]
    if missing:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:3]}")


def _names_allowed_missing(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (save_pretrained writes those once)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.setdefault(id(parameter), name)
    return tied | {name for name, _ in model.named_buffers()}


def _rng_states() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors, tuples and lists that `weights_only` loading accepts."""
    numpy_state: Any = np.random.get_state(legacy=True)
    name, keys, position, has_gauss, cached = numpy_state
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_python_state(states["python"]))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(value: Any) -> Any:
    """`random.setstate` wants tuples all the way down; a round trip may hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_python_state(item) for item in value)
    return value


def _replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`; a folder already there (a replayed step) is moved aside first and deleted
    only once `source` is in place, so a crash in between leaves it aside for `restore_interrupted_replace`."""
    aside = target.with_name(f"{ASIDE_PREFIX}{target.name}")
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)  # left by a crash after an earlier rename: `target` is newer
        os.rename(target, aside)
    os.rename(source, target)
    shutil.rmtree(aside, ignore_errors=True)


def restore_interrupted_replace(output_dir: str | Path) -> list[Path]:
    """Put back each complete checkpoint a crash left moved aside with no replacement; return what was put back.

    An aside whose complete replacement did arrive is only the older copy and is deleted. Every rank of a run may call
    this at once: a rename another rank made first is not an error.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    restored = []
    for aside in sorted(folder.glob(f"{ASIDE_PREFIX}{CHECKPOINT_PREFIX}*")):
        target = aside.with_name(aside.name.removeprefix(ASIDE_PREFIX))
        if is_complete(target):
            shutil.rmtree(aside, ignore_errors=True)
        elif not target.exists() and (aside / COMPLETE_MARKER).is_file():
            with contextlib.suppress(FileNotFoundError):
                os.rename(aside, target)
                restored.append(target)
    return restored


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    # Directories cannot be opened for fsync on Windows; the rename is still atomic there.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
