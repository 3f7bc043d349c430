#!/usr/bin/env bash
# The GPU checks, run from the repository root on a machine with an NVIDIA GPU and its own torch. Nothing
# downloads there, so the project's pinned pure-Python/bitsandbytes wheels travel in .whl/ (ignored by git),
# fetched beforehand with:
#
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated_types typing_inspection typing_extensions==4.16.0 orjson==3.13.0
#
# (match the versions to backend/training/requirements_training.txt). Results go to $OUT (default
# /tmp/gpu-out); copy the numbers into benchmarks/RESULTS.md by hand, with the date and the machine.
#
#   bash benchmarks/gpu_session.sh [PART ...]     # no PART: all of them, in this order
#
# Parts (rough H200 times; one device command may run 10 minutes, so pick parts to fit it):
#   plan      plan_accuracy.py on the tiny models against torch.cuda.max_memory_allocated (about 4 min)
#   large     the 7B 8-bit and 13B 4-bit guide commands against Trainer + PEFT (about 5 min, 13B cut at 330 s)
#   qlora8b   issue 11: Llama-3.1-8B shape, QLoRA r=32 all linear, bf16, checkpointing, 2 x 2048 tokens,
#             tokens/s and peak against Trainer + PEFT (about 3 min: 16 GB of weights made, two runs)
#   context8b issue 11: the same setting at batch 1 with --max_seq_length auto for the device's free memory
#             (the plan picks the length; capped at the model's 131,072 positions), 2 steps, the measured peak
#             against the plan (a step at 100k+ tokens takes minutes: allow 5; CONTEXT_BUDGET_GB=24 plans for
#             24 GiB instead, a much shorter run)
#   liger     Liger Kernel's RMSNorm/RoPE/SwiGLU (its wheel in .whl/ too): 5 LoRA steps of a tiny Llama in bf16
#             with and without them, the log's "Liger kernels on" line and losses that agree (under a minute)
# qlora8b leaves its model in $WORK8B and context8b reuses it (in the same call, or a later one while the machine is
# still warm), then removes it. Both together take about 8-10 minutes: with 10 minutes a command, run them as
# `CONTEXT_BUDGET_GB=80 bash benchmarks/gpu_session.sh qlora8b context8b` (about 129k tokens planned), or each in its
# own call.
# Before a device call, check the Python parts on the CPU: python benchmarks/gpu_large_models.py --smoke
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(plan large qlora8b context8b liger)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
WORK8B=/tmp/safetrain-gpu-8b

for part in "${PARTS[@]}"; do
  echo "== $part $(date -u +%H:%M:%S)" | tee -a "$OUT/parts.txt"
  case "$part" in
    plan)
      # plan against torch.cuda.max_memory_allocated, 8 settings on each tiny model (target ±15%)
      python3 benchmarks/plan_accuracy.py --arch gpt2 --no-write | tee "$OUT/plan_gpt2.txt"
      python3 benchmarks/plan_accuracy.py --arch llama --no-write | tee "$OUT/plan_llama.txt"
      ;;
    large)
      # the plan alone for the large shapes, to set beside their measured peaks
      python3 benchmarks/gpu_large_models.py --shape 7b --bits 8 --plan-only | tee "$OUT/plan_large.txt"
      python3 benchmarks/gpu_large_models.py --shape 13b --bits 4 --plan-only | tee -a "$OUT/plan_large.txt"
      # the guide's 8-bit command on a 7B shape (reentrant checkpointing now) and 4-bit on a 13B shape,
      # each against Trainer + PEFT
      python3 benchmarks/gpu_large_models.py --shape 7b --bits 8 --out "$OUT/large_7b_8bit.json" | tee "$OUT/large_7b.txt"
      timeout 330 python3 benchmarks/gpu_large_models.py --shape 13b --bits 4 --out "$OUT/large_13b_4bit.json" \
        | tee "$OUT/large_13b.txt" || echo "13B 4-bit did not finish in its 330 s" | tee -a "$OUT/large_13b.txt"
      ;;
    qlora8b)
      # issue 11: tokens/s vs Trainer + PEFT with the same settings (target >= 1.3), and both peaks
      python3 benchmarks/gpu_large_models.py --shape 8b --qlora --batch 2 --seq 2048 --plan-only \
        | tee "$OUT/plan_8b.txt"
      timeout 420 python3 benchmarks/gpu_large_models.py --shape 8b --qlora --batch 2 --seq 2048 --steps 10 \
        --warmup 3 --work "$WORK8B" --keep-model --out "$OUT/qlora_8b.json" | tee "$OUT/qlora_8b.txt" \
        || echo "8B QLoRA vs Trainer did not finish in its 420 s" | tee -a "$OUT/qlora_8b.txt"
      ;;
    context8b)
      # issue 11: the plan's longest context for this device's memory, trained for real
      budget=()
      [ -z "${CONTEXT_BUDGET_GB:-}" ] || budget=(--budget_gb "$CONTEXT_BUDGET_GB")
      # with every saver, as the README's longest-context table plans it (CONTEXT_SAVERS= for the settings alone)
      savers=(${CONTEXT_SAVERS---every-saver})
      timeout 480 python3 benchmarks/gpu_large_models.py --shape 8b --qlora --batch 1 --seq auto --steps 2 \
        --warmup 1 "${budget[@]}" "${savers[@]}" --work "$WORK8B" --reuse-model --out "$OUT/context_8b.json" \
        | tee "$OUT/context_8b.txt" || echo "8B --max_seq_length auto did not finish in its 480 s" \
        | tee -a "$OUT/context_8b.txt"
      rm -rf "$WORK8B"
      ;;
    liger)
      if python3 -c "import liger_kernel.transformers" 2>/dev/null; then
        python3 -m backend.cli models make-tiny /tmp/tiny-llama --arch llama --hidden 256 --layers 4 >/dev/null
        for liger in --liger_kernels --no_liger_kernels; do
          python3 -m backend.training.train_safe --model /tmp/tiny-llama --use_lora --bf16 --max_steps 5 \
            --logging_steps 1 --output_dir "/tmp/liger-run$liger" "$liger" | tee -a "$OUT/liger_kernels.txt"
        done
      else
        echo "liger_kernel does not import here: no Liger kernels run" | tee "$OUT/liger_kernels.txt"
      fi
      ;;
    *)
      echo "unknown part $part (plan, large, qlora8b, context8b, liger)" >&2
      exit 2
      ;;
  esac
done
