"""What 8-bit + LoRA + gradient checkpointing keeps per layer at the 7B layer shape, reentrant or not.

bitsandbytes' 8-bit matmul keeps its input on the autograd context (not through save_for_backward), so
non-reentrant checkpointing cannot drop it and every layer's matmul inputs stay until the backward; the
reentrant kind runs the forward without a graph and drops them. On an H200 this was the ~3.5 GB the memory
plan missed for a 7B Llama (benchmarks/RESULTS.md). Measured here without a GPU: a Llama with the 7B layer
shape (hidden 4096, MLP 11008, 32 heads) but few layers and a small vocabulary, loaded in 8-bit with LoRA and
checkpointing exactly as the trainer loads it, trained for a step with each kind of checkpointing. The peak
of live tensors (what torch.cuda.max_memory_allocated counts, benchmarks/live_tensors.py) differs by what
the non-reentrant kind keeps of every layer but the one the backward is in (plus the peak's own moment), so
what one layer keeps is the growth of that difference from 1 to 2 layers; the plan's count of the 8-bit
matmul inputs stands against it.

    python benchmarks/int8_checkpointing.py [--batch 2] [--seq 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plan_accuracy import append_results, live_training_peak, machine_info  # noqa: E402

MB = 1e6
DEPTHS = (1, 2)
LAYER_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}


def make_model(folder: Path, layers: int) -> None:
    """A random-weight Llama with the 7B layer shape, `layers` deep, and a locally trained tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from backend.training.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, **LAYER_7B)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def live_peak(folder: Path, *, reentrant: bool, batch: int, seq: int) -> int:
    """Weights plus the live-tensor peak of one training step, with the chosen kind of checkpointing."""
    import torch

    from backend.training.modeling import load_model_and_tokenizer
    from backend.training.options import TrainingOptions

    options = TrainingOptions.model_validate({
        "model": str(folder), "use_lora": True, "lora_r": 8, "use_8bit": True, "gradient_checkpointing": True,
        "per_device_train_batch_size": batch, "max_seq_length": seq,
    })
    model, _tokenizer = load_model_and_tokenizer(options)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ids = torch.randint(1, 500, (batch, seq), generator=torch.Generator().manual_seed(0))
    return live_training_peak(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1)[0]


def planned_kept_per_layer(folder: Path, *, batch: int, seq: int) -> int:
    """The plan's count of the 8-bit matmul inputs one layer keeps (fp32, distinct tensors)."""
    from backend.training.memory import load_model_config, model_shape

    shape = model_shape(load_model_config(str(folder)))
    return batch * seq * 4 * shape.quantized_inputs_per_layer  # fp32: the benchmark trains without --bf16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    peaks: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in DEPTHS:
            folder = Path(tmp) / f"llama-7b-layers-{layers}"
            make_model(folder, layers)
            peaks[layers] = {
                kind: live_peak(folder, reentrant=kind == "reentrant", batch=args.batch, seq=args.seq)
                for kind in ("non-reentrant", "reentrant")
            }
        planned = planned_kept_per_layer(folder, batch=args.batch, seq=args.seq)
    differences = {layers: peak["non-reentrant"] - peak["reentrant"] for layers, peak in peaks.items()}
    kept = differences[DEPTHS[1]] - differences[DEPTHS[0]]
    lines = [
        *(f"- peak of live tensors, {layers} layer(s): non-reentrant {peak['non-reentrant'] / MB:.0f} MB, "
          f"reentrant {peak['reentrant'] / MB:.0f} MB" for layers, peak in peaks.items()),
        f"- kept per layer by the non-reentrant kind: {kept / MB:.1f} MB measured, {planned / MB:.1f} MB planned "
        f"(8-bit matmul inputs; {planned / kept - 1:+.1%}); over a 7B model's 32 layers: {32 * kept / 1e9:.2f} GB",
        f"- {time.perf_counter() - started:.0f} s",
    ]
    print("\n".join(lines))
    if not args.no_write:
        append_results(
            "8-bit checkpointing at the 7B layer shape (benchmarks/int8_checkpointing.py)",
            f"### {machine_info()}\nLlama with hidden 4096, MLP 11008, 32 heads, 1 and 2 layers, "
            f"8-bit + LoRA r 8 + checkpointing, micro-batch {args.batch} x {args.seq} tokens, one AdamW step, "
            "fp32 compute.\n\n"
            + "\n".join(lines) + "\n",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
