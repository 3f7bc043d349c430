"""The harness: task files, pass@k, completions checked in the sandbox, and a real model evaluated end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.evaluation.harness import (
    EvalDataError,
    EvalTask,
    build_program,
    check_completion,
    evaluate_adapter,
    evaluate_model,
    load_tasks,
    parse_tasks,
    pass_at_k,
    run_check,
    trim_completion,
)
from backend.evaluation.sandbox import SandboxConfig, SandboxUnavailable
from tests.evaluation.conftest import SOLVED, UNSOLVED

TASK = EvalTask(
    task_id="demo/0",
    prompt='def is_even(n: int) -> bool:\n    """True when n is even."""\n',
    test="def check(candidate):\n    assert candidate(2) is True\n    assert candidate(7) is False\n",
    entry_point="is_even",
)


# Task files.


def test_load_tasks_reads_humaneval_shaped_jsonl(eval_file: Path) -> None:
    tasks = load_tasks(eval_file)
    assert [task.task_id for task in tasks] == ["tiny/solved", "tiny/unsolved"]
    assert tasks[0].entry_point == "add" and tasks[0].prompt == SOLVED["prompt"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(SOLVED), "[1, 2]"], "Line 2: expected a JSON object"),
        ([json.dumps(SOLVED), "{not json"], "Line 2: not valid JSON"),
        ([json.dumps({k: v for k, v in SOLVED.items() if k != "test"})], 'Line 1: missing "test"'),
        ([json.dumps({**SOLVED, "prompt": 3})], 'Line 1: "prompt" must be a non-empty string'),
        ([json.dumps({**SOLVED, "entry_point": "not an id"})], "Line 1: \"entry_point\" 'not an id' is not"),
        ([json.dumps(SOLVED), "", json.dumps(SOLVED)], "Line 3: task_id 'tiny/solved' appears twice"),
        ([json.dumps({**SOLVED, "test": "assert True"})], "Line 1: \"test\" must define check"),
        ([b'{"task_id": "\xff"}'], "Line 1: not UTF-8"),
        (["", "  "], "the evaluation file has no tasks"),
    ],
)
def test_bad_task_lines_are_refused_with_their_line_number(lines: list[str | bytes], message: str) -> None:
    with pytest.raises(EvalDataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_tasks(lines)


# pass@k.


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 0.3),
        (10, 0, 5, 0.0),
        (10, 10, 5, 1.0),
        (10, 8, 5, 1.0),  # fewer than k failures: some k-subset always passes
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (20, 5, 10, 1 - math.comb(15, 10) / math.comb(20, 10)),
    ],
)
def test_pass_at_k_matches_the_exact_formula(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n() -> None:
    # C(1000, 100) overflows a float; the running product does not.
    expected = 1 - math.comb(990, 100) / math.comb(1000, 100)
    assert pass_at_k(1000, 10, 100) == pytest.approx(expected, rel=1e-9)


def test_pass_at_k_refuses_impossible_counts() -> None:
    for n, c, k in [(5, 6, 1), (5, 1, 6), (5, 1, 0)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


# Checking completions.


def test_trim_completion_cuts_at_the_first_stop_sequence() -> None:
    text = "    return n % 2 == 0\n\n\ndef helper():\n    pass\nprint(1)"
    assert trim_completion(text) == "    return n % 2 == 0\n\n"
    assert trim_completion("    return 1\nif __name__ == '__main__':\n    main()") == "    return 1"
    assert trim_completion("    return 1\n") == "    return 1\n"


def test_program_is_prompt_completion_test_and_check() -> None:
    program = build_program(TASK, "    return n % 2 == 0\n")
    assert program.startswith(TASK.prompt + "    return n % 2 == 0\n")
    assert program.rstrip().endswith("check(is_even)")


def test_correct_completion_passes_and_wrong_one_fails() -> None:
    assert check_completion(TASK, "    return n % 2 == 0\n") is True
    assert check_completion(TASK, "    return n % 2 == 1\n") is False
    assert check_completion(TASK, "    return n %% 2\n") is False  # a syntax error


def test_a_completion_that_exits_early_does_not_pass() -> None:
    result = run_check(TASK, "    return True\nimport os\nos._exit(0)\n")
    assert result.exit_code == 0 and result.passed is False


def test_hostile_completion_is_contained_with_a_verdict() -> None:
    result = run_check(TASK, "    while True:\n        pass\n", timeout_s=1.0)
    assert result.passed is False and result.stopped_reason == "timeout"
    failing = run_check(TASK, "    return n % 2 == 1\n")
    assert failing.detail.startswith("AssertionError")


def test_lint_mode_passes_code_that_can_run_and_fails_code_that_cannot(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    assert check_completion(TASK, f"    open({str(marker)!r}, 'w')\n    return True\n", mode="lint") is True
    assert not marker.exists()  # lint mode never executes
    assert check_completion(TASK, "    return m % 2 == 0\n", mode="lint") is False


def test_harness_refuses_when_the_sandbox_is_unavailable() -> None:
    with pytest.raises(SandboxUnavailable):
        check_completion(TASK, "    return True\n", config=SandboxConfig(bwrap="/nonexistent/bwrap"))


# A model end to end.


def test_evaluate_model_scores_a_real_model_per_task_and_overall(silent_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(silent_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(silent_model_dir)
    tasks = parse_tasks([json.dumps(SOLVED), json.dumps(UNSOLVED)])
    seen: list[str] = []
    report = evaluate_model(
        model, tokenizer, tasks, n_samples=2, k_values=[1, 2], max_new_tokens=8, temperature=0.0,
        on_task=lambda result: seen.append(result.task_id),
    )
    by_task = {task.task_id: task for task in report.tasks}
    assert seen == ["tiny/solved", "tiny/unsolved"]
    assert by_task["tiny/solved"].correct == 2 and by_task["tiny/solved"].pass_at_k == {"pass@1": 1.0, "pass@2": 1.0}
    assert by_task["tiny/unsolved"].correct == 0 and by_task["tiny/unsolved"].pass_at_k["pass@1"] == 0.0
    assert report.pass_at_k == {"pass@1": 0.5, "pass@2": 0.5}
    assert all(sample.completion == "" for task in report.tasks for sample in task.samples)
    assert by_task["tiny/unsolved"].samples[0].detail == "AssertionError"  # a docstring-only body returns None
    data = json.loads(json.dumps(report.to_dict()))
    assert data["mode"] == "sandbox" and data["pass_at_k"]["pass@1"] == 0.5
    assert "samples" not in report.to_dict(include_samples=False)["tasks"][0]


def test_evaluate_model_refuses_k_above_n(silent_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="1 <= k <= n_samples"):
        evaluate_model(None, None, [TASK], n_samples=2, k_values=[1, 5])


def test_evaluate_adapter_loads_base_and_lora_adapter(
    silent_model_dir: Path, silent_adapter_dir: Path, eval_file: Path
) -> None:
    report = evaluate_adapter(
        base_model=silent_model_dir, adapter_dir=silent_adapter_dir, eval_data=eval_file,
        n_samples=1, k_values=[1], max_new_tokens=8, temperature=0.0,
    )
    assert report.pass_at_k == {"pass@1": 0.5}
    lint_report = evaluate_adapter(
        base_model=silent_model_dir, adapter_dir=silent_adapter_dir, eval_data=eval_file,
        max_new_tokens=8, temperature=0.0, mode="lint",
    )
    assert lint_report.mode == "lint"
    # Both programs can run, so both lint clean: lint-only mode cannot see that sub() returns None.
    assert {task.task_id: task.correct for task in lint_report.tasks} == {"tiny/solved": 1, "tiny/unsolved": 1}


def test_sampling_draws_n_completions(silent_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(silent_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(silent_model_dir)
    report = evaluate_model(
        model, tokenizer, [TASK], n_samples=3, k_values=[1, 3], max_new_tokens=4, temperature=1.0
    )
    assert report.tasks[0].n == 3 and len(report.tasks[0].samples) == 3
    assert 0.0 <= report.pass_at_k["pass@1"] <= report.pass_at_k["pass@3"] <= 1.0
