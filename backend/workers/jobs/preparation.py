"""Before a trainer starts (status validating_files): check the files, resolve the options, plan the memory.

Checks run cheapest first, and a refusal is a JobRefused carrying the OpenAI error code:
the dataset's format and example count (`invalid_training_file`, `invalid_n_examples`), the base model
folder (`model_not_found`), the memory plan against the roomiest device from the model's config alone
(`out_of_memory`, with the recommendation), then the token lengths against max_seq_length (a warning:
the trainer truncates). Nothing here loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backend.config import Settings
from backend.db.models import File, Job
from backend.devices import Device, candidate_devices
from backend.training.datasets import (
    DatasetError,
    DatasetFormat,
    DatasetSummary,
    token_length_stats,
    validate_file,
)
from backend.training.memory import apply_safe_defaults, load_model_config, plan_memory
from backend.training.options import API_TRAINING_FIELDS, TrainingOptions
from backend.training.preference_data import tokenize_preferences

MIN_TRAINING_EXAMPLES = 1
TOKEN_STATS_MAX_EXAMPLES = 2000  # enough to warn about truncation without tokenizing a huge file twice
UNTRUNCATED_TOKENS = 1 << 30  # a length no line reaches: preference lines measured before truncation


class JobRefused(Exception):
    """The job cannot run as asked: `code`, `message` and `param` become the job's error."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


@dataclass
class PreparedRun:
    """Everything the trainer child needs, and what the job row shows before it starts."""

    options: TrainingOptions
    plan: dict[str, Any]
    estimate_bytes: int
    devices: list[Device]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def training(self) -> dict[str, Any]:
        """The resolved options as the job's `training` object shows them (no server paths)."""
        shown = self.options.model_dump(mode="json", include=set(API_TRAINING_FIELDS))
        shown["learning_rate"] = self.options.resolved_learning_rate
        return shown


def dataset_path(file_row: File | None, settings: Settings, param: str) -> Path:
    """The stored dataset on disk; JobRefused when the row or the file is gone."""
    if file_row is None:
        raise JobRefused(f"invalid_{param}", f"The {param.replace('_', ' ')} no longer exists.", param)
    path = (settings.data_dir / file_row.path).resolve()
    if not path.is_file():
        raise JobRefused(f"invalid_{param}", f"The {param.replace('_', ' ')} {file_row.id} is missing on disk.", param)
    return path


def check_dataset(path: Path, settings: Settings, param: str, file_id: str) -> DatasetSummary:
    """Validate the JSONL line by line; return its format and example count."""
    try:
        summary = validate_file(path, max_line_bytes=settings.max_line_bytes)
    except DatasetError as error:
        raise JobRefused(f"invalid_{param}", f"File {file_id}: {error}", param) from None
    if summary.n_examples < MIN_TRAINING_EXAMPLES:
        raise JobRefused(
            "invalid_n_examples",
            f"File {file_id} has {summary.n_examples} examples; at least {MIN_TRAINING_EXAMPLES} are needed.",
            param,
        )
    return summary


def model_folder(job: Job, settings: Settings) -> Path:
    """The base model's folder under models_dir (the API checked the name; this checks it is still there)."""
    root = settings.models_dir.resolve()
    folder = (root / job.model).resolve()
    if folder.parent != root or not (folder / "config.json").is_file():
        raise JobRefused("model_not_found", f"The base model {job.model!r} is not in the models directory.", "model")
    return folder


def build_options(job: Job, *, model_dir: Path, train_path: Path, validation_path: Path | None, work_dir: Path
                  ) -> TrainingOptions:
    """The trainer's options: the job's API fields, plus the paths only the worker decides."""
    fields = {key: value for key, value in (job.training or {}).items() if key in API_TRAINING_FIELDS}
    fields.setdefault("use_lora", True)
    fields.setdefault("seed", job.seed)
    fields.update(integration_fields(job.integrations, fields.get("report_to")))
    try:
        return TrainingOptions(
            **fields,
            model=str(model_dir),
            data=str(train_path),
            validation_data=str(validation_path) if validation_path else None,
            output_dir=str(work_dir),
            resume_from_checkpoint="latest",  # a fresh folder starts at step 0; a resumed job continues
        )
    except ValidationError as error:
        raise JobRefused("invalid_options", f"The training options are invalid: {error.errors()[0]['msg']}",
                         "training") from None


def integration_fields(integrations: list[dict[str, Any]] | None, report_to: list[str] | None) -> dict[str, Any]:
    """The job's W&B integration as the trainer's options: wandb among --report_to, and the run's settings."""
    wandb = next((entry["wandb"] for entry in integrations or [] if entry.get("type") == "wandb"), None)
    if wandb is None:
        return {}
    return {
        "report_to": list(dict.fromkeys([*(report_to or []), "wandb"])),
        "wandb_project": wandb["project"], "wandb_name": wandb.get("name"),
        "wandb_entity": wandb.get("entity"), "wandb_tags": wandb.get("tags"),
    }


def plan_for_devices(options: TrainingOptions, model_dir: Path, devices: list[Device]) -> tuple[TrainingOptions, Any,
                                                                                               list[str]]:
    """Safe defaults and the memory plan against the roomiest device; out_of_memory when even that cannot fit."""
    budget = max(device.free_bytes for device in devices)
    kind = "cuda" if devices[0].is_gpu else "cpu"
    config = load_model_config(str(model_dir))
    try:
        options, notes = apply_safe_defaults(options, config, budget_bytes=budget, device=kind)
    except ValueError as error:  # --max_seq_length auto with a budget that fits no context at all
        raise JobRefused("out_of_memory", str(error), "training.max_seq_length") from None
    plan = plan_memory(options, config, budget_bytes=budget, device=kind)
    if not plan.fits:
        where = devices[0].label if len(devices) == 1 else f"any of {len(devices)} GPUs"
        raise JobRefused(
            "out_of_memory",
            f"The memory plan needs {plan.estimate_bytes / 2**30:.2f} GiB but {where} has "
            f"{budget / 2**30:.2f} GiB free, even with the safe defaults applied. Recommendation: "
            f"{plan.recommendation}",
            "training",
        )
    return options, plan, list(notes)


def first_examples(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first `limit` examples of an already validated JSONL file."""
    examples: list[dict[str, Any]] = []
    with open(path, encoding="utf-8-sig") as stream:
        for line in stream:
            if line.strip():
                examples.append(json.loads(line))
                if len(examples) >= limit:
                    break
    return examples


@lru_cache(maxsize=8)
def _tokenizer_for(folder: str, stamp: float) -> Any:
    """The tokenizer of a model folder, loaded once per version of the folder (`stamp`) in this process."""
    from backend.training.modeling import load_tokenizer

    return load_tokenizer(folder)


def cached_tokenizer(folder: str) -> Any:
    """The model folder's tokenizer; reloaded when a file in the folder changes."""
    stamp = max((path.stat().st_mtime for path in Path(folder).iterdir() if path.is_file()), default=0.0)
    return _tokenizer_for(folder, stamp)


def token_warnings(options: TrainingOptions, train_path: Path, fmt: DatasetFormat) -> list[str]:
    """Warnings about examples longer than max_seq_length (the trainer truncates them)."""
    tokenizer = cached_tokenizer(options.model)
    examples = first_examples(train_path, TOKEN_STATS_MAX_EXAMPLES)
    if fmt == "preference":
        stats = _preference_length_stats(examples, tokenizer, max_seq_length=options.seq_length)
    else:
        stats = token_length_stats(examples, fmt, tokenizer, max_seq_length=options.seq_length)
    if not stats["n_truncated"]:
        return []
    return [
        f"{stats['n_truncated']} of {stats['n_examples']} examples checked are longer than max_seq_length="
        f"{options.max_seq_length} tokens (longest {stats['max_tokens']}); they will be truncated."
    ]


def _preference_length_stats(examples: list[dict[str, Any]], tokenizer: Any, *, max_seq_length: int
                             ) -> dict[str, int | float]:
    """n_examples, max_tokens and n_truncated of preference lines, each measured by its longer side."""
    untruncated = tokenize_preferences(examples, tokenizer, max_seq_length=UNTRUNCATED_TOKENS)
    lengths = [len(line.prompt_ids) + max(len(line.chosen_ids), len(line.rejected_ids)) for line in untruncated]
    return {"n_examples": len(lengths), "max_tokens": max(lengths, default=0),
            "n_truncated": sum(length > max_seq_length for length in lengths)}


def prepare_run(job: Job, training_file: File | None, validation_file: File | None, settings: Settings
                ) -> PreparedRun:
    """Validate the job's inputs and plan its memory; JobRefused says why it cannot run."""
    train_path = dataset_path(training_file, settings, "training_file")
    summary = check_dataset(train_path, settings, "training_file", job.training_file_id)
    validation_path = None
    if job.validation_file_id:
        validation_path = dataset_path(validation_file, settings, "validation_file")
        check_dataset(validation_path, settings, "validation_file", job.validation_file_id)
    model_dir = model_folder(job, settings)
    options = build_options(
        job, model_dir=model_dir, train_path=train_path, validation_path=validation_path,
        work_dir=settings.job_dir(job.id).resolve(),
    )
    devices = candidate_devices()
    options, plan, notes = plan_for_devices(options, model_dir, devices)
    try:
        warnings = token_warnings(options, train_path, summary.format)
    except DatasetError as error:  # e.g. the model's chat template refuses a conversation
        raise JobRefused("invalid_training_file", f"File {job.training_file_id}: {error}", "training_file") from None
    return PreparedRun(
        options=options, plan=plan.to_dict(), estimate_bytes=int(plan.estimate_bytes), devices=devices,
        warnings=warnings, notes=notes,
    )
