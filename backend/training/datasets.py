"""Training datasets: each example rendered into text pieces, tokenized with its labels, packed and collated.

The files themselves (formats, the validator, `load_examples`) are in dataset_validation.py; their names are
importable from here too. Nothing here imports torch or transformers at import time: they load only when a
tokenizer is used or a batch is collated, so the API can import this module cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.training import chat_tools
from backend.training.conversations import CHAT_ROLES
from backend.training.dataset_validation import (
    DATASET_FORMATS,
    DEFAULT_MAX_LINE_BYTES,
    DatasetError,
    DatasetFormat,
    DatasetSummary,
    DatasetValidator,
    classify_record,
    load_examples,
    validate_file,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "BUILTIN_DATASET", "CHAT_ROLES", "DATASET_FORMATS",
    "DEFAULT_MAX_LINE_BYTES", "IGNORE_INDEX", "DatasetError", "DatasetFormat", "DatasetSummary", "DatasetValidator",
    "Segments", "TokenizedExample", "classify_record", "collate", "load_examples", "pack_examples", "render_segments",
    "token_length_stats", "tokenize_examples", "tokenize_segments", "validate_file",
]

BUILTIN_DATASET: Path = Path(__file__).with_name("builtin_dataset.jsonl")
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# ---------------------------------------------------------------------------------------------------------
# Rendering: each example becomes text pieces, each marked trainable or not

# A piece's part in the loss: True a target (completions, assistant turns), False the prompt (trained unless
# train_on_completions_only), CONTEXT never trained (an assistant turn of weight 0: context, not a target).
CONTEXT = None
Segments = list[tuple[str, bool | None]]


def render_segments(example: dict[str, Any], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Text pieces of one example and whether each is trained on (completions, assistant turns), eos last."""
    if fmt in ("chat", "chat_tools"):
        segments = _chat_segments(example, tokenizer)
    elif fmt == "preference":
        raise DatasetError(None, 'preference lines train with method "dpo" (see preference_data.py), not as text')
    elif fmt == "prompt_completion":
        segments = _bos_segments(tokenizer) + [(example["prompt"], False), (example["completion"], True)]
    elif fmt == "instruction":
        template = ALPACA_PROMPT_WITH_INPUT if example.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=example["instruction"], input=example.get("input", ""))
        segments = _bos_segments(tokenizer) + [(prompt, False), (example["output"], True)]
    elif fmt == "text":
        segments = _bos_segments(tokenizer) + [(example["text"], True)]
    else:
        raise ValueError(f"unknown dataset format {fmt!r}: choose one of {', '.join(DATASET_FORMATS)}")
    return _with_eos([piece for piece in segments if piece[0]], tokenizer)


def _with_eos(segments: Segments, tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Append eos (trained like the piece before it) unless the example already ends with it."""
    eos = tokenizer.eos_token
    if not eos or not segments or "".join(text for text, _ in segments).rstrip().endswith(eos):
        return segments
    return [*segments, (eos, segments[-1][1])]


def _bos_segments(tokenizer: PreTrainedTokenizerBase) -> Segments:
    """A leading bos piece for tokenizers that add one by default (Llama, Mistral); chat templates add their own."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or not tokenizer.bos_token:
        return []
    with_specials = tokenizer("a")["input_ids"]
    adds_bos = bool(with_specials) and with_specials[0] == bos_id
    return [(tokenizer.bos_token, False)] if adds_bos else []


def _chat_segments(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Segments:
    """A conversation through the tokenizer's template (with its tools support), or the plain fallbacks."""
    messages, tools = chat_tools.conversation(example["messages"], example.get("tools"), example.get("functions"))
    template = bool(getattr(tokenizer, "chat_template", None))
    if chat_tools.uses_tools(messages, tools):
        native = template and chat_tools.renders_tools(
            _apply_template(tokenizer, messages, generation_prompt=False, tools=tools), messages, tools
        )
        if not native:  # the template would drop the tools and calls: render them as plain messages
            messages, tools = chat_tools.plain_messages(messages, tools), None
    if template:
        return _chat_template_segments(messages, tokenizer, tools)
    return _bos_segments(tokenizer) + _fallback_chat_segments(messages)


def _target(message: dict[str, Any]) -> bool | None:
    """An assistant turn's part in the loss: a target, or CONTEXT where its weight is 0."""
    return CONTEXT if message.get("weight") == 0 else True


def _fallback_chat_segments(messages: list[dict[str, Any]]) -> Segments:
    """The plain template for tokenizers without one: `<|role|>\\ncontent\\n` per message."""
    segments: Segments = []
    for message in messages:
        header = f"<|{message['role']}|>\n"
        if message["role"] == "assistant":
            segments += [(header, False), (message["content"] + "\n", _target(message))]
        else:
            segments.append((header + message["content"] + "\n", False))
    return segments


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    shown = [{key: value for key, value in message.items() if key != "weight"} for message in messages]
    schemas: Any = tools  # JSON schemas; transformers' annotation (a list of dicts or callables) is invariant
    try:
        rendered = tokenizer.apply_chat_template(
            shown, tools=schemas, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate") from the model's template
        raise DatasetError(None, f"the model's chat template refused this conversation: {exc}") from None
    return str(rendered)


def _chat_template_segments(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> Segments:
    """Render through the tokenizer's template; assistant turns are told apart by rendering prefixes."""
    full = _apply_template(tokenizer, messages, generation_prompt=False, tools=tools)
    segments: Segments = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:  # templates refuse an empty conversation, so there is no prefix to render
            return _search_segments(full, messages, tokenizer)
        head = _apply_template(tokenizer, messages[:index], generation_prompt=True, tools=tools)
        turn = _apply_template(tokenizer, messages[: index + 1], generation_prompt=False, tools=tools)
        if not (head.startswith(done) and turn.startswith(head) and full.startswith(turn)):
            # This template rewrites earlier turns (e.g. drops reasoning): find the answers in the full text.
            return _search_segments(full, messages, tokenizer)
        segments += [(head[len(done) :], False), (turn[len(head) :], _target(message))]
        done = turn
    segments.append((full[len(done) :], False))
    return segments


def _search_segments(full: str, messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> Segments:
    """Mark each assistant content (and an eos right after it) as trained, found in order in the rendered text."""
    segments: Segments = []
    cursor = searched = 0  # text up to `cursor` is in segments; the messages so far were found before `searched`
    eos = tokenizer.eos_token or ""
    for message in messages:
        if message["role"] != "assistant":
            content = message.get("content") or ""
            at = full.find(content, searched) if content else -1
            searched = at + len(content) if at >= 0 else searched  # past it, so a call is not found in a tool list
            continue
        span = _assistant_span(full, message, searched, eos)
        if span is None:
            continue
        found, end = span
        if eos and full.startswith(eos, end):
            end += len(eos)
        segments += [(full[cursor:found], False), (full[found:end], _target(message))]
        cursor = searched = end
    segments.append((full[cursor:], False))
    return segments


def _assistant_span(full: str, message: dict[str, Any], cursor: int, eos: str) -> tuple[int, int] | None:
    """Where an assistant turn's content, then its calls, lie in the rendered text after `cursor`.

    A template's call syntax is its own: each call is found by its function's name, and the last one's
    arguments run to the turn's end (the next eos), the best a search can do without knowing the syntax.
    """
    content = message.get("content") or ""
    names = [call["function"]["name"] for call in message.get("tool_calls", [])]
    anchor = content or (names[0] if names else "")
    found = full.find(anchor, cursor) if anchor else -1
    if found < 0:
        return None
    end = found + len(anchor)
    for name in names if content else names[1:]:
        at = full.find(name, end)
        end = at + len(name) if at >= 0 else end
    turn_end = full.find(eos, end) if names and eos else -1
    return found, turn_end if turn_end >= 0 else end


# ---------------------------------------------------------------------------------------------------------
# Tokenization, packing and batches


@dataclass
class TokenizedExample:
    """Token ids and labels (IGNORE_INDEX where the loss is not taken) of one example or packed block.

    A packed block also has position ids, restarting at 0 at each example it holds: the model's attention mask
    is then block-diagonal (transformers builds it from them), so no example attends to another.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def tokenize_segments(
    segments: Segments, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[bool | None]]:
    """Token ids of the joined text and, for each token, the part in the loss of the piece it falls in."""
    text = "".join(piece for piece, _ in segments)
    if not tokenizer.is_fast:  # no offsets: tokenize piece by piece
        ids: list[int] = []
        trained: list[bool | None] = []
        for piece, is_trained in segments:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            trained += [is_trained] * len(piece_ids)
        return ids, trained
    # One pass over the whole text tokenizes exactly as inference will; offsets map tokens back to pieces.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    char_trained = [is_trained for piece, is_trained in segments for _ in piece]
    trained = [_token_trained(start, end, char_trained) for start, end in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), trained


def _token_trained(start: int, end: int, char_trained: list[bool | None]) -> bool | None:
    """A token is trained when any of its characters is (a token may straddle the prompt/answer boundary);
    else it is CONTEXT when any of them is, the prompt otherwise."""
    if end <= start:  # trimmed or zero-width offsets: go by the position
        return char_trained[start] if start < len(char_trained) else False
    parts = char_trained[start:end]
    return True if True in parts else CONTEXT if CONTEXT in parts else False


def tokenize_examples(
    examples: Iterable[dict[str, Any]],
    fmt: DatasetFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    train_on_completions_only: bool = False,
    packing: bool = False,
) -> list[TokenizedExample]:
    """Tokenize for causal-LM training: truncate to max_seq_length, then (packing) fill blocks of that length.

    With train_on_completions_only, prompt/user/system tokens get IGNORE_INDEX labels. Examples left with no
    trained token (a prompt longer than max_seq_length) are dropped: they would give no loss.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
    tokenized = [
        _labelled(ids, trained, train_on_completions_only)
        for ids, trained in _encoded(examples, fmt, tokenizer)
    ]
    truncated = (TokenizedExample(t.input_ids[:max_seq_length], t.labels[:max_seq_length]) for t in tokenized)
    kept = [example for example in truncated if _has_target(example)]
    return pack_examples(kept, max_seq_length) if packing else kept


def _encoded(
    examples: Iterable[dict[str, Any]], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase
) -> Iterable[tuple[list[int], list[bool | None]]]:
    for number, example in enumerate(examples, start=1):
        try:
            segments = render_segments(example, fmt, tokenizer)
        except DatasetError as exc:
            raise DatasetError(None, f"example {number}: {exc.reason}") from None
        yield tokenize_segments(segments, tokenizer)


def _labelled(ids: list[int], trained: list[bool | None], completions_only: bool) -> TokenizedExample:
    """Targets are always trained, the prompt unless completions_only, CONTEXT (weight-0 turns) never."""
    if not completions_only and CONTEXT not in trained:
        return TokenizedExample(ids, list(ids))
    keep = [part is True or (part is False and not completions_only) for part in trained]
    return TokenizedExample(ids, [tok if kept else IGNORE_INDEX for tok, kept in zip(ids, keep, strict=True)])


def _has_target(example: TokenizedExample) -> bool:
    # Label 0 is never predicted (the model shifts labels by one), so a block needs a trained token after it.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def pack_examples(examples: list[TokenizedExample], block: int) -> list[TokenizedExample]:
    """Whole examples, in order, into blocks of at most `block` tokens (an example never spans two blocks).

    Each example's first label is IGNORE_INDEX in its block: the token before it is the previous example's
    last, and predicting across that boundary is a target no unpacked example has.
    """
    blocks: list[TokenizedExample] = []
    current = TokenizedExample([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > block:
            blocks.append(current)
            current = TokenizedExample([], [], [])
        current.input_ids += example.input_ids
        current.labels += [IGNORE_INDEX, *example.labels[1:]]
        current.position_ids = [*(current.position_ids or []), *range(len(example.input_ids))]
    if current.input_ids:
        blocks.append(current)
    return blocks


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels (IGNORE_INDEX on padding) tensors.

    Packed blocks add position_ids; the padding after a block counts from 0 as a sequence of its own, so it
    stays out of every example's attention.
    """
    import torch  # here, not at the top: the API validates uploads without loading torch

    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    packed = any(example.position_ids is not None for example in batch)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
        positions = example.position_ids if example.position_ids is not None else list(range(length))
        position_ids[row, :length] = torch.tensor(positions, dtype=torch.long)
        position_ids[row, length:] = torch.arange(width - length)
    batch_tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch_tensors["position_ids"] = position_ids
    return batch_tensors


def token_length_stats(
    examples: Iterable[dict[str, Any]], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> dict[str, int | float]:
    """Token counts before truncation: n_examples, max_tokens, mean_tokens, total_tokens, n_truncated."""
    lengths = [len(ids) for ids, _ in _encoded(examples, fmt, tokenizer)]
    return {
        "n_examples": len(lengths),
        "max_tokens": max(lengths, default=0),
        "mean_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
        "total_tokens": sum(lengths),
        "n_truncated": sum(length > max_seq_length for length in lengths),
    }
