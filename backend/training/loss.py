"""The supervised loss of one micro-batch: the chunked (fused linear) cross-entropy, or the plain one on logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from backend.training.chunked_loss import (
    ChunkedLossUnavailable,
    chunked_loss_head,
    final_hidden_states,
    fused_linear_cross_entropy,
    loss_backend_reason,
    select_loss_backend,
    shift_labels,
)
from backend.training.datasets import IGNORE_INDEX
from backend.training.modeling import attention_inputs
from backend.training.reporting import token_hits
from backend.training.state import Attempt


def loss_head_for(attempt: Attempt) -> Any:
    """lm_head for the chunked loss, or None for the plain one (--no_chunked_loss, several ranks, another head)."""
    options, ranks, report = attempt.setup.options, attempt.setup.ranks, attempt.setup.report
    if not options.chunked_loss:
        return None
    if ranks.world_size > 1 or ranks.deepspeed:
        # DDP's and DeepSpeed's hooks run only through the wrapper's forward; ZeRO-3 gathers lm_head only inside it
        report.message("chunked loss off across ranks: the loss goes through the wrapped model's forward")
        return None
    try:
        head = chunked_loss_head(attempt.model)
    except ChunkedLossUnavailable as reason:
        report.message(f"chunked loss off, the plain loss on full logits instead: {reason}")
        return None
    report.message(f"chunked loss on ({select_loss_backend(attempt.device)}: {loss_backend_reason(attempt.device)})")
    return head


def summed_loss(
    attempt: Attempt, batch: dict[str, torch.Tensor], hits: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """The cross-entropy of one micro-batch, summed over its trained tokens; [argmax hits, tokens] onto `hits`."""
    input_ids = batch["input_ids"].to(attempt.device)
    attention_mask, position_ids = attention_inputs(batch, attempt.device)
    if attempt.loss_head is not None:
        # lm_head and the loss a slice of tokens at a time: no B x T x V logits, nor their fp32 copy, ever exist
        labels = shift_labels(batch["labels"].to(attempt.device))
        with attempt.autocast():
            hidden = final_hidden_states(attempt.model, input_ids, attention_mask, position_ids)
            return fused_linear_cross_entropy(hidden, attempt.loss_head.weight, labels, attempt.loss_head.bias,
                                              token_hits=hits)
    with attempt.autocast():
        outputs = attempt.forward_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits = outputs.logits[:, :-1]
    del outputs  # holds other per-layer outputs when a model returns them; only the logits are needed
    labels = batch["labels"][:, 1:].to(logits.device)
    if hits is not None:
        hits.append(token_hits(logits.detach(), labels))
    # A float32 log-softmax is stable under fp16/bf16; its vocabulary-wide copy lives only until backward.
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
