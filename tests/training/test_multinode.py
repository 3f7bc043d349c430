"""Multi-node: train_safe.py passes --num_machines/--machine_rank/--main_process_ip/--main_process_port to
`accelerate launch`; two "machines" (two train_safe.py processes, one CPU rank each) meet on 127.0.0.1 over gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from backend.training.checkpoints import read_trainer_state
from backend.training.deepspeed_presets import TRAIN_SAFE_PATH, deepspeed_available
from backend.training.distributed import machine_flags, multi_node_launch_command
from backend.training.options import TrainingOptions
from tests.support.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _run_two_machines(model: Path, data: Path, work: Path, *extra: str, **env_extra: str) -> list[str]:
    port = str(free_port())
    output_dir = work / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(work / "hf-home"),
           **env_extra}
    machines = []
    for rank in (0, 1):
        flags = [
            "--model", str(model), "--data", str(data), "--output_dir", str(output_dir), "--use_lora",
            "--lora_dropout", "0", "--learning_rate", "5e-3", "--max_seq_length", "32",
            "--per_device_train_batch_size", "2", "--max_steps", str(STEPS), "--logging_steps", "1", "--seed", "7",
            "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", port, *extra,
        ]
        machines.append(subprocess.Popen([sys.executable, str(TRAIN_SAFE_PATH), *flags], cwd=work, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [machine.communicate(timeout=400)[0] for machine in machines]
    for machine, output in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, output[-4000:]
    return outputs


def _assert_one_adapter_that_learned(outputs: list[str], model: Path, output_dir: Path) -> None:
    assert "Launching machine 0 of 2" in outputs[0] and "Launching machine 1 of 2" in outputs[1]
    # Events come from the main process (global rank 0, on machine 0) alone.
    assert outputs[0].count(f"Done: {STEPS} steps") == 1 and "Done:" not in outputs[1]
    assert (output_dir / "adapter_model.safetensors").is_file()
    losses = read_trainer_state(output_dir / f"checkpoint-{STEPS}").recent_losses
    assert len(losses) == STEPS and all(loss > 0 for loss in losses)
    base = AutoModelForCausalLM.from_pretrained(model)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), output_dir)
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids).logits, tuned(input_ids).logits, atol=1e-4)


def test_two_machines_of_cpu_ranks_train_data_parallel(tiny_llama, learnable_data, tmp_path):
    outputs = _run_two_machines(tiny_llama, learnable_data, tmp_path)
    _assert_one_adapter_that_learned(outputs, tiny_llama, tmp_path / "run")


@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_two_machines_of_cpu_ranks_train_under_zero3(tiny_llama, learnable_data, tmp_path):
    outputs = _run_two_machines(tiny_llama, learnable_data, tmp_path, "--deepspeed", "zero3", DS_ACCELERATOR="cpu")
    assert "--use_deepspeed" in outputs[0]
    _assert_one_adapter_that_learned(outputs, tiny_llama, tmp_path / "run")


def test_the_launch_command_carries_the_machine_flags(tmp_path):
    options = TrainingOptions(num_machines=3, machine_rank=2, main_process_ip="10.0.0.1", main_process_port=29500)
    assert machine_flags(options) == ["--num_machines", "3", "--machine_rank", "2", "--main_process_ip",
                                      "10.0.0.1", "--main_process_port", "29500"]
    command = multi_node_launch_command(options, ["--model", "m"])
    per_machine = max(torch.cuda.device_count(), 1)
    assert command[1:5] == ["launch", "--multi_gpu", "--num_processes", str(3 * per_machine)]
    assert command[-3:] == [str(TRAIN_SAFE_PATH), "--model", "m"]
    zero = multi_node_launch_command(options.model_copy(update={"deepspeed": "zero3"}), ["--output_dir", str(tmp_path)])
    assert (tmp_path / "deepspeed_zero3.json").is_file()  # the preset's config, beside the run's output
    assert "--use_deepspeed" in zero and zero[zero.index("--machine_rank") + 1] == "2"
    assert zero.count("--num_machines") == 1


def test_multi_node_flags_are_refused_when_incomplete_or_out_of_range():
    with pytest.raises(ValueError, match="--num_machines above 1 needs --main_process_ip and --main_process_port"):
        TrainingOptions(num_machines=2)
    with pytest.raises(ValueError, match=r"--machine_rank must be in \[0, --num_machines\)"):
        TrainingOptions(num_machines=2, machine_rank=2, main_process_ip="127.0.0.1", main_process_port=29500)
    with pytest.raises(ValueError, match="--main_process_port must be in 1-65535"):
        TrainingOptions(main_process_port=70000)
