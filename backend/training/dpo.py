"""DPO (sigmoid loss) on preference pairs, with the base model under a switched-off LoRA adapter as the reference.

The loss of one pair is `-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`, where each term is a summed
completion log-probability (prompt tokens at IGNORE_INDEX), averaged over the step's pairs. Memory:
- the reference is the same model with `disable_adapter()`, under no_grad: no second copy of the weights, and
  its activations are dropped as soon as its log-probs are taken;
- a micro-batch's chosen and rejected sequences run in one forward (chosen rows first, then rejected);
- with the chunked loss head the log-probs come from `fused_linear_cross_entropy` one sequence at a time (the
  summed cross-entropy of a sequence is minus its summed log-probability), so no B x T x V logits exist; on the
  plain path the whole logits exist once and only one row at a time is upcast to fp32 for its log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from backend.training.chunked_loss import final_hidden_states, fused_linear_cross_entropy, shift_labels
from backend.training.dataset_validation import load_examples
from backend.training.datasets import BUILTIN_DATASET, IGNORE_INDEX, DatasetError, TokenizedExample, collate
from backend.training.modeling import attention_inputs
from backend.training.preference_data import PreferenceExample, tokenize_preferences

if TYPE_CHECKING:
    from backend.training.options import TrainingOptions
    from backend.training.state import Attempt, TrainingData


def dpo_sigmoid_losses(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO sigmoid losses and the chosen and rejected rewards (beta times the log-ratio, detached)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def collate_pairs(pairs: list[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of the pairs' chosen sequences followed by their rejected ones (2 x len(pairs) rows)."""
    rows = [TokenizedExample(*pair.sequence(side)) for side in ("chosen", "rejected") for pair in pairs]
    return collate(rows, pad_token_id)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], loss_head: Any, autocast: Any) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (float32, one value per row)."""
    device = loss_head.weight.device if loss_head is not None else model.get_input_embeddings().weight.device
    input_ids = batch["input_ids"].to(device)
    attention_mask, position_ids = attention_inputs(batch, device)
    targets = shift_labels(batch["labels"].to(device))
    if loss_head is not None:
        with autocast:
            hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
            # One row at a time: the loss's slices stay within one sequence, and its sum is that row's.
            return -torch.stack([
                fused_linear_cross_entropy(hidden[row : row + 1], loss_head.weight, targets[row : row + 1],
                                           loss_head.bias)
                for row in range(hidden.size(0))
            ])
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.stack([_row_logp(logits[row], targets[row]) for row in range(logits.size(0))])


def _row_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    trained = targets != IGNORE_INDEX
    # The fp32 log-softmax of one row only: its vocabulary-wide copy is a row's, not the batch's.
    logps = logits[trained].float().log_softmax(-1)
    return logps.gather(-1, targets[trained].unsqueeze(-1)).sum()


def pair_logps(
    model: Any, batch: dict[str, torch.Tensor], loss_head: Any, autocast: Any, *, forward_model: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy and reference summed log-probs of a collated pair batch: (pi_c, pi_r, ref_c, ref_r).

    The policy runs through `forward_model` (a DDP wrapper across ranks), the reference through the PEFT model.
    """
    with torch.no_grad(), model.disable_adapter():
        # No graph is kept for the reference: its activations are freed as each layer finishes.
        reference = sequence_logps(model, batch, loss_head, autocast)
    policy = sequence_logps(forward_model or model, batch, loss_head, autocast)
    policy_chosen, policy_rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.to(policy.device).chunk(2)
    return policy_chosen, policy_rejected, reference_chosen, reference_rejected


@dataclass
class RewardTally:
    """Rewards summed over the pairs since the last log line (on the device: no sync per micro-batch)."""

    sums: list[torch.Tensor] = field(default_factory=list)
    latest: dict[str, float] = field(default_factory=dict)  # the last means, for checkpoints and the result

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Count one micro-batch's rewards."""
        self.sums.append(torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
                                      (chosen - rejected).sum(), torch.tensor(float(chosen.numel()),
                                                                                device=chosen.device)]))

    def means(self, ranks: Any) -> dict[str, float]:
        """The mean rewards per pair since the last call over all ranks (one sync), then starts over; {} when
        nothing was counted (a supervised run: no rank counts, so none syncs)."""
        if not self.sums:
            return {}
        totals = torch.stack([part.cpu() for part in self.sums]).sum(0).tolist()
        chosen, rejected, correct, margin, pairs = ranks.sum(totals) if ranks.world_size > 1 else totals
        self.sums.clear()
        self.latest = {"rewards/chosen": chosen / pairs, "rewards/rejected": rejected / pairs,
                       "rewards/accuracy": correct / pairs, "rewards/margin": margin / pairs}
        return self.latest


def preference_micro_batch_loss(attempt: Attempt, pairs: list[PreferenceExample], n_step_pairs: int) -> torch.Tensor:
    """This micro-batch's part of the step's mean DPO loss (its pairs' losses summed, over the step's pairs)."""
    batch = collate_pairs(pairs, attempt.setup.data.pad_token_id)
    logps = pair_logps(attempt.model, batch, attempt.loss_head, attempt.autocast(),
                       forward_model=attempt.forward_model)
    del batch  # the inputs are not needed for backward
    losses, chosen, rejected = dpo_sigmoid_losses(*logps, attempt.setup.options.dpo_beta)
    attempt.rewards.add(chosen, rejected)
    return losses.sum() / max(1, n_step_pairs)


@torch.no_grad()
def preference_validation_loss(attempt: Attempt, pairs: list[PreferenceExample] | None = None) -> float:
    """Mean DPO loss per pair over `pairs` (default: every validation pair), in eval mode (no dropout)."""
    pairs = (attempt.setup.data.validation or []) if pairs is None else pairs
    attempt.model.eval()
    total = 0.0
    for start in range(0, len(pairs), attempt.state.micro_batch_size):
        batch = collate_pairs(pairs[start : start + attempt.state.micro_batch_size], attempt.setup.data.pad_token_id)
        logps = pair_logps(attempt.model, batch, attempt.loss_head, attempt.autocast())
        total += float(dpo_sigmoid_losses(*logps, attempt.setup.options.dpo_beta)[0].sum())
    attempt.model.train()
    return total / max(1, len(pairs))


def pair_tokens(pair: PreferenceExample) -> int:
    """Input tokens of a pair's two sequences."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def setup_preference_data(options: TrainingOptions) -> TrainingData:
    """Validate and tokenize the preference file (and validation file) once; every attempt reuses it."""
    from backend.training.modeling import load_tokenizer, resolve_model_source
    from backend.training.state import TrainingData

    tokenizer = load_tokenizer(resolve_model_source(options.model), trust_remote_code=options.trust_remote_code)
    train = _tokenized_pairs(options.data, options, tokenizer)
    validation = _tokenized_pairs(options.validation_data, options, tokenizer) if options.validation_data else None
    return TrainingData(train, validation, int(tokenizer.pad_token_id))


def _tokenized_pairs(path: str | Path | None, options: TrainingOptions, tokenizer: Any) -> list[PreferenceExample]:
    fmt, records = load_examples(path or BUILTIN_DATASET)
    if fmt != "preference":
        raise DatasetError(None, f"{path}: --method dpo trains on preference lines "
                                 f'(input, preferred_output, non_preferred_output); this file is "{fmt}"')
    pairs = tokenize_preferences(records, tokenizer, max_seq_length=options.seq_length)
    if not pairs:
        raise DatasetError(None, f"{path}: no preference pair has a token to train on after tokenization")
    return pairs
