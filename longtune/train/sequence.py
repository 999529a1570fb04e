"""Sequence parallelism in training (``scaling.sequence_parallel`` = P): P consecutive ranks
share each block, each holding N/P of its tokens (longtune/attention/sequence_parallel.py).

    sequence = sequence_group(P, device)                      # every rank, once
    batches = sequence.shared(batches if sequence.is_leader else None, B, N)
    ids, positions, labels, shard = sequence.shard(ids, positions, labels)

Data: the group's first rank (its leader) reads the group's share of the training data
(Ray Train splits it between the leaders: ``longtune/train/ingest.py``) and broadcasts each
micro-batch to the others: one int64 [3, B, N] tensor per micro-batch, within the group.

Loss: position t predicts token t + 1, so a shard's labels run one token into the next
shard (the last shard's do not): every target is counted by exactly one rank, the token
losses are summed over all ranks and divided by the global number of targets
(``optimizer_step``), and the loss equals the unsharded one. The model is replicated over
the group (DDP over all ranks, or FSDP shards over all ranks): gradients are reduced over
every rank as without SP.

Plain torch; no Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from longtune.attention.sequence_parallel import SequenceShard
from longtune.distributed import broadcast_, rank, sequence_groups

_KEYS = ("input_ids", "position_ids", "loss_mask")


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: ``size`` ranks (global ranks ``members``) of
    which this is number ``index``; ``group`` their process group."""

    size: int
    index: int
    members: tuple[int, ...]
    group: Any
    device: torch.device

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    def shard(self, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor):
        """(ids, positions, labels, shard) of this rank's tokens of a [B, N] block: ids and
        positions [B, N/P]; labels [B, N/P + 1] (one token into the next shard) but on the
        last rank, [B, N/P]; ``shard`` for ``sharded_sequence``."""
        n = ids.shape[1]
        shard = SequenceShard(  # refuses a block that P cannot cut into equal shards
            self.index, self.size, n, members=self.members, group=self.group, device=self.device,
            position_ids=positions,
        )
        start, end = shard.start, shard.start + shard.local_len
        return shard.local(ids), shard.local_position_ids, labels[:, start : min(end + 1, n)], shard

    def shared(self, batches: Iterator[dict[str, torch.Tensor]] | None, batch_size: int,
               seq_len: int) -> Iterator[dict[str, torch.Tensor]]:
        """The leader's micro-batches on every rank of the group: ``batches`` on the leader
        (None elsewhere), each broadcast as one [3, B, N] int64 tensor on the device."""
        while True:
            packed = torch.empty(len(_KEYS), batch_size, seq_len, dtype=torch.int64, device=self.device)
            if self.is_leader:
                batch = next(batches)
                for i, key in enumerate(_KEYS):
                    if key in batch:
                        packed[i].copy_(batch[key])
                    else:  # no loss mask: every token may be a target
                        packed[i].fill_(1)
            broadcast_(packed, self.device, src=self.members[0], group=self.group)
            yield dict(zip(_KEYS, packed.unbind(0)))


def sequence_group(size: int, device: torch.device) -> SequenceGroup | None:
    """This rank's group of ``size`` consecutive ranks (None for size 1). Collective: every
    rank calls it, with the same size."""
    if size == 1:
        return None
    group, members = sequence_groups(size)
    return SequenceGroup(size, members.index(rank()), members, group, torch.device(device))
