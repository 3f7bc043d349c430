"""The `evaluation` object: defaults, the stored shape, and each refusal as a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from backend.services.errors import InvalidRequest
from backend.services.evaluation_options import EVALUATION_FIELDS, parse_options


def test_defaults_and_the_stored_shape() -> None:
    options = parse_options({"file": "file-evals"})
    stored = options.to_dict()
    assert stored == {"file": "file-evals", "n_samples": 1, "k": [1], "max_new_tokens": 256, "temperature": 0.2,
                      "mode": "sandbox", "timeout_s": 10.0}
    assert tuple(stored) == EVALUATION_FIELDS


def test_k_is_kept_sorted_and_unique_and_numbers_become_floats() -> None:
    stored = parse_options({"file": "f", "n_samples": 4, "k": [4, 1, 4], "temperature": 1, "timeout_s": 5}).to_dict()
    assert stored["k"] == [1, 4]
    assert (stored["temperature"], stored["timeout_s"]) == (1.0, 5.0)
    assert isinstance(stored["temperature"], float) and isinstance(stored["timeout_s"], float)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"n_samples": 2}, "evaluation.file", "evaluation.file must be the id of a file with purpose evals."),
        ({"file": ""}, "evaluation.file", "evaluation.file must be the id of a file with purpose evals."),
        ({"file": "f", "n_samples": 0}, "evaluation.n_samples",
         "evaluation.n_samples must be an integer from 1 to 20."),
        ({"file": "f", "n_samples": True}, "evaluation.n_samples",
         "evaluation.n_samples must be an integer from 1 to 20."),
        ({"file": "f", "n_samples": 2.0}, "evaluation.n_samples",
         "evaluation.n_samples must be an integer from 1 to 20."),
        ({"file": "f", "n_samples": 2, "k": [3]}, "evaluation.k",
         "evaluation.k must be a non-empty list of integers from 1 to n_samples (2)."),
        ({"file": "f", "k": [True]}, "evaluation.k",
         "evaluation.k must be a non-empty list of integers from 1 to n_samples (1)."),
        ({"file": "f", "k": []}, "evaluation.k",
         "evaluation.k must be a non-empty list of integers from 1 to n_samples (1)."),
        ({"file": "f", "mode": "exec"}, "evaluation.mode", "evaluation.mode must be 'sandbox' or 'lint'."),
        ({"file": "f", "max_new_tokens": 4096}, "evaluation.max_new_tokens",
         "evaluation.max_new_tokens must be an integer from 1 to 2048."),
        ({"file": "f", "temperature": float("nan")}, "evaluation.temperature",
         "evaluation.temperature must be a number from 0.0 to 2.0."),
        ({"file": "f", "temperature": "0.5"}, "evaluation.temperature",
         "evaluation.temperature must be a number from 0.0 to 2.0."),
        ({"file": "f", "timeout_s": 0.1}, "evaluation.timeout_s",
         "evaluation.timeout_s must be a number from 0.5 to 60.0."),
        # The first refusal in the order the fields are checked: mode before max_new_tokens.
        ({"file": "f", "max_new_tokens": 0, "mode": "exec"}, "evaluation.mode",
         "evaluation.mode must be 'sandbox' or 'lint'."),
        # Unknown fields come first, the first in sorted order.
        ({"file": 1, "zzz": 1, "command": "rm -rf /"}, "evaluation.command",
         "Unknown evaluation field 'command'; "
         "known: file, n_samples, k, max_new_tokens, temperature, mode, timeout_s."),
    ],
)
def test_a_refusal_names_the_field_under_its_prefix(body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_options(body, prefix="evaluation.")
    assert (refused.value.param, refused.value.message) == (param, message)


@pytest.mark.parametrize(("prefix", "param", "message"), [
    ("", None, "The body must be a JSON object."),
    ("evaluation.", "evaluation", "evaluation must be a JSON object."),
])
def test_a_body_that_is_no_object_is_refused(prefix: str, param: str | None, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_options([1], prefix=prefix)
    assert (refused.value.param, refused.value.message) == (param, message)
