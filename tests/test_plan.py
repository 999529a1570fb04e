"""`longtune plan` (issue #15 part 3, #16): its memory prediction against the measured peak
of the real training step (train/loop.py's model build and optimizer step) on the CPU, with
DDP and with FSDP2 over two gloo ranks, the shipped model configs, the command line, and
every shipped recipe on the GPU its cluster provides."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import loopback_port, tiny_lm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longtune.config import ConfigError, load_config
from longtune.plan import (
    GPUS,
    INSTANCE_GPUS,
    MAX_CONTEXT_CAP,
    max_context,
    model_shape,
    plan_run,
    shipped_models,
)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15  # the issue's bar; the settings below land within ~2%


# ---------------------------------------------------------------- measuring a real step


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, counting every storage an op
    creates while the mode is on until it is freed: what torch.cuda.max_memory_allocated
    measures on a GPU (without the allocator's rounding), and unlike the process's resident
    set, blind to the allocator's caching and to everything that is not a tensor."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0
        for t in existing:  # counted by the caller; their views must not count again
            self.sizes.setdefault(t.untyped_storage().data_ptr(), 0)

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if not n or key in self.sizes:
                continue
            self.sizes[key] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)  # storages keep their Python object
        return out


def tensors_alive() -> list[torch.Tensor]:
    gc.collect()  # an earlier setting's model, kept only by reference cycles, is not this step's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def measured_peak(config, model_dir: str, vocab: int) -> int:
    """Peak bytes of live tensors during one optimizer step of the training loop's own
    functions on the CPU, after a first step (AdamW's state exists, as in every later step):
    the tensors alive when it starts (weights, trained copies, optimizer state, batch) plus
    the highest rise the step makes above them."""
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_model, build_optimizer, optimizer_step

    device = torch.device("cpu")
    # tensors of the libraries themselves (bitsandbytes' quantization tables, ...) are no
    # part of the run: leave out whatever is alive before the model exists
    before = {t.untyped_storage().data_ptr() for t in tensors_alive() if t.device.type == "cpu" and not t.is_meta}
    model = build_model(config, model_dir, device)
    params, optimizer, scheduler = build_optimizer(config, model)
    autocast = resolve_precision(config.model, config.train, "cpu").autocast(device)
    b, n = config.train.batch_size_per_worker, config.context_length
    g = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": torch.randint(0, vocab, (b, n), generator=g),
               "position_ids": torch.arange(n)[None].expand(b, n)} for _ in range(config.train.grad_accum_steps)]
    model.train()
    optimizer_step(model, blocks, params, optimizer, scheduler, config, autocast)
    existing = tensors_alive()
    base = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in existing
                if t.device.type == "cpu" and not t.is_meta
                and t.untyped_storage().data_ptr() not in before}.values())
    tracker = LiveTensorBytes(existing)
    with tracker:
        optimizer_step(model, blocks, params, optimizer, scheduler, config, autocast)
    return base + tracker.peak


def test_the_tracker_counts_allocations_and_frees():
    existing = tensors_alive()
    with LiveTensorBytes(existing) as t:
        a = torch.empty(1000, dtype=torch.float32)
        view = a.view(10, 100)  # noqa: F841  (a view is no new storage)
        b = torch.ones(500, dtype=torch.float64)
        del b
        c = a * 2  # noqa: F841
    assert t.peak == 8000  # a with b, then a with c
    assert t.live == 8000


def tiny_model(tmp_path, family: str, **config) -> tuple[str, int]:
    path = tmp_path / family
    model = tiny_lm(family, **config)
    model.save_pretrained(path)
    return str(path), model.config.vocab_size


# Settings that differ in context, attention, chunked loss, model family and shape, dtype
# layout, batch, adapter and checkpointing. bf16 weights with bf16 autocast is a GPU run's
# dtype layout; fp32 weights with bf16 autocast a CPU with AMX's (and model.dtype=float32 on
# a GPU). train.precision is explicit: auto would depend on this CPU's bf16 support.
VALIDATION = {
    "llama s2 512 unchunked fp32": ("llama", dict(vocab_size=512),
                                    ["model.target_context=512", "train.chunked_loss=false", "train.precision=fp32"]),
    "llama s2 768 chunked bf16": ("llama", dict(vocab_size=2048),
                                  ["model.target_context=768", "train.loss_chunk_tokens=192",
                                   "model.dtype=bfloat16", "train.precision=bf16"]),
    "llama s2 768 unchunked bf16": ("llama", dict(vocab_size=2048),
                                    ["model.target_context=768", "train.chunked_loss=false",
                                     "model.dtype=bfloat16", "train.precision=bf16"]),
    "qwen2 gqa full 640 bf16": ("qwen2", dict(hidden_size=96, intermediate_size=256, num_attention_heads=6,
                                              num_key_value_heads=2, vocab_size=300),
                                ["model.target_context=640", "attention.type=full", "model.dtype=bfloat16",
                                 "train.precision=bf16"]),
    "mistral window full 512 fp32 (mask)": ("mistral", dict(sliding_window=128, vocab_size=200),
                                            ["model.target_context=512", "attention.type=full",
                                             "train.precision=fp32"]),
    "tied llama b2 384 fp32 weights bf16 autocast": ("llama_tied", dict(vocab_size=1024),
                                                     ["model.target_context=384", "train.batch_size_per_worker=2",
                                                      "train.loss_chunk_tokens=256", "train.precision=bf16"]),
    "qwen3 no checkpointing bf16": ("qwen3", dict(head_dim=16, vocab_size=256),
                                    ["model.target_context=384", "model.gradient_checkpointing=false",
                                     "model.dtype=bfloat16", "train.precision=bf16"]),
}


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """name -> (measured, predicted) bytes for every setting of VALIDATION."""
    tmp = tmp_path_factory.mktemp("plan_models")
    out = {}
    for name, (family, shape, overrides) in VALIDATION.items():
        path, vocab = tiny_model(tmp / re.sub(r"\W+", "_", name), family, **shape)
        config = load_config(None, [f"model.name_or_path={path}", "train.warmup_steps=0",
                                    "train.batch_size_per_worker=1", "data.position_ids=continuous", *overrides])
        predicted = plan_run(config, None, device="cpu").peak_bytes
        out[name] = (measured_peak(config, path, vocab), predicted)
    return out


@pytest.mark.parametrize("name", list(VALIDATION))
def test_the_plan_predicts_the_measured_peak_of_the_real_step(validation, name):
    measured, predicted = validation[name]
    assert abs(predicted - measured) <= TOLERANCE * measured, (
        f"{name}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"
    )


def test_the_chunked_loss_lowers_the_peak_measured_and_predicted(validation):
    chunked = validation["llama s2 768 chunked bf16"]
    stock = validation["llama s2 768 unchunked bf16"]
    assert chunked[0] < 0.6 * stock[0] and chunked[1] < 0.6 * stock[1]


# ---------------------------------------------------------------- measuring a real FSDP step


class StorageBytes(TorchDispatchMode):
    """LiveTensorBytes for FSDP2, which frees and reallocates its unsharded parameters by
    resizing their storages in place (``untyped_storage().resize_``, no op a mode sees): the
    storages of ``existing`` that are empty when it starts (the unsharded parameters, between
    steps) are read afresh after each op; the others count once, as LiveTensorBytes counts
    them. DTensor shards count as their local tensors."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.resizable: dict[int, weakref.ref] = {}
        self.live = 0
        for t in map(_local, existing):
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                self.resizable[storage._cdata] = weakref.ref(storage)
            elif storage._cdata not in self.sizes:
                self.sizes[storage._cdata] = storage.nbytes()
                self.live += storage.nbytes()
        self.peak = self.start = self.now()

    def now(self) -> int:
        return self.live + sum(s.nbytes() for s in (ref() for ref in self.resizable.values()) if s is not None)

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (t := _local(t)).is_meta:
                continue
            storage = t.untyped_storage()
            key, n = storage._cdata, storage.nbytes()  # one key per StorageImpl, however resized
            if not n or key in self.sizes or key in self.resizable:
                continue
            self.sizes[key] = n
            self.live += n
            weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.now())
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def test_the_storage_tracker_sees_storages_resized_in_place():
    kept = torch.empty(1000, dtype=torch.float32)
    other = torch.ones(10)
    kept.untyped_storage().resize_(0)  # as FSDP frees an unsharded parameter
    with StorageBytes([kept, other, other[2:]]) as t:
        start = t.start
        kept.untyped_storage().resize_(4000)  # reallocated outside any op
        kept.view(10, 100)  # the next op
        kept.untyped_storage().resize_(0)
        b = torch.ones(500, dtype=torch.float64)
        del b
        torch.zeros(1)
    assert start == 40 and t.peak == start + 4000 and t.now() == start


# Settings of a 2-rank FSDP run on the CPU (train.strategy=fsdp, gloo) of a model whose
# weights are most of the peak: bf16 weights under bf16 autocast, resharded after each
# layer's forward (the default; on CPUs FSDP gathers each parameter in its own dtype, frozen
# bf16 and trained fp32: no MixedPrecisionPolicy); fp32 with the whole base kept gathered and
# gradient accumulation. (An fp32 run resharded lands within 1% too; left out for time.)
FSDP_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=2048)
FSDP_VALIDATION = {
    "fsdp bf16 weights": ["model.dtype=bfloat16", "train.precision=bf16"],
    "fsdp fp32 reshard_after_forward=false, 2 micro-batches": [
        "train.precision=fp32", "train.fsdp.reshard_after_forward=false", "train.grad_accum_steps=2"],
}
FSDP_WORLD = 2


def fsdp_config(model_dir: str, overrides: list[str]):
    return load_config(None, [f"model.name_or_path={model_dir}", "model.target_context=128", "train.warmup_steps=0",
                              "train.batch_size_per_worker=1", "data.position_ids=continuous",
                              "train.strategy=fsdp", f"scaling.num_workers={FSDP_WORLD}", *overrides])


def _fsdp_rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """One rank: for each FSDP_VALIDATION setting, the loop's own model build (sharded) and
    optimizer, a first step (AdamW's state exists, as in every later step), then the peak of
    live storages through a second step, written to ``out/<rank>.json``."""
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_optimizer, build_parallel, optimizer_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    peaks = {}
    for name, overrides in FSDP_VALIDATION.items():
        config = fsdp_config(model_dir, overrides)
        precision = resolve_precision(config.model, config.train, "cpu")
        par = build_parallel(config, model_dir, device, precision)
        params, optimizer, scheduler = build_optimizer(config, par.model)
        g = torch.Generator().manual_seed(rank)
        n = config.context_length
        blocks = [{"input_ids": torch.randint(0, FSDP_SHAPE["vocab_size"], (1, n), generator=g),
                   "position_ids": torch.arange(n)[None]} for _ in range(config.train.grad_accum_steps)]
        par.model.train()
        autocast = precision.autocast(device)
        optimizer_step(par.wrapped, blocks, params, optimizer, scheduler, config, autocast)
        tracker = StorageBytes([t for t in tensors_alive() if _local(t).device.type == "cpu"])
        with tracker:
            optimizer_step(par.wrapped, blocks, params, optimizer, scheduler, config, autocast)
        peaks[name] = tracker.peak
        del par, params, optimizer, scheduler, tracker
    Path(out, f"{rank}.json").write_text(json.dumps(peaks))
    dist.destroy_process_group()
    os._exit(0)  # done: tearing down an interpreter that imported transformers takes seconds


@pytest.fixture(scope="module")
def fsdp_validation(tmp_path_factory):
    """name -> ([measured bytes of each rank], predicted bytes) for FSDP_VALIDATION."""
    tmp = tmp_path_factory.mktemp("plan_fsdp")
    path, _ = tiny_model(tmp, "llama", **FSDP_SHAPE)
    port = loopback_port()
    mp.spawn(_fsdp_rank, args=(FSDP_WORLD, port, path, str(tmp)), nprocs=FSDP_WORLD, join=True)
    measured = [json.loads((tmp / f"{rank}.json").read_text()) for rank in range(FSDP_WORLD)]
    return {name: ([m[name] for m in measured], plan_run(fsdp_config(path, overrides), None, device="cpu"))
            for name, overrides in FSDP_VALIDATION.items()}


@pytest.mark.parametrize("name", list(FSDP_VALIDATION))
def test_the_plan_predicts_each_fsdp_rank_s_measured_peak(fsdp_validation, name):
    measured, plan = fsdp_validation[name]
    for rank, peak in enumerate(measured):
        assert abs(plan.peak_bytes - peak) <= TOLERANCE * peak, (
            f"{name}, rank {rank}: predicted {plan.peak_bytes / 2**20:.2f} MiB ({plan.peak_phase}), "
            f"measured {peak / 2**20:.2f} MiB"
        )


def test_the_fsdp_validation_is_not_vacuous(fsdp_validation, tmp_path):
    """The weights are a large share of what was measured, sharded in two (a DDP plan of the
    same runs, every rank holding the whole model, misses by more than the tolerance: less
    than what FSDP gathers when no layer is resharded, more than its shards otherwise), and
    the whole base is gathered at the peak when no layer is resharded after its forward."""
    path, _ = tiny_model(tmp_path, "llama", **FSDP_SHAPE)
    for name, (measured, plan) in fsdp_validation.items():
        bytes_per_weight = 2 if "bf16" in name else 4
        assert plan.breakdown["base_weights_sharded"] == plan.params["base"] * bytes_per_weight // 2
        weights = sum(v for k, v in plan.breakdown.items() if k.startswith(("base_weights", "gathered_")))
        assert weights > 0.25 * measured[0], name
        assert "ddp_buckets" not in plan.breakdown and "base_weights" not in plan.breakdown
        ddp = plan_run(fsdp_config(path, [*FSDP_VALIDATION[name], "train.strategy=ddp"]), None, device="cpu")
        assert abs(ddp.peak_bytes - measured[0]) > TOLERANCE * measured[0], name
    _, kept = fsdp_validation["fsdp fp32 reshard_after_forward=false, 2 micro-batches"]
    one_layer = kept.phases["forward"]["gathered_layers"] // (FSDP_SHAPE["num_hidden_layers"] + 1)
    assert kept.breakdown["gathered_layers"] >= FSDP_SHAPE["num_hidden_layers"] * one_layer


# ---------------------------------------------------------------- measuring a real sequence-parallel step

# 2 gloo ranks sharing each block (scaling.sequence_parallel=2, DDP over both): a model whose
# activations are most of the peak, so that what the plan divides by P is what is measured.
# bf16 weights under bf16 autocast with the chunked loss (a GPU run's layout); fp32 with a kv
# head shared by both halves of the query heads (the shard repeats it to send the shifted
# heads' keys and values) and the stock loss.
SP_SHAPES = {
    "sp gqa bf16 chunked": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
    "sp shared kv head fp32 stock loss": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4,
                                              num_key_value_heads=1, vocab_size=256, max_position_embeddings=4096),
}
SP_VALIDATION = {
    "sp gqa bf16 chunked": ["model.target_context=1536", "attention.group_size=256", "model.dtype=bfloat16",
                            "train.precision=bf16", "train.loss_chunk_tokens=256"],
    "sp shared kv head fp32 stock loss": ["model.target_context=1024", "attention.group_size=128",
                                          "train.precision=fp32", "train.chunked_loss=false"],
}
SP_WORLD = 2


def sp_config(model_dir: str, overrides: list[str], sp: int = SP_WORLD):
    return load_config(None, [f"model.name_or_path={model_dir}", "train.warmup_steps=0",
                              "train.batch_size_per_worker=1", "data.position_ids=continuous",
                              f"scaling.num_workers={SP_WORLD}", f"scaling.sequence_parallel={sp}", *overrides])


def _sp_rank(rank: int, world: int, port: int, model_dirs: dict[str, str], out: str) -> None:
    """One rank: for each SP_VALIDATION setting, the loop's own model build (DDP), optimizer
    and sequence group, a first step, then the peak of live storages through a second step
    on the same block (every rank of the group holds it), written to ``out/<rank>.json``."""
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_optimizer, build_parallel, optimizer_step
    from longtune.train.sequence import sequence_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    peaks = {}
    for name, overrides in SP_VALIDATION.items():
        config = sp_config(model_dirs[name], overrides)
        precision = resolve_precision(config.model, config.train, "cpu")
        par = build_parallel(config, model_dirs[name], device, precision)
        params, optimizer, scheduler = build_optimizer(config, par.model)
        sequence = sequence_group(SP_WORLD, device)
        g = torch.Generator().manual_seed(0)  # the same block on both ranks
        n = config.context_length
        blocks = [{"input_ids": torch.randint(0, SP_SHAPES[name]["vocab_size"], (1, n), generator=g),
                   "position_ids": torch.arange(n)[None]}]
        par.model.train()
        autocast = precision.autocast(device)
        optimizer_step(par.wrapped, blocks, params, optimizer, scheduler, config, autocast, sequence=sequence)
        tracker = StorageBytes([t for t in tensors_alive() if _local(t).device.type == "cpu"])
        with tracker:
            optimizer_step(par.wrapped, blocks, params, optimizer, scheduler, config, autocast, sequence=sequence)
        peaks[name] = tracker.peak
        del par, params, optimizer, scheduler, tracker
    Path(out, f"{rank}.json").write_text(json.dumps(peaks))
    dist.destroy_process_group()
    os._exit(0)  # done: tearing down an interpreter that imported transformers takes seconds


@pytest.fixture(scope="module")
def sp_validation(tmp_path_factory):
    """name -> ([measured bytes of each rank], plan, the model's directory) for SP_VALIDATION."""
    tmp = tmp_path_factory.mktemp("plan_sp")
    dirs = {name: tiny_model(tmp / re.sub(r"\W+", "_", name), "llama", **shape)[0] for name, shape in SP_SHAPES.items()}
    port = loopback_port()
    mp.spawn(_sp_rank, args=(SP_WORLD, port, dirs, str(tmp)), nprocs=SP_WORLD, join=True)
    measured = [json.loads((tmp / f"{rank}.json").read_text()) for rank in range(SP_WORLD)]
    return {name: ([m[name] for m in measured], plan_run(sp_config(dirs[name], overrides), None, device="cpu"),
                   dirs[name])
            for name, overrides in SP_VALIDATION.items()}


@pytest.mark.parametrize("name", list(SP_VALIDATION))
def test_the_plan_predicts_each_sequence_parallel_rank_s_measured_peak(sp_validation, name):
    measured, plan, _ = sp_validation[name]
    for rank, peak in enumerate(measured):
        assert abs(plan.peak_bytes - peak) <= TOLERANCE * peak, (
            f"{name}, rank {rank}: predicted {plan.peak_bytes / 2**20:.2f} MiB ({plan.peak_phase}), "
            f"measured {peak / 2**20:.2f} MiB"
        )


def test_the_sequence_parallel_validation_is_not_vacuous(sp_validation):
    """The activations are most of what was measured: a plan of the same run without
    sequence parallelism (each rank holding the whole block) misses it by more than the
    tolerance, and the halo's own terms are part of the prediction."""
    for name, (measured, plan, model_dir) in sp_validation.items():
        whole = plan_run(sp_config(model_dir, SP_VALIDATION[name], sp=1), None, device="cpu")
        assert whole.peak_bytes > (1 + TOLERANCE) * max(measured), name
        assert plan.sequence_parallel == 2 and plan.halo_pass_bytes > 0
        assert max(terms.get("sequence_parallel_halo", 0) for terms in plan.phases.values()) > 0, name


def sp_recipe(*overrides: str, sp: int = 8, group: int = 8192):
    return recipe("llama2-7b-100k", "scaling.num_workers=8", f"scaling.sequence_parallel={sp}",
                  f"attention.group_size={group}", "data.context_length=null", *overrides)


def test_a_sequence_parallel_rank_plans_its_share_of_the_tokens_plus_the_halo():
    """At P = 2 every per-rank activation term is that of N/2 tokens (the same groups), the
    data block excepted (every rank holds the whole block's ids), plus the halo's terms."""
    from longtune.plan import _halo_terms, layout

    n, g = 65536, 8192
    sharded = plan_run(sp_recipe(f"model.target_context={n}", sp=2, group=g), "a100-80gb", search_max_context=False)
    half = plan_run(sp_recipe(f"model.target_context={n // 2}", sp=1, group=g), "a100-80gb", search_max_context=False)
    halo = _halo_terms(model_shape("meta-llama/Llama-2-7b-hf"), layout(sp_recipe(f"model.target_context={n}"), "cuda", True), 1, n // 2, g)
    assert set(sharded.phases) == set(half.phases) | {"last_layer_backward (halo)"}
    for phase, terms in half.phases.items():
        got = sharded.phases[phase]
        for term in ("layer_recompute", "attention", "lm_head_loss", "gradients", "base_weights", "optimizer_state"):
            assert got.get(term, 0) == terms.get(term, 0), (phase, term)
        if "checkpointed_activations" in terms:  # ids, positions, labels, loss mask of the other half (int64)
            assert got["checkpointed_activations"] - terms["checkpointed_activations"] == (n - n // 2) * 32, phase
    by_phase = {p: t.get("sequence_parallel_halo", 0) for p, t in sharded.phases.items()}
    assert by_phase["forward"] == halo["forward"]
    assert by_phase["last_layer_recompute (mlp)"] == by_phase["last_layer_backward (mlp)"] == halo["saved"]
    assert by_phase["last_layer_backward (attention)"] == halo["backward"]
    assert by_phase["last_layer_backward (halo)"] == halo["saved"] + halo["cat_backward"]
    # one more copy of the attention output at least (the shard's cat), forward
    assert halo["forward"] >= 2 * (n // 2) * 4096
    # FLOPs: N/2 tokens' through the layers and the head, plus the straddling group's
    extra = 2 * g * g * 16 * 128 * 32 * 4  # G x G causal, 16 shifted heads, 32 layers, fwd+recompute+bwd
    assert sharded.flops["step"] - half.flops["step"] == pytest.approx(extra * 8, rel=1e-9)  # 8 micro-batches


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (5, 5), (6, 2), (4, 1), (8, 8)])
def test_halo_bytes_are_what_the_shard_sends(heads, kv_heads):
    """The formula tests/test_sequence_parallel.py checks against SequenceShard.bytes_sent
    (B = 2, fp32): 2 x B x Hkv_shifted x G/2 x D per direction, the shifted kv heads those of
    the second half of the query heads (their repeated copies when a kv head serves both)."""
    from longtune.plan import ModelShape, halo_bytes

    d, g, b = 16, 24, 2
    s = ModelShape("t", "llama", heads * d, 4 * heads * d, 2, heads, kv_heads, d, 97, False, False, False, False,
                   False, None, 512)
    rep = heads // kv_heads
    shifted = kv_heads - (heads // 2) // rep if (heads // 2) % rep == 0 else heads - heads // 2
    assert halo_bytes(s, g, b, 4) == 2 * b * shifted * (g // 2) * d * 4


def test_the_plan_s_halo_per_layer_and_json():
    plan = plan_run(sp_recipe("model.target_context=131072"), "a100-80gb", search_max_context=False)
    one = 2 * 1 * 16 * 4096 * 128 * 2  # Llama-2-7B: 16 of 32 kv heads shifted, G/2 = 4096, bf16
    assert plan.halo_pass_bytes == one
    assert plan.halo_bytes_per_layer == 3 * one  # forward, the checkpointed recompute, the gradient back
    out = plan.to_dict()
    assert out["sequence_parallel"] == 8 and out["tokens_per_rank"] == 16384
    assert out["halo_bytes_per_layer"] == 3 * one and out["halo_pass_bytes"] == one
    assert "sequence_parallel_halo" in plan.phases["forward"]
    assert plan_run(recipe("llama2-7b-32k"), "a100-80gb", search_max_context=False).to_dict()["sequence_parallel"] == 1


def test_sequence_parallel_max_context_is_whole_groups_per_rank():
    from longtune.plan import context_step

    config = sp_recipe("model.target_context=65536", "model.activation_offload=true")
    gpu = GPUS["a100-80gb"]
    assert context_step(config) == 8 * 8192
    n = max_context(config, gpu)
    assert n % (8 * 8192) == 0 and n > 4 * 100_000  # the issue's goal: 4x the paper's 100k for 7B
    fits = lambda ctx: plan_run(sp_recipe(f"model.target_context={ctx}", "model.activation_offload=true"),  # noqa: E731
                                gpu, search_max_context=False).fits
    assert fits(n) and not fits(n + 8 * 8192)
    # sequence parallelism lets the context grow: the same run on one rank per sequence
    assert n > 4 * max_context(sp_recipe("model.target_context=65536", "model.activation_offload=true", sp=1), gpu)
    # groups of a quarter: 4 groups at every context, contexts of multiples of 1024 and 8
    assert context_step(recipe("llama2-7b-100k", "scaling.sequence_parallel=4")) == 1024


def test_sequence_parallel_settings_plan_cannot_search_are_refused_in_one_line():
    from longtune.plan import sequence_parallel_refusal

    base = recipe("llama2-7b-100k")

    def with_sp(p: int, ratio: float):  # past the config's own check at this context
        return base.model_copy(update={"scaling": base.scaling.model_copy(update={"sequence_parallel": p}),
                                       "attention": base.attention.model_copy(update={"group_size_ratio": ratio})})

    assert sequence_parallel_refusal(with_sp(4, 0.25)) is None and sequence_parallel_refusal(with_sp(1, 0.3)) is None
    message = sequence_parallel_refusal(with_sp(8, 0.25))
    assert "can never divide the 4 S2 groups" in message and "[1, 2, 4]" in message and "attention.group_size" in message
    with pytest.raises(ConfigError, match="can never divide"):
        plan_run(with_sp(8, 0.25), "a100-80gb")
    assert "group_size_ratio=0.3" in sequence_parallel_refusal(with_sp(2, 0.3))


def test_communication_per_layer_formulas():
    from longtune.plan import communication_per_layer

    s = model_shape("meta-llama/Llama-2-7b-hf")  # 32 heads, 32 kv heads, head_dim 128
    seventy = model_shape("meta-llama/Llama-2-70b-hf")  # 64 heads, 8 kv heads
    n, p, g = 100_000, 8, 8192
    halo = communication_per_layer(s, n, p, "halo_s2", group_size=g)
    assert halo == 2 * 16 * (g // 2) * 128 * 2 * 2  # forward + its gradient back, bf16
    assert halo == communication_per_layer(s, 10 * n, 4 * p, "halo_s2", group_size=g)  # flat in N and P
    assert communication_per_layer(seventy, n, p, "halo_s2", group_size=g) == 2 * 4 * (g // 2) * 128 * 2 * 2
    ring = communication_per_layer(s, n, p, "ring")
    assert ring == int(3 * (p - 1) * 2 * (n / p) * 32 * 128 * 2)
    ulysses = communication_per_layer(s, n, p, "ulysses")
    assert ulysses == int(2 * (p - 1) / p * (n / p) * (2 * 32 + 2 * 32) * 128 * 2)
    # 70B on 32 GPUs: 8 kv heads replicated to 32 for the all-to-all
    assert communication_per_layer(seventy, n, 32, "ulysses") == int(2 * 31 / 32 * (n / 32) * (2 * 64 + 2 * 32) * 128 * 2)
    assert halo < ulysses < ring
    # the recompute repeats the forward's exchange
    assert communication_per_layer(s, n, p, "halo_s2", group_size=g, recompute=True) == 3 * halo // 2
    assert communication_per_layer(s, n, p, "ring", recompute=True) == pytest.approx(4 * ring / 3, rel=1e-6)
    assert communication_per_layer(s, n, 1, "ring") == 0
    with pytest.raises(ValueError, match="do not divide"):
        communication_per_layer(s, n, 48, "ulysses")
    with pytest.raises(ValueError, match="scheme must be one of"):
        communication_per_layer(s, n, p, "allgather")


def test_where_the_peak_is_and_what_it_is_made_of(tmp_path):
    path, _ = tiny_model(tmp_path, "llama", vocab_size=4096)
    cfg = lambda *o: load_config(None, [f"model.name_or_path={path}", "model.target_context=1024",  # noqa: E731
                                        "train.batch_size_per_worker=1", *o])
    stock = plan_run(cfg("train.chunked_loss=false"), None, device="cpu")
    assert stock.peak_phase == "loss_backward"
    # log_softmax's output, its gradient and nll_loss's: three fp32 [tokens, vocab] tensors
    assert stock.breakdown["lm_head_loss"] >= 3 * 4 * 1023 * 4096
    chunked = plan_run(cfg("train.loss_chunk_tokens=128"), None, device="cpu")
    assert chunked.breakdown.get("lm_head_loss", 0) < stock.breakdown["lm_head_loss"] / 4


# ---------------------------------------------------------------- GPU plans


def recipe(name: str, *overrides: str):
    return load_config(ROOT / "pipelines" / "configs" / f"{name}.yaml", list(overrides))


def test_s2_and_chunked_loss_and_offload_each_lower_a_7b_plan():
    base = recipe("llama2-7b-32k")
    s2 = plan_run(base, "a100-80gb", search_max_context=False)
    full = plan_run(recipe("llama2-7b-32k", "attention.type=full", "data.position_ids=continuous"),
                    "a100-80gb", search_max_context=False)
    stock = plan_run(recipe("llama2-7b-32k", "train.chunked_loss=false"), "a100-80gb", search_max_context=False)
    offload = plan_run(recipe("llama2-7b-32k", "model.activation_offload=true"), "a100-80gb", search_max_context=False)
    # with flash kernels both attentions keep O(N) per layer (the MLP's recompute sets the
    # peak); S2's saving is compute, and full attention's mask on packed rows (below)
    assert s2.peak_bytes <= full.peak_bytes
    assert s2.peak_bytes < stock.peak_bytes
    assert offload.peak_bytes < s2.peak_bytes and offload.host_bytes > 0
    # S2 with groups of a quarter computes a quarter of full attention's FLOPs
    assert s2.flops["s2_vs_full"] == pytest.approx(0.25)
    assert s2.flops["attention_share"] < full.flops["attention_share"]


def test_packed_rows_cost_full_attention_no_mask():
    # longtune's full attention keeps documents apart by varlen sequences (flash-attn on a
    # GPU), not transformers' [N, N] SDPA mask: packed rows plan as rows of one document
    packed = plan_run(recipe("llama2-7b-32k", "attention.type=full"), "a100-80gb", search_max_context=False)
    single = plan_run(recipe("llama2-7b-32k", "attention.type=full", "data.position_ids=continuous"),
                      "a100-80gb", search_max_context=False)
    assert packed.peak_bytes == single.peak_bytes
    assert not any("[N, N]" in note or "quadratic" in note for note in packed.assumptions)


def test_max_context_is_the_edge_of_what_fits():
    config = recipe("llama2-7b-32k")
    gpu = GPUS["a100-40gb"]
    n = max_context(config, gpu)
    assert 1024 <= n < MAX_CONTEXT_CAP and n % 1024 == 0
    fits = lambda ctx: plan_run(recipe("llama2-7b-32k", f"model.target_context={ctx}"),  # noqa: E731
                                gpu, search_max_context=False).fits
    assert fits(n) and not fits(n + 1024)


@pytest.mark.parametrize("n, ratio, fixed", [
    (100_000, 0.25, None), (1001, 0.3, None), (7, 0.25, None), (4096, 0.25, 1024),
])
def test_the_plan_s_group_size_is_the_attention_s(n, ratio, fixed):
    from longtune.attention.s2 import resolve_group_size
    from longtune.plan import _group_size

    config = load_config(None, [f"attention.group_size_ratio={ratio}", f"attention.group_size={fixed or 'null'}"])
    assert _group_size(config, n) == resolve_group_size(n, fixed, ratio)


def test_weights_alone_too_big_fit_nowhere_and_say_so():
    plan = plan_run(recipe("llama2-7b-32k", "model.name_or_path=meta-llama/Llama-2-70b-hf"), "a100-80gb")
    assert not plan.fits and plan.max_context == 0
    assert plan.breakdown["base_weights"] > 128 * 2**30


# ---------------------------------------------------------------- FSDP plans on GPUs


def test_fsdp_shards_the_state_and_gathers_a_layer_at_a_time_in_bf16():
    def plan(*overrides: str):
        return plan_run(recipe("llama2-13b-64k", "model.activation_offload=false", *overrides), "a100-80gb",
                        search_max_context=False)

    ddp, fsdp = plan("train.strategy=ddp"), plan("train.strategy=fsdp")
    s, world = model_shape("meta-llama/Llama-2-13b-hf"), 8
    d, f = ddp.breakdown, fsdp.breakdown
    assert f["base_weights_sharded"] == d["base_weights"] // world
    assert f["optimizer_state_sharded"] == d["optimizer_state"] // world
    assert "ddp_buckets" in d and "ddp_buckets" not in f
    # a decoder layer gathered in bf16 (MixedPrecisionPolicy), its LoRA factors and trained
    # norms too: the one being computed and the next one's all-gather output
    lora = 4 * 8 * (s.hidden + s.hidden)  # r = 8 on q, k, v, o (hidden -> hidden)
    layer = 2 * (s.layer_linear_params() + s.layer_norm_params() + lora)
    assert fsdp.peak_phase.startswith("last_layer_") and f["gathered_layers"] == 2 * layer
    assert f["gathered_root"] == 2 * (s.vocab * s.hidden + s.hidden)  # head and final norm
    # the activations are DDP's, less what PEFT's fp32 casts cost on fp32 adapter weights
    assert 0 < d["layer_recompute"] - f["layer_recompute"] < 0.2 * d["layer_recompute"]
    assert f["checkpointed_activations"] == d["checkpointed_activations"]

    kept = plan("train.strategy=fsdp", "train.fsdp.reshard_after_forward=false")
    assert kept.breakdown["gathered_layers"] >= s.layers * layer
    assert not kept.fits  # the whole base gathered: what sharding saves is gone

    offload = plan("train.strategy=fsdp", "train.fsdp.cpu_offload=true")
    o = offload.breakdown
    assert o["base_weights_sharded"] == o["optimizer_state_sharded"] == o["gradients_sharded"] == 0
    assert offload.host_offload_bytes >= f["base_weights_sharded"] + f["optimizer_state_sharded"]
    assert offload.peak_bytes < fsdp.peak_bytes
    assert offload.host_per_node_bytes == 8 * offload.host_offload_bytes


def test_the_13b_and_70b_recipes_take_what_the_plan_needs():
    """llama2-13b-64k: FSDP alone fits, without the activation offload plain data parallel
    needs; llama2-70b-32k: FSDP alone does not fit, FSDP with the layer inputs in host memory
    does (and data parallel cannot hold its weights)."""
    fits = lambda name, *o: plan_run(recipe(name, *o), "a100-80gb", search_max_context=False).fits  # noqa: E731
    assert recipe("llama2-13b-64k").train.strategy == "fsdp" and not recipe("llama2-13b-64k").model.activation_offload
    assert fits("llama2-13b-64k") and not fits("llama2-13b-64k", "train.strategy=ddp")
    seventy = recipe("llama2-70b-32k")
    assert seventy.train.strategy == "fsdp" and seventy.model.activation_offload and not seventy.train.fsdp.cpu_offload
    assert fits("llama2-70b-32k") and not fits("llama2-70b-32k", "model.activation_offload=false")
    assert not fits("llama2-70b-32k", "train.strategy=ddp")


def test_plan_json_of_an_fsdp_recipe():
    done = run_plan("--config", "pipelines/configs/llama2-70b-32k.yaml", "--gpu", "a100-80gb", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["strategy"] == "fsdp" and out["fits"] is True
    terms = {"base_weights_sharded", "gathered_layers", "gathered_root", "checkpointed_activations"}
    assert terms <= set(out["breakdown"])
    assert sum(out["breakdown"].values()) == pytest.approx(out["peak_gib"], abs=0.02)
    assert out["host_per_node_gib"] == pytest.approx(8 * out["host_pinned_gib"], abs=0.01)


# ---------------------------------------------------------------- shipped model configs

PUBLISHED_PARAMS = {  # billions, as each model card counts them
    "meta-llama/Llama-2-7b-hf": 6.74, "meta-llama/Llama-2-13b-hf": 13.02, "meta-llama/Llama-2-70b-hf": 68.98,
    "meta-llama/Llama-3.1-8B": 8.03, "meta-llama/Llama-3.1-70B": 70.55, "mistralai/Mistral-7B-v0.1": 7.24,
    "Qwen/Qwen2.5-7B": 7.62, "Qwen/Qwen2.5-14B": 14.77, "Qwen/Qwen2.5-72B": 72.71,
}


def test_the_issue_s_models_are_shipped_and_installed_with_the_package():
    assert shipped_models() == sorted(PUBLISHED_PARAMS)
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "model_configs/*.json" in package_data["longtune"]


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_PARAMS))
def test_shipped_configs_have_the_published_parameter_counts(hub_id):
    assert model_shape(hub_id).params() / 1e9 == pytest.approx(PUBLISHED_PARAMS[hub_id], abs=0.01)


@pytest.mark.parametrize("hub_id", ["mistralai/Mistral-7B-v0.1", "Qwen/Qwen2.5-7B", "meta-llama/Llama-3.1-8B"])
def test_shipped_configs_build_the_model_transformers_builds(hub_id):
    """Parameter count of the model transformers builds from the shipped file (on the meta
    device, no weights) against the plan's own count: the shape is read as transformers reads it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((ROOT / "longtune" / "model_configs" / (hub_id.replace("/", "--") + ".json")).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == model_shape(hub_id).params()


def test_a_local_tiny_model_and_the_seed_model_plan_offline(tmp_path):
    path, _ = tiny_model(tmp_path, "qwen3", head_dim=16)
    shape = model_shape(path)
    assert (shape.model_type, shape.qk_norm, shape.kv_heads) == ("qwen3", True, 2)
    # the seed model has not been built in this cache: its shape is known without building it
    plan = plan_run(load_config(None, [f"model.cache_dir={tmp_path / 'cache'}"]), "a100-40gb")
    assert plan.fits and plan.params["base"] > 1e6
    assert not (tmp_path / "cache" / "seed" / "model").exists()


def test_unreadable_or_unmodelled_inputs_are_config_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read a model config"):
        model_shape(str(tmp_path / "bad"))
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(ConfigError, match="model_type='gemma2'"):
        model_shape(str(tmp_path / "gemma"))
    with pytest.raises(ConfigError, match="plan works offline"):
        model_shape("some-org/not-shipped")
    with pytest.raises(ConfigError, match="train.strategy=fsdp with adapter.type=lora2"):
        plan_run(recipe("llama2-7b-32k", "train.strategy=fsdp", "adapter.type=lora2"), "a100-80gb")
    with pytest.raises(ConfigError, match="DoRA"):
        plan_run(recipe("llama2-7b-32k", "adapter.use_dora=true"), "a100-80gb")
    with pytest.raises(ConfigError, match="unknown GPU 'v100'"):
        plan_run(recipe("llama2-7b-32k"), "v100")


# ---------------------------------------------------------------- the command line


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/plan.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_json_is_one_object_with_the_promised_keys():
    done = run_plan("--config", "pipelines/configs/llama2-7b-32k.yaml", "--gpu", "a100-80gb", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {"peak_gib", "fits", "breakdown", "max_context"} <= set(out)
    assert out["fits"] is True and out["gpu"] == "a100-80gb"
    assert sum(out["breakdown"].values()) == pytest.approx(out["peak_gib"], abs=0.02)
    assert {"base_weights", "checkpointed_activations", "layer_recompute", "attention"} <= set(out["breakdown"])


def test_plan_table_and_a_run_that_does_not_fit_exits_1():
    done = run_plan("--config", "pipelines/configs/llama2-7b-100k.yaml", "--gpu", "a100-40gb")
    assert done.returncode == 1, done.stderr
    assert "does NOT fit" in done.stdout and "max context" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpu", "v100"], "unknown GPU 'v100'"),
    ([], "plan needs --gpu"),
    (["--gpu", "h200", "model.name_or_path=/no/such/model"], "plan works offline"),
    (["--gpu", "h200", "train.strategy=fsdp", "adapter.type=lora2"], "train.strategy=fsdp with adapter.type=lora2"),
    (["--gpu", "h200", "scaling.num_workers=8", "scaling.sequence_parallel=8"],
     "scaling.sequence_parallel=8 must divide the 4 S2 groups"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    done = run_plan(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("longtune plan: config error:")


# ---------------------------------------------------------------- recipes on their clusters


def cluster_gpus() -> dict[str, str]:
    """cluster file -> the GPU kind its GPU workers carry."""
    out = {}
    for path in sorted((ROOT / "clusters").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if path.name == "kuberay-rayjob.yaml":
            (job,) = [d for d in docs if d.get("kind") == "RayJob"]
            (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            label = group["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"]
            out[path.name] = {"nvidia-a100-80gb": "a100-80gb", "nvidia-tesla-a100": "a100-40gb",
                              "nvidia-h100-80gb": "h100-80gb"}[label]
            continue
        (config,) = docs
        (gpu,) = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
        machine = gpu["node_config"].get("InstanceType") or gpu["node_config"].get("machineType")
        out[path.name] = INSTANCE_GPUS[machine]
    return out


RECIPES = sorted(p.stem for p in (ROOT / "pipelines" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("cluster", ["aws-a100.yaml", "gcp-a100.yaml", "kuberay-rayjob.yaml"])
@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_fits_the_gpu_its_cluster_provides(name, cluster):
    gpu = cluster_gpus()[cluster]
    plan = plan_run(recipe(name), gpu, search_max_context=False)
    assert plan.fits, (f"pipelines/configs/{name}.yaml needs {plan.peak_bytes / 2**30:.1f} GiB per GPU; "
                       f"clusters/{cluster}'s {gpu} allows {GPUS[gpu].budget_bytes / 2**30:.1f}")

