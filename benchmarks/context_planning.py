"""Benchmark: the longest context the memory plan fits on a GPU, Llama-3.1-8B shape, beside the peers' numbers.

QLoRA (4-bit NF4, double quantization) with LoRA r=32 on every linear layer, micro-batch 1, bf16, gradient
checkpointing, planned for CUDA from the config alone (`--plan_device cuda --max_seq_length auto`): a binary search
on `estimate_memory` for the longest --max_seq_length whose plan fits each budget, with the chunked loss (the
default) and, for comparison, with the plain loss on full logits. Beside them: Unsloth's published longest
contexts for that setting and the targets of issue 11 (Unsloth x 1.2), then the plan at 2 x 2048 tokens.
The plan's terms at the longest context say what dominates.

    python benchmarks/context_planning.py          # prints the tables (nothing is loaded, no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3
LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# GiB: (Unsloth's published longest context, Hugging Face + FA2's, issue 11's target)
PEERS: dict[int, tuple[int, int | None, int]] = {
    8: (2_972, None, 3_500), 12: (21_848, 932, 26_000), 24: (78_475, 5_789, 95_000), 80: (342_733, 28_454, 400_000),
}
TWO_BY_2048_TARGET_GIB = 7.0


def qlora_options(folder: str, **overrides: Any) -> Any:
    """The benchmark's setting: QLoRA r=32 on all linear layers, batch 1, bf16, checkpointing."""
    from backend.training.options import TrainingOptions

    settings = {
        "model": folder, "use_lora": True, "use_4bit": True, "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.0,
        "lora_target_modules": ALL_LINEAR, "bf16": True, "gradient_checkpointing": True,
        "per_device_train_batch_size": 1, "max_seq_length": 2048, **overrides,
    }
    return TrainingOptions.model_validate(settings)


# Every memory saver safetrain has beyond the setting itself, each the same training (offloads add copies, the
# tiled MLP a recompute; 8-bit AdamW states are what Unsloth's published runs use too).
EVERY_SAVER: dict[str, Any] = {
    "offload_activations": True, "offload_embeddings": True, "tiled_mlp": True, "optim": "paged_adamw_8bit",
}


def longest_contexts(folder: str, config: Any, *, chunked_loss: bool, **savers: Any) -> dict[int, int | None]:
    """The plan's longest context per budget (GiB), unbounded by the model's positions."""
    from backend.training.memory import longest_fitting_seq_length

    options = qlora_options(folder, chunked_loss=chunked_loss, **savers)
    return {
        gib: longest_fitting_seq_length(options, config, budget_bytes=gib * GIB, device="cuda")
        for gib in PEERS
    }


def plan_terms(folder: str, config: Any, *, seq: int, batch: int = 1, **savers: Any) -> dict[str, float]:
    """The plan's components and the activation terms (GiB) at one length."""
    from backend.training.memory import estimate_memory, model_shape
    from backend.training.memory_estimate import compute_bytes, loss_bytes

    options = qlora_options(folder, max_seq_length=seq, per_device_train_batch_size=batch, **savers)
    plan = estimate_memory(options, config, device="cuda")
    shape = model_shape(config)
    tokens = batch * seq
    terms = {name: value / GIB for name, value in plan.breakdown.to_dict().items()}
    kept_layers = 2 if options.offload_activations else shape.layers  # offloaded: the recomputed and the next
    terms["checkpointed layer inputs"] = kept_layers * tokens * shape.hidden * compute_bytes(options) / GIB
    terms["host"] = plan.host_bytes / GIB
    terms["loss"] = loss_bytes(options, shape, tokens=tokens, chunked_loss=True) / GIB
    terms["total"] = plan.estimate_bytes / GIB
    return terms


def _cell(value: int | None) -> str:
    return "OOM" if not value else f"{value:,}"


def report() -> str:
    """The Markdown tables: longest context per budget beside the peers, and the plan at 2 x 2048."""
    from backend.training.memory import load_model_config, model_shape, smallest_fitting_budget

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA_31_8B))  # a config alone is enough to plan
        config = load_model_config(tmp)
        given = longest_contexts(tmp, config, chunked_loss=True)
        plain = longest_contexts(tmp, config, chunked_loss=False)
        every = longest_contexts(tmp, config, chunked_loss=True, **EVERY_SAVER)
        at_longest = {
            gib: plan_terms(tmp, config, seq=length, **EVERY_SAVER) for gib, length in every.items() if length
        }
        two_by_2048 = plan_terms(tmp, config, seq=2048, batch=2, **EVERY_SAVER)
        two_by_2048_given = plan_terms(tmp, config, seq=2048, batch=2)
        smallest = smallest_fitting_budget(qlora_options(tmp), config, device="cuda") / GIB
        smallest_every = smallest_fitting_budget(qlora_options(tmp, **EVERY_SAVER), config, device="cuda") / GIB
        shape = model_shape(config)
        head_and_embeddings = 2 * shape.vocab * shape.hidden * 2 / GIB
    savers = " ".join(f"--{name}" if value is True else f"--{name} {value}" for name, value in EVERY_SAVER.items())
    lines = [
        f"Every saver: {savers}.", "",
        "| GPU memory | safetrain plan, every saver | settings alone (chunked loss) | plain loss "
        "| Unsloth (published) | HF + FA2 (published) | target | met |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for gib, (unsloth, hf, target) in PEERS.items():
        met = "yes" if (every[gib] or 0) >= target else "no"
        lines.append(f"| {gib} GiB | {_cell(every[gib])} | {_cell(given[gib])} | {_cell(plain[gib])} "
                     f"| {unsloth:,} | {_cell(hf)} | {target:,} | {met} |")
    lines += ["", f"Smallest budget that fits one token: {smallest_every:.2f} GiB with every saver, {smallest:.2f} GiB "
              f"with the settings alone (the bf16 embeddings and lm_head are {head_and_embeddings:.2f} GiB)."]
    lines += ["", "Plan at the longest context with every saver (GiB):", "",
              "| budget | tokens | weights | adapters+grads+optimizer | activations | of which layer inputs on the "
              "GPU | loss | overhead | total | host RAM |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for gib, terms in at_longest.items():
        trained = terms["adapters"] + terms["gradients"] + terms["optimizer"]
        lines.append(
            f"| {gib} | {every[gib]:,} | {terms['weights']:.2f} | {trained:.2f} | {terms['activations']:.2f} | "
            f"{terms['checkpointed layer inputs']:.2f} | {terms['loss']:.2f} | {terms['overhead']:.2f} | "
            f"{terms['total']:.2f} | {terms['host']:.2f} |"
        )
    verdict = "met" if two_by_2048["total"] <= TWO_BY_2048_TARGET_GIB else "not met"
    lines += ["", f"Plan at 2 x 2048 tokens: {two_by_2048['total']:.2f} GiB with every saver (target <= "
              f"{TWO_BY_2048_TARGET_GIB} GiB: {verdict}), {two_by_2048_given['total']:.2f} GiB with the settings "
              "alone; "
              f"with every saver: weights {two_by_2048['weights']:.2f}, activations {two_by_2048['activations']:.2f}, "
              f"overhead {two_by_2048['overhead']:.2f}, adapters+gradients+optimizer "
              f"{two_by_2048['adapters'] + two_by_2048['gradients'] + two_by_2048['optimizer']:.2f} GiB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
