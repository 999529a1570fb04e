"""One optimizer step (train/loop.py, train/loss.py): the loss is weighted by target tokens
over micro-batches and ranks, checked with real gloo process groups."""

from __future__ import annotations

import os

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtune.config import load_config

SEQ = 128


def step_config(model_dir: str, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"model.target_context={SEQ}", "attention.type=s2",
        "train.max_grad_norm=null", "train.precision=fp32",
        "train.loss_chunk_tokens=48",  # the chunked loss, several chunks a block (and a ragged last one)
        *extra,
    ])


def blocks() -> list[dict[str, torch.Tensor]]:
    """Two packed blocks: three documents in the first; the second ends in 70 padded tokens."""
    g = torch.Generator().manual_seed(1)
    first = {"input_ids": torch.randint(0, 300, (SEQ,), generator=g),
             "position_ids": torch.cat([torch.arange(40), torch.arange(50), torch.arange(38)])}
    second = {"input_ids": torch.randint(0, 300, (SEQ,), generator=g), "position_ids": torch.arange(SEQ),
              "loss_mask": (torch.arange(SEQ) < SEQ - 70).long()}
    first["loss_mask"] = torch.ones(SEQ, dtype=torch.long)
    return [first, second]


def sgd_step(model, micro_batches, config):
    """optimizer_step with plain SGD at lr 1: each trainable's change is minus its gradient."""
    from longtune.train.loop import optimizer_step

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    from longtune.train.loss import LanguageModelLoss

    inner = getattr(model, "module", model)
    inner = inner.model if isinstance(inner, LanguageModelLoss) else inner
    before = {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}
    loss = optimizer_step(model, micro_batches, params, optimizer, scheduler, config, torch.autocast("cpu", enabled=False))
    grads = {n: before[n] - p.detach() for n, p in inner.named_parameters() if p.requires_grad}
    return loss, grads


def _rank_main(rank: int, world: int, rendezvous: str, model_dir: str, out: str) -> None:
    from longtune.distributed import all_reduce_sum
    from longtune.train.loop import build_loss, build_model

    # a file, not a "free" TCP port: another process (the session's Ray) can take the port between
    # choosing it and binding it, and a rank then waits on a store that never answers
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = step_config(model_dir, "train.batch_size_per_worker=1")
    model = build_model(config, model_dir, torch.device("cpu"))
    # DDP wraps the loss, whose forward runs the model: the forward DDP must see to sync
    ddp = torch.nn.parallel.DistributedDataParallel(build_loss(config, model))
    assert ddp.module.chunked
    block = {k: v[None] for k, v in blocks()[rank].items()}
    loss, grads = sgd_step(ddp, [block], config)
    loss_sum, tokens = all_reduce_sum([loss.loss_sum, loss.tokens], "cpu")
    if rank == 0:
        torch.save({"loss": loss_sum / tokens, "grads": grads}, out)
    dist.destroy_process_group()
    # Leave without Python's teardown: freeing DDP's Reducer there joins gloo's worker thread
    # while holding the GIL, and that thread may be waiting for the GIL to free its last
    # allreduce's tensors — torch 2.13 then hangs for good (seen once, in a clean-clone run)
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir):
    """Loss and gradient of one step on 2 gloo ranks, one block each."""
    out = tmp_path_factory.mktemp("ranks") / "ranks.pt"
    mp.spawn(_rank_main, args=(2, str(out.parent / "rendezvous"), tiny_model_dir, str(out)), nprocs=2, join=True)
    return torch.load(out, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("one_rank", ["batch", "accumulation"])
def test_two_ranks_one_block_each_equal_one_rank_two_blocks(two_ranks, tiny_model_dir, one_rank):
    """2 workers x 1 block per step = 1 worker x 2 blocks per step (as one batch or as two
    accumulated micro-batches), on the same blocks, a padded one among them: the same loss
    and the same gradient. A mean of per-block (or per-rank) means fails this."""
    from longtune.train.loop import build_model

    torch.manual_seed(0)
    if one_rank == "batch":
        config = step_config(tiny_model_dir, "train.batch_size_per_worker=2")
        micro = [{k: torch.stack([b[k] for b in blocks()]) for k in blocks()[0]}]
    else:
        config = step_config(tiny_model_dir, "train.batch_size_per_worker=1", "train.grad_accum_steps=2")
        micro = [{k: v[None] for k, v in b.items()} for b in blocks()]
    model = build_model(config, tiny_model_dir, torch.device("cpu"))
    loss, grads = sgd_step(model, micro, config)

    assert loss.tokens == (40 - 1) + (50 - 1) + (38 - 1) + (SEQ - 70 - 1)  # document starts and padding excluded
    assert loss.mean == pytest.approx(two_ranks["loss"], abs=1e-5)
    assert grads.keys() == two_ranks["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, two_ranks["grads"][name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


class CountingHooks:
    """Adapter hooks that only count the steps they were called after."""

    def __init__(self):
        self.steps = []

    def extra_loss(self):
        return None

    def after_optimizer_step(self, step):
        self.steps.append(step)


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow(tiny_model_dir):
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_model, build_optimizer, optimizer_step

    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"model.target_context={SEQ}",
                                "train.precision=fp16", "train.max_grad_norm=1.0", "train.warmup_steps=0"])
    precision = resolve_precision(config.model, config.train, "cpu")
    assert precision.grad_scaler and precision.compute == torch.float16
    model = build_model(config, tiny_model_dir, torch.device("cpu"), precision)
    params, optimizer, scheduler = build_optimizer(config, model)
    block = [{k: v[None] for k, v in blocks()[0].items()}]
    hooks = CountingHooks()

    scaler = precision.grad_scaler_for("cpu")
    before = [p.detach().clone() for p in params]
    loss = optimizer_step(model, block, params, optimizer, scheduler, config, precision.autocast("cpu"),
                          hooks, 1, scaler)
    assert loss.skipped == 0 and hooks.steps == [1] and math.isfinite(loss.mean)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))

    # a scale so large the scaled loss overflows: the step is skipped, the scale lowered
    huge = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    before = [p.detach().clone() for p in params]
    loss = optimizer_step(model, block, params, optimizer, scheduler, config, precision.autocast("cpu"),
                          hooks, 2, huge)
    assert loss.skipped == 1 and hooks.steps == [1]  # LoRA²'s allocator would have read inf
    assert huge.get_scale() < 2.0**127
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_a_bf16_base_trains_its_norms_and_embeddings_in_fp32_through_the_loop(tiny_model_dir):
    """A GPU's weights on the CPU: the loop's own build and step on a bf16 base. In bf16 an
    AdamW update of ~2e-5 to a norm weight of ~1 rounds away; held in fp32 it does not."""
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_model, build_optimizer, optimizer_step

    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"model.target_context={SEQ}",
                                "model.dtype=bfloat16", "train.lr=2e-5", "train.warmup_steps=0"])
    precision = resolve_precision(config.model, config.train, "cpu")
    assert precision.weights == torch.bfloat16 and precision.compute == torch.bfloat16
    model = build_model(config, tiny_model_dir, torch.device("cpu"), precision)
    params, optimizer, scheduler = build_optimizer(config, model)
    assert {p.dtype for p in params} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    watched = {n: p for n, p in model.named_parameters()
               if p.requires_grad and ("layernorm" in n or "embed_tokens" in n)}
    before = {n: p.detach().clone() for n, p in watched.items()}
    block = [{k: v[None] for k, v in blocks()[0].items()}]
    for step in range(1, 6):
        loss = optimizer_step(model, block, params, optimizer, scheduler, config, precision.autocast("cpu"),
                              step=step)
        assert math.isfinite(loss.mean)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in watched.items()}
    assert moved and all(v > 0 for v in moved.values()), moved
