"""Preference (DPO) lines tokenized for a preference trainer: one prompt, a chosen and a rejected completion.

Each side is rendered as the conversation `input.messages` + its output, through the same chat rendering as
supervised chats (the template with its tools support, or the plain fallbacks: datasets.render_segments).
The input's own assistant turns are context (weight 0), so the trained tokens are exactly the output's. The
prompt is the tokens both sides share before their outputs begin; what follows is each side's completion,
labelled with its ids where it is the output and IGNORE_INDEX elsewhere (a template's text after the turn).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend.training.datasets import IGNORE_INDEX, DatasetError, DatasetFormat, render_segments, tokenize_segments

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PreferenceExample:
    """Token ids of one preference line: the shared prompt, and each completion with its labels."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]

    def sequence(self, side: str) -> tuple[list[int], list[int]]:
        """Input ids and labels of the prompt followed by the `chosen` or `rejected` completion (prompt -100)."""
        ids, labels = (self.chosen_ids, self.chosen_labels) if side == "chosen" else (
            self.rejected_ids, self.rejected_labels)
        return self.prompt_ids + ids, [IGNORE_INDEX] * len(self.prompt_ids) + labels


def _side(record: dict[str, Any], key: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[bool]]:
    """Token ids of the input followed by one output, and which tokens are the output's."""
    source = record["input"]
    history = [{**message, "weight": 0} if message["role"] == "assistant" else message
               for message in source["messages"]]
    example = {"messages": [*history, *record[key]]}
    example.update({name: source[name] for name in ("tools", "functions") if name in source})
    fmt: DatasetFormat = "chat_tools" if any(name in example for name in ("tools", "functions")) else "chat"
    ids, parts = tokenize_segments(render_segments(example, fmt, tokenizer), tokenizer)
    return ids, [part is True for part in parts]


def _shared_prompt(chosen: tuple[list[int], list[bool]], rejected: tuple[list[int], list[bool]]) -> int:
    """How many leading tokens both sides share before either's output begins."""
    limit = min(_first_trained(chosen[1]), _first_trained(rejected[1]))
    shared = 0
    while shared < limit and chosen[0][shared] == rejected[0][shared]:
        shared += 1
    return shared


def _first_trained(trained: list[bool]) -> int:
    return next((index for index, is_trained in enumerate(trained) if is_trained), len(trained))


def _completion(side: tuple[list[int], list[bool]], start: int) -> tuple[list[int], list[int]]:
    ids, trained = side
    return ids[start:], [tok if keep else IGNORE_INDEX for tok, keep in zip(ids[start:], trained[start:], strict=True)]


def tokenize_preference_line(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> PreferenceExample | None:
    """One validated preference line as token ids; None when truncation leaves a side nothing to train on.

    Past max_seq_length, the prompt keeps its last tokens (at most half the length when the completions need
    the room) and each completion its first ones, so prompt + completion fits.
    """
    chosen, rejected = _side(record, "preferred_output", tokenizer), _side(record, "non_preferred_output", tokenizer)
    start = _shared_prompt(chosen, rejected)
    prompt = chosen[0][:start]
    chosen_ids, chosen_labels = _completion(chosen, start)
    rejected_ids, rejected_labels = _completion(rejected, start)
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt) + longest > max_seq_length:
        prompt = prompt[-max(max_seq_length - longest, max_seq_length // 2):]
        room = max_seq_length - len(prompt)
        chosen_ids, chosen_labels = chosen_ids[:room], chosen_labels[:room]
        rejected_ids, rejected_labels = rejected_ids[:room], rejected_labels[:room]
    if all(label == IGNORE_INDEX for label in chosen_labels) or all(label == IGNORE_INDEX for label in rejected_labels):
        return None
    return PreferenceExample(prompt, chosen_ids, chosen_labels, rejected_ids, rejected_labels)


def tokenize_preferences(
    records: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> list[PreferenceExample]:
    """Validated preference lines as token ids, lines left with nothing to train on dropped."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 for preference data, got {max_seq_length}")
    tokenized: list[PreferenceExample] = []
    for number, record in enumerate(records, start=1):
        try:
            example = tokenize_preference_line(record, tokenizer, max_seq_length=max_seq_length)
        except DatasetError as exc:
            raise DatasetError(None, f"example {number}: {exc.reason}") from None
        if example is not None:
            tokenized.append(example)
    return tokenized
