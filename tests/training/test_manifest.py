"""The output folder: adapter or full model files, safetrain.json, and the base folder left untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from backend.training.manifest import (
    MANIFEST_FILENAME,
    read_manifest,
    save_adapter,
    write_manifest,
)
from backend.training.modeling import load_model_and_tokenizer, portable_model_name, weight_files_sha256
from backend.training.options import TrainingOptions
from backend.training.tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("manifest-models") / "gpt2", arch="gpt2")


def _train_a_few_steps(model: torch.nn.Module, vocab: int, steps: int = 3) -> None:
    """Real optimizer steps, so a LoRA adapter moves away from its zero-initialised B matrices."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, vocab, (2, 16))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_output_is_the_adapter_only_and_it_loads(base_folder, tmp_path):
    hashes_before = weight_files_sha256(base_folder)
    options = TrainingOptions(model=str(base_folder), use_lora=True, lora_r=4, gradient_checkpointing=True)
    model, tokenizer = load_model_and_tokenizer(options)
    _train_a_few_steps(model, len(tokenizer))

    output = save_adapter(model, tokenizer, tmp_path / "run")

    names = {path.name for path in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {"model.safetensors", "README.md"}
    assert not any(name.startswith(".saving-") for name in names)  # the staging folder is gone
    assert weight_files_sha256(base_folder) == hashes_before

    ids = torch.randint(0, len(tokenizer), (1, 10))
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, output)
    adapted_logits = _logits(adapted, ids)
    assert not torch.allclose(adapted_logits, base_logits)  # the adapter changes the output
    assert torch.allclose(adapted_logits, _logits(model, ids), atol=1e-5)  # ...exactly as trained


def test_4bit_adapter_saves_and_loads_on_the_unquantized_base(base_folder, tmp_path):
    options = TrainingOptions(model=str(base_folder), use_lora=True, use_4bit=True, lora_r=4)
    model, tokenizer = load_model_and_tokenizer(options)
    _train_a_few_steps(model, len(tokenizer))

    output = save_adapter(model, tokenizer, tmp_path / "run4")

    assert not (output / "model.safetensors").exists()
    ids = torch.randint(0, len(tokenizer), (1, 10))
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    base_logits = _logits(base, ids)
    assert not torch.allclose(_logits(PeftModel.from_pretrained(base, output), ids), base_logits)


def test_full_fine_tune_saves_a_loadable_full_model(base_folder, tmp_path):
    hashes_before = weight_files_sha256(base_folder)
    model, tokenizer = load_model_and_tokenizer(TrainingOptions(model=str(base_folder)))
    _train_a_few_steps(model, len(tokenizer), steps=1)

    output = save_adapter(model, tokenizer, tmp_path / "full")

    assert (output / "model.safetensors").is_file()
    assert not (output / "adapter_config.json").exists()
    assert weight_files_sha256(base_folder) == hashes_before
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.config.use_cache is True  # turned off for training, back on for the saved model
    assert model.config.use_cache is False  # ...without changing the live model's training setting
    ids = torch.randint(0, len(tokenizer), (1, 10))
    assert torch.allclose(_logits(reloaded, ids), _logits(model, ids), atol=1e-5)
    assert not torch.allclose(_logits(reloaded, ids), _logits(AutoModelForCausalLM.from_pretrained(base_folder), ids))


@pytest.mark.parametrize("inside", ["", "runs/x"], ids=["the-base-folder", "inside-it"])
def test_saving_into_the_base_folder_is_refused(base_folder, inside):
    hashes_before = weight_files_sha256(base_folder)
    files_before = sorted(path.name for path in base_folder.iterdir())
    model, tokenizer = load_model_and_tokenizer(TrainingOptions(model=str(base_folder), use_lora=True))

    with pytest.raises(ValueError, match="inside the base model folder"):
        save_adapter(model, tokenizer, base_folder / inside)
    assert weight_files_sha256(base_folder) == hashes_before
    assert sorted(path.name for path in base_folder.iterdir()) == files_before


def test_explicit_base_folder_is_refused_too(base_folder, tmp_path):
    model, tokenizer = load_model_and_tokenizer(TrainingOptions(model=str(base_folder), use_lora=True))
    with pytest.raises(ValueError, match="inside the base model folder"):
        save_adapter(model, tokenizer, tmp_path / "base" / "out", base_folder=tmp_path / "base")


def test_manifest_has_the_fields(base_folder, tmp_path):
    options = TrainingOptions(model=str(base_folder), use_lora=True, lora_r=4)
    hashes = weight_files_sha256(base_folder)

    path = write_manifest(
        tmp_path / "run",
        base_model=options.model,
        base_weight_sha256=hashes,
        options=options,
        metrics={"train_loss": 1.25, "eval_loss": math.nan, "steps": 3},
        extra={"adapter_dir": str(tmp_path / "run")},
    )

    assert path == tmp_path / "run" / MANIFEST_FILENAME
    manifest = json.loads(path.read_text())  # strict JSON: a NaN metric was written as null
    assert manifest == read_manifest(tmp_path / "run")
    assert manifest["base_model"] == str(base_folder)
    assert manifest["base_weight_sha256"] == hashes and len(hashes["model.safetensors"]) == 64
    assert manifest["options"] == options.model_dump(mode="json")
    assert TrainingOptions(**manifest["options"]) == options  # the options round-trip
    assert manifest["metrics"] == {"train_loss": 1.25, "eval_loss": None, "steps": 3}
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "python"}
    assert manifest["created_at"].endswith("+00:00")
    assert manifest["adapter_dir"] == str(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [MANIFEST_FILENAME]  # no temporary left behind


def test_manifest_rewrite_replaces_whole_file_and_extra_cannot_clobber(tmp_path):
    common = {"base_model": "m", "base_weight_sha256": {}, "options": TrainingOptions()}
    write_manifest(tmp_path, metrics={"train_loss": 2.0}, **common)
    write_manifest(tmp_path, metrics={"train_loss": 1.0}, **common)
    assert read_manifest(tmp_path)["metrics"] == {"train_loss": 1.0}
    with pytest.raises(ValueError, match="would overwrite metrics"):
        write_manifest(tmp_path, metrics={}, extra={"metrics": {}}, **common)
    with pytest.raises(FileNotFoundError, match="not a safetrain output folder"):
        read_manifest(tmp_path / "elsewhere")


def test_adapter_config_names_the_base_by_name_and_still_loads(base_folder, tmp_path):
    options = TrainingOptions(model=str(base_folder), use_lora=True, lora_r=4)
    model, tokenizer = load_model_and_tokenizer(options)
    _train_a_few_steps(model, len(tokenizer))

    output = save_adapter(model, tokenizer, tmp_path / "run", base_folder=base_folder)

    text = (output / "adapter_config.json").read_text()
    assert json.loads(text)["base_model_name_or_path"] == base_folder.name  # "gpt2", the models folder's name
    assert str(base_folder) not in text and str(tmp_path) not in text and '"/' not in text
    assert model.peft_config["default"].base_model_name_or_path == str(base_folder)  # the live model is untouched
    ids = torch.randint(0, len(tokenizer), (1, 10))
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, output)  # a base found elsewhere, here by its folder
    assert not torch.allclose(_logits(adapted, ids), base_logits)
    assert torch.allclose(_logits(adapted, ids), _logits(model, ids), atol=1e-5)


def test_an_explicit_base_model_name_is_written_as_given(base_folder, tmp_path):
    options = TrainingOptions(model=str(base_folder), use_lora=True, lora_r=4)
    model, tokenizer = load_model_and_tokenizer(options)

    output = save_adapter(model, tokenizer, tmp_path / "run", base_model_name="openai-community/gpt2")

    written = json.loads((output / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "openai-community/gpt2"


@pytest.mark.parametrize(("model", "name"), [
    ("openai-community/gpt2", "openai-community/gpt2"),
    ("/srv/models/tiny-llama", "tiny-llama"),
    ("/srv/models/tiny-llama/", "tiny-llama"),
    ("/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abcd", "Qwen/Qwen2.5-0.5B"),
])
def test_portable_model_name(model, name):
    assert portable_model_name(model) == name
