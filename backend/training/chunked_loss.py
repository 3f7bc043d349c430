"""The causal-LM loss without the whole logits: lm_head and cross-entropy a slice of tokens at a time.

The plain loss projects every token onto the vocabulary at once: B x T x V logits, their fp32 copy for the
log-softmax and the gradients of both, often the largest tensors of a LoRA run (128k vocabulary x 2k tokens
is 1 GiB per fp32 copy). Here the projection, the fp32 upcast and the log-softmax run on `chunk_tokens` rows at a
time, only each row's log-sum-exp is kept, and the backward recomputes each slice's logits, so the loss's
working set is one slice (`chunk_tokens_for`), whatever the sequence length.

Contract: `hidden` rows predict `labels` at the same position (already shifted: `shift_labels` aligns the
labels of a causal LM with its hidden states); tokens labelled `IGNORE_INDEX` add nothing and cost nothing.
The result equals `F.cross_entropy(logits.float().view(-1, V), labels.view(-1), ignore_index=-100,
reduction="sum")` with `logits = hidden @ weight.T + bias` projected in the same dtype.

On CUDA, Liger Kernel's fused linear cross-entropy (Triton) is used when installed (`select_loss_backend`).
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Any, TypedDict, Unpack

import torch
from torch import nn

IGNORE_INDEX = -100
# The default working set of one slice; 128 MiB is 174 tokens of a 128,256-token vocabulary.
DEFAULT_BUDGET_BYTES = 128 * 2**20
# A slice's fp32 logits plus, in half precision, the 2-byte matmul output they are upcast from.
BYTES_PER_LOGIT = 6
# Heads that are a plain projection: no logit scaling or soft-capping after lm_head (Gemma, Cohere, Granite do).
SUPPORTED_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2"})
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class ChunkedLossUnavailable(ValueError):
    """The model's head is not a plain projection the chunked loss can take over; the message says why."""


def chunk_tokens_for(vocab_size: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """How many tokens one slice may hold so its logits' working set stays within `budget_bytes`."""
    if vocab_size <= 0 or budget_bytes <= 0:
        raise ValueError(f"vocab_size and budget_bytes must be positive (got {vocab_size}, {budget_bytes})")
    return max(1, budget_bytes // (vocab_size * BYTES_PER_LOGIT))


def chunked_loss_bytes(
    tokens: int, vocab_size: int, hidden_size: int, *, element_bytes: int = 4, budget_bytes: int = DEFAULT_BUDGET_BYTES
) -> int:
    """The memory plan's term for the PyTorch chunked loss: one slice's working set plus what it keeps per token.

    A trained head's gradient (V x H, accumulated in fp32) is the plan's gradient term, not counted here.
    """
    chunk = min(tokens, chunk_tokens_for(vocab_size, budget_bytes))
    upcast = element_bytes if element_bytes < 4 else 0  # the half-precision matmul output while it is upcast
    per_token = 20 + hidden_size * element_bytes  # row index, target and log-sum-exp; the hidden states' gradient
    return chunk * vocab_size * (4 + upcast) + tokens * per_token


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token labels aligned with every hidden state, the last position ignored."""
    # Shifting the labels rather than slicing hidden[:, :-1] keeps the hidden states contiguous: no B x T x H copy.
    ignored = labels.new_full((*labels.shape[:-1], 1), IGNORE_INDEX)
    return torch.cat([labels[..., 1:], ignored], dim=-1)


def _projection_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype lm_head would run in here: autocast's when it is on, else the wider of the two."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _slice_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One slice's logits in fp32 (an fp32 projection writes them directly: no second copy)."""
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    return logits.float()


def _exp_and_logsumexp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise log-sum-exp and sum of exponentials, leaving exp(logits - row max) in `logits`."""
    # In place: torch.logsumexp would allocate a second slice-sized temporary.
    peak = logits.amax(dim=1, keepdim=True)
    sums = logits.sub_(peak).exp_().sum(dim=1)
    return peak.squeeze(1) + sums.log(), sums


def _minus_one_hot_(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(summed loss)/d(logits) of a slice: softmax minus the one-hot targets, in place."""
    rows = torch.arange(targets.numel(), device=probabilities.device)
    probabilities[rows, targets] -= 1.0
    return probabilities


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T + bias) over the rows not ignored, one slice at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_tokens: int,
        token_hits: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # The head is cast here, not before: its gradient then comes back in its own dtype (fp32 master weights
        # under autocast) with no half-precision V x H copy and no cast back.
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # ignored tokens (prompt, padding) are never projected
        targets = labels.index_select(0, rows)
        # Only each row's log-sum-exp survives the forward: 4 bytes a token instead of 4 x V.
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.int64, device=hidden.device)
        kept = None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk_tokens):
                stop = min(start + chunk_tokens, rows.numel())
                logits = _slice_logits(hidden.index_select(0, rows[start:stop]), weight, bias)
                picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
                if token_hits is not None:  # the slice's logits are here anyway: its argmax costs one pass over them
                    hits += (logits.argmax(dim=1) == targets[start:stop]).sum()
                lse[start:stop], sums = _exp_and_logsumexp_(logits)
                total += (lse[start:stop] - picked).sum()
                if rows.numel() <= chunk_tokens:
                    # A single slice fits the budget anyway: keep its gradient rather than project twice.
                    kept = _minus_one_hot_(logits.div_(sums[:, None]), targets)
                del logits  # the slice is freed before the next one is projected
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse, kept)
        ctx.chunk_tokens = chunk_tokens
        if token_hits is not None:
            token_hits.append(torch.stack([hits, hits.new_tensor(rows.numel())]))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, rows, targets, lse, kept = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        # Weight and bias gradients add up over slices in fp32, as one full-batch matmul would accumulate them.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), ctx.chunk_tokens):
                stop = min(start + ctx.chunk_tokens, rows.numel())
                index = rows[start:stop]
                inputs = hidden.index_select(0, index)
                grad_logits = kept if kept is not None else _recomputed_grad_logits(
                    inputs, weight, bias, lse[start:stop], targets[start:stop]
                )
                # grad_total scales the small products, never the slice: no extra V-wide pass, and a kept
                # slice stays as saved (a second backward with retain_graph sees it unchanged).
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, index, (grad_logits.to(weight.dtype) @ weight) * grad_total)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, inputs.float() * grad_total)
                if grad_bias is not None:
                    grad_bias.add_(grad_logits.sum(dim=0) * grad_total)
                del grad_logits  # one slice's logits at a time, in the backward too
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(ctx.weight_dtype),
            None if grad_bias is None else grad_bias.to(ctx.bias_dtype),
            None,
            None,
            None,
        )


def _recomputed_grad_logits(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """A slice's d(loss)/d(logits), its logits projected again and turned into probabilities in place."""
    probabilities = _slice_logits(inputs, weight, bias).sub_(lse[:, None]).exp_()
    return _minus_one_hot_(probabilities, targets)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_tokens: int | None = None,
    compute_dtype: torch.dtype | None = None,
    token_hits: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `labels`, in pure PyTorch, a slice at a time.

    `token_hits`, when given, gets one int64 tensor [argmax hits, trained tokens] appended (on the device)."""
    dtype = compute_dtype or _projection_dtype(hidden, weight)
    tokens = chunk_tokens_for(weight.size(0)) if chunk_tokens is None else chunk_tokens
    if tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive (got {tokens})")
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)).to(dtype),  # the projection runs in the hidden states' dtype
        weight,
        bias,
        labels.reshape(-1).to(hidden.device),
        tokens,
        token_hits,
    )


@torch.no_grad()
def chunked_argmax_hits(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    *, chunk_tokens: int | None = None,
) -> torch.Tensor:
    """[argmax hits, trained tokens] of `hidden @ weight.T + bias` against `labels`, one slice of logits at a time."""
    hidden = hidden.reshape(-1, hidden.size(-1))
    labels = labels.reshape(-1).to(hidden.device)
    tokens = chunk_tokens_for(weight.size(0)) if chunk_tokens is None else chunk_tokens
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    hits = torch.zeros((), dtype=torch.int64, device=hidden.device)
    weight = weight.to(hidden.dtype)
    bias = None if bias is None else bias.to(hidden.dtype)
    for start in range(0, rows.numel(), tokens):
        index = rows[start : start + tokens]
        logits = _slice_logits(hidden.index_select(0, index), weight, bias)
        hits += (logits.argmax(dim=1) == labels.index_select(0, index)).sum()
        del logits  # one slice at a time, as in the loss
    return torch.stack([hits, hits.new_tensor(rows.numel())])


@lru_cache(maxsize=8)
def _choose_backend(device_type: str) -> tuple[str, str]:
    if device_type != "cuda":
        return "pytorch", f"Liger Kernel's fused cross-entropy is Triton, CUDA only (device is {device_type})"
    if importlib.util.find_spec("liger_kernel") is None:
        return "pytorch", "liger_kernel is not installed"
    try:
        importlib.import_module("liger_kernel.transformers.functional")
    except Exception as error:  # a broken Triton or CUDA toolchain must not stop training: the fallback is exact
        return "pytorch", f"liger_kernel failed to import ({type(error).__name__}: {error})"
    return "liger", "liger_kernel is installed and the device is CUDA"


def select_loss_backend(device: torch.device | str) -> str:
    """The fused loss used on `device`: "liger" (CUDA, liger_kernel installed) or "pytorch"."""
    return _choose_backend(torch.device(device).type)[0]


def loss_backend_reason(device: torch.device | str) -> str:
    """Why `select_loss_backend` chose what it did on `device`, for the run's log."""
    return _choose_backend(torch.device(device).type)[1]


class LossOptions(TypedDict, total=False):
    """`chunked_cross_entropy`'s keyword options, which `fused_linear_cross_entropy` takes too."""

    chunk_tokens: int | None
    compute_dtype: torch.dtype | None
    token_hits: list[torch.Tensor] | None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    **options: Unpack[LossOptions],
) -> torch.Tensor:
    """`chunked_cross_entropy`, through Liger Kernel's fused kernel where `select_loss_backend` picks it."""
    if select_loss_backend(hidden.device) != "liger":
        return chunked_cross_entropy(hidden, weight, labels, bias, **options)
    token_hits, chunk_tokens = options.get("token_hits"), options.get("chunk_tokens")
    if token_hits is not None:  # Liger's kernel keeps no argmax: project again, a slice at a time, without a graph
        token_hits.append(chunked_argmax_hits(hidden.detach(), weight.detach(), labels, bias,
                                              chunk_tokens=chunk_tokens))
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = options.get("compute_dtype") or _projection_dtype(hidden, weight)
    loss = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.size(-1)).to(dtype).contiguous(),
        weight.to(dtype),
        labels.reshape(-1).to(hidden.device),
        None if bias is None else bias.to(dtype),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss.float()


def _base_causal_lm(model: nn.Module) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def config_head_problem(config: Any) -> str | None:
    """Why a model with this config cannot take the chunked loss (from the config alone), or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose head is known to be plain"
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1.0)]
    if transforms:
        return f"the model transforms its logits after lm_head ({', '.join(transforms)})"
    return None


def chunked_loss_head(model: nn.Module) -> nn.Linear:
    """The lm_head the chunked loss projects with; raises ChunkedLossUnavailable saying why the plain loss is needed."""
    base = _base_causal_lm(model)
    problem = config_head_problem(getattr(base, "config", None))
    if problem is not None:
        raise ChunkedLossUnavailable(problem)
    head = base.get_output_embeddings()
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ChunkedLossUnavailable("lm_head carries a LoRA adapter: its output is not hidden @ weight.T")
    if type(head) is not nn.Linear:
        raise ChunkedLossUnavailable(f"lm_head is a {type(head).__name__}, not a plain torch.nn.Linear")
    if not head.weight.dtype.is_floating_point:
        raise ChunkedLossUnavailable(f"lm_head's weight is quantized ({head.weight.dtype})")
    if head.weight.numel() == 0:
        raise ChunkedLossUnavailable("lm_head's weight is partitioned (ZeRO-3): it is gathered only in its forward")
    return head


def final_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder body's last hidden states (after the final norm), without computing any logits.

    Packed blocks (datasets.pack_examples) come with position_ids and no attention_mask."""
    base = _base_causal_lm(model)
    body = getattr(base, base.base_model_prefix)
    # The body alone: lm_head never runs, so no B x T x V tensor exists; no cache, no per-layer outputs kept.
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   output_hidden_states=False)
    return outputs.last_hidden_state


def causal_lm_summed_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """The summed next-token cross-entropy of a causal LM, through the fused loss (labels unshifted)."""
    head = chunked_loss_head(model)
    hidden = final_hidden_states(model, input_ids, attention_mask)
    targets = shift_labels(labels.to(hidden.device))
    return fused_linear_cross_entropy(hidden, head.weight, targets, head.bias, chunk_tokens=chunk_tokens)
