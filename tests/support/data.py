"""Datasets small enough to train on in a test."""

from __future__ import annotations

# Sixteen prompt/completion lines (counting on from a number), enough for a few training steps.
TRAIN_LINES = [
    {"prompt": f"Count from {n}:", "completion": " " + " ".join(str(n + k) for k in range(1, 6))} for n in range(16)
]
