#!/usr/bin/env bash
# The memory plan's GPU checks, sized for one device call (about 8 minutes on an H200), run from the
# repository root on a machine with an NVIDIA GPU and its own torch. Nothing downloads there, so the
# project's pinned pure-Python/bitsandbytes wheels travel in .whl/ (ignored by git), fetched beforehand with:
#
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated_types typing_inspection typing_extensions==4.16.0 orjson==3.13.0
#
# (match the versions to backend/training/requirements_training.txt). Results go to $OUT (default
# /tmp/gpu-out); copy the numbers into benchmarks/RESULTS.md by hand, with the date and the machine.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

# 1. plan against torch.cuda.max_memory_allocated, 8 settings on each tiny model (target ±15%)
python3 benchmarks/plan_accuracy.py --arch gpt2 --no-write | tee "$OUT/plan_gpt2.txt"
python3 benchmarks/plan_accuracy.py --arch llama --no-write | tee "$OUT/plan_llama.txt"
# 2. the plan alone for the large shapes, to set beside their measured peaks
python3 benchmarks/gpu_large_models.py --shape 7b --bits 8 --plan-only | tee "$OUT/plan_large.txt"
python3 benchmarks/gpu_large_models.py --shape 13b --bits 4 --plan-only | tee -a "$OUT/plan_large.txt"
# 3. the guide's 8-bit command on a 7B shape (reentrant checkpointing now) and 4-bit on a 13B shape,
#    each against Trainer + PEFT
python3 benchmarks/gpu_large_models.py --shape 7b --bits 8 --out "$OUT/large_7b_8bit.json" | tee "$OUT/large_7b.txt"
timeout 330 python3 benchmarks/gpu_large_models.py --shape 13b --bits 4 --out "$OUT/large_13b_4bit.json" \
  | tee "$OUT/large_13b.txt" || echo "13B 4-bit did not finish in its 330 s" | tee -a "$OUT/large_13b.txt"
