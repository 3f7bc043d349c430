"""train_safe.py: the guide's commands as real subprocesses, flags, refusals, --dry_run, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.training import train_safe
from backend.training.checkpoints import COMPLETE_MARKER, complete_checkpoints
from backend.training.deepspeed_presets import deepspeed_available
from backend.training.events import EXIT_BAD_OPTIONS, EXIT_OK, EXIT_STOPPED
from backend.training.modeling import weight_files_sha256
from backend.training.options import TrainingOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "backend" / "training" / "train_safe.py"
CHAT_LINES = [
    {"messages": [{"role": "user", "content": f"Count to {n}."},
                  {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]}
    for n in range(2, 10)
]


@pytest.fixture
def backend_dir(tmp_path: Path, tiny_gpt2: Path, tiny_llama: Path) -> Path:
    """A folder laid out like backend/: training/ (the real scripts), distilgpt2, THE/HF-MODEL, my_dataset.jsonl."""
    (tmp_path / "training").symlink_to(SCRIPT.parent, target_is_directory=True)
    shutil.copytree(tiny_gpt2, tmp_path / "distilgpt2")
    shutil.copytree(tiny_llama, tmp_path / "THE" / "HF-MODEL")
    (tmp_path / "my_dataset.jsonl").write_text("".join(json.dumps(line) + "\n" for line in CHAT_LINES))
    return tmp_path


def _child_environment() -> dict[str, str]:
    # Nothing on PYTHONPATH: the script must find `backend` itself. One OpenMP thread: on a small shared
    # machine more threads only spin against each other.
    return {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}


def _run_guide_command(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command line exactly as the guide prints it, with `python` meaning this interpreter."""
    argv = command.split()
    assert argv[0] == "python"
    env = _child_environment()
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_guide_smoke_command(backend_dir):
    hashes = weight_files_sha256(backend_dir / "distilgpt2")

    done = _run_guide_command(
        "python training/train_safe.py --model distilgpt2 --output_dir ./runs/distilgpt2-smoke --epochs 1 "
        "--per_device_train_batch_size 2",
        backend_dir,
    )

    assert done.returncode == EXIT_OK, done.stdout[-2000:] + done.stderr[-3000:]
    output = backend_dir / "runs" / "distilgpt2-smoke"
    assert {"config.json", "model.safetensors", "tokenizer.json", "safetrain.json", "telemetry.jsonl"} <= {
        path.name for path in output.iterdir()
    }
    manifest = json.loads((output / "safetrain.json").read_text())
    assert manifest["metrics"]["step"] == 30  # the 60 built-in examples, two per step, one epoch
    assert "Done: 30 steps" in done.stdout and "step 30/30" in done.stdout
    assert weight_files_sha256(backend_dir / "distilgpt2") == hashes


def test_guide_memory_saving_command(backend_dir):
    done = _run_guide_command(
        "python training/train_safe.py --model THE/HF-MODEL --data ./my_dataset.jsonl --output_dir ./runs/my-finetune "
        "--use_8bit --use_lora --lora_r 8 --gradient_checkpointing",
        backend_dir,
    )

    assert done.returncode == EXIT_OK, done.stdout[-2000:] + done.stderr[-3000:]
    output = backend_dir / "runs" / "my-finetune"
    names = {path.name for path in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "safetrain.json"} <= names
    assert "model.safetensors" not in names
    options = json.loads((output / "safetrain.json").read_text())["options"]
    assert options["use_8bit"] and options["use_lora"] and options["lora_r"] == 8
    assert options["gradient_checkpointing"] is True
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 8


def test_sigterm_checkpoints_exits_75_and_resume_continues(backend_dir, tmp_path, monkeypatch, capsys):
    command = [sys.executable, "training/train_safe.py", "--model", "distilgpt2", "--output_dir", "./runs/stop",
               "--use_lora", "--max_steps", "100000", "--logging_steps", "1", "--max_seq_length", "32"]
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:  # a file, not a pipe: nobody reads stderr until the end
        process = subprocess.Popen(command, cwd=backend_dir, env=_child_environment(), stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:  # training has started once a metrics line for step 2 appears
            if line.startswith("step 2/"):
                break
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    err = stderr_path.read_text()
    assert process.returncode == EXIT_STOPPED, err[-3000:]
    (checkpoint,) = complete_checkpoints(backend_dir / "runs" / "stop")
    assert (checkpoint / COMPLETE_MARKER).is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not [path for path in (backend_dir / "runs" / "stop").iterdir() if path.name.startswith(".tmp")]
    assert "SIGTERM" in err and "--resume_from_checkpoint latest" in out

    stopped_at = int(checkpoint.name.removeprefix("checkpoint-"))
    monkeypatch.chdir(backend_dir)
    code = train_safe.main(["--model", "distilgpt2", "--output_dir", "./runs/stop", "--use_lora", "--max_seq_length",
                            "32", "--logging_steps", "1", "--resume_from_checkpoint", "latest",
                            "--max_steps", str(stopped_at + 2)])
    resumed = capsys.readouterr().out
    assert code == EXIT_OK
    assert f"at step {stopped_at}" in resumed and f"step {stopped_at + 1}/{stopped_at + 2}" in resumed
    assert f"step {stopped_at}/" not in resumed


def test_contradictory_flags_are_refused_before_anything_loads(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--use_8bit", "--use_4bit", "--use_lora", "--output_dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60,
    )

    assert done.returncode == EXIT_BAD_OPTIONS
    assert "--use_8bit" in done.stderr and "--use_4bit" in done.stderr
    assert time.monotonic() - started < 10  # refused without importing torch or touching a model
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--fp16", "--bf16"], ["--fp16", "--bf16"]), (["--use_lora", "--lora_r", "0"], ["--lora_r"]),
     (["--use_8bit"], ["--use_8bit", "--use_lora"])],
)
def test_more_refusals_name_the_flags(flags, named, capsys):
    assert train_safe.main(flags) == EXIT_BAD_OPTIONS
    error = capsys.readouterr().err
    assert all(flag in error for flag in named), error


def test_dry_run_prints_the_plan_without_loading(tiny_gpt2, tmp_path, capsys):
    code = train_safe.main(["--model", str(tiny_gpt2), "--output_dir", str(tmp_path / "out"), "--use_lora",
                            "--dry_run"])

    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "Memory plan on cpu" in out and "Activations" in out and "Budget" in out
    assert "Loaded" not in out and not (tmp_path / "out").exists()


def test_deepspeed_without_deepspeed_is_refused(tiny_gpt2, tmp_path, capsys):
    code = train_safe.main(["--model", str(tiny_gpt2), "--output_dir", str(tmp_path / "out"), "--deepspeed", "zero2"])

    assert code == EXIT_BAD_OPTIONS
    err = capsys.readouterr().err
    assert "needs DeepSpeed and more than one GPU" in err
    assert ("DeepSpeed is not installed" in err) is not deepspeed_available()  # else: no GPUs here


def test_every_option_is_a_flag_with_its_description_as_help():
    flags = {flag: action for action in train_safe.build_parser()._actions for flag in action.option_strings}
    for name, info in TrainingOptions.model_fields.items():
        assert f"--{name}" in flags, name
        assert (flags[f"--{name}"].help or "").startswith(info.description or ""), name


def test_list_mapping_and_tri_state_flags_parse():
    options = train_safe.parse_options([
        "--use_lora", "--lora_target_modules", "q_proj,v_proj", "--device_map", "auto",
        "--max_memory", "0=10GiB,cpu=30GiB", "--no_gradient_checkpointing", "--epochs", "0.5",
    ])

    assert options.lora_target_modules == ["q_proj", "v_proj"]
    assert options.max_memory == {"0": "10GiB", "cpu": "30GiB"}
    assert options.gradient_checkpointing is False and options.use_8bit is None and options.epochs == 0.5


def test_safetrain_train_passes_every_flag_to_train_safe(tiny_gpt2, tmp_path, capsys):
    from backend.cli import main as safetrain_main

    assert safetrain_main(["train", "--use_8bit", "--use_4bit", "--use_lora"]) == EXIT_BAD_OPTIONS
    assert "--use_4bit" in capsys.readouterr().err
    code = safetrain_main(["train", "--", "--model", str(tiny_gpt2), "--output_dir", str(tmp_path / "o"), "--dry_run"])
    assert code == EXIT_OK and "Memory plan" in capsys.readouterr().out


QLORA_8B_FLAGS = [
    "--use_lora", "--use_4bit", "--lora_r", "32", "--lora_dropout", "0",
    "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "--bf16", "--gradient_checkpointing", "--per_device_train_batch_size", "1", "--plan_device", "cuda",
]


@pytest.fixture
def llama_8b_config(tmp_path: Path) -> Path:
    """A Llama-3.1-8B-shaped model as a lone config.json: enough to plan, nothing to load."""
    from benchmarks.context_planning import LLAMA_31_8B

    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return folder


def _plan_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_json_dry_run_plans_the_longest_gpu_context_from_a_config_alone(llama_8b_config, tmp_path, capsys):
    from backend.training.memory import GIB, estimate_memory, load_model_config

    code = train_safe.main(["--model", str(llama_8b_config), "--output_dir", str(tmp_path / "out"), *QLORA_8B_FLAGS,
                            "--memory_budget_gb", "24", "--max_seq_length", "auto", "--dry_run", "--json"])

    plan = _plan_json(capsys)
    assert code == EXIT_OK and plan["device"] == "cuda" and plan["budget_bytes"] == 24 * GIB and plan["fits"]
    assert plan["estimate_bytes"] == sum(plan["breakdown"].values()) <= 24 * GIB
    assert {"use_4bit", "gradient_checkpointing", "chunked_loss", "bf16"} <= set(plan["techniques"])
    assert plan["savings"]["chunked_loss"] > 30 * GIB  # the whole fp32 logits of 26k tokens x 128,256 and copies
    config = load_model_config(str(llama_8b_config))
    one_more = train_safe.parse_options(["--model", str(llama_8b_config), *QLORA_8B_FLAGS, "--max_seq_length",
                                         str(plan["max_seq_length"] + 1)])
    assert estimate_memory(one_more, config, device="cuda").estimate_bytes > 24 * GIB  # the longest that fits
    assert plan["max_seq_length"] > 4 * 6_298  # the plain loss's longest at 24 GiB (issue 11)


def test_max_seq_length_auto_with_a_budget_that_fits_nothing_names_the_smallest(llama_8b_config, tmp_path, capsys):
    code = train_safe.main(["--model", str(llama_8b_config), "--output_dir", str(tmp_path / "out"), *QLORA_8B_FLAGS,
                            "--memory_budget_gb", "5", "--max_seq_length", "auto", "--dry_run", "--json"])

    answer = _plan_json(capsys)
    assert code == EXIT_BAD_OPTIONS and answer["fits"] is False and answer["error"] == "invalid_options"
    assert "--max_seq_length auto" in answer["message"] and "--memory_budget_gb 5.00" in answer["message"]
    # 4-bit layers, bf16 embeddings and lm_head, fp32 adapters and AdamW states, the CUDA context: one token's plan
    assert "the smallest budget that fits is 7.55 GiB" in answer["message"]
    assert "or 6.04 GiB if you enable" in answer["message"] and "--offload_embeddings" in answer["message"]


def test_max_seq_length_auto_takes_the_cheapest_savers_when_the_settings_alone_fit_nothing(
    llama_8b_config, tmp_path, capsys
):
    from backend.training.memory import GIB

    code = train_safe.main(["--model", str(llama_8b_config), "--output_dir", str(tmp_path / "out"), *QLORA_8B_FLAGS,
                            "--memory_budget_gb", "7", "--max_seq_length", "auto", "--dry_run", "--json"])

    captured = capsys.readouterr().out
    plan = json.loads(captured.strip().splitlines()[-1])
    assert code == EXIT_OK and plan["fits"] and plan["estimate_bytes"] <= 7 * GIB < 7.55 * GIB
    assert "nothing fits 7.0 GiB with the settings given; enable" in captured
    assert plan["max_seq_length"] > 500 and {"offload_embeddings"} <= set(plan["techniques"])  # the cheapest: 867


def test_no_chunked_loss_plans_the_whole_logits(tiny_gpt2, tmp_path, capsys):
    flags = ["--model", str(tiny_gpt2), "--output_dir", str(tmp_path / "out"), "--use_lora", "--dry_run", "--json",
             "--max_seq_length", "256", "--memory_budget_gb", "4"]
    assert train_safe.main(flags) == EXIT_OK
    chunked = _plan_json(capsys)
    assert train_safe.main([*flags, "--no_chunked_loss"]) == EXIT_OK
    plain = _plan_json(capsys)

    assert "chunked_loss" in chunked["techniques"] and "chunked_loss" not in plain["techniques"]
    assert plain["estimate_bytes"] - chunked["estimate_bytes"] >= chunked["savings"]["chunked_loss"] > 0
    assert not plain["savings"] and chunked["max_seq_length"] == plain["max_seq_length"] == 256


def test_json_without_dry_run_and_a_gpu_plan_without_a_budget_are_refused(tiny_gpt2, tmp_path, capsys):
    assert train_safe.main(["--model", str(tiny_gpt2), "--output_dir", str(tmp_path / "o"), "--json"]) == 2
    assert "--json needs --dry_run" in capsys.readouterr().err
    if not torch_cuda_available():
        code = train_safe.main(["--model", str(tiny_gpt2), "--output_dir", str(tmp_path / "o"), "--dry_run",
                                "--plan_device", "cuda"])
        assert code == EXIT_BAD_OPTIONS
        assert "--plan_device cuda on a machine without a GPU needs --memory_budget_gb" in capsys.readouterr().err


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
