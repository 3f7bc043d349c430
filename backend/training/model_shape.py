"""A model's shape from its config alone: parameters, linear layers and dimensions, counted on the meta device.

The memory estimate (memory_estimate.py) and the plan (memory.py) read everything they need about a model
from a `ModelShape`; nothing here loads weights or downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from backend.training.modeling import default_lora_targets
from backend.training.options import TrainingOptions

_GATED_NAMES = ("gate_proj", "gate_up_proj", "w1", "w3")
# Sibling projections that read the same tensor (one input kept, not three)
_SHARED_INPUT_NAMES = (
    frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value"}),
    frozenset({"gate_proj", "up_proj", "w1", "w3"}),
)


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
    # Elements of each parameter tensor (tied ones once): bitsandbytes' 8-bit optimizers keep small ones in fp32.
    parameter_sizes: tuple[int, ...] = ()
    input_embedding_parameters: int = 0
    tied_embeddings: bool = False  # lm_head is the input embedding matrix itself

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
        parameter_sizes=tuple(parameter.numel() for parameter in model.parameters()),
        input_embedding_parameters=model.get_input_embeddings().weight.numel(),
        tied_embeddings=_tied_embeddings(model),
    )


def _tied_embeddings(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()  # type: ignore[operator]
    return head is not None and head.weight is model.get_input_embeddings().weight  # type: ignore[operator]


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

