"""DeepSpeed ZeRO for real: two CPU ranks over gloo (DeepSpeed's CPU accelerator), a tiny Llama with LoRA.

The ranks are started with the project's own `accelerate_launch_command` (the command train_safe.py runs on
GPUs), with DS_ACCELERATOR=cpu in their environment. The first run on a machine JIT-compiles DeepSpeed's
shared-memory communication op (about a minute; cached under ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from backend.training.checkpoints import COMPLETE_MARKER, read_trainer_state
from backend.training.deepspeed_presets import accelerate_launch_command
from backend.training.distributed import DEEPSPEED_STATE_DIR
from tests.support.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS, RANKS, LORA_R = 4, 2, 8
PRESETS = ("zero2", "zero3")


@dataclass
class DeepSpeedRun:
    preset: str
    returncode: int
    output: str
    output_dir: Path

    def failure(self) -> str:
        """What a failed run said: its progress and error lines (DeepSpeed's deprecation warnings left out), then
        its last lines."""
        noise = ("FutureWarning", "return func(")
        lines = [line for line in self.output.splitlines() if not any(word in line for word in noise)]
        telling = ("step ", "Done:", "Error", "error", "terminate", "Traceback", "Signal", "plan")
        said = [line for line in lines if any(word in line for word in telling)]
        return "\n".join([*said[:40], "...", *lines[-60:]])

    def losses(self) -> list[float]:
        return read_trainer_state(self.output_dir / f"checkpoint-{STEPS}").recent_losses


@pytest.fixture(scope="module", params=PRESETS)
def deepspeed_run(
    request: pytest.FixtureRequest, tiny_llama: Path, learnable_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> DeepSpeedRun:
    preset = str(request.param)
    work = tmp_path_factory.mktemp(f"deepspeed-{preset}")
    output_dir = work / "run"
    flags = [
        "--model", str(tiny_llama), "--data", str(learnable_data), "--output_dir", str(output_dir),
        "--use_lora", "--lora_r", str(LORA_R), "--lora_dropout", "0", "--learning_rate", "5e-3",
        "--max_seq_length", "32", "--per_device_train_batch_size", "2", "--max_steps", str(STEPS),
        "--save_steps", str(STEPS // 2), "--logging_steps", "1", "--seed", "7", "--deepspeed", preset,
    ]
    command = accelerate_launch_command(preset, flags, RANKS, config_dir=work)
    command[2:2] = ["--main_process_port", str(free_port()), "--dynamo_backend", "no"]  # beside other tests' runs
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator: gloo without oneCCL
        "OMP_NUM_THREADS": "1",  # one thread a rank: the machine is small and shared
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HOME": str(work / "hf-home"),  # no accelerate default config from the user's cache
    }
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=400)
    return DeepSpeedRun(preset, done.returncode, done.stdout + done.stderr, output_dir)


def test_zero_trains_on_two_cpu_ranks_and_writes_one_adapter(deepspeed_run: DeepSpeedRun, tiny_llama: Path):
    assert deepspeed_run.returncode == 0, deepspeed_run.failure()
    assert deepspeed_run.output.count(f"Done: {STEPS} steps") == 1  # rank 0 alone reports

    losses = deepspeed_run.losses()
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses

    # One adapter, at the top of the output folder; the checkpoints hold DeepSpeed's per-rank shards instead.
    output_dir = deepspeed_run.output_dir
    assert [path.relative_to(output_dir) for path in output_dir.rglob("adapter_model.safetensors")] == [
        Path("adapter_model.safetensors")
    ]
    checkpoint = output_dir / f"checkpoint-{STEPS}"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    shards = {path.name for path in (checkpoint / DEEPSPEED_STATE_DIR).rglob("zero_pp_rank_*")}
    kind = "model_states" if deepspeed_run.preset == "zero3" else "optim_states"  # ZeRO-3 also shards weights
    assert {f"zero_pp_rank_{rank}_mp_rank_00_{kind}.pt" for rank in range(RANKS)} <= shards

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), output_dir)
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids).logits, tuned(input_ids).logits, atol=1e-4)


def test_adapter_weights_are_whole_not_zero3_shards(deepspeed_run: DeepSpeedRun, tiny_llama: Path):
    assert deepspeed_run.returncode == 0, deepspeed_run.failure()
    weights = load_file(deepspeed_run.output_dir / "adapter_model.safetensors")
    linears = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_modules())
    assert weights
    for key, tensor in weights.items():
        # base_model.model.<module path>.lora_A.weight: A is (r, in_features), B is (out_features, r)
        module_path, _, matrix = key.removeprefix("base_model.model.").rpartition(".lora_")
        linear = linears[module_path]
        expected = (LORA_R, linear.in_features) if matrix == "A.weight" else (linear.out_features, LORA_R)
        assert tuple(tensor.shape) == expected, key
    trained_b = [tensor for key, tensor in weights.items() if "lora_B" in key]
    assert trained_b and all(bool(tensor.abs().sum() > 0) for tensor in trained_b)  # B starts at zero

