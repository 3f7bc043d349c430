"""The memory estimate: peak training memory from a model's config alone, term by term.

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
  term for small models, or with the chunked loss (on by default) one slice of them and what it keeps per token
  (`chunked_loss_bytes`); what one layer's backward adds (its widest gradients, k-bit weights dequantized).
  bitsandbytes' 8-bit matmul keeps its input even for a frozen weight. Checkpointing keeps each layer's
  input plus one recomputed layer (8-bit checkpoints reentrantly so that its matmuls' inputs are dropped too);
* overhead: on a GPU the CUDA context, cuBLAS workspaces and the caching allocator's fragmentation; on the CPU
  the runtime's workspaces and the freed memory glibc keeps in its heap (about two layers' activations).

Checked against the live tensors of real training steps (what torch.cuda.max_memory_allocated counts, measured
on the CPU too: benchmarks/live_tensors.py, tests/training/test_memory_measured.py), against process peaks
in benchmarks/plan_accuracy.py and benchmarks/checkpointing_memory.py, and against H200 runs of a 7B Llama.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig

from backend.training.chunked_loss import chunked_loss_bytes, config_head_problem
from backend.training.kernels import planned_kernels, training_device
from backend.training.model_shape import LinearLayer, ModelShape, lora_layers, lora_targets, model_shape
from backend.training.options import EIGHT_BIT_OPTIMIZERS, TrainingOptions
from backend.training.tiled_mlp import tile_tokens_for

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
NF4_BLOCK = 64
# The plain loss's working set per logit (--no_chunked_loss): three fp32 copies, measured on the CPU as live tensors
WHOLE_LOGITS_BYTES_PER_LOGIT = 12
# --offload_activations: layer inputs on the device in the backward (the one recomputed, the next one prefetched)
OFFLOAD_LAYERS_ON_DEVICE = 2
# bitsandbytes' 8-bit optimizers: states quantized in blocks of this many, tensors below the minimum kept fp32
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
NESTED_BLOCK = 256
_PYTHON_GELUS = {"gelu_new": 3, "gelu_fast": 3, "gelu_python": 2, "quick_gelu": 1, "gelu_accurate": 3}
# peft keeps adapter weights (and so the tensors it casts for them) in fp32
ADAPTER_BYTES = 4


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
    max_seq_length: int = 0
    techniques: list[str] = field(default_factory=list)
    savings: dict[str, int] = field(default_factory=dict)  # bytes each technique in use saves against going without
    host_bytes: int = 0  # host RAM the plan puts there (--offload_activations on a GPU), checked against the host's

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (the API's estimate body uses it)."""
        data = asdict(self)
        data["breakdown"] = self.breakdown.to_dict()
        return data


# 'cuda' where torch sees a GPU, else 'cpu': the device the trainer computes on (kernels.py decides by it too)
default_device = training_device


def estimate_memory(options: TrainingOptions, config: PretrainedConfig, *, device: str | None = None) -> MemoryPlan:
    """The peak memory of training with these options, component by component (no budget)."""
    device = device or default_device()
    shape = model_shape(config)
    adapted = lora_layers(shape, lora_targets(options, config)) if options.use_lora else []
    lora_parameters = sum(options.lora_r * (layer.in_features + layer.out_features) for layer in adapted)
    trainable = lora_parameters if options.use_lora else shape.n_parameters
    chunked = chunked_loss_planned(options, config)
    offload = offloads_activations(options, device)
    forward = forward_options(options)
    with_checkpointing, without_checkpointing = (
        max(activation_bytes(forward, shape, adapted, device=device, checkpointing=on, chunked_loss=chunked,
                             offload=offload and on),
            reference_forward_bytes(forward, shape, adapted, device=device, chunked_loss=chunked))
        for on in (True, False)
    )
    activations = with_checkpointing if options.gradient_checkpointing else without_checkpointing
    embeddings_on_host = host_embedding_bytes(options, shape, device=device)
    weights = weight_bytes(options, shape) - embeddings_on_host
    optimizer = optimizer_state_bytes(options, shape, adapted)
    subtotal = weights + 4 * lora_parameters + 4 * trainable + optimizer + activations
    layer = _layer_activation_bytes(forward, shape, adapted, device=device, tokens=_tokens(forward))
    breakdown = MemoryBreakdown(
        weights=weights,
        adapters=4 * lora_parameters,  # peft keeps adapter weights in fp32
        gradients=4 * trainable,  # fp32, one per trainable parameter
        optimizer=optimizer,  # AdamW's exp_avg and exp_avg_sq: fp32, or uint8 with --optim adamw_8bit
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
        max_seq_length=options.seq_length,
        techniques=techniques_in_use(options, chunked_loss=chunked) + planned_kernels(options, config, device),
        savings={**(_chunked_loss_savings(options, shape, adapted, device=device) if chunked else {}),
                 **_offload_savings(options, shape, device=device),
                 **_optimizer_savings(options, shape, adapted, optimizer_bytes=optimizer),
                 **({"offload_embeddings": embeddings_on_host} if embeddings_on_host else {}),
                 **_tiled_mlp_savings(forward, shape, adapted, device=device, chunked_loss=chunked,
                                      offload=offload, activations=activations)},
        host_bytes=(checkpoint_input_bytes(options, shape) if offload else 0) + embeddings_on_host,
    )


def forward_options(options: TrainingOptions) -> TrainingOptions:
    """The options as one forward sees them: --method dpo runs a micro-batch's chosen and rejected rows together."""
    if options.method != "dpo":
        return options
    return options.model_copy(update={"per_device_train_batch_size": 2 * options.per_device_train_batch_size})


def reference_forward_bytes(
    options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer], *, device: str, chunked_loss: bool
) -> int:
    """--method dpo's reference forward (adapter off, no_grad): nothing is kept for a backward, so its peak is one
    layer's tensors, those outside the layers and the log-probs' working set; it ends before the policy forward."""
    if options.method != "dpo":
        return 0
    tokens = _tokens(options)
    layer = _layer_activation_bytes(options, shape, adapted, device=device, tokens=tokens)
    outside_layers = tokens * shape.hidden * (compute_bytes(options) + 4 * 2)
    return layer + outside_layers + loss_bytes(options, shape, tokens=tokens, chunked_loss=chunked_loss)


def offloads_activations(options: TrainingOptions, device: str) -> bool:
    """Whether the checkpointed layers' inputs leave the device: --offload_activations on a GPU (on the CPU the
    host is the device, so they stay in the plan's activations)."""
    return options.offload_activations and bool(options.gradient_checkpointing) and device.startswith("cuda")


def host_embedding_bytes(options: TrainingOptions, shape: ModelShape, *, device: str) -> int:
    """The input embedding table's bytes that --offload_embeddings moves off a GPU (frozen, untied tables only)."""
    if not (options.offload_embeddings and options.use_lora and device.startswith("cuda")) or shape.tied_embeddings:
        return 0
    element = kbit_stream_bytes(options) if options.use_4bit or options.use_8bit else compute_bytes(options)
    return element * shape.input_embedding_parameters


def checkpoint_input_bytes(options: TrainingOptions, shape: ModelShape) -> int:
    """Every layer's input, which gradient checkpointing keeps for the recompute (layers x tokens x hidden)."""
    return shape.layers * _tokens(options) * shape.hidden * compute_bytes(options)


def _optimizer_savings(
    options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer], *, optimizer_bytes: int
) -> dict[str, int]:
    """What 8-bit optimizer states save against torch's fp32 AdamW."""
    if options.optim not in EIGHT_BIT_OPTIMIZERS:
        return {}
    fp32 = optimizer_state_bytes(options.model_copy(update={"optim": "adamw_torch"}), shape, adapted)
    return {"optim": fp32 - optimizer_bytes}


def _offload_savings(options: TrainingOptions, shape: ModelShape, *, device: str) -> dict[str, int]:
    """Device bytes --offload_activations frees: all layers' inputs but the one recomputed and the one prefetched."""
    if not offloads_activations(options, device):
        return {}
    kept = min(OFFLOAD_LAYERS_ON_DEVICE, shape.layers) * _tokens(options) * shape.hidden * compute_bytes(options)
    return {"offload_activations": checkpoint_input_bytes(options, shape) - kept}


def _tiled_mlp_savings(
    options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer], *, device: str, chunked_loss: bool,
    offload: bool, activations: int,
) -> dict[str, int]:
    """What --tiled_mlp saves: the activations with the MLP run whole minus with it tiled (none for short inputs)."""
    if mlp_tile_tokens(options, shape) is None:
        return {}
    whole = options.model_copy(update={"tiled_mlp": False})
    untiled = activation_bytes(whole, shape, adapted, device=device, checkpointing=bool(options.gradient_checkpointing),
                               chunked_loss=chunked_loss, offload=offload)
    return {"tiled_mlp": max(untiled - activations, 0)}


def chunked_loss_planned(options: TrainingOptions, config: PretrainedConfig) -> bool:
    """Whether the trainer will use the chunked loss: asked for, a plain head, no DeepSpeed, lm_head not adapted."""
    adapted_head = options.use_lora and "lm_head" in (options.lora_target_modules or [])
    plain_head = config_head_problem(config) is None
    return options.chunked_loss and options.deepspeed is None and not adapted_head and plain_head


def techniques_in_use(options: TrainingOptions, *, chunked_loss: bool) -> list[str]:
    """The memory techniques these options use, by their flags' names."""
    switches = {
        "use_lora": options.use_lora, "use_8bit": bool(options.use_8bit), "use_4bit": options.use_4bit,
        "gradient_checkpointing": bool(options.gradient_checkpointing), "chunked_loss": chunked_loss,
        "fp16": options.fp16, "bf16": options.bf16, "device_map": options.device_map is not None,
        "offload_activations": options.offload_activations and bool(options.gradient_checkpointing),
        "offload_embeddings": options.offload_embeddings, "tiled_mlp": options.tiled_mlp,
    }
    used = [name for name, on in switches.items() if on] + ([options.optim] if options.optim != "adamw_torch" else [])
    return used + ([f"deepspeed_{options.deepspeed}"] if options.deepspeed else [])


def _chunked_loss_savings(
    options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer], *, device: str
) -> dict[str, int]:
    """What the chunked loss saves: the plan's activations with the plain loss minus with the chunked one."""
    checkpointing = bool(options.gradient_checkpointing)
    plain = activation_bytes(options, shape, adapted, device=device, checkpointing=checkpointing)
    chunked = activation_bytes(options, shape, adapted, device=device, checkpointing=checkpointing, chunked_loss=True)
    return {"chunked_loss": plain - chunked}


def optimizer_state_bytes(options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer]) -> int:
    """AdamW's two states per trainable parameter: fp32 (8 bytes), or bitsandbytes' 8-bit ones (2 bytes).

    The 8-bit optimizers quantize in blocks of 256 with an fp32 scale per block and state, plus a 256-entry
    fp32 code per state and tensor; tensors under 4096 elements (norms, biases, small adapters) stay fp32.
    """
    if options.use_lora:
        sizes = [size for layer in adapted for size in (options.lora_r * layer.in_features,
                                                          options.lora_r * layer.out_features)]
    else:
        sizes = list(shape.parameter_sizes) or [shape.n_parameters]
    if options.optim not in EIGHT_BIT_OPTIMIZERS:
        return 8 * sum(sizes)
    return sum(_eight_bit_state_bytes(size) for size in sizes)


def _eight_bit_state_bytes(size: int) -> int:
    if size < BNB_MIN_8BIT_SIZE:
        return 8 * size
    return 2 * (size + 4 * math.ceil(size / BNB_BLOCK) + 4 * 256)


def compute_bytes(options: TrainingOptions) -> int:
    """Bytes per element of the compute dtype: 2 with --fp16/--bf16, else 4 (fp32)."""
    return 2 if options.fp16 or options.bf16 else 4


def weight_bytes(options: TrainingOptions, shape: ModelShape) -> int:
    """The base model's weights at their bit width (adapters not included)."""
    quantizable = shape.quantizable_parameters
    rest = shape.n_parameters - quantizable
    if options.use_4bit or options.use_8bit:
        # what is not quantized (embeddings, norms, lm_head) is fp32, or bf16 under --bf16 (modeling.py)
        return quantized_bytes(shape, bits=4 if options.use_4bit else 8) + kbit_stream_bytes(options) * rest
    if options.use_lora:
        return compute_bytes(options) * shape.n_parameters  # frozen base, loaded in the compute dtype
    autocast_copies = 2 * quantizable if compute_bytes(options) == 2 else 0  # half copies of linear weights
    return 4 * shape.n_parameters + autocast_copies  # fp32 master weights


def kbit_stream_bytes(options: TrainingOptions) -> int:
    """Bytes per element of a k-bit model's unquantized weights and residual stream: bf16 under --bf16, else
    fp32 (prepare_model_for_kbit_training casts embeddings, norms and lm_head up; modeling._prepare_for_training)."""
    return 2 if options.bf16 else 4


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
    chunked_loss: bool = False,
    offload: bool = False,
) -> int:
    """Peak activation memory for one micro-batch, with or without gradient checkpointing (and its offload)."""
    element = compute_bytes(options)
    tokens = _tokens(options)
    layer = _layer_activation_bytes(options, shape, adapted, device=device, tokens=tokens)
    outside_layers = tokens * shape.hidden * (element + 4 * 2)  # embedding output, final norm input and output
    outside_layers += packed_mask_bytes(options, device=device)
    loss = loss_bytes(options, shape, tokens=tokens, chunked_loss=chunked_loss)
    working = _backward_working_bytes(options, shape, device=device, tokens=tokens)
    if checkpointing:
        # each layer's input stays; 8-bit checkpoints reentrantly (modeling.py), so its matmuls' inputs go too
        # (with offload only the layer being recomputed and the next one, already fetched, are on the device)
        kept = min(OFFLOAD_LAYERS_ON_DEVICE, shape.layers) if offload else shape.layers
        layer_inputs = kept * tokens * shape.hidden * element
        return layer_inputs + outside_layers + max(loss, layer + working)
    return shape.layers * layer + outside_layers + max(loss, working)


def loss_bytes(options: TrainingOptions, shape: ModelShape, *, tokens: int, chunked_loss: bool) -> int:
    """The loss's working set: one slice of the logits with the chunked loss, else the whole logits and copies."""
    element = compute_bytes(options)
    if chunked_loss:
        return chunked_loss_bytes(tokens, shape.vocab, shape.hidden, element_bytes=element)
    # Measured as live tensors (tests/training/test_memory_measured.py, 32,000-token head): fp32 and bf16 alike
    # peak at three fp32 copies of the logits (the shifted copy, the log-softmax and its gradient), not five.
    return tokens * shape.vocab * WHOLE_LOGITS_BYTES_PER_LOGIT


def _layer_activation_bytes(
    options: TrainingOptions, shape: ModelShape, adapted: list[LinearLayer], *, device: str, tokens: int
) -> int:
    element = compute_bytes(options)
    trained = not options.use_lora  # frozen linears do not keep their inputs
    h = shape.hidden
    mask = element if device == "cpu" else 1  # dropout keeps a float mask on the CPU, a byte mask on CUDA
    norm_fp32 = (2 if shape.rms_norm and trained else 1) * 4  # norms run in fp32; RMSNorm keeps its normalized x
    per_token = 2 * norm_fp32 * h
    per_token += element * (h + 2 * shape.kv_dim + h)  # q, k, v and the attention output
    per_token += element * 2 * h if trained else 0  # inputs of the qkv and MLP projections
    if shape.residual_dropout > 0:
        per_token += 2 * mask * h
    # the 8-bit matmuls keep their inputs; the attention output (o_proj's input) is counted above already
    per_token += max(_int8_kept_input_bytes(options, shape) - kbit_stream_bytes(options) * h, 0)
    # LoRA casts its input to the adapter's fp32 before dropout: a float mask is fp32 whatever the compute dtype;
    # lora_A keeps the dropout output (under autocast, its half copy), or the input without dropout
    lora_mask = ADAPTER_BYTES if device == "cpu" else 1
    kept = (lora_mask + element) if options.lora_dropout > 0 else element
    per_layer = max(shape.layers, 1)

    def lora_inputs(in_mlp: bool) -> int:  # per token and layer, the adapters inside the MLP or outside it
        return sum(kept * layer.in_features + element * options.lora_r
                   for layer in adapted if _in_mlp(layer) == in_mlp) // per_layer

    per_token += lora_inputs(in_mlp=False)
    mlp = _mlp_bytes_per_token(options, shape) + lora_inputs(in_mlp=True)
    tile = mlp_tile_tokens(options, shape)
    if tile is None:
        per_token += mlp
        mlp_tile = 0
    else:  # the MLP keeps only its input; one tile's tensors live while it is recomputed in the backward
        per_token += element * h
        mlp_tile = options.per_device_train_batch_size * tile * mlp
    scores = options.per_device_train_batch_size * shape.heads * options.seq_length**2
    return tokens * per_token + mlp_tile + scores * _score_bytes(options, shape, device=device)


def _in_mlp(layer: LinearLayer) -> bool:
    return ".mlp." in layer.name


def _mlp_bytes_per_token(options: TrainingOptions, shape: ModelShape) -> int:
    """What one layer's MLP keeps per token for its backward (its LoRA adapters' inputs not included)."""
    element, i = compute_bytes(options), shape.intermediate
    trained = not options.use_lora
    if shape.gated_mlp:
        return element * (3 * i + (i if trained else 0))  # gate, act(gate), up; their product feeds down
    extra = _PYTHON_GELUS.get(shape.activation, 0)
    return element * (1 + extra + (1 if trained else 0)) * i


def mlp_tile_tokens(options: TrainingOptions, shape: ModelShape) -> int | None:
    """Tokens per tile of one sequence under --tiled_mlp, or None where the MLP runs whole (off, or one tile)."""
    if not options.tiled_mlp:
        return None
    tile = tile_tokens_for(shape.hidden)
    return tile if options.seq_length > tile else None


def _int8_kept_input_bytes(options: TrainingOptions, shape: ModelShape) -> int:
    """Bytes per token of the inputs one layer's 8-bit matmuls keep for the backward (0 unless --use_8bit).

    bitsandbytes' MatMul8bitLt (CUDA) and MatMul8bitFp (CPU) keep the input A on the autograd context even
    when the weight is frozen (reentrant checkpointing drops the context; the non-reentrant kind could not);
    q/k/v read one tensor, as do gate/up. The stream is fp32 in a k-bit model (prepare_model_for_kbit_training
    casts the embeddings and norms to fp32, unless --bf16). 4-bit matmuls keep no input.
    """
    if not options.use_8bit:
        return 0
    return kbit_stream_bytes(options) * shape.quantized_inputs_per_layer


def _tokens(options: TrainingOptions) -> int:
    return options.per_device_train_batch_size * options.seq_length


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


def packs_with_flash_attention(options: TrainingOptions, device: str) -> bool:
    """Whether packed rows run flash-attention 2's varlen kernel (no mask): as modeling._attention_implementation."""
    half = options.bf16 or options.fp16 or options.use_4bit or bool(options.use_8bit)
    return options.packing and half and device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None


def packed_mask_bytes(options: TrainingOptions, *, device: str) -> int:
    """--packing through SDPA: transformers' block-diagonal mask (bool, batch x T x T, one for all layers) and the
    additive copy of it in the compute dtype; none with flash-attention's varlen kernel."""
    if not options.packing or packs_with_flash_attention(options, device):
        return 0
    return options.per_device_train_batch_size * options.seq_length**2 * (1 + compute_bytes(options))


def _backward_working_bytes(options: TrainingOptions, shape: ModelShape, *, device: str, tokens: int) -> int:
    """What one layer's backward allocates on top of its saved activations.

    The gradient arriving at the layer and the widest one inside it (the MLP's), a score-sized gradient
    where attention is materialized, and for k-bit weights the largest weight bitsandbytes dequantizes to
    fp32 for the input gradient. Measured as live tensors (benchmarks/live_tensors.py), this is all that
    coexists with the layer's activations: the rest is freed as fast as the backward makes it.
    """
    element = compute_bytes(options)
    tile = mlp_tile_tokens(options, shape)
    intermediate_tokens = tokens if tile is None else options.per_device_train_batch_size * tile
    gradients = element * (tokens * shape.hidden + intermediate_tokens * shape.intermediate)
    if _materialized_attention(shape, device=device):
        gradients += options.per_device_train_batch_size * shape.heads * options.seq_length**2 * element
    elif packed_mask_bytes(options, device=device) and device == "cpu":
        # the CPU's SDPA backward with a mask keeps fp32 scores of every head of one layer
        gradients += options.per_device_train_batch_size * shape.heads * options.seq_length**2 * 4
    if options.use_8bit or options.use_4bit:
        weights = [layer.in_features * layer.out_features for layer in shape.linears if layer.quantizable]
        gradients += kbit_stream_bytes(options) * max(weights, default=0)
    return max(gradients, _peft_cpu_cast_bytes(options, shape, device=device, tokens=tokens,
                                               intermediate_tokens=intermediate_tokens))


def _peft_cpu_cast_bytes(
    options: TrainingOptions, shape: ModelShape, *, device: str, tokens: int, intermediate_tokens: int
) -> int:
    """The forward's (or the recompute's) widest moment on the CPU under k-bit LoRA in half precision.

    peft's bitsandbytes LoRA layers cast their input to the adapters' fp32 unless `torch.is_autocast_enabled()`,
    which reads CUDA's autocast only: on the CPU the MLP's product (down_proj's input) then lives in the compute
    dtype and in fp32 at once on top of the layer's saved tensors, with the gradient arriving at the layer
    (measured at the Llama-3.1-8B layer shape, 4,096 tokens: benchmarks/layer_plan_accuracy.py).
    """
    if device != "cpu" or not options.use_lora or not (options.use_4bit or options.use_8bit):
        return 0
    element = compute_bytes(options)
    if element == 4:
        return 0  # fp32 compute: the cast is a no-op
    return element * tokens * shape.hidden + (element + 4) * intermediate_tokens * shape.intermediate


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

