"""Loading the base model safely: local folders or the local Hub cache, safetensors only, no remote code
unless asked; then quantization, gradient checkpointing and LoRA as the options say."""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend.training.kernels import apply_liger_kernels
from backend.training.options import TrainingOptions

SAFETENSORS_SUFFIX = ".safetensors"
# Files that unpickle when loaded: running them can execute arbitrary code.
PICKLE_WEIGHT_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES: tuple[str, ...] = (SAFETENSORS_SUFFIX, *PICKLE_WEIGHT_SUFFIXES, ".h5", ".msgpack", ".gguf")
_HASH_CHUNK_BYTES = 1 << 20

# The linear layers worth adapting, per `config.model_type`: attention and MLP projections, never the head.
LORA_TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
}
# Output heads and embeddings stay frozen: adapting them costs vocabulary-sized matrices.
_NEVER_ADAPTED = frozenset({"lm_head", "embed_out", "embed_tokens", "score", "classifier", "output"})


class ModelSourceError(ValueError):
    """The model asked for cannot be loaded safely (missing, a URL, pickle weights, remote code)."""


# ---------------------------------------------------------------------------------------------------------
# Where the weights come from, and whether they are safe to load.


def _looks_like_path(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model or model.count("/") > 1


def portable_model_name(model: str) -> str:
    """The model's name as another machine would know it: a Hub id as given (also from its cache snapshot's path),
    else the folder's name (a job's model under the models directory), never this machine's path."""
    if not _looks_like_path(model) and not Path(model).expanduser().is_dir():
        return model
    parts = Path(model).expanduser().parts
    for index, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[index + 1] == "snapshots":  # the Hub cache: models--org--name
            return part.removeprefix("models--").replace("--", "/")
    return Path(model).expanduser().resolve().name


def resolve_model_source(model: str, *, cache_dir: str | Path | None = None) -> str:
    """The folder to load `model` from: a folder of that name here wins, else the Hub id's local cache copy."""
    if not model.strip():
        raise ModelSourceError("--model is empty: give a local folder or a Hub id")
    if "://" in model or model.lower().startswith(("http:", "https:", "hf:", "s3:", "gs:")):
        raise ModelSourceError(f"--model {model!r} is a URL: give a local folder or a Hub id (nothing is downloaded)")
    folder = Path(model).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    if _looks_like_path(model):
        raise ModelSourceError(f"model folder {model!r} does not exist (working directory {Path.cwd()})")
    return _cached_hub_snapshot(model, cache_dir)


def _cached_hub_snapshot(repo_id: str, cache_dir: str | Path | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ModelSourceError(f"--model {repo_id!r} is neither a folder here nor a valid Hub id") from error
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        return str(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ModelSourceError(
            f"model {repo_id!r}: there is no folder {repo_id!r} in {Path.cwd()} and it is not in the local "
            f"Hugging Face cache ({cache}); models are never downloaded here: copy the model folder in, "
            f"or build a tiny one with `safetrain models make-tiny {repo_id}`"
        ) from error


def _weight_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES))


def assert_safetensors_only(folder: str | Path) -> None:
    """Refuse a model folder whose weights are not in safetensors (pickle files can run code when loaded)."""
    weights = _weight_files(Path(folder))
    if any(path.name.endswith(SAFETENSORS_SUFFIX) for path in weights):
        return
    pickled = [path.name for path in weights if path.name.endswith(PICKLE_WEIGHT_SUFFIXES)]
    if pickled:
        raise ModelSourceError(
            f"{folder} holds only pickle weights ({', '.join(pickled)}): safetrain loads safetensors only, "
            "because unpickling can run code; convert the weights to safetensors first"
        )
    raise ModelSourceError(f"{folder} holds no safetensors weight files (*.safetensors)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def assert_no_remote_code(folder: str | Path, *, trust_remote_code: bool) -> None:
    """Refuse a folder whose config or tokenizer names its own code (`auto_map`) unless remote code is trusted."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        auto_map = _read_json(Path(folder) / name).get("auto_map")
        if auto_map:
            raise ModelSourceError(
                f"{Path(folder) / name} asks to run the model's own Python code (auto_map: "
                f"{', '.join(sorted(auto_map))}); refused: pass --trust_remote_code only if you trust that code"
            )


def weight_files_sha256(folder: str | Path) -> dict[str, str]:
    """The sha256 of each weight file at the top of `folder` (the files transformers loads), streamed."""
    digests: dict[str, str] = {}
    for path in _weight_files(Path(folder)):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        digests[path.name] = digest.hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------------------
# Precision.


@cache
def _cpu_runs_bf16() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe = torch.ones(4, 4) @ torch.ones(4, 4)
        return probe.dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision_supported(options: TrainingOptions) -> list[str]:
    """Refuse --fp16/--bf16 where this machine cannot run them; return notes worth announcing.

    --fp16 needs CUDA (torch's CPU autocast has no float16 loss scaling). --bf16 needs a GPU that supports
    bfloat16 natively (Ampere or newer); without a GPU it is allowed when torch's CPU autocast runs
    bfloat16, with a note when the CPU lacks AVX512-BF16/AMX and so emulates it (slower than float32).
    """
    cuda = torch.cuda.is_available()
    if options.fp16 and not cuda:
        raise ValueError("--fp16 needs a CUDA GPU and this machine has none: drop --fp16 (or use --bf16 on a CPU)")
    if not options.bf16:
        return []
    if cuda:
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name()
            raise ValueError(f"--bf16 is not supported by this GPU ({name}): use --fp16 instead")
        return []
    if not _cpu_runs_bf16():
        raise ValueError("--bf16 is not supported by this torch build on the CPU: drop --bf16")
    if not _cpu_has_native_bf16():
        return ["--bf16 on this CPU is emulated (no AVX512-BF16/AMX): expect it to be slower than float32"]
    return []


def compute_dtype(options: TrainingOptions) -> torch.dtype:
    """The dtype matmuls run in: bfloat16 or float16 when asked, else float32."""
    if options.bf16:
        return torch.bfloat16
    if options.fp16:
        return torch.float16
    return torch.float32


def weights_dtype(options: TrainingOptions) -> torch.dtype:
    """The dtype the base weights load in.

    A full fine-tune keeps float32 weights (they are the optimizer's master copy; autocast does the rest);
    frozen LoRA bases and the unquantized parts of 8/4-bit models load in the compute dtype to save memory.
    """
    return compute_dtype(options) if options.use_lora else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Loading.


def build_quantization_config(options: TrainingOptions) -> Any | None:
    """The BitsAndBytesConfig for --use_8bit / --use_4bit (NF4, double quantization), or None."""
    from transformers import BitsAndBytesConfig

    # With device_map=auto on a GPU some layers may land on the CPU: bitsandbytes keeps those in float32.
    offload = options.device_map == "auto" and torch.cuda.is_available()
    if options.use_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
    if options.use_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(options),
            llm_int8_enable_fp32_cpu_offload=offload,
        )
    return None


def build_device_map(options: TrainingOptions) -> str | dict[str, Any] | None:
    """Where the weights go: all on the one device by default, spread with --device_map auto, DeepSpeed's own."""
    if options.deepspeed:
        return None  # DeepSpeed (under accelerate launch) places and shards the weights itself
    if options.device_map == "auto":
        return "auto"
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def _max_memory(options: TrainingOptions) -> dict[int | str, str] | None:
    if options.device_map != "auto" or not options.max_memory:
        return None
    return {int(key) if key.isdigit() else key: size for key, size in options.max_memory.items()}


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the model folder, with a pad token (eos, else unk) so batches can be padded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelSourceError(f"the tokenizer in {source} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_model_and_tokenizer(options: TrainingOptions) -> tuple[Any, Any]:
    """The base model prepared for training as the options say (quantized, checkpointed, LoRA), and its tokenizer."""
    check_precision_supported(options)
    source = resolve_model_source(options.model)
    assert_safetensors_only(source)
    assert_no_remote_code(source, trust_remote_code=options.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=options.trust_remote_code)
    model = _load_base_model(source, options)
    apply_liger_kernels(model, options)  # Liger's RMSNorm, RoPE and SwiGLU on CUDA when installed (kernels.py)
    model.config.use_cache = False  # the KV cache is useless while training and conflicts with checkpointing
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if options.packing:
        check_packing_supported(model)
    model = _prepare_for_training(model, options)
    if options.offload_activations:
        from backend.training.offload import offload_checkpointed_activations

        offload_checkpointed_activations(model)  # each layer's checkpoint function now keeps its input on the host
    if options.use_lora:
        model = _attach_lora(model, options)
    if options.tiled_mlp:
        from backend.training.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model)  # each MLP over tiles of the sequence, recomputed tile by tile in the backward
    if options.offload_embeddings:
        from backend.training.offload import keep_input_embeddings_on_host

        keep_input_embeddings_on_host(model)  # the frozen table in host memory, its rows copied to the device
    return model, tokenizer


def _load_base_model(source: str, options: TrainingOptions) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=build_quantization_config(options),
        device_map=build_device_map(options),
        max_memory=_max_memory(options),
        dtype=weights_dtype(options),
        trust_remote_code=options.trust_remote_code,
        **_attention_implementation(options),
        use_safetensors=True,
        local_files_only=True,
    )


def _attention_implementation(options: TrainingOptions) -> dict[str, str]:
    """Flash-attention 2 for packed half-precision batches on CUDA when installed: packed blocks then run its
    variable-length kernel (no mask at all); otherwise the default (SDPA with a block-diagonal mask)."""
    from importlib.util import find_spec

    half = options.bf16 or options.fp16 or options.use_4bit or options.use_8bit
    if options.packing and half and torch.cuda.is_available() and find_spec("flash_attn") is not None:
        return {"attn_implementation": "flash_attention_2"}
    return {}


def check_packing_supported(model: Any) -> None:
    """Refuse --packing for a model whose attention would not keep packed examples apart.

    transformers' `create_causal_mask` turns position ids that restart at 0 into a block-diagonal causal mask
    (SDPA, eager, flex) or cu_seqlens (flash-attention's varlen path); a model that builds its own mask would let
    every example attend to the ones before it in the block.
    """
    import sys

    module = sys.modules.get(type(model).__module__)
    if module is None or not hasattr(module, "create_causal_mask"):
        raise ModelSourceError(
            f"--packing needs a model whose attention follows packed position ids (transformers' "
            f"create_causal_mask); {type(model).__name__} builds its own mask: drop --packing"
        )


def attention_inputs(
    batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attention_mask, position_ids) for the forward of a collated batch.

    Packed blocks pass position ids and no mask: transformers then builds the block-diagonal causal mask from
    the restarts (it looks for packed sequences only when the 2D mask is absent). Padding needs no mask there:
    it sits after the block's examples as a sequence of its own.
    """
    if "position_ids" in batch:
        return None, batch["position_ids"].to(device)
    return batch["attention_mask"].to(device), None


def _prepare_for_training(model: Any, options: TrainingOptions) -> Any:
    checkpointing = bool(options.gradient_checkpointing)
    # Non-reentrant checkpointing works with frozen inputs and LoRA; the reentrant one needs an input that
    # requires grad (prepare_model_for_kbit_training sees to that). 8-bit needs the reentrant one: bitsandbytes'
    # 8-bit matmul keeps its input on the autograd context, out of the non-reentrant one's reach, so every
    # layer's matmul inputs would stay alive (about 3 GB for a 7B model at 2 x 512 tokens).
    checkpoint_kwargs = {"use_reentrant": bool(options.use_8bit)}
    if getattr(model, "is_quantized", False) and not options.bf16:
        from peft import prepare_model_for_kbit_training

        # Casts the unquantized parts (norms, embeddings, head) to float32 and freezes the base: float16 norms
        # and embeddings would overflow. Under --bf16 they stay bfloat16 (float32's range; torchtune and Unsloth
        # train QLoRA so), which halves them: 2 GiB of embeddings and lm_head for Llama-3-8B.
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=checkpoint_kwargs
        )
    if getattr(model, "is_quantized", False):
        model.requires_grad_(False)
    if checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias) to this.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        if options.use_lora:
            # The embeddings are frozen under LoRA: make their output require grad so checkpointed blocks
            # still have a graph to recompute through.
            model.enable_input_require_grads()
    return model


def _attach_lora(model: Any, options: TrainingOptions) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = options.lora_target_modules or default_lora_targets(model)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(targets),
    )
    # GPT-2's Conv1D stores its weight transposed; peft corrects a wrong flag layer by layer, but warns each time.
    config.fan_in_fan_out = _adapts_only_conv1d(model, config)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ModelSourceError(f"--lora_target_modules {','.join(targets)}: {error}") from error


# ---------------------------------------------------------------------------------------------------------
# LoRA targets.


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    # bitsandbytes' Linear8bitLt and Linear4bit subclass nn.Linear, so quantized models are covered too.
    return isinstance(module, nn.Linear | Conv1D)


def _adapts_only_conv1d(model: nn.Module, config: Any) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    adapted = [module for name, module in model.named_modules() if check_target_module_exists(config, name)]
    return bool(adapted) and all(isinstance(module, Conv1D) for module in adapted)


def linear_leaf_names(model: nn.Module) -> list[str]:
    """The distinct last-name parts of every Linear/Conv1D leaf, except output heads and embeddings."""
    names: list[str] = []
    for qualified, module in model.named_modules():
        leaf = qualified.rsplit(".", 1)[-1]
        if not qualified or next(module.children(), None) is not None or not _is_linear(module):
            continue
        if leaf in _NEVER_ADAPTED or "embed" in leaf or leaf in names:
            continue
        names.append(leaf)
    return names


def default_lora_targets(model: nn.Module) -> list[str]:
    """The linear layers LoRA adapts by default: the known ones for the architecture, else all linear leaves."""
    present = linear_leaf_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = [name for name in LORA_TARGETS_BY_MODEL_TYPE.get(str(model_type), ()) if name in present]
    targets = known or present
    if not targets:
        raise ModelSourceError(
            f"found no linear layers to adapt in this {model_type or 'model'}: pass --lora_target_modules"
        )
    return targets
