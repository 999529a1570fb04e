"""How Ray Train hands the datasets to the workers (the TorchTrainer's ``dataset_config``).

"train" is split between the workers, in the same order on every run; "eval" goes whole to
each (rank 0 reads it). Under sequence parallelism (``scaling.sequence_parallel`` = P) the
P ranks of a group train on the same blocks: "train" is split between the groups' leaders
(ranks 0, P, 2P, ...), each leader broadcasts its micro-batches to its group
(longtune/train/sequence.py), and the other ranks are handed an empty iterator, never read.

Ray Train replaces a dataset's own execution options with these, and without
preserve_order its split hands each bundle of blocks to whichever worker needs one as the
bundles arrive: a resumed run, skipping the batches its checkpoint counts, would skip other
blocks than the ones it had trained on.
"""

from __future__ import annotations

import copy

from ray.data import DataContext
from ray.train import DataConfig


class SequenceParallelDataConfig(DataConfig):
    """``DataConfig`` whose split datasets go to every ``sequence_parallel``-th worker."""

    def __init__(self, sequence_parallel: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sequence_parallel = sequence_parallel

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        p = self.sequence_parallel
        if p == 1:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        if world_size % p:
            raise ValueError(f"scaling.sequence_parallel={p} must divide the {world_size} workers")
        split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        # the other names are handed whole to every worker, exactly as the base class does
        output = super().configure(
            {k: v for k, v in datasets.items() if k not in split}, world_size, worker_handles, worker_node_ids,
            **kwargs,
        )
        hints = None
        if self._enable_shard_locality and worker_node_ids:
            hints = list(worker_node_ids)[::p]
        for name in split & set(datasets):
            ds = datasets[name]
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(world_size // p, equal=True, locality_hints=hints)
            for rank in range(world_size):
                output[rank][name] = splits[rank // p] if rank % p == 0 else ds.limit(0).iterator()
        return output


def ingest_config(sequence_parallel: int = 1) -> DataConfig:
    # The DataContext's options, as DataConfig.default_ingest_options() would take them; that
    # passes them through ExecutionOptions' deprecated exclude_resources argument, which warns
    # at every run (Ray 2.60). A copy takes every option without it.
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return SequenceParallelDataConfig(sequence_parallel, datasets_to_split=["train"], execution_options=options)
