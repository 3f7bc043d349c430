"""--offload_activations: checkpointed layers' inputs held in host memory through saved-tensor hooks.

On the CPU the host is the device: the hooks still run (each input is copied to a host tensor, the original
freed) and the gradients must be exactly those of plain checkpointing. The plan moves the checkpoint term
from the device to the host on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from backend.training.checkpoints import read_trainer_state
from backend.training.memory import format_plan, plan_memory
from backend.training.memory_estimate import (
    OFFLOAD_LAYERS_ON_DEVICE,
    checkpoint_input_bytes,
    estimate_memory,
)
from backend.training.model_shape import load_model_config, model_shape
from backend.training.offload import ActivationOffloader, offload_checkpointed_activations
from backend.training.options import TrainingOptions
from backend.training.tiny_models import tiny_config
from backend.training.trainer import run_training

BATCH, TOKENS = 2, 24


def _gradients(folder: Path, *, offload: bool, reentrant: bool) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    offloader = offload_checkpointed_activations(model) if offload else None
    ids = torch.randint(1, 200, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks in both runs (the checkpoint replays them)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, offloader.offloaded_bytes if offloader else 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_are_identical_with_offloaded_checkpoints(tiny_model_folders, arch, reentrant):
    folder = tiny_model_folders[arch]
    plain, _ = _gradients(folder, offload=False, reentrant=reentrant)
    offloaded, packed_bytes = _gradients(folder, offload=True, reentrant=reentrant)
    assert plain.keys() == offloaded.keys() and plain
    for name, grad in plain.items():
        assert torch.equal(grad, offloaded[name]), name
    # Every layer's input went through the hooks: at least layers x batch x tokens x hidden fp32 values.
    config = load_model_config(str(folder))
    shape = model_shape(config)
    assert packed_bytes >= shape.layers * BATCH * TOKENS * shape.hidden * 4


def test_the_hooks_hand_back_a_host_copy_not_the_original():
    offloader = ActivationOffloader()
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    seen: list[torch.Tensor] = []

    def checkpoint(function, *args):  # a stand-in that saves its input the way torch's checkpoint does
        class Saving(torch.autograd.Function):
            @staticmethod
            def forward(ctx, tensor):
                ctx.save_for_backward(tensor)
                return function(tensor.detach()).detach()

            @staticmethod
            def backward(ctx, grad):
                (saved,) = ctx.saved_tensors
                seen.append(saved)
                with torch.enable_grad():
                    replay = saved.detach().requires_grad_()
                    (grad_in,) = torch.autograd.grad(function(replay), replay, grad)
                return grad_in

        return Saving.apply(*args)

    out = offloader.wrap(lambda tensor: checkpoint(layer, tensor))(x)
    out.sum().backward()
    assert seen and seen[0].data_ptr() != x.data_ptr() and torch.equal(seen[0], x.detach())
    assert offloader.offloaded_bytes == x.numel() * 4


def test_a_run_with_offload_trains_as_without(tiny_llama, learnable_data, tmp_path, single_torch_thread):
    def losses(name: str, offload: bool) -> list[float]:
        options = TrainingOptions(
            model=str(tiny_llama), data=str(learnable_data), output_dir=str(tmp_path / name), use_lora=True,
            lora_dropout=0.0, learning_rate=5e-3, max_seq_length=32, per_device_train_batch_size=2, max_steps=4,
            logging_steps=1, gradient_checkpointing=True, offload_activations=offload,
        )
        result = run_training(options)
        assert result.status == "succeeded", result.error_message
        return read_trainer_state(tmp_path / name / "checkpoint-4").recent_losses

    assert losses("offloaded", True) == pytest.approx(losses("plain", False), abs=1e-6)


def test_offload_without_checkpointing_is_refused_naming_both_flags():
    for checkpointing in (None, False):
        with pytest.raises(ValueError, match="--offload_activations needs --gradient_checkpointing"):
            TrainingOptions(offload_activations=True, gradient_checkpointing=checkpointing)


def test_no_checkpointed_layer_to_offload_is_refused(tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with pytest.raises(ValueError, match="found no checkpointed layer"):
        offload_checkpointed_activations(model)


LLAMA_8B_SHAPE = {"hidden": 4096, "layers": 4, "heads": 32}  # a few 8B-wide layers: planned, never allocated


def test_the_gpu_plan_moves_the_checkpoint_term_to_the_host():
    config = tiny_config("llama", 32_000, **LLAMA_8B_SHAPE)
    base = {"use_lora": True, "bf16": True, "gradient_checkpointing": True, "max_seq_length": 4096,
            "per_device_train_batch_size": 1}
    plain = estimate_memory(TrainingOptions(**base), config, device="cuda")
    offloaded = estimate_memory(TrainingOptions(**base, offload_activations=True), config, device="cuda")
    options = TrainingOptions(**base, offload_activations=True)
    term = checkpoint_input_bytes(options, model_shape(config))
    assert term == 4 * 4096 * 4096 * 2
    kept = OFFLOAD_LAYERS_ON_DEVICE * 4096 * 4096 * 2
    assert plain.breakdown.activations - offloaded.breakdown.activations == term - kept
    assert offloaded.host_bytes == term and plain.host_bytes == 0
    assert offloaded.savings["offload_activations"] == term - kept
    assert "offload_activations" in offloaded.techniques
    assert f"Host RAM for what is offloaded: {term / 2**20:.1f} MiB" in format_plan(offloaded)
    # On the CPU the host is the device: nothing moves.
    cpu = estimate_memory(options, config, device="cpu")
    assert cpu.host_bytes == 0 and "offload_activations" not in cpu.savings


def test_the_plan_chooses_offload_when_tight_and_checks_the_host(monkeypatch):
    config = tiny_config("llama", 32_000, **LLAMA_8B_SHAPE)
    # the MLP already tiled: offloading is then the cheapest step left (tests/training/test_tiled_mlp.py)
    options = TrainingOptions(use_lora=True, bf16=True, gradient_checkpointing=True, max_seq_length=16_384,
                              per_device_train_batch_size=1, tiled_mlp=True)
    needed = estimate_memory(options, config, device="cuda").estimate_bytes
    with_offload = estimate_memory(TrainingOptions(**{**options.model_dump(), "offload_activations": True}),
                                   config, device="cuda")
    budget = (needed + with_offload.estimate_bytes) // 2
    plan = plan_memory(options, config, budget_bytes=budget, device="cuda")
    assert plan.fits is False and plan.recommended_changes.get("offload_activations") is True
    assert "--offload_activations" in (plan.recommendation or "")

    class NoRam:
        available = with_offload.host_bytes - 1

    monkeypatch.setattr("backend.training.memory.psutil.virtual_memory", lambda: NoRam())
    starved = plan_memory(options, config, budget_bytes=budget, device="cuda")
    assert starved.recommended_changes.get("offload_activations") is not True


def test_a_tensor_at_a_freed_tensors_address_gets_its_own_copy():
    offloader = ActivationOffloader()
    memory = torch.full((256, 64), 1.0)
    first = memory.view(256, 64)
    kept = offloader.pack(first)  # the graph holds this entry while later layers run
    assert offloader.pack(first) is kept  # the same tensor again (e.g. rotary cos/sin): one host copy
    del first
    # The freed block handed out again with new contents and the same address, shape and version (the GPU's
    # caching allocator does this to layer inputs all the time): a copy keyed by address would be stale.
    memory.data.fill_(2.0)
    second = memory.view(256, 64)
    entry = offloader.pack(second)
    assert entry is not kept and torch.equal(offloader.unpack(entry), torch.full((256, 64), 2.0))
    assert torch.equal(offloader.unpack(kept), torch.full((256, 64), 1.0))


# --offload_embeddings: the frozen input embedding table in host memory.


def test_embeddings_on_host_are_refused_where_lm_head_needs_them(tiny_model_folders, tmp_path):
    from backend.training.offload import embeddings_on_host_problem, keep_input_embeddings_on_host

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_model_folders["gpt2"])  # GPT-2 ties lm_head to the table
    gpt2.requires_grad_(False)
    assert "untied" in embeddings_on_host_problem(gpt2)
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_folders["llama"])
    assert "frozen" in embeddings_on_host_problem(llama)  # a full fine-tune trains the table
    with pytest.raises(ValueError, match="frozen"):
        keep_input_embeddings_on_host(llama)
    with pytest.raises(ValueError, match="--offload_embeddings needs --use_lora"):
        TrainingOptions(model=str(tiny_model_folders["llama"]), offload_embeddings=True)
    options = TrainingOptions(model=str(tiny_model_folders["gpt2"]), use_lora=True, offload_embeddings=True,
                              output_dir=str(tmp_path / "out"), max_steps=1)
    result = run_training(options)  # refused from the config, before any weight loads
    assert result.status == "failed" and result.error_code == "invalid_options"
    assert "ties" in result.error_message and not (tmp_path / "out" / "telemetry.jsonl").exists()


def test_embeddings_on_host_keep_the_layers_device_and_the_loss(tiny_model_folders):
    """On a machine without a GPU the table is already in host memory: nothing moves, the layers' device is still
    the one the trainer uses, and the loss is the same."""
    from backend.training.offload import compute_device, keep_input_embeddings_on_host

    model = AutoModelForCausalLM.from_pretrained(tiny_model_folders["llama"])
    model.requires_grad_(False)
    ids = torch.randint(1, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids, labels=ids).loss
    assert keep_input_embeddings_on_host(model) == torch.device("cpu") == compute_device(model)
    assert model(input_ids=ids, labels=ids).loss == before


def test_plan_moves_the_embedding_table_to_the_host_on_a_gpu(tiny_model_folders):
    config = load_model_config(str(tiny_model_folders["llama"]))
    shape = model_shape(config)
    options = TrainingOptions(model=str(tiny_model_folders["llama"]), use_lora=True, use_4bit=True, bf16=True)
    offloaded = options.model_copy(update={"offload_embeddings": True})
    plain_gpu, gpu = estimate_memory(options, config, device="cuda"), estimate_memory(offloaded, config, device="cuda")
    table = 2 * shape.input_embedding_parameters  # bf16
    assert plain_gpu.breakdown.weights - gpu.breakdown.weights == table
    assert gpu.host_bytes - plain_gpu.host_bytes == table == gpu.savings["offload_embeddings"]
    assert "offload_embeddings" in gpu.techniques
    cpu = estimate_memory(offloaded, config, device="cpu")  # the host is the device: nothing is saved
    assert cpu.breakdown.weights == estimate_memory(options, config, device="cpu").breakdown.weights
