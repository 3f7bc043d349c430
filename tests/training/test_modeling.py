"""Model loading: where weights come from, what is refused, and what each training setup loads."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from backend.training.modeling import (
    ModelSourceError,
    assert_no_remote_code,
    assert_safetensors_only,
    check_precision_supported,
    default_lora_targets,
    linear_leaf_names,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_source,
    weight_files_sha256,
)
from backend.training.options import TrainingOptions
from backend.training.tiny_models import make_tiny_model

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modeling-models")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ("gpt2", "llama")}


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# --- where the weights come from ---------------------------------------------------------------------


def test_folder_in_working_directory_wins(tiny_models, tmp_path, monkeypatch):
    _copy_model(tiny_models["gpt2"], tmp_path / "acme" / "tiny")
    monkeypatch.chdir(tmp_path)
    # "acme/tiny" is also a valid Hub id: the folder of that name must win, as in transformers.
    assert resolve_model_source("acme/tiny") == str((tmp_path / "acme" / "tiny").resolve())


def test_hub_id_resolves_from_local_cache_only(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123abcd"
    _copy_model(tiny_models["gpt2"], snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")

    assert Path(resolve_model_source("acme/tiny", cache_dir=tmp_path / "hub")) == snapshot
    with pytest.raises(ModelSourceError, match=r"'acme/absent'.*not in the local Hugging Face cache"):
        resolve_model_source("acme/absent", cache_dir=tmp_path / "hub")


@pytest.mark.parametrize("url", ["https://huggingface.co/gpt2", "http://example.com/m", "hf://acme/tiny"])
def test_urls_are_refused(url):
    with pytest.raises(ModelSourceError, match="is a URL"):
        resolve_model_source(url)


def test_missing_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match=r"'\./nowhere' does not exist"):
        resolve_model_source("./nowhere")


# --- what is refused ---------------------------------------------------------------------------------


def test_pickle_only_folder_is_refused_before_loading(tiny_models, tmp_path):
    folder = _copy_model(tiny_models["gpt2"], tmp_path / "pickled")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model.bin\)"):
        assert_safetensors_only(folder)
    with pytest.raises(ModelSourceError, match="safetensors only"):
        load_model_and_tokenizer(TrainingOptions(model=str(folder)))


def test_pickle_file_beside_safetensors_is_never_read(tiny_models, tmp_path):
    folder = _copy_model(tiny_models["gpt2"], tmp_path / "both")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle: reading this file would fail")
    model, _ = load_model_and_tokenizer(TrainingOptions(model=str(folder)))
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, reference.transformer.h[0].attn.c_attn.weight)


def test_auto_map_is_refused_without_trust_remote_code(tiny_models, tmp_path):
    folder = _copy_model(tiny_models["gpt2"], tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    with pytest.raises(ModelSourceError, match=r"auto_map.*--trust_remote_code"):
        load_model_and_tokenizer(TrainingOptions(model=str(folder)))
    assert not marker.exists()
    assert_no_remote_code(folder, trust_remote_code=True)  # allowed once the user says so


def test_precision_is_checked_before_anything_loads():
    # The model does not exist: on a CPU machine the --fp16 refusal must come first; on a GPU it passes
    # the precision check and fails only on the missing folder.
    expected = (ModelSourceError, "does not exist") if torch.cuda.is_available() else (ValueError, "--fp16 needs")
    with pytest.raises(expected[0], match=expected[1]):
        load_model_and_tokenizer(TrainingOptions(model="./no-such-model", fp16=True))


def test_bf16_on_cpu_follows_torch_support():
    notes = check_precision_supported(TrainingOptions(bf16=True))
    assert isinstance(notes, list)
    assert check_precision_supported(TrainingOptions()) == []


def test_tokenizer_gets_a_pad_token(tiny_models, tmp_path):
    folder = _copy_model(tiny_models["gpt2"], tmp_path / "nopad")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_device_map_auto_with_max_memory_loads_8bit(tiny_models):
    options = TrainingOptions(
        model=str(tiny_models["gpt2"]), use_lora=True, use_8bit=True, device_map="auto", max_memory="cpu=2GiB"
    )
    model, _ = load_model_and_tokenizer(options)
    layer = model.get_base_model().transformer.h[0].mlp.c_fc.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt)


def test_weight_hashes_are_sha256_of_each_file(tiny_models):
    expected = hashlib.sha256((tiny_models["llama"] / "model.safetensors").read_bytes()).hexdigest()
    assert weight_files_sha256(tiny_models["llama"]) == {"model.safetensors": expected}


# --- LoRA targets per architecture --------------------------------------------------------------------

_TOY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32), GPT2_TARGETS),
        (transformers.LlamaConfig(**_TOY, num_key_value_heads=1), LLAMA_TARGETS),
        (transformers.MistralConfig(**_TOY, num_key_value_heads=1), LLAMA_TARGETS),
        (transformers.Qwen2Config(**_TOY, num_key_value_heads=1), LLAMA_TARGETS),
        (transformers.GPTNeoXConfig(**_TOY), ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        (
            transformers.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=64,
                word_embed_proj_dim=32,
            ),
            ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        ),
        # Not in the table: the generic fallback finds the Conv1D/Linear leaves itself.
        (
            transformers.GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32),
            ["c_attn", "c_proj", "c_fc"],
        ),
    ],
    ids=["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "gpt_bigcode-fallback"],
)
def test_default_lora_targets(config, expected):
    model = AutoModelForCausalLM.from_config(config)
    assert default_lora_targets(model) == expected
    # the output head and embeddings are never adapted
    assert not {"lm_head", "embed_out", "wte", "embed_tokens"} & set(linear_leaf_names(model))


# --- what each training setup loads -------------------------------------------------------------------

MODES = {
    "full": {},
    "lora": {"use_lora": True},
    "lora-8bit": {"use_lora": True, "use_8bit": True},
    "lora-4bit": {"use_lora": True, "use_4bit": True},
}


def _expected_lora_params(model: torch.nn.Module, targets: list[str], rank: int) -> int:
    """r * (in + out) for every adapted layer, read from the base model's own shapes."""
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "base_layer"):
            base = module.base_layer
            if isinstance(base, transformers.pytorch_utils.Conv1D):
                fan_in, fan_out = base.weight.shape
            else:
                fan_in, fan_out = base.in_features, base.out_features
            total += rank * (fan_in + fan_out)
    return total


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_load_for_training(tiny_models, arch, mode, checkpointing):
    options = TrainingOptions(
        model=str(tiny_models[arch]),
        gradient_checkpointing=checkpointing,
        lora_r=4,
        lora_dropout=0.0,
        **MODES[mode],
    )
    model, tokenizer = load_model_and_tokenizer(options)
    base = model.get_base_model() if options.use_lora else model
    targets = GPT2_TARGETS if arch == "gpt2" else LLAMA_TARGETS

    assert tokenizer.pad_token is not None
    assert base.config.use_cache is False
    assert base.is_activation_checkpointing is checkpointing
    layer = base.transformer.h[0].attn.c_attn if arch == "gpt2" else base.model.layers[0].self_attn.q_proj
    if options.use_8bit:
        assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt)
    if options.use_4bit:
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.base_layer.weight.quant_type == "nf4"
        assert layer.base_layer.weight.quant_state.nested  # double quantization

    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if options.use_lora:
        assert model.peft_config["default"].target_modules == set(targets)
        # set from the layers (GPT-2's Conv1D, unless quantized into Linear), so peft need not correct it
        conv1d = isinstance(layer.base_layer, transformers.pytorch_utils.Conv1D)
        assert model.peft_config["default"].fan_in_fan_out is conv1d
        assert all("lora_" in name for name in trainable)
        count = sum(param.numel() for param in model.parameters() if param.requires_grad)
        assert count == _expected_lora_params(model, targets, rank=4) > 0
    else:
        assert trainable == {name for name, _ in model.named_parameters()}

    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    assert with_grad == trainable  # gradients reach exactly the trainable parameters, frozen ones get none
    if options.use_lora:
        # lora_B starts at zero, so it is the half whose gradient must be non-zero on the first step
        assert all(param.grad.abs().sum() > 0 for name, param in model.named_parameters() if "lora_B" in name)


def _lora_gradients(folder: Path, mode: str, *, checkpointing: bool) -> dict[str, torch.Tensor]:
    options = TrainingOptions(model=str(folder), gradient_checkpointing=checkpointing, lora_r=4, lora_dropout=0.0,
                              **MODES[mode])
    torch.manual_seed(0)
    model, _tokenizer = load_model_and_tokenizer(options)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # zero at first, which would make every lora_A gradient zero too
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    ids = torch.randint(1, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("mode", [mode for mode in MODES if MODES[mode].get("use_lora")])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointing_changes_no_gradient(tiny_models, arch, mode):
    """8-bit checkpoints reentrantly (its matmuls' saved inputs are out of the other kind's reach); every mode
    must still give each adapter exactly the gradient it gets without checkpointing."""
    plain = _lora_gradients(tiny_models[arch], mode, checkpointing=False)
    checkpointed = _lora_gradients(tiny_models[arch], mode, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and plain
    for name, gradient in plain.items():
        assert checkpointed[name] is not None, f"{name} got no gradient under checkpointing"
        assert torch.allclose(checkpointed[name], gradient, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("bits", ["use_4bit", "use_8bit"])
def test_bf16_kbit_model_keeps_its_unquantized_weights_in_bf16(tiny_models, bits):
    """Under --bf16 the embeddings, norms and lm_head stay bfloat16 (peft's prepare_model_for_kbit_training would
    make them float32: twice the memory); without it they are float32 as before. Only the adapters train."""
    half = TrainingOptions(model=str(tiny_models["llama"]), use_lora=True, bf16=True, gradient_checkpointing=True,
                           lora_dropout=0.0, **{bits: True})
    model, tokenizer = load_model_and_tokenizer(half)
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert {name for name, param in model.named_parameters() if param.requires_grad} == {
        name for name, _ in model.named_parameters() if "lora_" in name
    }
    ids = torch.randint(1, len(tokenizer), (2, 12))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(param.grad is not None for name, param in model.named_parameters() if "lora_B" in name)

    full, _ = load_model_and_tokenizer(half.model_copy(update={"bf16": False}))
    assert full.get_base_model().model.embed_tokens.weight.dtype == torch.float32
