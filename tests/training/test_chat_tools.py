"""Tool-use conversations rendered and labelled: the template's own tools support, and the plain fallback."""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from backend.training import chat_tools
from backend.training.datasets import IGNORE_INDEX, TokenizedExample, render_segments, tokenize_examples
from backend.training.tiny_models import EOS, build_tokenizer
from tests.training.test_dataset_validation import CALL, LEGACY_LINE, TOOL_LINE, WEATHER_TOOL

# A template with tools support, as real models' templates have: tools in a header, calls as tagged JSON.
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>\n{{ tools | tojson }}" + EOS + "\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}{% endif %}"
    "{% if m['content'] is defined and m['content'] %}{{ m['content'] }}{% endif %}" + EOS + "\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CALLS_JSON = '{"tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]}'
RESULTS_JSON = '{"tool_results": [{"tool_call_id": "call_1", "content": "{\\"sky\\": \\"clear\\"}"}]}'


def trained_pieces(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The trained stretches of an example, decoded one by one."""
    pieces: list[str] = []
    current: list[int] = []
    for label in [*example.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            pieces.append(str(tokenizer.decode(current)))
            current = []
    return pieces


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


@pytest.fixture
def tools_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def test_a_template_with_tools_support_renders_tools_and_calls(tools_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "".join(piece for piece, _ in render_segments(TOOL_LINE, "chat_tools", tools_tokenizer))
    messages, tools = chat_tools.conversation(TOOL_LINE["messages"], TOOL_LINE["tools"], None)
    assert text == tools_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert text.startswith("<|tools|>\n" + json.dumps([WEATHER_TOOL]))
    [example] = tokenize_examples([TOOL_LINE], "chat_tools", tools_tokenizer, max_seq_length=512,
                                  train_on_completions_only=True)
    # The loss is on the assistant's call and its answer, not on the tools, the question or the tool's result.
    assert trained_pieces(example, tools_tokenizer) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' + EOS + "\n",
        "Sunny." + EOS + "\n",
    ]


def test_legacy_functions_render_as_tools(tools_tokenizer: PreTrainedTokenizerBase) -> None:
    legacy = "".join(piece for piece, _ in render_segments(LEGACY_LINE, "chat_tools", tools_tokenizer))
    modern = "".join(piece for piece, _ in render_segments(TOOL_LINE, "chat_tools", tools_tokenizer))
    assert legacy == modern


def test_a_template_without_tools_support_gets_the_plain_tool_messages(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "".join(piece for piece, _ in render_segments(TOOL_LINE, "chat_tools", tokenizer))
    assert text == (
        f"<|system|>\nTools:\n{json.dumps([WEATHER_TOOL])}{EOS}\n"
        f"<|user|>\nWhat is the weather in Paris?{EOS}\n"
        f"<|assistant|>\n{CALLS_JSON}{EOS}\n"
        f"<|user|>\n{RESULTS_JSON}{EOS}\n"
        f"<|assistant|>\nSunny.{EOS}\n"
    )
    [example] = tokenize_examples([TOOL_LINE], "chat_tools", tokenizer, max_seq_length=512,
                                  train_on_completions_only=True)
    assert trained_pieces(example, tokenizer) == [CALLS_JSON + EOS + "\n", "Sunny." + EOS + "\n"]


def test_a_tokenizer_without_a_template_gets_the_plain_tool_messages() -> None:
    plain = build_tokenizer()
    plain.chat_template = None
    text = "".join(piece for piece, _ in render_segments(TOOL_LINE, "chat_tools", plain))
    assert text == (
        f"<|system|>\nTools:\n{json.dumps([WEATHER_TOOL])}\n<|user|>\nWhat is the weather in Paris?\n"
        f"<|assistant|>\n{CALLS_JSON}\n<|user|>\n{RESULTS_JSON}\n<|assistant|>\nSunny.\n{EOS}"
    )


def test_parallel_calls_and_their_answers_in_the_plain_messages() -> None:
    second = {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_1", "content": "clear"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "assistant", "content": "Clear, then rain.", "weight": 0},
    ]
    normalised, tools = chat_tools.conversation(messages, [WEATHER_TOOL], None)
    plain = chat_tools.plain_messages(normalised, tools)
    assert [message["role"] for message in plain] == ["system", "user", "assistant", "user", "assistant"]
    assert plain[0]["content"] == f"Be brief.\n\nTools:\n{json.dumps([WEATHER_TOOL])}"
    assert json.loads(plain[2]["content"].removeprefix("Checking.\n"))["tool_calls"][1] == {
        "id": "call_2", "name": "get_weather", "arguments": {"city": "Rome"}}
    assert json.loads(plain[3]["content"]) == {"tool_results": [
        {"tool_call_id": "call_1", "content": "clear"}, {"tool_call_id": "call_2", "content": "rain"}]}
    assert plain[4]["weight"] == 0  # weights travel through the rewrite


def test_a_template_rewriting_earlier_turns_finds_the_calls_by_searching() -> None:
    rewriting = build_tokenizer()
    rewriting.chat_template = TOOLS_TEMPLATE.replace("{{ m['content'] }}{% endif %}",
                                                     "{{ m['content'] }}{% endif %}{% if loop.last %} [end]{% endif %}")
    [example] = tokenize_examples([TOOL_LINE], "chat_tools", rewriting, max_seq_length=512,
                                  train_on_completions_only=True)
    assert trained_pieces(example, rewriting) == [
        'get_weather", "arguments": {"city": "Paris"}}</tool_call>' + EOS, "Sunny.",
    ]


@pytest.mark.usefixtures("single_torch_thread")
def test_a_tool_use_file_with_weights_trains(tiny_gpt2: Any, tmp_path: Any, events: Any) -> None:
    from backend.training.options import TrainingOptions
    from backend.training.trainer import run_training
    from tests.training.test_dataset_validation import WEIGHTED_LINE

    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in [TOOL_LINE, LEGACY_LINE, WEIGHTED_LINE] * 4))
    options = TrainingOptions(
        model=str(tiny_gpt2), data=str(data), output_dir=str(tmp_path / "out"), max_steps=3, max_seq_length=256,
        per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-3, use_lora=True, use_8bit=False,
        train_on_completions_only=True,
    )
    result = run_training(options, on_event=events)
    assert result.status == "succeeded", events.warnings()
    losses = [metrics["train_loss"] for metrics in events.metrics()]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
