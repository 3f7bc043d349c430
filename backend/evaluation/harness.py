"""HumanEval-style evaluation: load tasks, sample completions from a model, run each against its tests, pass@k.

Every completion runs inside the bubblewrap sandbox (`sandbox.run_python`), or, where a deployment forbids
execution, is only compiled and linted (`lint.lint_python`). Nothing here executes generated code directly.
"""

from __future__ import annotations

import json
import keyword
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from backend.evaluation.lint import lint_python
from backend.evaluation.sandbox import SandboxConfig, check_sandbox, run_python

EvaluationMode = Literal["sandbox", "lint"]
EVALUATION_MODES: tuple[str, ...] = ("sandbox", "lint")
REQUIRED_FIELDS: tuple[str, ...] = ("task_id", "prompt", "test", "entry_point")
# Where a function-level completion ends (the stop sequences of the HumanEval paper).
STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")


class EvalDataError(ValueError):
    """An evaluation file that is not HumanEval-shaped JSONL; the message names the line."""


@dataclass(frozen=True)
class EvalTask:
    """One coding task: a prompt to complete, a test defining `check(candidate)`, and the function to check."""

    task_id: str
    prompt: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class SampleResult:
    """One generated completion and what its tests said."""

    completion: str
    passed: bool
    stopped_reason: str | None = None
    exit_code: int | None = None
    detail: str = ""  # the last line of stderr, or the first lint problem


@dataclass
class TaskResult:
    """All samples of one task with its pass@k."""

    task_id: str
    n: int
    correct: int
    pass_at_k: dict[str, float]
    samples: list[SampleResult] = field(default_factory=list)


@dataclass
class EvaluationReport:
    """pass@k per task and overall (the mean over tasks), with timings."""

    mode: EvaluationMode
    n_samples: int
    k_values: list[int]
    pass_at_k: dict[str, float]
    tasks: list[TaskResult]
    generation_s: float = 0.0
    duration_s: float = 0.0

    def to_dict(self, *, include_samples: bool = True) -> dict[str, Any]:
        """A JSON-ready dict (for SQL, events and safetrain.json); samples optional to keep it small."""
        data = asdict(self)
        if not include_samples:
            for task in data["tasks"]:
                task.pop("samples")
        return data


# Loading tasks.


def parse_tasks(lines: Iterable[bytes | str]) -> list[EvalTask]:
    """Validate HumanEval-shaped JSONL lines; raise EvalDataError naming the first bad line."""
    tasks: list[EvalTask] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        text = _decode_line(raw, number)
        if not text.strip():
            continue
        task = _parse_task(text, number)
        if task.task_id in seen:
            raise EvalDataError(f"Line {number}: task_id {task.task_id!r} appears twice")
        seen.add(task.task_id)
        tasks.append(task)
    if not tasks:
        raise EvalDataError("the evaluation file has no tasks")
    return tasks


def load_tasks(path: str | Path) -> list[EvalTask]:
    """Read and validate a HumanEval-shaped JSONL file."""
    with open(path, "rb") as handle:
        return parse_tasks(handle)


def parse_task_line(raw: bytes | str, number: int) -> EvalTask | None:
    """One line of an evaluation file (line `number`): its task, or None when blank; EvalDataError names the line."""
    text = _decode_line(raw, number)
    return _parse_task(text, number) if text.strip() else None


def _decode_line(raw: bytes | str, number: int) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EvalDataError(f"Line {number}: not UTF-8") from error


def _parse_task(text: str, number: int) -> EvalTask:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalDataError(f"Line {number}: not valid JSON ({error.msg})") from error
    if not isinstance(row, dict):
        raise EvalDataError(f"Line {number}: expected a JSON object")
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise EvalDataError(f'Line {number}: missing "{name}"')
        if not isinstance(row[name], str) or not row[name].strip():
            raise EvalDataError(f'Line {number}: "{name}" must be a non-empty string')
    entry_point = row["entry_point"]
    if not entry_point.isidentifier() or keyword.iskeyword(entry_point):
        raise EvalDataError(f'Line {number}: "entry_point" {entry_point!r} is not a Python identifier')
    if "def check" not in row["test"]:
        raise EvalDataError(f'Line {number}: "test" must define check(candidate)')
    return EvalTask(row["task_id"], row["prompt"], row["test"], entry_point)


# Scoring.


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable running product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for total in range(n - c + 1, n + 1):
        miss *= 1.0 - k / total
    return 1.0 - miss


def build_program(task: EvalTask, completion: str, *, nonce: str = "") -> str:
    """The program that checks one completion: prompt + completion + test + check(entry_point).

    With a nonce it prints the nonce once check() returns, so a completion that exits 0 early does not pass.
    """
    program = f"{task.prompt}{completion}\n\n{task.test}\n\ncheck({task.entry_point})\n"
    return program + (f"print({nonce!r})\n" if nonce else "")


def trim_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut a generated completion at the first stop sequence (the function body ends there)."""
    cut = min((index for stop in stops if (index := text.find(stop)) != -1), default=len(text))
    return text[:cut]


def run_check(
    task: EvalTask,
    completion: str,
    *,
    timeout_s: float = 10.0,
    mode: EvaluationMode = "sandbox",
    memory_mb: int = 512,
    config: SandboxConfig | None = None,
) -> SampleResult:
    """Check one completion against its task's tests, in the sandbox or by lint only."""
    if mode == "lint":
        lint = lint_python(build_program(task, completion), filename=f"{task.task_id}.py")
        first = next((p for p in lint.problems if p.fatal), None)
        detail = f"line {first.line}: {first.message}" if first else ""
        return SampleResult(completion, lint.ok, detail=detail)
    nonce = f"safetrain-check-passed-{secrets.token_hex(8)}"
    result = run_python(build_program(task, completion, nonce=nonce), timeout_s=timeout_s, memory_mb=memory_mb,
                        config=config)
    passed = result.ok and result.stdout.rstrip().endswith(nonce)
    lines = result.stderr.strip().splitlines()
    return SampleResult(completion, passed, result.stopped_reason, result.exit_code, (lines[-1:] or [""])[0][:300])


def check_completion(
    task: EvalTask,
    completion: str,
    *,
    timeout_s: float = 10.0,
    mode: EvaluationMode = "sandbox",
    config: SandboxConfig | None = None,
) -> bool:
    """True when the completion passes its task's tests in the sandbox (or only lints clean in lint mode)."""
    return run_check(task, completion, timeout_s=timeout_s, mode=mode, config=config).passed


# Generating and evaluating.


def generate_completions(
    model: Any, tokenizer: Any, prompt: str, *, n: int, max_new_tokens: int, temperature: float
) -> list[str]:
    """Sample `n` completions of `prompt` (greedy once and repeated when temperature is 0), trimmed at stops."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    sampling = temperature > 0
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampling,
        "num_return_sequences": n if sampling else 1,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "stop_strings": list(STOP_SEQUENCES),
        "tokenizer": tokenizer,
    }
    if sampling:
        settings.update(temperature=temperature, top_p=0.95)
    with torch.inference_mode():
        output = model.generate(**inputs, **settings)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    texts = [trim_completion(text) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return texts if sampling else texts * n


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[EvalTask],
    *,
    n_samples: int = 1,
    k_values: Sequence[int] = (1,),
    max_new_tokens: int = 256,
    temperature: float = 0.2,
    timeout_s: float = 10.0,
    mode: EvaluationMode = "sandbox",
    config: SandboxConfig | None = None,
    workers: int = 2,
    on_task: Callable[[TaskResult], None] | None = None,
) -> EvaluationReport:
    """Generate n samples per task, check each (sandboxed while the next task generates), report pass@k."""
    k_list = _check_request(n_samples=n_samples, k_values=k_values, mode=mode, config=config)
    started = time.monotonic()
    generation_s = 0.0
    pending: list[tuple[EvalTask, list[Future[SampleResult]]]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for task in tasks:
            began = time.monotonic()
            completions = generate_completions(
                model, tokenizer, task.prompt, n=n_samples, max_new_tokens=max_new_tokens, temperature=temperature
            )
            generation_s += time.monotonic() - began
            futures = [pool.submit(run_check, task, c, timeout_s=timeout_s, mode=mode, config=config)
                       for c in completions]
            pending.append((task, futures))
        results = [_task_result(task, [f.result() for f in futures], k_list, on_task) for task, futures in pending]
    overall = {f"pass@{k}": _mean([r.pass_at_k[f"pass@{k}"] for r in results]) for k in k_list}
    return EvaluationReport(mode, n_samples, k_list, overall, results, generation_s, time.monotonic() - started)


def _check_request(
    *, n_samples: int = 1, k_values: Sequence[int] = (1,), mode: EvaluationMode = "sandbox",
    config: SandboxConfig | None = None, **_: Any,
) -> list[int]:
    """The sorted k values, once the request is one that can run (the sandbox included)."""
    if mode not in EVALUATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(EVALUATION_MODES)} (got {mode!r})")
    k_list = sorted(set(k_values))
    if n_samples < 1 or not k_list or k_list[0] < 1 or k_list[-1] > n_samples:
        raise ValueError(f"k_values {list(k_values)} need 1 <= k <= n_samples ({n_samples})")
    if mode == "sandbox":
        check_sandbox(config)  # fail closed before spending GPU time on samples that could never run
    return k_list


def _task_result(
    task: EvalTask, samples: list[SampleResult], k_list: list[int], on_task: Callable[[TaskResult], None] | None
) -> TaskResult:
    correct = sum(sample.passed for sample in samples)
    scores = {f"pass@{k}": pass_at_k(len(samples), correct, k) for k in k_list}
    result = TaskResult(task.task_id, len(samples), correct, scores, samples)
    if on_task is not None:
        on_task(result)
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def load_model_for_evaluation(base_model: str | Path, adapter_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Load a local base model (safetensors only, no remote code) and, if given, its LoRA adapter via peft."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_own_tokenizer = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").exists()
    tokenizer_source = adapter_dir if has_own_tokenizer and adapter_dir is not None else base_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    model = model.to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


class EvaluationSettings(TypedDict, total=False):
    """How an adapter is evaluated: `evaluate_model`'s keyword arguments, passed through by `evaluate_adapter`."""

    n_samples: int
    k_values: Sequence[int]
    max_new_tokens: int
    temperature: float
    timeout_s: float
    mode: EvaluationMode
    config: SandboxConfig | None
    on_task: Callable[[TaskResult], None] | None


def evaluate_adapter(
    *, base_model: str | Path, adapter_dir: str | Path | None, eval_data: str | Path,
    **settings: Unpack[EvaluationSettings],
) -> EvaluationReport:
    """The entry point for the trainer and the worker: validate the file, load base + adapter, evaluate."""
    tasks = load_tasks(eval_data)
    _check_request(**settings)  # fail before the model loads
    model, tokenizer = load_model_for_evaluation(base_model, adapter_dir)
    return evaluate_model(model, tokenizer, tasks, **settings)
