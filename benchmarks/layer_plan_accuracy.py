"""Benchmark: the memory plan's per-layer terms against live tensors at the real Llama-3.1-8B layer shape.

Random-weight Llama models with Llama-3.1-8B's layer (hidden 4096, intermediate 14,336, 32 heads, 8 KV heads,
RMSNorm, SiLU gated MLP) and a 512-token vocabulary, 1 and 2 layers deep, written locally (nothing from the Hub),
loaded by the trainer's own loader (`load_model_and_tokenizer`: NF4 with double quantization, LoRA r=32 on every
linear layer, dropout 0) and trained for one step (forward and backward, the trainer's chunked loss under bf16
autocast) at batch 1 x 4,096 tokens on the CPU. Live tensors are counted the way CUDA's caching allocator counts
them (`live_tensors.LiveTensorPeak`); the host copies `--offload_activations` makes are counted apart.

For each variant (the QLoRA setting of `context_planning.py`, without checkpointing, fp32 without 4-bit with and
without checkpointing, with `--tiled_mlp`, with `--offload_activations`), the adapters' gradients made before the
step so that only activations count:
* per extra layer (2 layers less 1, where both are run): measured peak against the plan's activations (without
  checkpointing this is `_layer_activation_bytes`; with it, one checkpointed input);
* the layers' share of the 1-layer peak (all but what the forward made outside the decoder layers and the host
  copies) against `_layer_activation_bytes` + `_backward_working_bytes` (one layer and its backward);
* without checkpointing, what autograd saves in the layer (saved_tensors_hooks, each storage once, by module): the
  breakdown to set against each line of `_layer_activation_bytes`;
* with offload, the host copies against the plan's host RAM for a GPU.

    python benchmarks/layer_plan_accuracy.py               # every variant, appends to benchmarks/RESULTS.md
    python benchmarks/layer_plan_accuracy.py --plan-only   # the plan's numbers alone (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.live_tensors import LiveTensorPeak  # noqa: E402

MIB = 1024**2
TOLERANCE = 0.15
SEQ = 4096
VOCAB = 512
DEPTHS = (1, 2)
LLAMA_31_8B_LAYER: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}
# name: changes to context_planning.qlora_options (QLoRA NF4, LoRA r=32 all linear, dropout 0, bf16, checkpointing)
# (each layer takes 40-120 s on 2 cores: the per-layer difference is measured where it says most)
VARIANTS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "QLoRA (NF4, bf16, checkpointing)": ({}, DEPTHS),
    "QLoRA, no checkpointing": ({"gradient_checkpointing": False}, DEPTHS),
    "LoRA fp32, no 4-bit, checkpointing": ({"use_4bit": False, "bf16": False}, (1,)),
    "LoRA fp32, no 4-bit, no checkpointing": ({"use_4bit": False, "bf16": False, "gradient_checkpointing": False},
                                              (1,)),
    "QLoRA + --tiled_mlp": ({"tiled_mlp": True}, (1,)),
    "QLoRA + --offload_activations": ({"offload_activations": True}, (1,)),
}


# ---------------------------------------------------------------------------------------------------------
# Models


def make_models(root: Path) -> dict[int, str]:
    """Write the 1- and 2-layer models (bf16 safetensors, one shared first layer) with the local tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from backend.training.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(VOCAB)
    config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=max(DEPTHS), **LLAMA_31_8B_LAYER)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folders = {}
    for depth in sorted(DEPTHS, reverse=True):
        model.model.layers = model.model.layers[:depth]
        model.config.num_hidden_layers = depth
        folder = root / f"llama8b-layer-x{depth}"
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders[depth] = str(folder)
    del model
    gc.collect()
    return folders


def variant_options(folder: str, changes: dict[str, Any]) -> Any:
    """The variant's TrainingOptions at batch 1 x SEQ tokens."""
    from benchmarks.context_planning import qlora_options

    return qlora_options(folder, max_seq_length=SEQ, per_device_train_batch_size=1, **changes)


# ---------------------------------------------------------------------------------------------------------
# The plan


def plan_terms(options: Any) -> dict[str, int]:
    """The plan's numbers for these options on the CPU (and, with offload, the device side as on a GPU)."""
    from backend.training.memory import estimate_memory, load_model_config, model_shape
    from backend.training.memory_estimate import (
        _backward_working_bytes,
        _layer_activation_bytes,
        _tokens,
        chunked_loss_planned,
        compute_bytes,
        forward_options,
        loss_bytes,
        packed_mask_bytes,
    )
    from backend.training.model_shape import lora_layers, lora_targets

    config = load_model_config(options.model)
    shape = model_shape(config)
    plan = estimate_memory(options, config, device="cpu")
    forward = forward_options(options)
    adapted = lora_layers(shape, lora_targets(options, config))
    tokens = _tokens(forward)
    element = compute_bytes(forward)
    layer = _layer_activation_bytes(forward, shape, adapted, device="cpu", tokens=tokens)
    working = _backward_working_bytes(forward, shape, device="cpu", tokens=tokens)
    outside = tokens * shape.hidden * (element + 8) + packed_mask_bytes(forward, device="cpu")
    loss = loss_bytes(forward, shape, tokens=tokens, chunked_loss=chunked_loss_planned(options, config))
    checkpointing = bool(options.gradient_checkpointing)
    layer_inputs = shape.layers * tokens * shape.hidden * element if checkpointing else 0
    terms = {
        "activations": plan.breakdown.activations, "gradients": plan.breakdown.gradients,
        "layer": layer, "working": working, "outside": outside, "loss": loss, "layer_inputs": layer_inputs,
        # what the peak holds beside the layer terms: layer inputs, the stream outside the layers, adapter grads
        "beside_layer": layer_inputs + outside + plan.breakdown.gradients,
        "layer_part": (layer + working) if checkpointing else shape.layers * layer + working,
    }
    if options.offload_activations:
        on_gpu = estimate_memory(options, config, device="cuda")
        terms["gpu_activations"] = on_gpu.breakdown.activations
        terms["gpu_host"] = on_gpu.host_bytes
    return terms


# ---------------------------------------------------------------------------------------------------------
# Measuring one step


class DeviceHostPeak(LiveTensorPeak):
    """LiveTensorPeak that counts storages made while `to_host` is set (the offloader's host copies) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.to_host = False
        self.outside = False  # set while the forward runs outside the decoder layers
        self.host_current = self.host_peak = self.device_peak = 0
        self.outside_current = 0
        self.at_peak = {"host": 0, "outside": 0}  # what the total's peak held of each

    def _track(self, storage: Any) -> None:
        key = storage._cdata
        if key in self._alive and self._alive[key]() is not None:
            return
        size, kind = storage.nbytes(), "host" if self.to_host else "outside" if self.outside else ""
        self._alive[key] = weakref.ref(storage, lambda _ref, key=key, size=size, kind=kind: self._gone(key, size, kind))
        self.current += size
        if kind == "host":
            self.host_current += size
            self.host_peak = max(self.host_peak, self.host_current)
        elif kind == "outside":
            self.outside_current += size
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = {"host": self.host_current, "outside": self.outside_current}
        self.device_peak = max(self.device_peak, self.current - self.host_current)

    def _gone(self, key: int, size: int, kind: str) -> None:
        self._alive.pop(key, None)
        self.current -= size
        if kind == "host":
            self.host_current -= size
        elif kind == "outside":
            self.outside_current -= size

    def is_tracked(self, storage: Any) -> bool:
        ref = self._alive.get(storage._cdata)
        return ref is not None and ref() is not None


@contextlib.contextmanager
def host_copies_counted_apart(tracker: DeviceHostPeak) -> Iterator[None]:
    """While inside, the offloader's host copies are the tracker's host storages."""
    from backend.training.offload import ActivationOffloader

    original = ActivationOffloader._copy_to_host

    def copy_to_host(self: Any, tensor: Any) -> Any:
        tracker.to_host = True
        try:
            return original(self, tensor)
        finally:
            tracker.to_host = False

    ActivationOffloader._copy_to_host = copy_to_host  # type: ignore[method-assign]
    try:
        yield
    finally:
        ActivationOffloader._copy_to_host = original  # type: ignore[method-assign]


class SavedByModule:
    """saved_tensors_hooks recording each storage autograd saves once, under the innermost module running."""

    def __init__(self, model: Any, tracker: DeviceHostPeak) -> None:
        self.tracker = tracker
        self.stack: list[str] = []
        self.saved: dict[int, tuple[str, int, str]] = {}
        self._refs: list[Any] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: self._enter(name)))
            self.handles.append(module.register_forward_hook(lambda _m, _a, _o: self._leave()))

    def _enter(self, name: str) -> None:
        self.stack.append(name)

    def _leave(self) -> None:
        self.stack.pop()

    def pack(self, tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if self.tracker.is_tracked(storage) and storage._cdata not in self.saved:  # made in the step, not a weight
            where = self.stack[-1] if self.stack else "(outside modules)"
            self.saved[storage._cdata] = (where, storage.nbytes(), f"{tuple(tensor.shape)} {tensor.dtype}")
            self._refs.append(storage)  # the ids stay unique while recording
        return tensor

    def by_module(self, prefix: str) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for where, size, _shape in self.saved.values():
            if where.find(prefix) != -1:
                totals[_module_group(where.split(prefix, 1)[1])] += size
        return dict(totals)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._refs.clear()


def _module_group(name: str) -> str:
    """A module path inside one decoder layer, without peft's wrappers: self_attn.q_proj.lora_A and so on."""
    parts = [part for part in name.strip(".").split(".") if part not in ("base_layer", "default")]
    return ".".join(parts) or "(the layer itself)"


def measure(options: Any, *, breakdown: bool) -> dict[str, Any]:
    """One training step of the model as the trainer loads it: live-tensor peaks (all, device, host copies)."""
    import torch

    from backend.training.chunked_loss import causal_lm_summed_loss
    from backend.training.modeling import compute_dtype, load_model_and_tokenizer

    torch.manual_seed(0)
    started = time.perf_counter()
    model, _tokenizer = load_model_and_tokenizer(options)
    model.train()
    loaded = time.perf_counter() - started
    ids = torch.randint(1, VOCAB - 1, (1, SEQ))
    mask = torch.ones_like(ids)
    dtype = compute_dtype(options) if options.bf16 else torch.float32
    for param in model.parameters():
        if param.requires_grad:  # made before the step: the backward accumulates into them, so only activations count
            param.grad = torch.zeros_like(param)
    tracker = DeviceHostPeak()
    layers = [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
    depth = [0]

    def enter(*_args: Any) -> None:
        depth[0] += 1
        tracker.outside = False

    def leave(*_args: Any) -> None:
        depth[0] -= 1
        tracker.outside = depth[0] == 0 and forward[0]

    forward = [True]
    handles = [hook for layer in layers for hook in (layer.register_forward_pre_hook(enter),
                                                       layer.register_forward_hook(leave))]
    recorder = SavedByModule(model, tracker) if breakdown else None
    hooks = (torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda tensor: tensor) if recorder
             else contextlib.nullcontext())
    started = time.perf_counter()
    tracker.outside = True  # the embeddings, until the first layer starts
    with host_copies_counted_apart(tracker), tracker:
        with torch.autocast("cpu", dtype=dtype, enabled=options.bf16), hooks:
            loss = causal_lm_summed_loss(model, ids, mask, ids)
        after_forward = tracker.current
        saved = recorder.by_module("layers.0.") if recorder else {}
        if recorder:
            recorder.close()
        forward[0] = tracker.outside = False  # the backward's tensors are the layers' working sets (and the loss's)
        (loss / (SEQ - 1)).backward()
        del loss
    seconds = time.perf_counter() - started
    for handle in handles:
        handle.remove()
    result = {
        "peak": tracker.peak, "device_peak": tracker.device_peak, "host_peak": tracker.host_peak,
        "outside_at_peak": tracker.at_peak["outside"], "host_at_peak": tracker.at_peak["host"],
        "after_forward": after_forward, "saved_layer0": saved, "load_s": round(loaded, 1), "step_s": round(seconds, 1),
    }
    del model, recorder, layers
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------------
# The report


def _mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


def _ratio(measured: float, planned: float) -> str:
    return f"{_mib(measured)} | {_mib(planned)} | {planned / measured:.3f}"


def compare(name: str, plans: dict[int, dict[str, int]], runs: dict[int, dict[str, Any]]) -> tuple[str, list[str],
                                                                                                   list[float]]:
    """One variant's table row, its detail lines and the plan/measured ratios it is judged by."""
    depths = sorted(runs)
    shallow, deep = depths[0], depths[-1]
    one = plans[shallow]
    ratios, details = [], []
    # the layers' share of the peak: all but what the forward made outside the decoder layers (embeddings, the
    # final norm, the loss's) and the offloader's host copies, against the plan's layer terms
    layers = runs[shallow]["peak"] - runs[shallow]["outside_at_peak"] - runs[shallow]["host_at_peak"]
    ratios.append(one["layer_part"] / layers)
    if deep > shallow:
        per_layer = (runs[deep]["peak"] - runs[shallow]["peak"]) / (deep - shallow)
        planned = (plans[deep]["activations"] - one["activations"]) / (deep - shallow)
        ratios.append(planned / per_layer)
        per_layer_cells = _ratio(per_layer, planned)
    else:
        per_layer_cells = "- | - | -"
    beside, planned_beside = runs[shallow]["peak"] - layers, one["activations"] - one["layer_part"]
    row = (f"| {name} | {'/'.join(map(str, depths))} | {per_layer_cells} | {_ratio(layers, one['layer_part'])} | "
           f"{_mib(beside)} | {_mib(planned_beside)} | {_ratio(runs[shallow]['peak'], one['activations'])} | "
           f"{runs[shallow]['step_s']:.0f} |")
    if "gpu_host" in one:
        host = runs[shallow]["host_peak"]
        ratios.append(one["gpu_host"] / host)
        details.append(
            f"- {name}: host copies (the offloaded layer inputs) peak {_mib(host)} MiB, the GPU plan's host RAM "
            f"{_mib(one['gpu_host'])} MiB ({one['gpu_host'] / host:.3f}); the rest, on the device, "
            f"{_mib(runs[shallow]['device_peak'])} MiB (on the CPU the host copy is recomputed from in place; on a "
            f"GPU the input being recomputed and the next one are fetched back, which the plan keeps on the device)"
        )
    saved = runs[shallow]["saved_layer0"]
    if saved:
        lines = ", ".join(f"{group} {_mib(size)}" for group, size in sorted(saved.items()) if size >= MIB)
        details.append(f"- {name}: autograd saves {_mib(sum(saved.values()))} MiB in layer 0 ({lines}; MiB, groups "
                       f"under 1 MiB left out) against `_layer_activation_bytes` {_mib(one['layer'])} MiB")
    return row, details, ratios


def run(*, variants: list[str], write: bool, plan_only: bool) -> int:
    """Measure (or only plan) the variants, print the table, append it to RESULTS.md; 0 when all are within."""
    import torch

    torch.set_num_threads(2)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[str] = []
    details: list[str] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_models(Path(tmp))
        for name in variants:
            changes, depths = VARIANTS[name]
            plans = {depth: plan_terms(variant_options(folders[depth], changes)) for depth in depths}
            if plan_only:
                print(name, json.dumps({depth: {key: round(value / MIB) for key, value in terms.items()}
                                        for depth, terms in plans.items()}), flush=True)
                continue
            checkpointing = variant_options(folders[1], changes).gradient_checkpointing
            runs = {depth: measure(variant_options(folders[depth], changes),
                                   breakdown=depth == 1 and not checkpointing) for depth in depths}
            print(name, json.dumps({depth: {key: value for key, value in result.items() if key != "saved_layer0"}
                                    for depth, result in runs.items()}), flush=True)
            row, lines, judged = compare(name, plans, runs)
            rows.append(row)
            details += lines
            ratios += judged
    if plan_only:
        return 0
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    worst = max(ratios, key=lambda value: abs(value - 1))
    within = sum(abs(value - 1) <= TOLERANCE for value in ratios)
    summary = f"{within}/{len(ratios)} plan/measured ratios within ±{TOLERANCE:.0%}, worst {worst:.3f}; {seconds:.0f} s"
    table = "\n".join([
        "| variant | layers | per extra layer: measured MiB | planned MiB | plan/measured "
        "| the layer's share of the 1-layer peak: measured MiB | planned MiB | plan/measured "
        "| the rest: measured MiB | planned MiB | whole 1-layer peak: measured MiB | planned MiB | plan/measured "
        "| step s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    print(table)
    print("\n".join(details))
    print(summary)
    if write:
        from benchmarks.plan_accuracy import append_results, machine_info

        loads = (" ".join(f"{value:.1f}" for value in load_before), " ".join(f"{value:.1f}" for value in load_after))
        append_results(
            "Memory plan accuracy per layer, Llama-3.1-8B layer shape (benchmarks/layer_plan_accuracy.py)",
            f"### {machine_info()}\n"
            f"Random-weight Llama with Llama-3.1-8B's layer (hidden 4096, intermediate 14,336, 32 heads, 8 KV heads, "
            f"RMSNorm, SiLU gated MLP), vocabulary {VOCAB}, 1 and 2 layers; loaded by `load_model_and_tokenizer`, LoRA "
            f"r=32 on every linear layer, dropout 0; one step (forward + backward, the chunked loss, bf16 autocast "
            f"where bf16) at 1 x {SEQ:,} tokens; torch {torch.__version__}, 2 threads; load average before "
            f"{loads[0]}, after {loads[1]}. Measured: live tensors (what torch.cuda.max_memory_allocated counts) "
            "created by the step, base weights not included; planned: `estimate_memory` (device cpu) activations + "
            "adapter gradients. Per extra layer: 2 layers less 1 (without checkpointing `_layer_activation_bytes`; "
            "with it one checkpointed input). One layer's working set: the 1-layer step's peak less what the plan "
            "counts beside the layer's terms (checkpointed inputs, the stream outside the layers, adapter gradients), "
            "against `_layer_activation_bytes` + `_backward_working_bytes`.\n\n"
            f"{table}\n\n" + "\n".join(details) + f"\n\n{summary}\n",
        )
    return 0 if within == len(ratios) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="only these (repeatable)")
    parser.add_argument("--plan-only", action="store_true", help="print the plan's terms, measure nothing")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    return run(variants=args.variant or list(VARIANTS), write=not args.no_write, plan_only=args.plan_only)


if __name__ == "__main__":
    raise SystemExit(main())
