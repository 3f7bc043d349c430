"""merge_adapter: the merged model answers as base + adapter (unmerged) does, and saves a loadable, hashed folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.training.merge import EXPORT_MANIFEST, file_digest, merge_adapter
from backend.training.tiny_models import make_tiny_model

ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="module", params=ARCHS)
def base_and_adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny base and a LoRA adapter on all its linear layers with random (non-zero) B, so merging changes it."""
    root = tmp_path_factory.mktemp(f"merge-{request.param}")
    base = make_tiny_model(root / f"tiny-{request.param}", arch=request.param)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return base, adapter


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids() -> torch.Tensor:
    return torch.arange(1, 25).reshape(2, 12) * 7 % 500


def test_merged_logits_equal_base_plus_adapter(base_and_adapter: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = base_and_adapter
    manifest = merge_adapter(base, adapter, tmp_path / "merged", "float32")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = _ids()
    expected = _logits(unmerged, ids)
    assert (_logits(merged, ids) - expected).abs().max().item() < 1e-4
    assert (_logits(plain, ids) - expected).abs().max().item() > 1e-2  # the adapter does change the answer
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert manifest["base_model"] == base.name and manifest["dtype"] == "float32"


def test_a_16_bit_merge_saves_16_bit_shards_that_load_and_match(base_and_adapter: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    manifest = merge_adapter(base, adapter, out, "bfloat16", max_shard_size="100KB",
                             extra_manifest={"job_id": "ftjob-x"})

    shards = sorted(path.name for path in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.bfloat16}
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    ids = _ids()
    expected = _logits(unmerged, ids)
    # bf16 keeps 8 bits of mantissa: the merged weights are the fp32 sums rounded, so logits agree to that.
    assert (_logits(merged.eval(), ids) - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("The quick brown fox").input_ids == AutoTokenizer.from_pretrained(base)(
        "The quick brown fox").input_ids

    on_disk = json.loads((out / EXPORT_MANIFEST).read_text())
    assert on_disk == manifest and manifest["job_id"] == "ftjob-x" and manifest["dtype"] == "bfloat16"
    listed = set(manifest["files"])
    assert listed == {path.name for path in out.iterdir() if path.name != EXPORT_MANIFEST}
    assert {*shards, "config.json", "tokenizer.json"} <= listed
    for name, entry in manifest["files"].items():
        assert file_digest(out / name) == (entry["sha256"], entry["bytes"])


def test_an_unknown_dtype_is_refused_before_anything_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32"):
        merge_adapter(tmp_path / "no-base", tmp_path / "no-adapter", tmp_path / "out", "int8")
