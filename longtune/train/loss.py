"""The language-model loss of packed blocks, as token sums: what training optimizes and
what it logs and evaluates.

Sums, not means: a step's loss is the sum of token losses over its micro-batches and ranks
divided by the global number of target tokens, so a padded block weighs what its real tokens
weigh, and 2 workers x 1 block per step train exactly as 1 worker x 2 blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position that is not a target (transformers' convention)


def block_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids, labels of a batch of packed blocks ([B, N] each). A document's
    first token is not a target: nothing before it in the block belongs to its document (as
    transformers' DataCollatorWithFlattening does); padding is not a target either."""
    ids = batch["input_ids"].long()
    positions = batch["position_ids"].long()
    labels = ids.masked_fill(positions == 0, IGNORE)
    if "loss_mask" in batch:
        labels = labels.masked_fill(batch["loss_mask"] == 0, IGNORE)
    return ids, positions, labels


def target_count(labels: torch.Tensor) -> int:
    """Next-token targets in ``labels`` [B, N]: position t predicts labels[:, t + 1]."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_loss_sum(model, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the targets of ``labels`` (fp32 scalar), from
    the logits: the model's own ``loss`` is a mean, and PEFT's AdaLoRA adds its
    orthogonality penalty to it."""
    logits = model(input_ids=ids, position_ids=positions).logits  # [B, N, V]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
