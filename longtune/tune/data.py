"""The blocks every trial of a search reads: prepared once, before the first trial, and kept
in Ray's object store (or, from a prepared dataset the workers read themselves, its first
files' rows)."""

from __future__ import annotations

import math
from typing import Any

from longtune.config import Config, with_overrides


def prepare_search_data(config: Config) -> tuple[dict[str, Any], bool]:
    """The blocks every trial reads, prepared once and kept in Ray's object store: the first
    tune.max_steps x workers x batch x accumulation training blocks (what one trial
    consumes; the largest batch in the space) and eval.loss_blocks held-out blocks."""
    from longtune.train.trainer import open_datasets

    s, t = config.scaling, config.train
    space = config.tune.search_space
    batch = _largest(space, "train.batch_size_per_worker", t.batch_size_per_worker)
    accum = _largest(space, "train.grad_accum_steps", t.grad_accum_steps)
    n_train = config.tune.max_steps * s.num_workers * batch * accum
    # The final packing pass gathers pack_batch_tokens before it yields: no more than needed.
    cap = max(n_train, config.eval.loss_blocks) * config.context_length
    data_config = with_overrides(config, {"data.pack_batch_tokens": min(config.data.pack_batch_tokens, cap)})
    datasets, with_eval = open_datasets(data_config)
    datasets["train"] = _first(datasets["train"], n_train)
    if with_eval:
        datasets["eval"] = _first(datasets["eval"], config.eval.loss_blocks)
    return datasets, with_eval


def _first(dataset, rows: int):
    """A Ray dataset's first ``rows`` blocks, materialized in the object store; a prepared
    split the workers read themselves (data.prepared_reader: workers), cut to as many."""
    limited = dataset.limit(rows)
    return limited.materialize() if hasattr(limited, "materialize") else limited


def _largest(space: dict[str, Any], key: str, default: int) -> int:
    spec = space.get(key)
    if not spec:
        return default
    kind, args = next(iter(spec.items()))
    return int(max(args)) if kind == "choice" else math.ceil(args[-1])
