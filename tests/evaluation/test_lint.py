"""Lint-only mode: compile and pyflakes find code that cannot run, and nothing is executed."""

from __future__ import annotations

from pathlib import Path

from backend.evaluation.lint import MAX_SOURCE_BYTES, lint_python


def test_clean_program_is_ok() -> None:
    result = lint_python("def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n")
    assert result.ok and result.problems == ()


def test_syntax_error_is_fatal_with_its_line() -> None:
    result = lint_python("def f(:\n    pass\n")
    assert not result.ok
    assert [(p.line, p.code) for p in result.problems] == [(1, "syntax")]


def test_undefined_name_is_fatal_and_unused_import_is_not() -> None:
    result = lint_python("import os\n\ndef f(x):\n    return y + x\n")
    assert not result.ok
    found = {(p.line, p.code, p.fatal) for p in result.problems}
    assert found == {(1, "UnusedImport", False), (4, "UndefinedName", True)}
    assert lint_python("import os\n").ok  # style findings alone do not fail a program


def test_return_outside_function_is_fatal() -> None:
    result = lint_python("return 3\n")
    assert not result.ok and result.problems[0].line == 1


def test_nothing_is_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    result = lint_python(f"import os\nopen({str(marker)!r}, 'w').write('ran')\nos.system('touch {marker}')\n")
    assert result.ok
    assert not marker.exists()


def test_hostile_inputs_are_refused_quickly() -> None:
    assert not lint_python("x = " + "(" * 500 + ")" * 500).ok
    assert lint_python("x = 1\n" * (MAX_SOURCE_BYTES // 6 + 1)).problems[0].code == "too_large"
