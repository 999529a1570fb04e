"""train/parallel.py: FSDP2 trains what DDP trains, saves the adapter DDP saves, resumes from
its shards exactly; checked with real gloo process groups (2 ranks, fp32, CPU)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import loopback_port

from longtune.config import ConfigError, load_config

SEQ = 64
STEPS = 5


def rank_config(model_dir: str, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"model.target_context={SEQ}", "attention.type=s2",
        "train.precision=fp32", "train.lr=1e-2", "train.warmup_steps=0", f"train.max_steps={STEPS}",
        "train.grad_accum_steps=2", "train.max_grad_norm=0.5", "train.loss_chunk_tokens=16", *extra,
    ])


def micro_batches(rank: int, step: int) -> list[dict[str, torch.Tensor]]:
    """Step ``step``'s two micro-batches of rank ``rank``: its own blocks, two documents each."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return [{"input_ids": torch.randint(0, 300, (1, SEQ), generator=g),
             "position_ids": torch.cat([torch.arange(SEQ // 2 + 5), torch.arange(SEQ // 2 - 5)])[None]}
            for _ in range(2)]


# ---------------------------------------------------------------- what each rank runs


class Run:
    """One rank's training run, strategy as the config says, with the loop's own pieces."""

    def __init__(self, config, model_dir: str):
        from longtune.adapters import training_hooks
        from longtune.precision import resolve_precision
        from longtune.train.loop import build_optimizer, build_parallel

        torch.manual_seed(0)
        self.config = config
        self.precision = resolve_precision(config.model, config.train, "cpu")
        self.par = build_parallel(config, model_dir, torch.device("cpu"), self.precision)
        self.model = self.par.model
        self.params, self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.hooks = training_hooks(self.model, config.adapter, config.train.max_steps)
        self.model.train()

    def steps(self, first: int, last: int) -> list[float]:
        """Train steps ``first``..``last``; the global loss of each."""
        from longtune.distributed import all_reduce_sum
        from longtune.train.loop import optimizer_step

        losses = []
        for step in range(first, last + 1):
            loss = optimizer_step(self.par.wrapped, micro_batches(dist.get_rank(), step), self.params,
                                  self.optimizer, self.scheduler, self.config, self.precision.autocast("cpu"),
                                  self.hooks, step)
            loss_sum, tokens = all_reduce_sum([loss.loss_sum, loss.tokens], "cpu")
            losses.append(loss_sum / tokens)
        return losses

    def checkpoint(self, directory: Path, step: int) -> None:
        from longtune.train.checkpoint import TrainState, write_checkpoint

        write_checkpoint(directory, self.model, self.optimizer, self.scheduler, TrainState(step=step),
                         self.config.to_yaml(), self.hooks, parallel=self.par)

    def resume(self, directory: Path) -> int:
        from longtune.train.checkpoint import read_checkpoint

        return read_checkpoint(directory, self.model, self.optimizer, self.scheduler, self.hooks,
                               parallel=self.par).step

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-attention logits of ``ids`` from the sharded model (every rank runs it)."""
        self.model.eval()
        root = self.par.loss  # the head and final norm are the root's: gathered by hand, as the
        root.unshard()  # model runs outside the root's forward here; the layers gather themselves
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits
        root.reshard()
        self.model.train()
        return logits


def _merge(parts: list[Path], into: Path) -> None:
    """What Ray Train does with the directories every rank reports: one directory, the files
    of all of them (the last one winning on a clash)."""
    for part in parts:
        shutil.copytree(part, into, dirs_exist_ok=True)


def _ranks_main(rank: int, world: int, port: int, model_dir: str, tied_dir: str, out: str) -> None:
    from longtune.config import with_overrides
    from longtune.train.parallel import adapter_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = Path(out)
    result: dict = {}

    def fsdp(config):
        return with_overrides(config, {"train.strategy": "fsdp"})

    # LoRA+ on an untied Llama: DDP, FSDP uninterrupted, FSDP stopped at step 3 and resumed
    config = rank_config(model_dir)
    ddp = Run(config, model_dir)
    result["ddp_losses"] = ddp.steps(1, STEPS)
    if rank == 0:
        ddp.checkpoint(out / "ddp", STEPS)
    del ddp

    straight = Run(fsdp(config), model_dir)
    result["shards"] = {n: (tuple(p.shape), tuple(p.to_local().shape)) for n, p in straight.model.named_parameters()
                        if type(p).__name__ == "DTensor"}
    result["fsdp_losses"] = straight.steps(1, STEPS)
    straight.checkpoint(out / "straight" / f"rank{rank}", STEPS)
    probe = torch.randint(0, 300, (1, SEQ), generator=torch.Generator().manual_seed(7))
    result["probe"] = probe
    result["logits"] = straight.logits(probe)
    result["adapter_state"] = adapter_state_dict(straight.par)
    del straight

    stopped = Run(fsdp(config), model_dir)
    stopped.steps(1, 3)
    stopped.checkpoint(out / "stopped" / f"rank{rank}", 3)
    del stopped
    dist.barrier()
    if rank == 0:
        _merge([out / "stopped" / f"rank{r}" for r in range(world)], out / "stopped" / "merged")
    dist.barrier()
    resumed = Run(fsdp(config), model_dir)
    result["resumed_at"] = resumed.resume(out / "stopped" / "merged")
    result["resumed_losses"] = resumed.steps(4, STEPS)
    resumed.checkpoint(out / "resumed" / f"rank{rank}", STEPS)
    del resumed

    # every layer gathered from forward to backward: the same training
    run = Run(with_overrides(config, {"train.strategy": "fsdp", "train.fsdp.reshard_after_forward": False}),
              model_dir)
    result["kept_gathered_losses"] = run.steps(1, STEPS)
    del run

    # plain LoRA (no trained embeddings or norms): DDP and FSDP
    lora = rank_config(model_dir, "adapter.type=lora")
    result["lora_ddp_losses"] = Run(lora, model_dir).steps(1, STEPS)
    result["lora_fsdp_losses"] = Run(fsdp(lora), model_dir).steps(1, STEPS)

    # LoRA² on a tied Llama: pruning under sharding, stopped mid-pruning and resumed
    config = rank_config(tied_dir, "adapter.type=lora2", "adapter.rank=4", "adapter.lora2.outer_rank=4",
                         "adapter.pruning.target_rank=2", "model.activation_offload=true")

    def masks_of(run: Run) -> list[dict[str, torch.Tensor]]:
        every = [None] * world
        dist.all_gather_object(every, {n: b.clone() for n, b in run.model.named_buffers() if "lora_mask" in n})
        return every

    run = Run(config, tied_dir)
    result["lora2_ddp_losses"] = run.steps(1, STEPS)
    result["lora2_ddp_masks"] = masks_of(run)
    run = Run(fsdp(config), tied_dir)
    result["lora2_fsdp_losses"] = run.steps(1, 3)
    run.checkpoint(out / "lora2_stopped" / f"rank{rank}", 3)
    dist.barrier()
    if rank == 0:
        _merge([out / "lora2_stopped" / f"rank{r}" for r in range(world)], out / "lora2_stopped" / "merged")
    dist.barrier()
    run = Run(fsdp(config), tied_dir)
    run.resume(out / "lora2_stopped" / "merged")
    result["lora2_fsdp_losses"] += run.steps(4, STEPS)
    result["lora2_fsdp_masks"] = masks_of(run)
    run.checkpoint(out / "lora2_fsdp" / f"rank{rank}", STEPS)
    del run
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model_dir, tiny_tokenizer_path):
    """Everything the two gloo ranks ran and wrote (one spawn for the whole module)."""
    from transformers import AutoTokenizer

    from conftest import tiny_lm

    out = tmp_path_factory.mktemp("parallel")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    tied = tiny_lm("llama_tied", vocab_size=len(tokenizer), max_position_embeddings=64)
    tied.save_pretrained(out / "tied_model")
    mp.spawn(_ranks_main, args=(2, loopback_port(), tiny_model_dir, str(out / "tied_model"), str(out)),
             nprocs=2, join=True)
    for name in ("straight", "resumed", "lora2_fsdp"):
        _merge(sorted((out / name).glob("rank*")), out / name / "merged")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter" / "adapter_model.safetensors")


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_fsdp_trains_what_ddp_trains(ranks):
    """2 ranks, the same blocks, fp32, S2-Attn, gradient checkpointing, the chunked loss (4
    chunks a block), 2 accumulated micro-batches, clipping: the same loss at every step and
    the same adapter."""
    out, (r0, r1) = ranks
    assert len(r0["fsdp_losses"]) == STEPS
    assert _relative(r0["fsdp_losses"], r0["ddp_losses"]) < 1e-5
    assert r0["fsdp_losses"] == r1["fsdp_losses"]  # one global loss
    assert r0["fsdp_losses"][-1] != r0["fsdp_losses"][0]  # it trained
    ddp, fsdp = _adapter(out / "ddp"), _adapter(out / "straight" / "merged")
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-5, rtol=1e-5, msg=key)


def test_fsdp_trains_what_ddp_trains_with_layers_kept_gathered_and_with_plain_lora(ranks):
    """train.fsdp.reshard_after_forward=false (the LoRA+ run above, every layer's weights kept
    from forward to backward) and plain LoRA (no modules_to_save): DDP's losses."""
    _, (r0, _) = ranks
    assert _relative(r0["kept_gathered_losses"], r0["ddp_losses"]) < 1e-5
    assert _relative(r0["lora_fsdp_losses"], r0["lora_ddp_losses"]) < 1e-5
    assert r0["lora_fsdp_losses"] != r0["ddp_losses"]  # another adapter, another training


def test_every_layer_is_sharded_over_the_ranks(ranks):
    _, (r0, r1) = ranks
    shards = r0["shards"]
    assert any(".layers.0." in n for n in shards) and any("lm_head" in n for n in shards)
    assert any("embed_tokens" in n for n in shards)
    for name, (whole, mine) in shards.items():
        theirs = r1["shards"][name][1]
        assert mine[0] + theirs[0] == whole[0] and mine[1:] == whole[1:], name
        assert mine[0] < whole[0], name


def test_the_fsdp_adapter_is_the_ddp_format_and_loads_with_plain_peft(ranks, tiny_model_dir):
    """The adapter written from the gathered trained parameters alone: a plain PEFT reload
    gives the logits the sharded model gives."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    out, (r0, _) = ranks
    adapter = out / "straight" / "merged" / "adapter"
    assert {p.name for p in adapter.iterdir()} == {p.name for p in (out / "ddp" / "adapter").iterdir()}
    state = r0["adapter_state"]
    assert state and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())
    assert not any("base_layer" in k or "original_module" in k for k in state)  # no frozen weight gathered
    base_config = AutoConfig.from_pretrained(tiny_model_dir)
    base_config.rope_parameters = {**base_config.rope_parameters, "rope_type": "linear", "factor": SEQ / 64}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base_config)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=r0["probe"]).logits
    torch.testing.assert_close(logits, r0["logits"], atol=1e-5, rtol=1e-5)


def test_a_resumed_fsdp_run_equals_the_uninterrupted_one(ranks):
    """Stopped after step 3's checkpoint (every rank wrote its own shards into one merged
    directory), resumed by fresh ranks: steps 4 and 5, the adapter and the optimizer state
    equal the uninterrupted run's."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, (r0, r1) = ranks
    stopped = out / "stopped" / "merged"
    assert sorted(p.name for p in (stopped / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (stopped / "optimizer.pt").exists()
    assert r0["resumed_at"] == r1["resumed_at"] == 3
    assert r0["resumed_losses"] == pytest.approx(r0["fsdp_losses"][3:], rel=1e-6)
    a, b = _adapter(out / "resumed" / "merged"), _adapter(out / "straight" / "merged")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6, msg=key)
    for name in ("resumed", "straight"):
        dcp_to_torch_save(out / name / "merged" / "sharded", out / f"{name}.pt")
    resumed, straight = (torch.load(out / f"{n}.pt", weights_only=False) for n in ("resumed", "straight"))
    states = straight["optimizer"]["state"]
    assert states and resumed["optimizer"]["state"].keys() == states.keys()
    for key, state in states.items():
        assert int(resumed["optimizer"]["state"][key]["step"]) == int(state["step"]) == STEPS
        torch.testing.assert_close(resumed["optimizer"]["state"][key]["exp_avg_sq"], state["exp_avg_sq"],
                                   atol=1e-9, rtol=1e-5, msg=key)


def test_lora2_prunes_alike_on_every_rank_under_fsdp(ranks):
    """The allocator's scores are gathered from the shards: every rank keeps the same
    singular values, the ones DDP keeps, and the losses agree (the orthogonality penalty on
    the gathered factors, activation offload on), also across a resume in the middle of
    pruning (masks from the shards, the allocator's EMAs from its whole record)."""
    out, (r0, _) = ranks
    assert _relative(r0["lora2_fsdp_losses"], r0["lora2_ddp_losses"]) < 1e-5
    fsdp, ddp = r0["lora2_fsdp_masks"], r0["lora2_ddp_masks"]
    assert fsdp[0] and fsdp[0].keys() == ddp[0].keys()
    for name in fsdp[0]:
        assert torch.equal(fsdp[0][name], fsdp[1][name]) and torch.equal(fsdp[0][name], ddp[0][name]), name
    kept = sum(int(m.sum()) for m in fsdp[0].values())
    assert kept < 4 * len(fsdp[0])  # it pruned
    merged = out / "lora2_fsdp" / "merged"
    allocator = torch.load(merged / "adapter_state.pt", weights_only=True)["allocator"]
    assert allocator["ema_ipt"] and all(v.shape[0] in (4,) for k, v in allocator["ema_ipt"].items() if "lora_Qin" in k)
    assert (merged / "adapter" / "rank_pattern.json").is_file()


def test_adalora_is_refused_under_fsdp_naming_what_to_use():
    with pytest.raises(ConfigError, match=r"adapter.type=adalora does not run with train.strategy=fsdp.*lora2"):
        load_config(None, ["train.strategy=fsdp", "adapter.type=adalora"])
