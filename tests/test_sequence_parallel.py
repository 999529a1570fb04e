"""Sequence-parallel S2-Attn (longtune/attention/sequence_parallel.py) on real gloo ranks:
each rank's output and the gradients of its q, k, v equal the rows of single-process
S2-Attn on the whole sequence, for P = 2 and 4 (P = 4 makes every shard one group)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from longtune.attention.s2 import s2_attention
from longtune.attention.sequence_parallel import (
    SequenceShard,
    sequence_parallel_s2_attention,
)

N, G, D = 64, 16, 8  # 4 groups: P = 2 gives 2 groups per shard, P = 4 one

def _positions(batch: int) -> torch.Tensor:
    """Packed documents with starts inside shards, at a shard's first token (32), at the
    token before a cut (47) and crossing every cut."""
    rows = []
    for starts in ([0, 5, 32, 47], [0, 20, 40, 59]):
        pos = torch.zeros(N, dtype=torch.long)
        bounds = starts + [N]
        for a, b in zip(bounds, bounds[1:]):
            pos[a:b] = torch.arange(b - a)
        rows.append(pos)
    return torch.stack(rows[:batch])


def _padding() -> torch.Tensor:
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 44:] = 0  # crosses the last cut of P = 4 (48)
    return mask


CASES = {
    # name: (heads, kv heads, positions?, padding?, sliding window, softcap)
    "gqa": (8, 2, False, False, None, None),
    "gqa_shared_kv_head": (4, 1, False, False, None, None),  # h/2 not a multiple of the repeat
    "odd_heads": (5, 5, False, False, None, None),
    "documents": (8, 2, True, False, None, None),
    "padding": (8, 4, False, True, None, None),
    "documents_padding_window": (8, 2, True, True, 6, None),
    "softcap": (4, 2, True, False, None, 20.0),
}


WORLD = 4  # one spawn: ranks {0, 1} and {2, 3} are two P = 2 groups, all four one P = 4 group


def _rank_main(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    # a file rendezvous: a "free" TCP port can be taken by another process before rank 0 binds it
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    reports = {p: _cases(p) for p in (2, 4)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(reports, f)
    dist.destroy_process_group()


def _cases(size: int) -> dict:
    """Every case on this rank, as the ``size``-rank group holding it computes it."""
    from longtune.distributed import sequence_groups

    group, members = sequence_groups(size)
    index = members.index(torch.distributed.get_rank())
    report = {}
    for name, (h, hkv, docs, pad, window, softcap) in CASES.items():
        torch.manual_seed(0)
        b = 2
        q, k, v = torch.randn(b, h, N, D), torch.randn(b, hkv, N, D), torch.randn(b, hkv, N, D)
        w = torch.randn(b, N, h, D)
        positions = _positions(b) if docs else None
        mask = _padding() if pad else None
        kw = dict(scaling=None, sliding_window=window, softcap=softcap)

        whole = [x.clone().requires_grad_() for x in (q, k, v)]
        ref, _ = s2_attention(*whole, group_size=G, shift="split", position_ids=positions, attention_mask=mask, **kw)
        (ref * w).sum().backward()

        shard = SequenceShard(index, size, N, members=members, group=group, position_ids=positions,
                              attention_mask=mask)
        mine = [shard.local(x.clone(), dim=2).requires_grad_() for x in (q, k, v)]
        got, _ = sequence_parallel_s2_attention(*mine, shard=shard, group_size=G, **kw)
        sent_forward = shard.bytes_sent
        (got * shard.local(w)).sum().backward()

        errors = {"out": (got - shard.local(ref)).abs().max().item()}
        for label, a, x in zip("qkv", mine, whole):
            errors[f"d{label}"] = (a.grad - shard.local(x.grad, dim=2)).abs().max().item()
        # S2 alone differs from full attention on these rows: the comparison can fail
        errors["vs_plain_shard"] = (
            got - s2_attention(*[shard.local(x, dim=2) for x in (q, k, v)], group_size=G,
                               position_ids=shard.local(positions), attention_mask=shard.local(mask), **kw)[0]
        ).abs().max().item()
        report[name] = {"errors": errors, "bytes_sent": shard.bytes_sent, "bytes_forward": sent_forward,
                        "heads": h, "kv_heads": hkv}
    return report


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    mp.spawn(_rank_main, args=(WORLD, str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(params=[2, 4], ids=["P2", "P4"])
def ranks(request, spawned):
    """(P, every rank's report as its group computed it, in group order, all groups)."""
    size = request.param
    return size, [spawned[r][str(size)] for r in range(WORLD)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_shard_equals_the_whole_sequence(ranks, case):
    world, reports = ranks
    for rank, report in enumerate(reports):
        errors = report[case]["errors"]  # rank: the global rank (its index in its group: rank % P)
        for name in ("out", "dq", "dk", "dv"):
            assert errors[name] < 1e-5, f"P={world} rank {rank} {case}: {name} differs by {errors[name]:.3g}"


def test_the_halo_changes_what_a_later_shard_computes(ranks):
    """Without the halo a later shard's first shifted half group sees only its own tokens."""
    world, reports = ranks
    plain = [r["gqa"]["errors"]["vs_plain_shard"] for r in reports]
    # a group's first shard needs no halo, but with one group per shard (P = 4) plain
    # S2-Attn would not shift it at all
    for rank, error in enumerate(plain):
        if rank % world == 0 and world == 2:
            assert error < 1e-6, plain
        else:
            assert error > 1e-3, plain


def test_bytes_sent_are_the_half_group_halo(ranks):
    """Forward: every rank but the last sends 2 x B x Hkv_shifted x G/2 x D fp32 values;
    backward: every rank but the first sends as many back. Nothing else."""
    world, reports = ranks
    for rank, report in enumerate(reports):
        rank %= world  # the place in its group
        for case, r in report.items():
            h, hkv = r["heads"], r["kv_heads"]
            rep = h // hkv
            shifted = hkv - (h // 2) // rep if (h // 2) % rep == 0 else h - h // 2
            halo = 2 * 2 * shifted * (G // 2) * D * 4
            assert r["bytes_forward"] == (halo if rank < world - 1 else 0), (case, rank)
            assert r["bytes_sent"] == r["bytes_forward"] + (halo if rank > 0 else 0), (case, rank)


def test_one_shard_is_plain_s2_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, G, D), torch.randn(1, 2, G, D), torch.randn(1, 2, G, D)
    shard = SequenceShard(0, 1, G)
    got, _ = sequence_parallel_s2_attention(q, k, v, shard=shard, group_size=G)
    ref, _ = s2_attention(q, k, v, group_size=G)
    assert torch.equal(got, ref)
    assert shard.bytes_sent == 0


def test_refusals_name_the_setting():
    q = torch.randn(1, 4, 24, D)
    with pytest.raises(ValueError, match="divides each shard's 24 tokens"):
        sequence_parallel_s2_attention(q, q, q, shard=SequenceShard(0, 2, 48, members=(0, 1)), group_size=16)
    with pytest.raises(ValueError, match="holds 24 tokens, but attention got 16"):
        sequence_parallel_s2_attention(q[:, :, :16], q[:, :, :16], q[:, :, :16],
                                       shard=SequenceShard(0, 2, 48, members=(0, 1)), group_size=8)
    with pytest.raises(ValueError, match="cannot be cut into 3 equal shards"):
        SequenceShard(0, 3, 32, members=(0, 1, 2))


# ---------------------------------------------------------------- the training step

SEQ = 128  # S2 groups of 32 (ratio 0.25): 4 groups, 2 per shard at P = 2
STEPS = 3


def _blocks() -> list[dict[str, torch.Tensor]]:
    """Two packed blocks, one per data-parallel group: a document crossing the cut (64) in
    the first; padding from token 58 on, across the cut, in the second."""
    g = torch.Generator().manual_seed(1)
    first = {"input_ids": torch.randint(0, 300, (SEQ,), generator=g),
             "position_ids": torch.cat([torch.arange(40), torch.arange(50), torch.arange(38)]),
             "loss_mask": torch.ones(SEQ, dtype=torch.long)}
    second = {"input_ids": torch.randint(0, 300, (SEQ,), generator=g), "position_ids": torch.arange(SEQ),
              "loss_mask": (torch.arange(SEQ) < 58).long()}
    return [first, second]


def _train_config(model_dir: str, *extra: str):
    from longtune.config import load_config

    return load_config(None, [
        f"model.name_or_path={model_dir}", f"model.target_context={SEQ}", "attention.type=s2",
        "train.precision=fp32", "train.loss_chunk_tokens=24", "train.lr=1e-2", "train.warmup_steps=0",
        "train.batch_size_per_worker=1", *extra,
    ])


def _steps(par, config, micro_batches, sequence=None) -> tuple[list[float], dict | None]:
    """STEPS AdamW steps on the same micro-batches: the global loss of each, and the
    trained weights after them (whole on rank 0)."""
    from longtune.distributed import all_reduce_sum
    from longtune.train.loop import build_optimizer, optimizer_step
    from longtune.train.parallel import adapter_state_dict

    params, optimizer, scheduler = build_optimizer(config, par.model)
    par.model.train()
    losses = []
    for step in range(STEPS):
        loss = optimizer_step(par.wrapped, micro_batches, params, optimizer, scheduler, config,
                              torch.autocast("cpu", enabled=False), step=step + 1, sequence=sequence)
        loss_sum, tokens = all_reduce_sum([loss.loss_sum, loss.tokens], "cpu")
        losses.append(loss_sum / tokens)
    return losses, adapter_state_dict(par)


def _train_rank(rank: int, world: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from longtune.precision import resolve_precision
    from longtune.train.loop import build_parallel
    from longtune.train.sequence import sequence_group

    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for strategy in ("ddp", "fsdp"):
        config = _train_config(model_dir, f"scaling.num_workers={world}", "scaling.sequence_parallel=2",
                               f"train.strategy={strategy}")
        torch.manual_seed(0)
        par = build_parallel(config, model_dir, torch.device("cpu"), resolve_precision(config.model, config.train, "cpu"))
        sequence = sequence_group(2, torch.device("cpu"))
        # the group's leader holds its block; the data path shares it with the group
        mine = _blocks()[rank // 2]
        leader_batches = iter([{k: v[None] for k, v in mine.items()}] * STEPS) if sequence.is_leader else None
        batches = sequence.shared(leader_batches, 1, SEQ)
        micro = [next(batches)]
        assert torch.equal(micro[0]["input_ids"][0], mine["input_ids"])  # every rank got its group's block
        losses, state = _steps(par, config, micro, sequence)
        results[strategy] = {"losses": losses, "state": state}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_training(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("sp_train") / "ranks.pt"
    mp.spawn(_train_rank, args=(4, tiny_model_dir, str(out)), nprocs=4, join=True)
    return torch.load(out, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_groups_of_two_ranks_train_as_one_process(sharded_training, tiny_model_dir, strategy):
    """4 gloo ranks: 2 data-parallel groups x sequence_parallel 2 (each group one block, each
    rank half its tokens; gradient checkpointing and the chunked loss on) train exactly as
    one process on both blocks: the loss of every step and the trained weights after 3 AdamW
    steps, with DDP and with FSDP2 over all 4 ranks."""
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_loss, build_model
    from longtune.train.parallel import ParallelModel

    config = _train_config(tiny_model_dir, "train.batch_size_per_worker=2")
    assert config.model.gradient_checkpointing
    torch.manual_seed(0)
    model = build_model(config, tiny_model_dir, torch.device("cpu"),
                        resolve_precision(config.model, config.train, "cpu"))
    loss = build_loss(config, model)
    par = ParallelModel("ddp", model, loss, loss, torch.device("cpu"))
    micro = [{k: torch.stack([b[k] for b in _blocks()]) for k in _blocks()[0]}]
    losses, state = _steps(par, config, micro)

    got = sharded_training[strategy]
    for step, (a, b) in enumerate(zip(got["losses"], losses)):
        assert a == pytest.approx(b, rel=1e-5), f"{strategy} step {step + 1}: {a} vs {b}"
    assert losses[-1] < losses[0]  # it trained
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and trained <= got["state"].keys()  # (DDP's is the whole model's state)
    for name in trained:
        torch.testing.assert_close(got["state"][name], state[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- through finetune, on Ray


@pytest.mark.slow
def test_finetune_with_two_workers_sharing_each_sequence(ray_local, tmp_path, tiny_model_dir, run_config):
    """`longtune finetune scaling.num_workers=2 scaling.sequence_parallel=2` on Ray (gloo):
    the loss of each of the first 5 steps equals one worker's on the same blocks within 1e-5
    relative, with a worker killed after step 4 (Ray Train restarts both from the step-2
    checkpoint); rank 1 trains on the blocks rank 0 reads; the adapter equals the one
    worker's and loads with plain PEFT. The blocks come from a `longtune prepare` dataset the
    group's leader reads itself (data.prepared_reader: workers)."""
    from mlflow import MlflowClient
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from longtune.data.pipeline import prepare
    from longtune.finetune import finetune
    from longtune.models import load_model
    from longtune.train.probes import KillOnce, RecordBlocks, read_records

    prepared = f"data.prepared_path={tmp_path / 'prepared'}"
    prepare(run_config(prepared))

    def run(name, *extra, probes=()):
        config = run_config("train.max_steps=5", f"train.run_name={name}", "train.precision=fp32",
                            "train.log_every=1", "train.checkpoint_every=2", prepared, *extra)
        assert config.data.prepared_reader == "workers"
        return config, finetune(config, probes=probes)

    _, single = run("single", "scaling.num_workers=1", probes=(RecordBlocks(str(tmp_path / "single_blocks")),))
    marker = tmp_path / "killed"
    config, sharded = run("sharded", "scaling.num_workers=2", "scaling.sequence_parallel=2", "train.max_failures=1",
                          probes=(KillOnce(step=4, rank=1, marker=str(marker)),
                                  RecordBlocks(str(tmp_path / "blocks"))))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def losses(run_id):
        history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)
        return {m.step: m.value for m in history}  # the last value of a step wins (after the restart)

    a, b = losses(single.mlflow_run_id), losses(sharded.mlflow_run_id)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert a[5] != a[1]
    assert marker.read_text() == "4"
    assert [int(m.value) for m in client.get_metric_history(sharded.mlflow_run_id, "train/resumed_from_step")] == [2]
    records = read_records(tmp_path / "blocks")
    assert records[0] and records[0] == records[1]  # both ranks of the group trained on the same blocks
    assert records[0] == read_records(tmp_path / "single_blocks")[0]  # the blocks one worker trains on
    assert sharded.metrics["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-5)

    mine, theirs = (load_file(Path(r.adapter_path) / "adapter_model.safetensors") for r in (sharded, single))
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-5, rtol=1e-5, msg=key)
    probe = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    base, _ = load_model(config.model, for_training=False, path=tiny_model_dir)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base.config)
        logits = PeftModel.from_pretrained(plain, sharded.adapter_path).eval()(input_ids=probe).logits
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base.config), single.adapter_path
        ).eval()(input_ids=probe).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["scaling.num_workers=4", "scaling.sequence_parallel=3"],
     r"scaling.sequence_parallel=3 must divide scaling.num_workers=4 .*use one of \[1, 2, 4\]"),
    (["scaling.sequence_parallel=2", "attention.type=full"],
     r"needs attention.type=s2: full attention has no group structure"),
    (["scaling.sequence_parallel=2", "attention.shift=roll"], r"needs attention.shift=split: roll wraps"),
    (["scaling.num_workers=8", "scaling.sequence_parallel=8"],
     r"must divide the 4 S2 groups of a sequence \(1024 tokens / group size 256\).*use one of \[1, 2, 4\]"),
    (["scaling.sequence_parallel=2", "attention.group_size=384"],
     r"context length 1024 is not a multiple of the group size 384"),
])
def test_settings_sequence_parallelism_cannot_run_are_refused_naming_the_valid_values(overrides, message):
    from longtune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.target_context=1024", *overrides])


def test_valid_sequence_parallel_settings_load():
    from longtune.config import load_config

    config = load_config(None, ["model.target_context=1024", "scaling.num_workers=8", "scaling.sequence_parallel=8",
                                "attention.group_size=128"])
    assert config.scaling.sequence_parallel == 8
