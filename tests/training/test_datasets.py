"""The dataset layer: validation (whole files and streamed chunks), rendering, tokenization, packing, batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from backend.training.datasets import (
    BUILTIN_DATASET,
    IGNORE_INDEX,
    DatasetError,
    DatasetFormat,
    DatasetSummary,
    DatasetValidator,
    TokenizedExample,
    collate,
    load_examples,
    render_segments,
    token_length_stats,
    tokenize_examples,
    tokenize_segments,
    validate_file,
)
from backend.training.tiny_models import EOS, build_tokenizer, tiny_config

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye now"},
    ]
}
PROMPT_COMPLETION = {"prompt": "Q: What is 2 plus 3?\nA:", "completion": " 5."}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
INSTRUCTION = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
SAMPLES: dict[DatasetFormat, list[dict[str, Any]]] = {
    "chat": [CHAT, {"messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]}],
    "prompt_completion": [PROMPT_COMPLETION, {"prompt": "Q: Say cat twice.\nA:", "completion": " cat cat."}],
    "text": [TEXT, {"text": "def add(a, b):\n    return a + b\n"}],
    "instruction": [INSTRUCTION, {"instruction": "Name the capital of France.", "output": "Paris"}],
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


def jsonl(records: list[Any]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def feed_in_chunks(data: bytes, size: int, *, max_line_bytes: int = 1_000_000) -> DatasetSummary:
    validator = DatasetValidator(max_line_bytes=max_line_bytes)
    for start in range(0, len(data), size):
        validator.feed(data[start : start + size])
    return validator.finish()


def trained_text(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> str:
    return str(tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX]))


# ---------------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_each_format_validates_loads_and_tokenizes(
    fmt: DatasetFormat, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(SAMPLES[fmt]))
    assert validate_file(path) == DatasetSummary(format=fmt, n_examples=2)
    loaded_fmt, examples = load_examples(path)
    assert (loaded_fmt, examples) == (fmt, SAMPLES[fmt])
    tokenized = tokenize_examples(examples, fmt, tokenizer, max_seq_length=512)
    assert len(tokenized) == 2
    for example in tokenized:
        assert example.labels == example.input_ids
        assert str(tokenizer.decode(example.input_ids)).rstrip().endswith(EOS)


def test_instruction_renders_the_alpaca_template(tokenizer: PreTrainedTokenizerBase) -> None:
    with_input = "".join(text for text, _ in render_segments(INSTRUCTION, "instruction", tokenizer))
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5" + EOS in with_input
    without_input = "".join(text for text, _ in render_segments(SAMPLES["instruction"][1], "instruction", tokenizer))
    assert "### Input:" not in without_input
    assert without_input.endswith("### Response:\nParis" + EOS)


def test_blank_lines_bom_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl([TEXT]).replace(b"\n", b"\r\n") + b"\n  \n" + json.dumps(TEXT).encode())
    assert validate_file(path) == DatasetSummary(format="text", n_examples=2)


def test_the_builtin_dataset_validates() -> None:
    assert BUILTIN_DATASET.name == "builtin_dataset.jsonl" and BUILTIN_DATASET.is_file()
    summary = validate_file(BUILTIN_DATASET)
    assert summary.format == "prompt_completion"
    assert 40 <= summary.n_examples <= 80


def test_the_validator_does_not_import_torch() -> None:
    code = "import sys, backend.training.datasets; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------------------
# Streaming: any chunk boundaries give the whole-file answer


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_chunked_feeding_matches_the_whole_file(size: int, tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + jsonl(SAMPLES["chat"] * 3).replace(b"\n", b"\r\n", 2) + b"\n\n" + jsonl([CHAT])
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    assert feed_in_chunks(data, size) == validate_file(path) == DatasetSummary(format="chat", n_examples=7)


@pytest.mark.parametrize("size", [1, 5, 1 << 20])
def test_chunked_feeding_reports_the_same_error(size: int) -> None:
    data = jsonl([TEXT, TEXT]) + b"\n" + b'{"text": "caf\xc3\xa9"}\n' + b'{"text": "\xff"}\n' + jsonl([TEXT])
    with pytest.raises(DatasetError) as caught:
        feed_in_chunks(data, size)
    assert (caught.value.line, str(caught.value)) == (5, "Line 5: not valid UTF-8 (byte 11 of the line)")


# ---------------------------------------------------------------------------------------------------------
# Errors: the line and the fault


def chat_line(*messages: Any) -> dict[str, Any]:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}

ERROR_CASES: dict[str, tuple[bytes, int | None, str]] = {
    "bad json": (jsonl([TEXT]) + b'{"text": "a"\n', 2, "invalid JSON: Expecting ',' delimiter at column 13"),
    "not an object": (jsonl([TEXT] * 6) + b'["a", "b"]\n', 7, "expected a JSON object"),
    "unknown shape": (b'{"question": "a", "answer": "b"}\n', 1, 'unknown shape: expected keys "messages", '
                      '"prompt"+"completion", "instruction"+"output" or "text" (found "question", "answer")'),
    "missing key": (jsonl([PROMPT_COMPLETION, {"prompt": "a"}]), 2, 'missing key "completion"'),
    "missing output": (jsonl([{"instruction": "a", "input": "b"}]), 1, 'missing key "output"'),
    "text not a string": (jsonl([{"text": 5}]), 1, '"text" must be a string, not a number'),
    "input not a string": (jsonl([{"instruction": "a", "input": None, "output": "b"}]), 1,
                           '"input" must be a string, not null'),
    "content not a string": (jsonl([chat_line(USER, {"role": "assistant", "content": ["x"]})]), 1,
                             'message 2 "content" must be a string, not a list'),
    "long unknown role": (jsonl([chat_line({"role": "x" * 100, "content": "a"}, ASSISTANT)]), 1,
                          'unknown role "' + "x" * 36 + "..."),
    "message without role": (jsonl([CHAT, CHAT, chat_line(USER, {"content": "x"})]), 3, 'message 2 has no "role"'),
    "message without content": (jsonl([chat_line(USER, {"role": "assistant"})]), 1, 'message 2 has no "content"'),
    "message not an object": (jsonl([chat_line("hello", ASSISTANT)]), 1, "message 1 is not a JSON object"),
    "unknown role": (jsonl([CHAT] * 8) + jsonl([chat_line(USER, {"role": "bot", "content": "x"})]), 9,
                     'unknown role "bot"'),
    "no assistant turn": (jsonl([chat_line(USER, USER)]), 1,
                          "no assistant message (a conversation needs at least one to train on)"),
    "empty messages": (jsonl([chat_line()]), 1, '"messages" is empty'),
    "messages not a list": (jsonl([{"messages": "hi"}]), 1, '"messages" must be a list, not a string'),
    "not utf-8": (b'{"text": "\xe9t\xe9"}\n', 1, "not valid UTF-8 (byte 11 of the line)"),
    "utf-16": (("\ufeff" + json.dumps(TEXT) + "\n").encode("utf-16-le"), 1, "not valid UTF-8 (byte 1 of the line)"),
    "empty file": (b"", None, "the file is empty"),
    "only blank lines": (b"\n  \n\r\n", None, "the file is empty"),
    "mixed formats": (jsonl([CHAT, CHAT, TEXT]), 3,
                      'this line is "text" but the file is "chat" (from line 1); one file holds one format'),
    "mixed after blank lines": (b"\n\n" + jsonl([TEXT, PROMPT_COMPLETION]), 4,
                                'this line is "prompt_completion" but the file is "text" (from line 3); '
                                "one file holds one format"),
    "over-long line": (jsonl([TEXT, {"text": "x" * 500}]), 2, "the line is longer than 400 bytes"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_a_bad_file_names_the_line_and_the_fault(case: str, tmp_path: Path) -> None:
    data, line, reason = ERROR_CASES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        validate_file(path, max_line_bytes=400)
    assert (caught.value.line, caught.value.reason) == (line, reason)
    assert str(caught.value) == (f"Line {line}: {reason}" if line is not None else reason)
    with pytest.raises(DatasetError) as streamed:
        feed_in_chunks(data, 3, max_line_bytes=400)
    assert str(streamed.value) == str(caught.value)


def test_the_api_examples_read_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(ERROR_CASES["message without role"][0])
    with pytest.raises(DatasetError, match='^Line 3: message 2 has no "role"$'):
        validate_file(path)
    path.write_bytes(ERROR_CASES["unknown role"][0])
    with pytest.raises(DatasetError, match='^Line 9: unknown role "bot"$'):
        validate_file(path)
    path.write_bytes(ERROR_CASES["not an object"][0])
    with pytest.raises(DatasetError, match="^Line 7: expected a JSON object$"):
        validate_file(path)


def test_an_over_long_line_is_refused_before_its_newline_arrives() -> None:
    validator = DatasetValidator(max_line_bytes=100)
    validator.feed(jsonl([TEXT]) + b'{"text": "')
    validator.feed(b"x" * 80)
    with pytest.raises(DatasetError, match="^Line 2: the line is longer than 100 bytes$"):
        validator.feed(b"x" * 20)  # 110 bytes so far, no newline yet


def test_a_line_exactly_at_the_limit_passes_with_crlf_and_bom() -> None:
    line = json.dumps({"text": "x" * 20}).encode()
    data = b"\xef\xbb\xbf" + line + b"\r\n" + line + b"\r\n" + line
    assert feed_in_chunks(data, 1, max_line_bytes=len(line)).n_examples == 3
    with pytest.raises(DatasetError, match="^Line 1: the line is longer than"):
        feed_in_chunks(data, 1, max_line_bytes=len(line) - 1)


# ---------------------------------------------------------------------------------------------------------
# The fast path (orjson, plain shapes) answers exactly as json + classify_record (load_examples' path)

BIG = 123456789012345678901234567890  # past 64 bits: orjson reads it as a float, json as this int
DEEP = "[" * 1000 + "]" * 1000  # json's recursion limit refuses it; orjson alone would go to 1024
FAST_PATH_CASES: dict[str, tuple[bytes, DatasetSummary | str]] = {
    "NaN in an extra key": (jsonl([TEXT]) + b'{"text": "a", "score": NaN}\n', DatasetSummary("text", 2)),
    "a lone surrogate escape": (b'{"text": "\\ud800"}\n', DatasetSummary("text", 1)),
    "a big integer in an extra key": (jsonl([TEXT, {"text": "a", "n": BIG}]), DatasetSummary("text", 2)),
    "a big integer as a role": (jsonl([CHAT, chat_line({"role": BIG, "content": "a"}, ASSISTANT)]),
                                f"Line 2: unknown role {BIG}"),
    "an infinite number as the text": (b'{"text": 1e999}\n', 'Line 1: "text" must be a string, not a number'),
    "nested past json's limit": (jsonl([TEXT]) + f'{{"text": "a", "x": {DEEP}}}\n'.encode(),
                                 "Line 2: invalid JSON: nested too deeply"),
    "nested past json's limit in a message": (
        jsonl([CHAT]) + f'{{"messages": [{{"role": "assistant", "content": "a", "x": {DEEP}}}]}}\n'.encode(),
        "Line 2: invalid JSON: nested too deeply",
    ),
    "nested within the limit": (f'{{"text": "a", "x": {"[" * 200 + "]" * 200}}}\n'.encode(),
                                DatasetSummary("text", 1)),
    "a line of unicode whitespace": (jsonl([TEXT]) + "\u3000\x1c\n".encode() + jsonl([TEXT]),
                                     DatasetSummary("text", 2)),
    "a BOM on a later line": (jsonl([TEXT]) + b"\xef\xbb\xbf" + jsonl([TEXT]),
                              "Line 2: invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1"),
    "a role that is not a string": (jsonl([CHAT, chat_line({"role": ["user"], "content": "a"}, ASSISTANT)]),
                                    'Line 2: unknown role ["user"]'),
    "prompt and completion beside messages": (jsonl([CHAT, {**CHAT, "prompt": 5}]), DatasetSummary("chat", 2)),
    "an instruction with a null input": (jsonl([INSTRUCTION, {"instruction": "a", "input": None, "output": "b"}]),
                                         'Line 2: "input" must be a string, not null'),
}


def outcome(check: Any) -> DatasetSummary | str:
    try:
        return check()  # type: ignore[no-any-return]
    except DatasetError as exc:
        return str(exc)


@pytest.mark.parametrize("case", list(FAST_PATH_CASES))
def test_the_fast_path_agrees_with_json(case: str, tmp_path: Path) -> None:
    data, expected = FAST_PATH_CASES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    through_json = outcome(lambda: summary_of(*load_examples(path)))
    assert outcome(lambda: validate_file(path)) == outcome(lambda: feed_in_chunks(data, 7)) == through_json == expected


def summary_of(fmt: DatasetFormat, examples: list[dict[str, Any]]) -> DatasetSummary:
    return DatasetSummary(fmt, len(examples))


def test_examples_handed_on_keep_json_values(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl([{"text": "a", "n": BIG}]))
    assert load_examples(path) == ("text", [{"text": "a", "n": BIG}])


def test_many_lines_across_chunks_count_every_example() -> None:
    data = jsonl([CHAT, CHAT, CHAT] * 5000) + b"\n\n" + jsonl([CHAT])
    assert feed_in_chunks(data, 4093) == DatasetSummary(format="chat", n_examples=15001)
    with pytest.raises(DatasetError) as caught:
        feed_in_chunks(data + jsonl([TEXT]), 4093)
    assert str(caught.value) == (
        'Line 15004: this line is "text" but the file is "chat" (from line 1); one file holds one format'
    )


# ---------------------------------------------------------------------------------------------------------
# Rendering and masking


def test_completions_only_masks_exactly_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    [example] = tokenize_examples(
        [PROMPT_COMPLETION], "prompt_completion", tokenizer, max_seq_length=512, train_on_completions_only=True
    )
    assert trained_text(example, tokenizer) == " 5." + EOS
    masked = [tok for tok, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(masked) == PROMPT_COMPLETION["prompt"]
    assert example.labels == [IGNORE_INDEX] * len(masked) + example.input_ids[len(masked) :]


def test_completions_only_trains_the_alpaca_output(tokenizer: PreTrainedTokenizerBase) -> None:
    [example] = tokenize_examples(
        [INSTRUCTION], "instruction", tokenizer, max_seq_length=512, train_on_completions_only=True
    )
    assert trained_text(example, tokenizer) == "5" + EOS


def test_a_token_across_the_boundary_counts_as_trained(tokenizer: PreTrainedTokenizerBase) -> None:
    # "A: Paris" tokenizes as "A", ":", " Paris": the prompt's last space belongs to the answer's first token.
    [example] = tokenize_examples(
        [{"prompt": "A: ", "completion": "Paris"}], "prompt_completion", tokenizer,
        max_seq_length=512, train_on_completions_only=True,
    )
    assert trained_text(example, tokenizer) == " Paris" + EOS


def test_chat_uses_the_tokenizers_template_and_trains_assistant_turns(tokenizer: PreTrainedTokenizerBase) -> None:
    segments = render_segments(CHAT, "chat", tokenizer)
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    [example] = tokenize_examples([CHAT], "chat", tokenizer, max_seq_length=512, train_on_completions_only=True)
    assert trained_text(example, tokenizer) == f"Hello there{EOS}\nBye now{EOS}\n"
    [full] = tokenize_examples([CHAT], "chat", tokenizer, max_seq_length=512)
    assert full.labels == full.input_ids == example.input_ids


def test_chat_without_a_template_uses_the_plain_fallback() -> None:
    plain = build_tokenizer()
    plain.chat_template = None
    text = "".join(piece for piece, _ in render_segments(CHAT, "chat", plain))
    assert text == (
        f"<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello there\n<|user|>\nBye\n<|assistant|>\nBye now\n{EOS}"
    )
    [example] = tokenize_examples([CHAT], "chat", plain, max_seq_length=512, train_on_completions_only=True)
    assert trained_text(example, plain) == f"Hello there\nBye now\n{EOS}"


def test_a_template_that_rewrites_earlier_turns_falls_back_to_searching() -> None:
    rewriting = build_tokenizer()
    # The last message is rendered differently from earlier ones, so prefixes do not line up.
    rewriting.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if loop.last %} [end]{% endif %}"
        + EOS + "\n{% endfor %}"
    )
    [example] = tokenize_examples([CHAT], "chat", rewriting, max_seq_length=512, train_on_completions_only=True)
    assert trained_text(example, rewriting) == f"Hello there{EOS}Bye now"


def test_a_conversation_opening_with_the_assistant(tokenizer: PreTrainedTokenizerBase) -> None:
    opening = {"messages": [ASSISTANT, USER, {"role": "assistant", "content": "Bye"}]}
    [example] = tokenize_examples([opening], "chat", tokenizer, max_seq_length=512, train_on_completions_only=True)
    assert trained_text(example, tokenizer) == f"Hello{EOS}Bye{EOS}"


def test_a_template_refusing_a_conversation_names_the_example() -> None:
    strict = build_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + strict.chat_template
    )
    assert len(tokenize_examples(SAMPLES["chat"][1:], "chat", strict, max_seq_length=512)) == 1
    with pytest.raises(DatasetError, match="^example 2: the model's chat template refused .*System role not"):
        tokenize_examples(SAMPLES["chat"][::-1], "chat", strict, max_seq_length=512)


def test_a_tokenizer_that_adds_bos_gets_it_once() -> None:
    with_bos = build_tokenizer()
    bos_id = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, bos_id)]
    )
    assert with_bos("a")["input_ids"][0] == bos_id
    [example] = tokenize_examples([TEXT], "text", with_bos, max_seq_length=512)
    assert example.input_ids[0] == bos_id and example.input_ids[1] != bos_id
    assert with_bos.decode(example.input_ids) == EOS + TEXT["text"] + EOS


def test_piecewise_tokenization_for_tokenizers_without_offsets(tokenizer: PreTrainedTokenizerBase) -> None:
    class WithoutOffsets:
        """The fast tokenizer seen as a slow one: it can only encode pieces."""

        is_fast = False

        def __call__(self, text: str, **kwargs: Any) -> Any:
            return tokenizer(text, **kwargs)

    segments = render_segments(PROMPT_COMPLETION, "prompt_completion", tokenizer)
    assert tokenize_segments(segments, WithoutOffsets()) == tokenize_segments(segments, tokenizer)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Truncation, packing, batches, statistics


def test_truncation_and_examples_left_without_targets(tokenizer: PreTrainedTokenizerBase) -> None:
    _, examples = load_examples(BUILTIN_DATASET)
    truncated = tokenize_examples(examples, "prompt_completion", tokenizer, max_seq_length=10)
    assert len(truncated) == len(examples)
    assert all(len(example.input_ids) == 10 for example in truncated)
    # Every prompt is longer than 10 tokens: with completions only, nothing would be trained, so all go.
    assert tokenize_examples(
        examples, "prompt_completion", tokenizer, max_seq_length=10, train_on_completions_only=True
    ) == []


def test_packing_keeps_examples_whole_with_their_labels(tokenizer: PreTrainedTokenizerBase) -> None:
    _, examples = load_examples(BUILTIN_DATASET)
    kept = tokenize_examples(
        examples, "prompt_completion", tokenizer, max_seq_length=128, train_on_completions_only=True
    )
    packed = tokenize_examples(
        examples, "prompt_completion", tokenizer, max_seq_length=128, train_on_completions_only=True, packing=True
    )
    assert all(len(block.input_ids) <= 128 for block in packed) and len(packed) < len(kept)
    # Whole examples in order, each truncated alone; position ids restart at 0 at each one.
    assert [tok for block in packed for tok in block.input_ids] == [tok for ex in kept for tok in ex.input_ids]
    assert [pos for block in packed for pos in block.position_ids or []] == [
        pos for ex in kept for pos in range(len(ex.input_ids))
    ]
    # Labels are the examples' own, except each example's first (it would be predicted across the boundary).
    assert [lab for block in packed for lab in block.labels] == [
        lab for ex in kept for lab in [IGNORE_INDEX, *ex.labels[1:]]
    ]


def test_collate_pads_on_the_right() -> None:
    batch = collate([TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_token_length_stats(tokenizer: PreTrainedTokenizerBase) -> None:
    _, examples = load_examples(BUILTIN_DATASET)
    untruncated = tokenize_examples(examples, "prompt_completion", tokenizer, max_seq_length=512)
    lengths = [len(example.input_ids) for example in untruncated]
    stats = token_length_stats(examples, "prompt_completion", tokenizer, max_seq_length=24)
    assert stats["n_examples"] == len(examples)
    assert stats["max_tokens"] == max(lengths)
    assert stats["total_tokens"] == sum(lengths)
    assert stats["n_truncated"] == sum(length > 24 for length in lengths) > 0


def test_the_builtin_dataset_is_learnable(tokenizer: PreTrainedTokenizerBase) -> None:
    fmt, examples = load_examples(BUILTIN_DATASET)
    data = tokenize_examples(examples, fmt, tokenizer, max_seq_length=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.randperm(len(data)).tolist() * 4
    losses = []
    for step in range(24):
        batch = collate([data[i] for i in order[step * 8 : step * 8 + 8]], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.6 * losses[0], losses


# ---------------------------------------------------------------------------------------------------------
# Message weights: a weight-0 assistant turn is context, never a target

WEIGHTED = chat_line(
    {"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Rainy today", "weight": 0},
    {"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "Sunny", "weight": 1},
)


def weighted_tokenizer(kind: str) -> PreTrainedTokenizerBase:
    """The tiny tokenizer with its template, with none (plain fallback), or one that sends rendering to searching."""
    tokenizer = build_tokenizer()
    if kind == "plain":
        tokenizer.chat_template = None
    elif kind == "searched":
        tokenizer.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if loop.last %} [end]{% endif %}"
            + EOS + "\n{% endfor %}"
        )
    return tokenizer


@pytest.mark.parametrize("completions_only", [False, True])
@pytest.mark.parametrize("kind", ["template", "plain", "searched"])
def test_weight_zero_turns_get_no_labels(kind: str, completions_only: bool) -> None:
    tokenizer = weighted_tokenizer(kind)
    ids, parts = tokenize_segments(render_segments(WEIGHTED, "chat", tokenizer), tokenizer)
    context = [tok for tok, part in zip(ids, parts, strict=True) if part is None]
    assert str(tokenizer.decode(context)).startswith("Rainy today")
    [example] = tokenize_examples([WEIGHTED], "chat", tokenizer, max_seq_length=512,
                                  train_on_completions_only=completions_only)
    assert example.input_ids == ids
    # Every token of the weight-0 turn is IGNORE_INDEX; the weight-1 turn's tokens are all trained.
    assert all(label == IGNORE_INDEX for label, part in zip(example.labels, parts, strict=True) if part is None)
    assert all(label == tok for tok, label, part in zip(ids, example.labels, parts, strict=True) if part is True)
    trained = trained_text(example, tokenizer)
    assert "Rainy" not in trained and "Sunny" in trained
    assert ("And tomorrow?" in trained) is not completions_only  # the prompt is trained unless completions only


def test_weights_leave_the_rendered_text_unchanged(tokenizer: PreTrainedTokenizerBase) -> None:
    unweighted = chat_line(*({k: v for k, v in message.items() if k != "weight"} for message in WEIGHTED["messages"]))
    text = "".join(piece for piece, _ in render_segments(WEIGHTED, "chat", tokenizer))
    assert text == tokenizer.apply_chat_template(unweighted["messages"], tokenize=False)


def test_a_weight_zero_last_turn_leaves_its_eos_untrained() -> None:
    plain = weighted_tokenizer("plain")
    last_context = chat_line(USER, {"role": "assistant", "content": "Sure", "weight": 1}, USER,
                             {"role": "assistant", "content": "Nope", "weight": 0})
    [example] = tokenize_examples([last_context], "chat", plain, max_seq_length=512, train_on_completions_only=True)
    assert trained_text(example, plain) == "Sure\n"


def test_weight_zero_tokens_get_no_gradient(tokenizer: PreTrainedTokenizerBase) -> None:
    ids, parts = tokenize_segments(render_segments(WEIGHTED, "chat", tokenizer), tokenizer)
    [example] = tokenize_examples([WEIGHTED], "chat", tokenizer, max_seq_length=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer)))
    outputs = model(**collate([example], tokenizer.pad_token_id))
    outputs.logits.retain_grad()
    outputs.loss.backward()
    # Token t is predicted from position t - 1: its loss's gradient reaches the logits there, or nowhere.
    gradient_norms = outputs.logits.grad[0].norm(dim=-1)
    context = [t for t in range(1, len(ids)) if parts[t] is None]
    targets = [t for t in range(1, len(ids)) if parts[t] is True]
    assert context and targets
    assert all(gradient_norms[t - 1] == 0 for t in context)
    assert all(gradient_norms[t - 1] > 0 for t in targets)
