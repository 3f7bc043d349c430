"""The engine in-process on tiny models: one base per bit width, the adapter LRU, and prompts rendered as trained."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from backend.config import Settings
from backend.inference.engine import AdapterSpec, Engine, Sink
from backend.inference.protocol import GenerationRequest, Sampling
from backend.inference.rendering import chat_prompt, completion_prompt
from backend.services.errors import InvalidRequest
from backend.training.datasets import render_segments
from backend.training.tiny_models import build_tokenizer, make_tiny_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 3:"}]


class Collected(Sink):
    def __init__(self) -> None:
        self.text = ""
        self.reasons: list[str] = []
        self.tokens = 0

    def delta(self, index: int, text: str) -> None:
        self.text += text

    def finish(self, index: int, reason: str, completion_tokens: int) -> None:
        self.reasons.append(reason)
        self.tokens += completion_tokens


def random_adapter(base: Path, folder: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    tmp = tmp_path_factory.mktemp("engine")
    base = make_tiny_model(tmp / "models" / "tiny-gpt2")
    settings = Settings(models_dir=tmp / "models", data_dir=tmp / "data", inference_adapter_cache=1)
    running = Engine(settings, device="cpu")
    for name, seed in (("a", 1), ("b", 2)):
        folder = random_adapter(base, tmp / "data" / name, seed)
        running.register(AdapterSpec(name=name, path=folder, base_model="tiny-gpt2"))
    running.register(AdapterSpec(name="a-4bit", path=tmp / "data" / "a", base_model="tiny-gpt2", quantization="4bit"))
    outside = random_adapter(base, tmp / "elsewhere", 3)
    with pytest.raises(InvalidRequest, match="under the data directory"):
        running.register(AdapterSpec(name="outside", path=outside, base_model="tiny-gpt2"))
    return running


def answer(engine: Engine, model: str) -> Collected:
    sink = Collected()
    request = GenerationRequest(kind="completion", model=model, messages=None, prompt="Count from 3:",
                                sampling=Sampling(max_tokens=8, temperature=0))
    engine.generate(request, sink)
    return sink


def test_adapters_are_kept_in_an_lru_on_one_base(engine: Engine) -> None:
    first_a = answer(engine, "a").text
    first_b = answer(engine, "b").text
    assert engine.loaded_adapters() == ["b"], "a cache of one keeps the adapter used last"
    assert answer(engine, "a").text == first_a != first_b, "an evicted adapter loads again and answers the same"
    base = answer(engine, "tiny-gpt2")
    assert base.text not in (first_a, first_b) and base.reasons == ["length"] and base.tokens == 8
    assert len(engine.bases) == 1, "the base is loaded once for the base and both adapters"


def test_the_base_loads_at_the_bit_width_the_job_trained_with(engine: Engine) -> None:
    answer(engine, "a-4bit")
    quantized = [loaded for (name, bits, _), loaded in engine.bases.items() if bits == "4bit"]
    assert len(quantized) == 1 and quantized[0].model.is_quantized
    assert "Linear4bit" in type(quantized[0].model.transformer.h[0].attn.c_attn.base_layer).__name__


@pytest.mark.parametrize("templated", [True, False], ids=["chat-template", "fallback"])
def test_a_chat_prompt_is_what_training_renders_before_the_answer(templated: bool) -> None:
    tokenizer = build_tokenizer()
    if not templated:
        tokenizer.chat_template = None
    answer_text = "4 5 6"
    trained = "".join(piece for piece, _ in render_segments(
        {"messages": [*CHAT, {"role": "assistant", "content": answer_text}]}, "chat", tokenizer))
    prompt = chat_prompt(CHAT, tokenizer)
    assert trained.startswith(prompt + answer_text) and prompt.endswith("<|assistant|>\n")
    assert completion_prompt("Count from 3:", tokenizer) == "Count from 3:"
