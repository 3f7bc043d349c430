"""The trainer's options: one typed model, shared by the CLI flags and the API's `training` object."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DeepSpeedPreset = Literal["zero2", "zero2-offload", "zero3", "zero3-offload"]
DEEPSPEED_PRESETS: tuple[str, ...] = ("zero2", "zero2-offload", "zero3", "zero3-offload")
OptimizerName = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
EIGHT_BIT_OPTIMIZERS: frozenset[str] = frozenset({"adamw_8bit", "paged_adamw_8bit"})
# --report_to's sinks, each with the package it needs (backend/training/integrations.py imports them lazily).
REPORT_TO_LIBRARIES: dict[str, str] = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
WANDB_FIELDS = ("wandb_project", "wandb_name", "wandb_entity", "wandb_tags")

# The keys a client may send in the API's `training` object (../shared/API.md): one vocabulary
# with train_safe.py's flags. Paths, fault injection and remote code stay CLI/worker-only.
API_TRAINING_FIELDS: frozenset[str] = frozenset(
    {
        "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "report_to",
        "use_8bit", "use_4bit", "gradient_checkpointing", "fp16", "bf16", "epochs",
        "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
        "max_seq_length", "warmup_ratio", "weight_decay", "save_steps", "logging_steps", "seed",
        "packing", "train_on_completions_only", "deepspeed", "chunked_loss", "method", "dpo_beta",
        "optim", "offload_activations", "offload_embeddings", "tiled_mlp",
    }
)


class TrainingOptions(BaseModel):
    """Every knob of one training run; each field's description is its `--help` line."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What to train, on what, and where to write.
    model: str = Field("distilgpt2", description="Hub id or local folder of the base model.")
    data: str | None = Field(None, description="Training JSONL; the built-in dataset when omitted.")
    validation_data: str | None = Field(None, description="Validation JSONL, evaluated at each save.")
    eval_data: str | None = Field(None, description="HumanEval-shaped JSONL for sandboxed evaluation.")
    output_dir: str = Field("./runs/safetrain", description="Folder for checkpoints and the adapter.")

    # Training method.
    method: Literal["supervised", "dpo"] = Field(
        "supervised", description="supervised: chat/completion data; dpo: preference pairs (needs --use_lora)."
    )
    dpo_beta: float = Field(0.1, description="DPO's beta: how far the policy may move from the reference.")

    # LoRA.
    use_lora: bool = Field(False, description="Train LoRA adapters (PEFT) instead of all weights.")
    lora_r: int = Field(8, description="LoRA rank.")
    lora_alpha: int = Field(16, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, description="Dropout on the LoRA path, in [0, 1).")
    lora_target_modules: list[str] | None = Field(
        None, description="Modules to adapt (comma-separated); found from the architecture when omitted."
    )

    # Weights and placement.
    use_8bit: bool | None = Field(
        None, description="Load weights in 8-bit (bitsandbytes); on by default above 7B parameters."
    )
    use_4bit: bool = Field(False, description="Load weights in 4-bit NF4 with double quantization.")
    device_map: Literal["auto"] | None = Field(
        None, description="'auto' spreads layers over GPUs and the CPU (offload)."
    )
    max_memory: dict[str, str] | None = Field(
        None, description="Per-device caps for device_map=auto, e.g. 0=10GiB,cpu=30GiB."
    )
    trust_remote_code: bool = Field(False, description="Run the model folder's own code (off: unsafe).")

    # Memory savers and precision.
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward; on by default when the memory plan is tight."
    )
    fp16: bool = Field(False, description="Mixed precision in float16 (GPU).")
    bf16: bool = Field(False, description="Mixed precision in bfloat16 (GPU or CPU that supports it).")
    deepspeed: DeepSpeedPreset | None = Field(
        None, description="DeepSpeed ZeRO preset: zero2, zero2-offload, zero3, zero3-offload."
    )
    chunked_loss: bool = Field(
        True, description="lm_head and the loss a slice of tokens at a time: the whole logits never exist."
    )
    liger_kernels: bool = Field(
        True, description="Liger Kernel's fused RMSNorm/RoPE/SwiGLU on CUDA when installed; off: the PyTorch modules."
    )
    optim: OptimizerName = Field(
        "adamw_torch", description="Optimizer: adamw_torch, or bitsandbytes' adamw_8bit / paged_adamw_8bit."
    )
    offload_activations: bool = Field(
        False, description="Keep each checkpointed layer's input in host memory until the backward needs it."
    )
    offload_embeddings: bool = Field(
        False, description="Keep the frozen input embedding table in host memory (LoRA, untied lm_head; GPU)."
    )
    tiled_mlp: bool = Field(
        False, description="Compute each layer's MLP a tile of tokens at a time, recomputed in the backward."
    )

    # Several machines (each runs train_safe.py; the first one's address joins them).
    num_machines: int = Field(1, description="Machines in a multi-node run, passed to accelerate launch.")
    machine_rank: int = Field(0, description="This machine's rank among --num_machines (0 is the main one).")
    main_process_ip: str | None = Field(None, description="Address of machine 0, for a multi-node run.")
    main_process_port: int | None = Field(None, description="Port of machine 0's rendezvous, for a multi-node run.")

    # Schedule.
    epochs: float = Field(1.0, description="Passes over the training data.")
    per_device_train_batch_size: int = Field(2, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(1, description="Micro-batches summed before each step.")
    learning_rate: float | None = Field(
        None, description="Peak learning rate; 2e-4 with LoRA, 2e-5 for a full fine-tune when omitted."
    )
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps.")
    max_seq_length: int | Literal["auto"] = Field(
        512, description="Tokens per example; longer ones are truncated. 'auto': the longest that fits the budget."
    )
    warmup_ratio: float = Field(0.0, description="Fraction of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    save_steps: int | None = Field(None, description="Checkpoint every N steps (default: at the end only).")
    save_total_limit: int = Field(2, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(10, description="Log metrics and memory every N steps.")
    seed: int = Field(42, description="Random seed.")
    packing: bool = Field(False, description="Pack short examples into full-length sequences.")
    train_on_completions_only: bool = Field(
        False, description="Compute the loss on completions/assistant turns only."
    )
    resume_from_checkpoint: str | None = Field(
        None, description="Checkpoint folder to resume from, or 'latest' in output_dir."
    )

    # Where the metrics also go (the API's integrations set the wandb_* ones).
    report_to: list[str] | None = Field(
        None, description="Also log the metrics to tensorboard, mlflow and/or wandb (comma-separated)."
    )
    wandb_project: str | None = Field(None, description="W&B project for --report_to wandb ('safetrain' if omitted).")
    wandb_name: str | None = Field(None, description="W&B (and MLflow) run name; the output folder's name if omitted.")
    wandb_entity: str | None = Field(None, description="W&B team or user; the API key's default if omitted.")
    wandb_tags: list[str] | None = Field(None, description="W&B run tags (comma-separated).")

    # Planning and safety.
    dry_run: bool = Field(False, description="Print the memory plan and exit without loading weights.")
    memory_budget_gb: float | None = Field(
        None, description="Memory budget for the plan instead of the device's free memory."
    )
    plan_device: Literal["cuda", "cpu"] | None = Field(
        None, description="Plan for this device whatever this machine has (with --memory_budget_gb)."
    )
    print_json: bool = Field(
        False, description="With --dry_run: the plan as one JSON object on the last line of stdout.",
        json_schema_extra={"flag": "json"},
    )
    max_oom_retries: int = Field(3, description="Times to halve the micro-batch after an out-of-memory.")
    max_divergence_retries: int = Field(2, description="Times to roll back after a NaN/inf loss.")
    inject_oom_at_step: int | None = Field(None, description="Testing: raise a fake OOM at this step.")
    inject_nan_at_step: int | None = Field(None, description="Testing: make the loss NaN at this step.")

    @field_validator("lora_target_modules", "report_to", "wandb_tags", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _parse_max_memory(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("max_memory must look like 0=10GiB,cpu=30GiB")
            return {key.strip(): size.strip() for key, size in pairs}
        return value

    @model_validator(mode="after")
    def _refuse_contradictions(self) -> TrainingOptions:
        for problem in find_option_problems(self):
            raise ValueError(problem)
        return self

    @property
    def seq_length(self) -> int:
        """--max_seq_length as a number; 'auto' is resolved by the plan (preflight.py) before anything uses it."""
        if self.max_seq_length == "auto":
            raise ValueError("--max_seq_length auto is resolved by the memory plan before anything is estimated")
        return self.max_seq_length

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step on one device."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def resolved_learning_rate(self) -> float:
        """The learning rate asked for, or the safe default for LoRA or a full fine-tune."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if self.use_lora else 2e-5


def find_option_problems(options: TrainingOptions) -> list[str]:
    """Contradictions and out-of-range values, each message naming the flags involved."""
    problems: list[str] = []
    if options.use_8bit and options.use_4bit:
        problems.append("--use_8bit and --use_4bit contradict each other: choose one weight bit width")
    if options.fp16 and options.bf16:
        problems.append("--fp16 and --bf16 contradict each other: choose one mixed precision")
    if (options.use_8bit or options.use_4bit) and not options.use_lora:
        problems.append("--use_8bit/--use_4bit need --use_lora: quantized weights cannot be trained directly")
    if options.deepspeed and (options.use_8bit or options.use_4bit):
        problems.append("--deepspeed cannot shard bitsandbytes-quantized weights: drop --use_8bit/--use_4bit")
    if options.deepspeed and options.device_map:
        problems.append("--deepspeed and --device_map contradict each other: DeepSpeed places the weights")
    positive = {
        "lora_r": options.lora_r,
        "lora_alpha": options.lora_alpha,
        "per_device_train_batch_size": options.per_device_train_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "max_seq_length": 1 if options.max_seq_length == "auto" else options.max_seq_length,
        "logging_steps": options.logging_steps,
        "save_total_limit": options.save_total_limit,
    }
    problems += [f"--{name} must be at least 1 (got {value})" for name, value in positive.items() if value < 1]
    optional_positive = {"max_steps": options.max_steps, "save_steps": options.save_steps}
    problems += [
        f"--{name} must be at least 1 (got {value})"
        for name, value in optional_positive.items()
        if value is not None and value < 1
    ]
    if not 0 <= options.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1) (got {options.lora_dropout})")
    if not 0 <= options.warmup_ratio < 1:
        problems.append(f"--warmup_ratio must be in [0, 1) (got {options.warmup_ratio})")
    if options.epochs <= 0:
        problems.append(f"--epochs must be positive (got {options.epochs})")
    if options.learning_rate is not None and not 0 < options.learning_rate < 1:
        problems.append(f"--learning_rate must be in (0, 1) (got {options.learning_rate})")
    if options.weight_decay < 0:
        problems.append(f"--weight_decay must not be negative (got {options.weight_decay})")
    if options.print_json and not options.dry_run:
        problems.append("--json needs --dry_run: only the plan is printed as JSON")
    if options.memory_budget_gb is not None and options.memory_budget_gb <= 0:
        problems.append(f"--memory_budget_gb must be positive (got {options.memory_budget_gb})")
    if options.max_oom_retries < 0 or options.max_divergence_retries < 0:
        problems.append("--max_oom_retries and --max_divergence_retries must not be negative")
    problems += _memory_technique_problems(options)
    problems += _multi_node_problems(options)
    problems += _dpo_problems(options)
    problems += _report_to_problems(options)
    return problems


def _memory_technique_problems(options: TrainingOptions) -> list[str]:
    problems: list[str] = []
    if options.offload_activations and options.gradient_checkpointing is not True:
        problems.append(
            "--offload_activations needs --gradient_checkpointing: it offloads the checkpointed layers' inputs"
        )
    if options.offload_embeddings and not options.use_lora:
        problems.append("--offload_embeddings needs --use_lora: a full fine-tune trains the embedding table")
    if options.tiled_mlp and options.deepspeed:
        problems.append("--tiled_mlp and --deepspeed contradict each other: the tiles' gradients bypass ZeRO's hooks")
    if options.offload_embeddings and options.deepspeed:
        problems.append("--offload_embeddings and --deepspeed contradict each other: ZeRO places the table itself")
    if options.optim in EIGHT_BIT_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"--optim {options.optim} needs bitsandbytes, which is not installed: use --optim adamw_torch")
    return problems


def _multi_node_problems(options: TrainingOptions) -> list[str]:
    if options.num_machines < 1:
        return [f"--num_machines must be at least 1 (got {options.num_machines})"]
    problems: list[str] = []
    if not 0 <= options.machine_rank < options.num_machines:
        problems.append(
            f"--machine_rank must be in [0, --num_machines) (got {options.machine_rank} of {options.num_machines})"
        )
    if options.num_machines > 1 and (options.main_process_ip is None or options.main_process_port is None):
        problems.append("--num_machines above 1 needs --main_process_ip and --main_process_port (machine 0's)")
    if options.main_process_port is not None and not 0 < options.main_process_port < 65536:
        problems.append(f"--main_process_port must be in 1-65535 (got {options.main_process_port})")
    return problems


def _dpo_problems(options: TrainingOptions) -> list[str]:
    problems: list[str] = []
    if options.dpo_beta <= 0:
        problems.append(f"--dpo_beta must be positive (got {options.dpo_beta})")
    if options.method != "dpo":
        return problems
    # The reference model is the base with the adapter switched off: without LoRA it would be a second copy.
    if not options.use_lora:
        problems.append("--method dpo needs --use_lora: the reference is the base model with the adapter off")
    if options.packing:
        problems.append("--method dpo and --packing contradict each other: each pair is scored as whole sequences")
    if options.train_on_completions_only:
        problems.append("--method dpo and --train_on_completions_only contradict each other: "
                        "DPO scores the preferred and non-preferred outputs only already")
    if options.deepspeed:
        problems.append("--method dpo and --deepspeed contradict each other: the reference forward needs the "
                        "adapter switched off on one unsharded model")
    return problems


def _report_to_problems(options: TrainingOptions) -> list[str]:
    """Unknown sinks and missing libraries, found without importing any of them."""
    names = options.report_to or []
    unknown = [name for name in names if name not in REPORT_TO_LIBRARIES]
    if unknown:
        return [f"--report_to: unknown sink {unknown[0]!r} (choose from {', '.join(REPORT_TO_LIBRARIES)})"]
    problems = [
        f"--report_to {name} needs the {library} package, which is not installed"
        for name, library in REPORT_TO_LIBRARIES.items()
        if name in names and importlib.util.find_spec(library) is None
    ]
    asked = [name for name in WANDB_FIELDS if getattr(options, name)]
    if asked and "wandb" not in names:
        problems.append(f"--{asked[0]} needs --report_to wandb")
    return problems
