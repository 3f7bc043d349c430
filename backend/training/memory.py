"""The memory plan: peak training memory from a model's config alone, and the cheapest settings that fit.

Nothing here loads weights. Parameters are counted on the meta device; activations follow a per-layer
count of the tensors autograd saves, in the spirit of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), adapted to what transformers + peft + bitsandbytes keep:

* weights: the compute dtype (fp32 unless --fp16/--bf16); a full fine-tune keeps fp32 master weights
  (mixed precision adds the autocast half copies of the linear weights); 8/4-bit quantize every
  nn.Linear/Conv1D except the output embedding (lm_head), and `prepare_model_for_kbit_training` casts
  everything left (embeddings, norms, biases, lm_head) to fp32;
* adapters, their gradients and AdamW states are fp32 (peft keeps adapters in fp32);
* activations per token and layer: norm inputs, q/k/v, the attention output, the MLP intermediates
  (gated MLPs keep four, GELU-tanh written in Python keeps five), dropout masks (float on the CPU, bytes
  on CUDA), linear inputs only where the linear's weight is trained, LoRA's dropout output;
  attention scores (b·heads·s²) only where attention is materialized (eager, or SDPA on the CPU with
  attention dropout); the logits for the loss (fp32 log-softmax and its gradients), often the largest
  term for small models; what one layer's backward adds (its widest gradients, k-bit weights dequantized).
  bitsandbytes' 8-bit matmul keeps its input even for a frozen weight. Checkpointing keeps each layer's
  input plus one recomputed layer (8-bit checkpoints reentrantly so that its matmuls' inputs are dropped too);
* overhead: on a GPU the CUDA context, cuBLAS workspaces and the caching allocator's fragmentation; on the CPU
  the runtime's workspaces and the freed memory glibc keeps in its heap (about two layers' activations).

Checked against the live tensors of real training steps (what torch.cuda.max_memory_allocated counts, measured
on the CPU too: benchmarks/live_tensors.py, tests/training/test_memory_measured.py), against process peaks
in benchmarks/plan_accuracy.py and benchmarks/checkpointing_memory.py, and against H200 runs of a 7B Llama.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from backend.training.modeling import default_lora_targets
from backend.training.options import TrainingOptions

MIB = 1024**2
GIB = 1024**3
CUDA_CONTEXT_BYTES = 500 * MIB
# The CPU runtime grows by about this much on the first training step (oneDNN/MKL workspaces, lazily
# loaded kernels, autograd bookkeeping): measured with a 2-layer, 64-wide model at 8 tokens.
CPU_RUNTIME_BYTES = 24 * MIB
# glibc keeps freed tensors below its (dynamically raised, up to 32 MiB) mmap threshold in its heap, so a
# CPU process's resident set stays about two layers' activations above the live tensors; measured with
# mallinfo2 against VmHWM on GPT-2 shapes at 256-512 tokens (benchmarks/plan_accuracy.py).
CPU_HEAP_RETAINED_LAYERS = 2
# cuBLAS handles are per thread: the forward runs on the caller's, the backward on autograd's device thread
CUBLAS_HANDLES_IN_TRAINING = 2
# The CUDA caching allocator's fragmentation, as a share of everything else.
CUDA_ALLOCATOR_SLACK = 0.05
OVER_7B_PARAMETERS = 7_000_000_000
TIGHT_FRACTION = 0.8
NF4_BLOCK = 64
NESTED_BLOCK = 256
_PYTHON_GELUS = {"gelu_new": 3, "gelu_fast": 3, "gelu_python": 2, "quick_gelu": 1, "gelu_accurate": 3}
_GATED_NAMES = ("gate_proj", "gate_up_proj", "w1", "w3")
# Sibling projections that read the same tensor (one input kept, not three)
_SHARED_INPUT_NAMES = (
    frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value"}),
    frozenset({"gate_proj", "up_proj", "w1", "w3"}),
)
# peft keeps adapter weights (and so the tensors it casts for them) in fp32
ADAPTER_BYTES = 4
# A k-bit model's residual stream is fp32: prepare_model_for_kbit_training casts embeddings and norms up
KBIT_STREAM_BYTES = 4


@dataclass
class MemoryBreakdown:
    """Peak memory by component, in bytes."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        """The sum of every component."""
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations + self.overhead

    def to_dict(self) -> dict[str, int]:
        """The components as a plain dict (bytes)."""
        return asdict(self)


@dataclass
class MemoryPlan:
    """An estimate against a budget, with the cheapest change that fits when it does not."""

    breakdown: MemoryBreakdown
    estimate_bytes: int
    budget_bytes: int | None
    fits: bool | None
    device: str
    n_parameters: int
    trainable_parameters: int
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    recommendation: str | None = None
    recommended_changes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (the API's estimate body uses it)."""
        data = asdict(self)
        data["breakdown"] = self.breakdown.to_dict()
        return data


@dataclass(frozen=True)
class LinearLayer:
    """One nn.Linear/Conv1D of the model, as bitsandbytes and peft see it."""

    name: str
    in_features: int
    out_features: int
    quantizable: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs from a config: its parameters, linear layers and dimensions."""

    n_parameters: int
    linears: tuple[LinearLayer, ...]
    hidden: int
    layers: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    activation: str
    rms_norm: bool
    residual_dropout: float
    attention_dropout: float
    attn_implementation: str
    default_lora_targets: tuple[str, ...]

    @property
    def quantized_inputs_per_layer(self) -> int:
        """Elements per token of the distinct tensors one layer's quantized linears read."""
        inputs: dict[tuple[str, str | int], int] = {}
        for layer in self.linears:
            if layer.quantizable:
                parent, _, leaf = layer.name.rpartition(".")
                shared = [index for index, names in enumerate(_SHARED_INPUT_NAMES) if leaf in names]
                inputs[(parent, shared[0] if shared else leaf)] = layer.in_features
        return sum(inputs.values()) // max(self.layers, 1)

    @property
    def quantizable_parameters(self) -> int:
        """Weights that bitsandbytes replaces (biases stay in the compute dtype)."""
        return sum(layer.in_features * layer.out_features for layer in self.linears if layer.quantizable)


def load_model_config(model: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config from a local folder (which wins) or the Hub cache; never downloads."""
    folder = Path(model)
    if folder.is_dir():
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(
            f"model {model!r} is neither a local folder nor in the Hugging Face cache (the plan never downloads)"
        ) from error


_SHAPES: dict[str, ModelShape] = {}


def model_shape(config: PretrainedConfig) -> ModelShape:
    """Count parameters and linear layers on the meta device (cached per config: plans re-estimate often)."""
    key = config.to_json_string(use_diff=False)
    if key not in _SHAPES:
        if len(_SHAPES) >= 64:
            _SHAPES.clear()
        _SHAPES[key] = _measure_shape(config)
    return _SHAPES[key]


def _measure_shape(config: PretrainedConfig) -> ModelShape:
    with torch.device("meta"):  # shapes only: no memory is allocated and nothing is read from disk
        model = AutoModelForCausalLM.from_config(config)
    text = model.config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    linears = tuple(_linear_layers(model))
    return ModelShape(
        n_parameters=sum(parameter.numel() for parameter in model.parameters()),
        linears=linears,
        hidden=hidden,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=_intermediate_size(text, hidden),
        vocab=text.vocab_size,
        gated_mlp=any(layer.name.rsplit(".", 1)[-1] in _GATED_NAMES for layer in linears),
        activation=str(getattr(text, "hidden_act", None) or getattr(text, "activation_function", "gelu")),
        rms_norm=hasattr(text, "rms_norm_eps"),
        residual_dropout=_first_float(text, ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "dropout")),
        attention_dropout=_first_float(text, ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")),
        attn_implementation=str(getattr(model.config, "_attn_implementation", None) or "sdpa"),
        default_lora_targets=tuple(default_lora_targets(model)),
    )


def _linear_layers(model: torch.nn.Module) -> list[LinearLayer]:
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep_full = get_keys_to_not_convert(model)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        elif type(module) is torch.nn.Linear:
            in_features, out_features = module.in_features, module.out_features
        else:
            continue
        layers.append(LinearLayer(name, in_features, out_features, should_convert_module(name, keep_full)))
    return layers


def _intermediate_size(config: PretrainedConfig, hidden: int) -> int:
    for name in ("intermediate_size", "n_inner", "ffn_dim", "d_ff"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 4 * hidden


def _first_float(config: PretrainedConfig, names: tuple[str, ...]) -> float:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def default_device() -> str:
    """'cuda' where torch sees a GPU, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def lora_targets(options: TrainingOptions, config: PretrainedConfig) -> list[str]:
    """The modules LoRA adapts: the options' list, or the trainer's default for the architecture."""
    if options.lora_target_modules:
        return list(options.lora_target_modules)
    return list(model_shape(config).default_lora_targets)


def lora_layers(shape: ModelShape, targets: list[str]) -> list[LinearLayer]:
    """The linear layers whose names match the LoRA targets (as peft matches them)."""
    if "all-linear" in targets:
        return [layer for layer in shape.linears if layer.quantizable]
    return [layer for layer in shape.linears if any(_matches(layer.name, target) for target in targets)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def estimate_memory(options: TrainingOptions, config: PretrainedConfig, *, device: str | None = None) -> MemoryPlan:
    """The peak memory of training with these options, component by component (no budget)."""
    device = device or default_device()
    shape = model_shape(config)
    adapted = lora_layers(shape, lora_targets(options, config)) if options.use_lora else []
    lora_parameters = sum(options.lora_r * (layer.in_features + layer.out_features) for layer in adapted)
    trainable = lora_parameters if options.use_lora else shape.n_parameters
    with_checkpointing = activation_bytes(options, shape, adapted, device=device, checkpointing=True)
    without_checkpointing = activation_bytes(options, shape, adapted, device=device, checkpointing=False)
    activations = with_checkpointing if options.gradient_checkpointing else without_checkpointing
    weights = weight_bytes(options, shape)
    subtotal = weights + 4 * lora_parameters + 4 * trainable + 8 * trainable + activations
    layer = _layer_activation_bytes(options, shape, adapted, device=device, tokens=_tokens(options))
    breakdown = MemoryBreakdown(
        weights=weights,
        adapters=4 * lora_parameters,  # peft keeps adapter weights in fp32
        gradients=4 * trainable,  # fp32, one per trainable parameter
        optimizer=8 * trainable,  # AdamW: exp_avg and exp_avg_sq in fp32
        activations=activations,
        overhead=overhead_bytes(subtotal, device, layer_activations=layer),
    )
    return MemoryPlan(
        breakdown=breakdown,
        estimate_bytes=breakdown.total,
        budget_bytes=None,
        fits=None,
        device=device,
        n_parameters=shape.n_parameters,
        trainable_parameters=trainable,
        activations_with_checkpointing=with_checkpointing,
        activations_without_checkpointing=without_checkpointing,
    )


def compute_bytes(options: TrainingOptions) -> int:
    """Bytes per element of the compute dtype: 2 with --fp16/--bf16, else 4 (fp32)."""
    return 2 if options.fp16 or options.bf16 else 4


def weight_bytes(options: TrainingOptions, shape: ModelShape) -> int:
    """The base model's weights at their bit width (adapters not included)."""
    quantizable = shape.quantizable_parameters
    rest = shape.n_parameters - quantizable
    if options.use_4bit or options.use_8bit:
        # prepare_model_for_kbit_training casts what is not quantized (embeddings, norms, lm_head) to fp32
        return quantized_bytes(shape, bits=4 if options.use_4bit else 8) + 4 * rest
    if options.use_lora:
        return compute_bytes(options) * shape.n_parameters  # frozen base, loaded in the compute dtype
    autocast_copies = 2 * quantizable if compute_bytes(options) == 2 else 0  # half copies of linear weights
    return 4 * shape.n_parameters + autocast_copies  # fp32 master weights


def quantized_bytes(shape: ModelShape, *, bits: int) -> int:
    """Bytes of the quantized linear weights, scales included."""
    layers = [layer for layer in shape.linears if layer.quantizable]
    count = sum(layer.in_features * layer.out_features for layer in layers)
    if bits == 8:
        return count + 4 * sum(layer.out_features for layer in layers)  # int8 + one fp32 scale per row
    blocks = math.ceil(count / NF4_BLOCK)
    # NF4 packs two weights a byte; double quantization stores block scales in 8 bits, plus fp32 per 256 blocks
    return count // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK)


def activation_bytes(
    options: TrainingOptions,
    shape: ModelShape,
    adapted: list[LinearLayer],
    *,
    device: str,
    checkpointing: bool,
) -> int:
    """Peak activation memory for one micro-batch, with or without gradient checkpointing."""
    element = compute_bytes(options)
    tokens = _tokens(options)
    layer = _layer_activation_bytes(options, shape, adapted, device=device, tokens=tokens)
    outside_layers = tokens * shape.hidden * (element + 4 * 2)  # embedding output, final norm input and output
    # logits, fp32 log-softmax, its gradient, the logits' gradient and the shifted-slice gradient
    loss = tokens * shape.vocab * (2 * element + 12)
    working = _backward_working_bytes(options, shape, device=device, tokens=tokens)
    if checkpointing:
        # each layer's input stays; 8-bit checkpoints reentrantly (modeling.py), so its matmuls' inputs go too
        layer_inputs = shape.layers * tokens * shape.hidden * element
        return layer_inputs + outside_layers + max(loss, layer + working)
    return shape.layers * layer + outside_layers + max(loss, working)


def _layer_activation_bytes(
    options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer], *, device: str, tokens: int
) -> int:
    element = compute_bytes(options)
    trained = not options.use_lora  # frozen linears do not keep their inputs
    h, i = shape.hidden, shape.intermediate
    mask = element if device == "cpu" else 1  # dropout keeps a float mask on the CPU, a byte mask on CUDA
    norm_fp32 = (2 if shape.rms_norm and trained else 1) * 4  # norms run in fp32; RMSNorm keeps its normalized x
    per_token = 2 * norm_fp32 * h
    per_token += element * (h + 2 * shape.kv_dim + h)  # q, k, v and the attention output
    per_token += element * 2 * h if trained else 0  # inputs of the qkv and MLP projections
    if shape.gated_mlp:
        per_token += element * (3 * i + (i if trained else 0))  # gate, act(gate), up; their product feeds down
    else:
        extra = _PYTHON_GELUS.get(shape.activation, 0)
        per_token += element * (1 + extra + (1 if trained else 0)) * i
    if shape.residual_dropout > 0:
        per_token += 2 * mask * h
    # the 8-bit matmuls keep their inputs; the attention output (o_proj's input) is counted above already
    per_token += max(_int8_kept_input_bytes(options, shape) - KBIT_STREAM_BYTES * h, 0)
    # LoRA casts its input to the adapter's fp32 before dropout: a float mask is fp32 whatever the compute dtype;
    # lora_A keeps the dropout output (under autocast, its half copy), or the input without dropout
    lora_mask = ADAPTER_BYTES if device == "cpu" else 1
    kept = (lora_mask + element) if options.lora_dropout > 0 else element
    lora = sum(kept * layer.in_features + element * options.lora_r for layer in adapted)
    per_token += lora // max(shape.layers, 1)
    scores = options.per_device_train_batch_size * shape.heads * options.max_seq_length**2
    return tokens * per_token + scores * _score_bytes(options, shape, device=device)


def _int8_kept_input_bytes(options: TrainingOptions, shape: ModelShape) -> int:
    """Bytes per token of the inputs one layer's 8-bit matmuls keep for the backward (0 unless --use_8bit).

    bitsandbytes' MatMul8bitLt (CUDA) and MatMul8bitFp (CPU) keep the input A on the autograd context even
    when the weight is frozen (reentrant checkpointing drops the context; the non-reentrant kind could not);
    q/k/v read one tensor, as do gate/up. The stream is fp32 in a k-bit model (prepare_model_for_kbit_training
    casts the embeddings and norms to fp32). 4-bit matmuls keep no input.
    """
    if not options.use_8bit:
        return 0
    return KBIT_STREAM_BYTES * shape.quantized_inputs_per_layer


def _tokens(options: TrainingOptions) -> int:
    return options.per_device_train_batch_size * options.max_seq_length


def _materialized_attention(shape: ModelShape, *, device: str) -> bool:
    if shape.attn_implementation == "eager":
        return True
    # PyTorch's CPU flash kernel takes no dropout: SDPA then falls back to the math path
    return shape.attn_implementation == "sdpa" and device == "cpu" and shape.attention_dropout > 0


def _score_bytes(options: TrainingOptions, shape: ModelShape, *, device: str) -> int:
    if not _materialized_attention(shape, device=device):
        return 0
    element = compute_bytes(options)
    softmax = 4 if element == 4 else 4 + element  # softmax in fp32, cast back to the compute dtype
    mask = element if device == "cpu" else 1
    return softmax + (mask + element if shape.attention_dropout > 0 else 0)


def _backward_working_bytes(options: TrainingOptions, shape: ModelShape, *, device: str, tokens: int) -> int:
    """What one layer's backward allocates on top of its saved activations.

    The gradient arriving at the layer and the widest one inside it (the MLP's), a score-sized gradient
    where attention is materialized, and for k-bit weights the largest weight bitsandbytes dequantizes to
    fp32 for the input gradient. Measured as live tensors (benchmarks/live_tensors.py), this is all that
    coexists with the layer's activations: the rest is freed as fast as the backward makes it.
    """
    element = compute_bytes(options)
    gradients = tokens * element * (shape.hidden + shape.intermediate)
    if _materialized_attention(shape, device=device):
        gradients += options.per_device_train_batch_size * shape.heads * options.max_seq_length**2 * element
    if options.use_8bit or options.use_4bit:
        weights = [layer.in_features * layer.out_features for layer in shape.linears if layer.quantizable]
        gradients += KBIT_STREAM_BYTES * max(weights, default=0)
    return gradients


def overhead_bytes(subtotal: int, device: str, *, layer_activations: int) -> int:
    """CUDA context, cuBLAS workspaces and fragmentation (GPU), or runtime workspaces and retained heap (CPU)."""
    if device.startswith("cuda"):
        return CUDA_CONTEXT_BYTES + cublas_workspace_bytes() + int(CUDA_ALLOCATOR_SLACK * subtotal)
    return CPU_RUNTIME_BYTES + CPU_HEAP_RETAINED_LAYERS * layer_activations


def cublas_workspace_bytes() -> int:
    """The cuBLAS workspaces training allocates through PyTorch's caching allocator.

    PyTorch gives each (thread, stream) cuBLAS handle its own workspace, and training uses two threads: the
    forward's and autograd's device thread. The size is CUBLAS_WORKSPACE_CONFIG's (":KiB:count" pairs), else
    PyTorch's default: 32 MiB from Hopper (sm90) on, 8 MiB + 128 KiB before; no GPU here counts as Hopper.
    """
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    pairs = re.findall(r":(\d+):(\d+)", config)
    if pairs:
        per_handle = sum(int(kib) * 1024 * int(count) for kib, count in pairs)
    elif _cuda_major_version() < 9:
        per_handle = 8 * MIB + 128 * 1024
    else:
        per_handle = 32 * MIB
    return CUBLAS_HANDLES_IN_TRAINING * per_handle


def _cuda_major_version() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9


def device_budget_bytes(options: TrainingOptions) -> tuple[int, str]:
    """The memory budget and its device: --memory_budget_gb, else the GPU's free memory, else host RAM."""
    device = default_device()
    if options.memory_budget_gb is not None:
        return int(options.memory_budget_gb * GIB), device
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return int(free), device
    return int(psutil.virtual_memory().available), "cpu"


def plan_memory(
    options: TrainingOptions,
    config: PretrainedConfig,
    *,
    budget_bytes: int | None = None,
    device: str | None = None,
) -> MemoryPlan:
    """Estimate against a budget (the device's when omitted); when it does not fit, the cheapest change that does."""
    if budget_bytes is None:
        budget_bytes, budget_device = device_budget_bytes(options)
        device = device or budget_device
    plan = estimate_memory(options, config, device=device)
    plan.budget_bytes = budget_bytes
    plan.fits = plan.estimate_bytes <= budget_bytes
    if plan.fits:
        return plan
    changes = cheapest_fitting_changes(options, config, budget_bytes=budget_bytes, device=plan.device)
    if changes is None:
        plan.recommendation = (
            f"does not fit even with every memory saver: estimated {_gib(plan.estimate_bytes)} "
            f"of {_gib(budget_bytes)}; use a smaller model, shorter --max_seq_length or a larger device"
        )
        return plan
    changed = estimate_memory(_updated(options, changes), config, device=plan.device)
    plan.recommended_changes = changes
    plan.recommendation = (
        f"{describe_changes(changes)}: estimated {_gib(changed.estimate_bytes)} of {_gib(budget_bytes)}"
    )
    return plan


def cheapest_fitting_changes(
    options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str
) -> dict[str, Any] | None:
    """The first cumulative step that fits, with the steps it turns out not to need dropped again."""
    steps = _memory_saving_steps(options, device=device, budget_bytes=budget_bytes)
    for count in range(1, len(steps) + 1):
        changes = _merge(steps[:count])
        if _fits(options, changes, config, budget_bytes=budget_bytes, device=device):
            return _drop_unneeded(options, steps[:count], config, budget_bytes=budget_bytes, device=device)
    return None


def _memory_saving_steps(options: TrainingOptions, *, device: str, budget_bytes: int) -> list[dict[str, Any]]:
    """Changes from cheapest to most drastic: checkpointing, micro-batch, LoRA, 8-bit, 4-bit, offload."""
    steps: list[dict[str, Any]] = []
    if not options.gradient_checkpointing:
        steps.append({"gradient_checkpointing": True})
    effective = options.effective_batch_size
    for micro_batch in (2, 1):
        if micro_batch < options.per_device_train_batch_size and effective % micro_batch == 0:
            steps.append({"per_device_train_batch_size": micro_batch,
                          "gradient_accumulation_steps": effective // micro_batch})
    if not options.use_lora:
        steps.append({"use_lora": True})
    if options.deepspeed is None:
        if not options.use_8bit and not options.use_4bit:
            steps.append({"use_8bit": True, "use_4bit": False})
        if not options.use_4bit:
            steps.append({"use_8bit": False, "use_4bit": True})
        if device.startswith("cuda") and options.device_map is None:
            steps.append({"device_map": "auto", "max_memory": _offload_max_memory(budget_bytes)})
    return steps


def _offload_max_memory(budget_bytes: int) -> dict[str, str]:
    host = int(psutil.virtual_memory().available * 0.8)
    return {"0": f"{budget_bytes // GIB}GiB", "cpu": f"{host // GIB}GiB"}


def _drop_unneeded(
    options: TrainingOptions,
    steps: list[dict[str, Any]],
    config: PretrainedConfig,
    *,
    budget_bytes: int,
    device: str,
) -> dict[str, Any]:
    kept = list(steps)
    for step in reversed(steps[:-1]):  # the last step is the one that made it fit
        trial = [other for other in kept if other is not step]
        if _fits(options, _merge(trial), config, budget_bytes=budget_bytes, device=device):
            kept = trial
    return _merge(kept)


def _merge(steps: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for step in steps:
        merged.update(step)
    return merged


def _fits(
    options: TrainingOptions, changes: dict[str, Any], config: PretrainedConfig, *, budget_bytes: int, device: str
) -> bool:
    try:
        changed = _updated(options, changes)
    except ValueError:  # e.g. 8-bit without LoRA once LoRA was dropped again
        return False
    if changed.device_map == "auto" and device.startswith("cuda"):
        return _fits_with_offload(changed, config, budget_bytes=budget_bytes, device=device)
    return estimate_memory(changed, config, device=device).estimate_bytes <= budget_bytes


def _fits_with_offload(options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str) -> bool:
    """Offload fits when all but the weights fit the GPU with a layer to spare and the weights fit the host."""
    plan = estimate_memory(options, config, device=device)
    on_gpu = plan.estimate_bytes - plan.breakdown.weights
    one_layer = plan.breakdown.weights // max(model_shape(config).layers, 1)
    return on_gpu + one_layer <= budget_bytes and plan.breakdown.weights <= psutil.virtual_memory().available


def _updated(options: TrainingOptions, changes: dict[str, Any]) -> TrainingOptions:
    """A validated copy of the options with the changes applied."""
    return TrainingOptions.model_validate({**options.model_dump(), **changes})


def describe_changes(changes: dict[str, Any]) -> str:
    """The changes as the flags a user would type, e.g. 'enable --gradient_checkpointing and --use_4bit'."""
    switches = [f"--{name}" for name, value in changes.items() if value is True]
    values = [
        f"--{name} {_flag_value(value)}"
        for name, value in changes.items()
        if not isinstance(value, bool) and value is not None
    ]
    parts = []
    if switches:
        parts.append("enable " + " and ".join(switches))
    if values:
        parts.append("set " + " ".join(values))
    return "; ".join(parts) or "no change"


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{key}={size}" for key, size in value.items())
    return str(value)


def apply_safe_defaults(
    options: TrainingOptions, config: PretrainedConfig, *, budget_bytes: int, device: str | None = None
) -> tuple[TrainingOptions, list[str]]:
    """The guide's safe defaults, each announced: 8-bit over 7B, small micro-batches, checkpointing when tight."""
    device = device or default_device()
    messages: list[str] = []
    shape = model_shape(config)
    changes: dict[str, Any] = {}
    if shape.n_parameters > OVER_7B_PARAMETERS and options.deepspeed is None:
        changes.update(_large_model_defaults(options, shape.n_parameters, messages))
    current = _updated(options, changes)
    changes.update(_checkpointing_default(current, config, budget_bytes=budget_bytes, device=device, messages=messages))
    current = _updated(options, changes)
    changes.update(_micro_batch_default(current, config, budget_bytes=budget_bytes, device=device, messages=messages))
    current = _updated(options, changes)
    plan = plan_memory(current, config, budget_bytes=budget_bytes, device=device)
    if not plan.fits and plan.recommended_changes:
        messages.append(f"memory plan: {plan.recommendation}")
        current = _updated(current, plan.recommended_changes)
    elif not plan.fits:
        messages.append(f"memory plan: {plan.recommendation}")
    return current, messages


def _large_model_defaults(options: TrainingOptions, n_parameters: int, messages: list[str]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    size = f"{n_parameters / 1e9:.1f}B parameters"
    if options.use_8bit is None and not options.use_4bit:
        if options.use_lora:
            changes["use_8bit"] = True
            messages.append(f"{size} (over 7B): loading weights in 8-bit (--use_8bit)")
        else:
            messages.append(f"{size} (over 7B): 8-bit needs --use_lora, so weights stay at full precision")
    if options.device_map is None:
        changes["device_map"] = "auto"
        messages.append(f"{size} (over 7B): placing layers with --device_map auto")
    return changes


def _micro_batch_default(
    options: TrainingOptions,
    config: PretrainedConfig,
    *,
    budget_bytes: int,
    device: str,
    messages: list[str],
) -> dict[str, Any]:
    """Micro-batches above 2 that do not fit go down to 2 or 1, accumulation up, effective batch unchanged."""
    if options.per_device_train_batch_size <= 2 or _fits(options, {}, config, budget_bytes=budget_bytes, device=device):
        return {}
    effective = options.effective_batch_size
    candidates = [size for size in (2, 1) if effective % size == 0]
    for micro_batch in candidates:
        changes = {"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": effective // micro_batch}
        if _fits(options, changes, config, budget_bytes=budget_bytes, device=device) or micro_batch == candidates[-1]:
            messages.append(
                f"micro-batch {options.per_device_train_batch_size} does not fit: using {micro_batch} with "
                f"{effective // micro_batch} accumulation steps (effective batch {effective} unchanged)"
            )
            return changes
    return {}


def _checkpointing_default(
    options: TrainingOptions,
    config: PretrainedConfig,
    *,
    budget_bytes: int,
    device: str,
    messages: list[str],
) -> dict[str, Any]:
    """Decide --gradient_checkpointing when it was left open: on when the plan without it is tight."""
    if options.gradient_checkpointing is not None:
        return {}
    without = estimate_memory(_updated(options, {"gradient_checkpointing": False}), config, device=device)
    share = without.estimate_bytes / budget_bytes
    if share > TIGHT_FRACTION:
        messages.append(
            f"memory plan is tight ({_gib(without.estimate_bytes)} of {_gib(budget_bytes)}, {share:.0%}): "
            "enabling --gradient_checkpointing"
        )
        return {"gradient_checkpointing": True}
    messages.append(f"memory plan has room ({share:.0%} of {_gib(budget_bytes)}): gradient checkpointing off")
    return {"gradient_checkpointing": False}


def format_plan(plan: MemoryPlan) -> str:
    """The human table `--dry_run` prints."""
    rows = [(name.capitalize(), value) for name, value in plan.breakdown.to_dict().items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        f"Memory plan on {plan.device}: {plan.n_parameters / 1e6:,.1f}M parameters, "
        f"{plan.trainable_parameters / 1e6:,.2f}M trainable",
        *(f"  {name:<{width}}{_size(value):>12}" for name, value in rows),
        f"  {'Total':<{width}}{_size(plan.estimate_bytes):>12}",
        f"  (activations: {_size(plan.activations_without_checkpointing)} without gradient checkpointing, "
        f"{_size(plan.activations_with_checkpointing)} with)",
    ]
    if plan.budget_bytes is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"  {'Budget':<{width}}{_size(plan.budget_bytes):>12}  -> {verdict}")
    if plan.recommendation:
        lines.append(f"Recommendation: {plan.recommendation}")
    return "\n".join(lines)


def _size(value: int) -> str:
    return _gib(value) if value >= GIB else f"{value / MIB:.1f} MiB"


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
