"""The engine in-process on tiny models: one base per bit width, the adapter LRU, and prompts rendered as trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from backend.config import Settings
from backend.inference.engine import AdapterSpec, Engine, Sink
from backend.inference.protocol import GenerationRequest, Limits, Sampling, parse_request
from backend.inference.rendering import chat_prompt, completion_prompt, prompt_ids
from backend.services.errors import InvalidRequest
from backend.training.datasets import render_segments
from backend.training.tiny_models import build_tokenizer, make_tiny_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 3:"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}
# A tool conversation as an OpenAI client sends it: a call (no content), the tool's answer, then the model's turn.
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
]


class Collected(Sink):
    def __init__(self) -> None:
        self.text = ""
        self.reasons: list[str] = []
        self.tokens = 0
        self.prompt_tokens = 0

    def start(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens

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


@pytest.mark.parametrize("templated", [True, False], ids=["template-with-tools", "fallback"])
def test_a_chat_prompt_with_tools_is_what_tool_training_renders_before_the_answer(templated: bool) -> None:
    from tests.training.test_chat_tools import TOOLS_TEMPLATE

    tokenizer = build_tokenizer()
    if templated:
        tokenizer.chat_template = TOOLS_TEMPLATE
    answer_text = "It is clear in Paris."
    line = {"tools": [WEATHER], "messages": [*TOOL_CHAT, {"role": "assistant", "content": answer_text}]}
    trained = "".join(piece for piece, _ in render_segments(line, "chat_tools", tokenizer))
    request = parse_request({"model": "m", "messages": TOOL_CHAT, "tools": [WEATHER], "tool_choice": "auto"},
                            kind="chat", limits=Limits(max_tokens=8, max_n=1))

    prompt = chat_prompt(request.messages or [], tokenizer, request.tools)

    assert trained.startswith(prompt + answer_text) and prompt.endswith("<|assistant|>\n")
    tools_shown = "<|tools|>\n" if templated else "<|system|>\nTools:\n"  # the template's own, or the fallback
    assert prompt.startswith(tools_shown + json.dumps([WEATHER]))
    call = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' if templated else
            '{"tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]}')
    assert call in prompt


def test_the_engine_prompts_a_tools_request_with_the_tools_rendering(engine: Engine) -> None:
    tokenizer = build_tokenizer()  # the tiny base's own (built the same way)
    sampling = Sampling(max_tokens=2, temperature=0)
    with_tools, without = Collected(), Collected()
    for sink, tools in ((with_tools, [WEATHER]), (without, None)):
        engine.generate(GenerationRequest(kind="chat", model="tiny-gpt2", messages=TOOL_CHAT, prompt=None,
                                          sampling=sampling, tools=tools), sink)

    rendered = chat_prompt(TOOL_CHAT, tokenizer, [WEATHER])
    assert "Tools:\n" + json.dumps([WEATHER]) in rendered  # the tiny template has no tools support: the fallback
    assert with_tools.prompt_tokens == len(prompt_ids(rendered, tokenizer))
    assert without.prompt_tokens == len(prompt_ids(chat_prompt(TOOL_CHAT, tokenizer), tokenizer))
    assert with_tools.prompt_tokens > without.prompt_tokens and with_tools.reasons == ["length"]
