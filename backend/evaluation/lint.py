"""Lint-only evaluation for deployments that forbid executing generated code: compile() and pyflakes, nothing runs.

`compile()` only parses and builds bytecode; pyflakes walks the syntax tree. Neither imports nor executes the
program, so this mode is safe without a sandbox. It finds code that cannot run (syntax errors, undefined names,
`return` outside a function) but says nothing about whether the code is correct.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from pyflakes import checker, messages

# Far above any generated function; bounds parse time and memory on hostile input.
MAX_SOURCE_BYTES = 1024 * 1024

# pyflakes findings that mean the program fails when run; the rest (unused imports, ...) are style.
_FATAL = (
    messages.UndefinedName,
    messages.UndefinedLocal,
    messages.UndefinedExport,
    messages.DuplicateArgument,
    messages.ReturnOutsideFunction,
    messages.YieldOutsideFunction,
    messages.ContinueOutsideLoop,
    messages.BreakOutsideLoop,
    messages.TwoStarredExpressions,
    messages.TooManyExpressionsInStarredAssignment,
    messages.DefaultExceptNotLast,
)


@dataclass(frozen=True)
class LintProblem:
    """One finding: where, what kind, and whether it stops the program from running."""

    line: int
    column: int
    code: str
    message: str
    fatal: bool


@dataclass(frozen=True)
class LintResult:
    """Every finding for one program; `ok` when none of them is fatal."""

    problems: tuple[LintProblem, ...]

    @property
    def ok(self) -> bool:
        """True when the program compiles and pyflakes finds nothing that would fail at run time."""
        return not any(problem.fatal for problem in self.problems)


def lint_python(source: str, *, filename: str = "<generated>") -> LintResult:
    """Compile `source` and run pyflakes over it, without executing any of it."""
    if len(source.encode("utf-8", errors="replace")) > MAX_SOURCE_BYTES:
        return LintResult((LintProblem(1, 0, "too_large", f"source is over {MAX_SOURCE_BYTES} bytes", True),))
    try:
        tree = ast.parse(source, filename=filename)
        compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as error:
        return LintResult((_syntax_problem(error),))
    except (ValueError, RecursionError, MemoryError) as error:
        return LintResult((LintProblem(1, 0, "uncompilable", f"{type(error).__name__}: {error}", True),))
    report = checker.Checker(tree, filename=filename)
    found = sorted(report.messages, key=lambda message: (message.lineno, message.col))
    return LintResult(tuple(_pyflakes_problem(message) for message in found))


def _syntax_problem(error: SyntaxError) -> LintProblem:
    return LintProblem(error.lineno or 1, max((error.offset or 1) - 1, 0), "syntax", error.msg, True)


def _pyflakes_problem(message: messages.Message) -> LintProblem:
    text = message.message % message.message_args
    fatal = isinstance(message, _FATAL)
    return LintProblem(message.lineno, message.col, type(message).__name__, text, fatal)
