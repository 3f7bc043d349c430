"""Preference lines as a DPO trainer takes them: one shared prompt, chosen and rejected completions labelled."""

from __future__ import annotations

import json
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from backend.training.datasets import IGNORE_INDEX
from backend.training.preference_data import PreferenceExample, tokenize_preferences
from backend.training.tiny_models import EOS, build_tokenizer
from tests.training.test_dataset_validation import CALL, PREFERENCE_LINE, USER, WEATHER_TOOL

PLAIN_LINE = {
    "input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Weather?"}]},
    "preferred_output": [{"role": "assistant", "content": "Sunny and warm."}],
    "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


def decoded(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    return str(tokenizer.decode(ids))


def test_the_prompt_is_the_input_and_each_completion_its_output(tokenizer: PreTrainedTokenizerBase) -> None:
    [example] = tokenize_preferences([PLAIN_LINE], tokenizer, max_seq_length=512)
    # The input's own assistant turn is part of the prompt, rendered as the template renders a conversation.
    assert decoded(example.prompt_ids, tokenizer) == tokenizer.apply_chat_template(
        PLAIN_LINE["input"]["messages"], tokenize=False, add_generation_prompt=True)
    assert decoded(example.chosen_ids, tokenizer) == f"Sunny and warm.{EOS}\n"
    assert decoded(example.rejected_ids, tokenizer) == f"No idea.{EOS}\n"
    assert example.chosen_labels == example.chosen_ids and example.rejected_labels == example.rejected_ids


def test_sequences_mask_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    [example] = tokenize_preferences([PLAIN_LINE], tokenizer, max_seq_length=512)
    for side, completion in (("chosen", example.chosen_ids), ("rejected", example.rejected_ids)):
        ids, labels = example.sequence(side)
        assert ids == example.prompt_ids + completion
        assert labels == [IGNORE_INDEX] * len(example.prompt_ids) + completion


def test_tools_reach_the_prompt_and_calls_are_trained(tokenizer: PreTrainedTokenizerBase) -> None:
    calling = {**PREFERENCE_LINE, "preferred_output": [{"role": "assistant", "tool_calls": [CALL]}]}
    [example] = tokenize_preferences([calling], tokenizer, max_seq_length=512)
    assert decoded(example.prompt_ids, tokenizer).startswith(f"<|system|>\nTools:\n{json.dumps([WEATHER_TOOL])}")
    assert json.loads(decoded(example.chosen_ids, tokenizer).removesuffix(f"{EOS}\n")) == {
        "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert decoded(example.rejected_ids, tokenizer) == f"I don't know.{EOS}\n"


def test_long_lines_keep_the_prompts_end_and_the_completions_start(tokenizer: PreTrainedTokenizerBase) -> None:
    long_line: dict[str, Any] = {**PLAIN_LINE, "input": {"messages": [{**USER, "content": "word " * 200}]}}
    [full] = tokenize_preferences([long_line], tokenizer, max_seq_length=4096)
    [cut] = tokenize_preferences([long_line], tokenizer, max_seq_length=64)
    assert cut.prompt_ids == full.prompt_ids[-(64 - len(full.chosen_ids)):]
    assert cut.chosen_ids == full.chosen_ids and cut.rejected_ids == full.rejected_ids
    assert all(len(cut.sequence(side)[0]) <= 64 for side in ("chosen", "rejected"))
    [tight] = tokenize_preferences([long_line], tokenizer, max_seq_length=8)
    assert len(tight.prompt_ids) == 4 and tight.chosen_ids == full.chosen_ids[:4]


def test_the_shared_prompt_stops_where_the_sides_differ() -> None:
    example = PreferenceExample([1, 2], [3], [3], [4], [4])
    assert example.sequence("chosen") == ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3])
    plain = build_tokenizer()
    plain.chat_template = None  # the plain fallback: the output begins right after the assistant header
    [line] = tokenize_preferences([PLAIN_LINE], plain, max_seq_length=512)
    assert decoded(line.prompt_ids, plain).endswith("<|user|>\nWeather?\n<|assistant|>\n")
    assert decoded(line.chosen_ids, plain) == f"Sunny and warm.\n{EOS}"


def test_supervised_tokenization_refuses_preference_lines(tokenizer: PreTrainedTokenizerBase) -> None:
    from backend.training.datasets import DatasetError, tokenize_examples

    with pytest.raises(DatasetError, match='^example 1: preference lines train with method "dpo"'):
        tokenize_examples([PLAIN_LINE], "preference", tokenizer, max_seq_length=64)
