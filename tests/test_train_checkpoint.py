"""train/checkpoint.py: what a checkpoint holds, and a resume that restores all of it onto
the worker's device."""

from __future__ import annotations

import pytest
import torch

from longtune.config import load_config
from longtune.train.checkpoint import TrainState, read_checkpoint, write_checkpoint

SEQ = 64


def lora2_run(model_dir: str):
    from longtune.adapters import training_hooks
    from longtune.train.loop import build_model, build_optimizer

    config = load_config(None, [
        f"model.name_or_path={model_dir}", f"model.target_context={SEQ}", "adapter.type=lora2",
        "adapter.rank=4", "adapter.pruning.target_rank=2", "train.max_steps=10", "train.precision=fp32",
    ])
    torch.manual_seed(0)
    model = build_model(config, model_dir, torch.device("cpu"))
    params, optimizer, scheduler = build_optimizer(config, model)
    return config, model, params, optimizer, scheduler, training_hooks(model, config.adapter, 10)


def train(run, steps: int) -> None:
    from longtune.train.loop import optimizer_step

    config, model, params, optimizer, scheduler, hooks = run
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        block = {"input_ids": torch.randint(0, 300, (1, SEQ), generator=g), "position_ids": torch.arange(SEQ)[None]}
        optimizer_step(model, [block], params, optimizer, scheduler, config,
                       torch.autocast("cpu", enabled=False), hooks, step)


def test_a_lora2_run_resumes_with_weights_optimizer_schedule_and_allocator(tmp_path, tiny_model_dir):
    run = lora2_run(tiny_model_dir)
    train(run, 4)  # past pruning.start: the allocator has scores and a mask
    config, model, _, optimizer, scheduler, hooks = run
    state = TrainState(step=4, epoch=1, batches_in_epoch=3, tokens_seen=4 * SEQ)
    write_checkpoint(tmp_path, model, optimizer, scheduler, state, config.to_yaml(), hooks)
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter", "optimizer.pt", "scheduler.pt", "adapter_state.pt", "config.yaml", "state.json"}

    fresh = lora2_run(tiny_model_dir)
    _, model2, _, optimizer2, scheduler2, hooks2 = fresh
    restored = read_checkpoint(tmp_path, model2, optimizer2, scheduler2, hooks2)
    assert restored == state
    trained = {n: p for n, p in model.state_dict().items() if "lora_" in n or "modules_to_save" in n}
    again = model2.state_dict()
    for name, value in trained.items():
        assert torch.equal(value, again[name]), name
    assert scheduler2.state_dict() == scheduler.state_dict()
    for a, b in zip(optimizer.state_dict()["state"].values(), optimizer2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert torch.equal(hooks2.allocator.scores(), hooks.allocator.scores())
    assert hooks2.allocator.budget == hooks.allocator.budget


def test_the_allocator_state_goes_to_the_factors_device(tiny_model_dir):
    """EMAs saved on one device land on the device of the factors that resume them ("meta"
    stands in for a GPU here), not where torch.load put them."""
    run = lora2_run(tiny_model_dir)
    train(run, 3)
    state = run[-1].state_dict()
    assert state["allocator"]["ema_ipt"]
    from longtune.adapters import training_hooks

    config, model = lora2_run(tiny_model_dir)[:2]
    hooks = training_hooks(model.to("meta"), config.adapter, 10)
    hooks.load_state_dict(state)
    allocator = hooks.allocator
    devices = {t.device.type for t in [*allocator.ema_ipt.values(), *allocator.ema_unc.values()]}
    assert devices == {"meta"}


def test_an_incomplete_checkpoint_is_refused(tmp_path, tiny_model_dir):
    run = lora2_run(tiny_model_dir)
    config, model, _, optimizer, scheduler, hooks = run
    write_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), config.to_yaml(), hooks)
    (tmp_path / "state.json").unlink()  # written last: its absence marks an interrupted write
    with pytest.raises(FileNotFoundError, match="not a complete longtune checkpoint"):
        read_checkpoint(tmp_path, model, optimizer, scheduler, hooks)


def test_fp16s_loss_scale_is_kept_and_restored(tmp_path, tiny_model_dir):
    run = lora2_run(tiny_model_dir)
    config, model, _, optimizer, scheduler, hooks = run
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    scaler.update(512.0)  # as after an overflow
    write_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), config.to_yaml(), hooks, scaler)
    restored = torch.amp.GradScaler("cpu")
    read_checkpoint(tmp_path, model, optimizer, scheduler, hooks, restored)
    assert restored.get_scale() == 512.0

    disabled = torch.amp.GradScaler("cpu", enabled=False)  # bf16 and fp32 runs write no scaler
    write_checkpoint(tmp_path / "bf16", model, optimizer, scheduler, TrainState(step=1), config.to_yaml(), hooks,
                     disabled)
    assert not (tmp_path / "bf16" / "grad_scaler.pt").exists()


def test_a_checkpoint_of_the_other_strategy_is_refused_naming_the_one_to_resume_with(tmp_path, tiny_model_dir):
    """A DDP checkpoint holds optimizer.pt, an FSDP one sharded/: neither can resume the other."""
    from types import SimpleNamespace

    from longtune.train.checkpoint import CheckpointError

    config, model, _, optimizer, scheduler, hooks = lora2_run(tiny_model_dir)
    write_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), config.to_yaml(), hooks)
    with pytest.raises(CheckpointError, match=r"train.strategy=ddp run; resume it with train.strategy=ddp"):
        read_checkpoint(tmp_path, model, optimizer, scheduler, hooks, parallel=SimpleNamespace(sharded=True))
    (tmp_path / "sharded").mkdir()
    with pytest.raises(CheckpointError, match=r"train.strategy=fsdp run; resume it with train.strategy=fsdp"):
        read_checkpoint(tmp_path, model, optimizer, scheduler, hooks)
