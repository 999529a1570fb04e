"""LoRA²: the layer, its orthogonality penalty, the rank allocator, save/load, DDP."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from longtune.adapters import apply_adapter, load_adapter, save_adapter, training_hooks
from longtune.adapters.lora2 import (
    BudgetSchedule,
    Lora2Linear,
    adalora_scored_parameter_count,
    lora2_layers,
    lora2_scored_parameter_count,
    orthogonality_loss,
    scored_parameter_count,
    semi_orthogonality,
)
from longtune.config import load_config
from conftest import loopback_port, tiny_lm


def tiny_llama(seed: int = 0):
    return tiny_lm("llama", seed=seed, vocab_size=128, max_position_embeddings=256)


def lora2_config(*extra: str):
    return load_config(None, ["adapter.type=lora2", "adapter.rank=6", "adapter.lora2.outer_rank=4",
                              "adapter.pruning.target_rank=2", "train.max_steps=20", *extra])


def lora2_model(*extra: str, seed: int = 0):
    config = lora2_config(*extra)
    return apply_adapter(tiny_llama(seed), config.adapter, config.train.max_steps), config


def randomize_singular_values(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora2_layers(model):
            layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=g))


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def test_layers_replace_the_attention_projections_and_embeddings_norms_train():
    model, _ = lora2_model()
    names = [name.rsplit(".", 1)[-1] for name, _ in lora2_layers(model)]
    assert sorted(set(names)) == ["k_proj", "o_proj", "q_proj", "v_proj"] and len(names) == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("input_layernorm.modules_to_save" in n for n in trainable)
    assert not any("base_layer" in n for n in trainable)
    layer = next(m for _, m in lora2_layers(model))
    a = "default"
    assert layer.lora_Qout[a].shape == (4, 64) and layer.lora_Qin[a].shape == (6, 4)
    assert layer.lora_E[a].shape == (6,) and layer.lora_Pin[a].shape == (4, 6)
    assert layer.lora_Pout[a].shape == (64, 4) and layer.scaling[a] == 16 / 6


def test_delta_weight_is_zero_at_init_and_logits_equal_the_base():
    model, _ = lora2_model()
    for _, layer in lora2_layers(model):
        assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    with torch.no_grad():
        adapted = model(IDS).logits
        with model.disable_adapter():
            base = model(IDS).logits
    assert torch.equal(adapted, base)


def test_forward_equals_the_materialised_product():
    model, _ = lora2_model()
    randomize_singular_values(model)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    for _, layer in lora2_layers(model):
        a = "default"
        qout, qin, e, pin, pout = (getattr(layer, n)[a] for n in
                                   ("lora_Qout", "lora_Qin", "lora_E", "lora_Pin", "lora_Pout"))
        dense = pout @ pin @ torch.diag(e) @ qin @ qout * layer.scaling[a]
        assert torch.allclose(layer.get_delta_weight(a), dense, atol=1e-6)
        expected = layer.base_layer(x) + x @ dense.T
        assert torch.allclose(layer(x), expected, atol=1e-5), (layer(x) - expected).abs().max()
        assert torch.count_nonzero(dense) > 0


def test_merge_then_unmerge_restores_the_weights_and_merged_logits_match():
    model, _ = lora2_model()
    randomize_singular_values(model)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in lora2_layers(model)}
    with torch.no_grad():
        unmerged = model(IDS).logits
        for _, layer in lora2_layers(model):
            layer.merge()
        merged = model(IDS).logits
        for name, layer in lora2_layers(model):
            assert not torch.equal(layer.base_layer.weight, originals[name])  # merging changed it
            layer.unmerge()
            assert torch.allclose(layer.base_layer.weight, originals[name], atol=1e-6)
        again = model(IDS).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.allclose(again, unmerged, atol=1e-6)

    plain = model.merge_and_unload()  # PEFT's route: what `longtune export` uses
    assert not any(isinstance(m, Lora2Linear) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(IDS).logits, unmerged, atol=1e-5)


def test_orthogonality_loss_is_zero_for_orthonormal_factors_and_positive_otherwise():
    tall, wide = torch.empty(10, 3), torch.empty(3, 10)
    nn.init.orthogonal_(tall)
    nn.init.orthogonal_(wide)
    assert semi_orthogonality(tall) < 1e-6 and semi_orthogonality(wide) < 1e-6
    assert semi_orthogonality(2 * tall) > 1 and semi_orthogonality(torch.ones(3, 10)) > 1

    model, _ = lora2_model()
    assert orthogonality_loss(model).item() < 1e-5  # the factors start orthonormal
    layer = next(m for _, m in lora2_layers(model))
    with torch.no_grad():
        layer.lora_Pin["default"].mul_(1.5)
    penalty = orthogonality_loss(model)
    assert penalty.item() > 0.05 and penalty.requires_grad  # one of 32 factors off by 1.5x
    penalty.backward()
    assert layer.lora_Pin["default"].grad.abs().sum() > 0


def test_budget_schedule_is_adaloras_cubic_decay():
    s = BudgetSchedule(initial=48, target=16, start=2, end=12, every=1)
    assert [s.budget(t) for t in (0, 1, 2)] == [48, 48, 48]
    for t in range(3, 12):
        assert s.budget(t) == int(16 + 32 * (1 - (t - 2) / 10) ** 3)
    assert s.budget(12) == s.budget(20) == 16
    assert not s.masks_at(2) and s.masks_at(3) and s.masks_at(15)
    sparse = BudgetSchedule(initial=48, target=16, start=2, end=12, every=4)
    assert [t for t in range(1, 15) if sparse.masks_at(t)] == [4, 8, 12, 13, 14]
    with pytest.raises(ValueError, match="start < end"):
        BudgetSchedule(initial=48, target=16, start=5, end=5)


def _fake_training_step(model, generator) -> None:
    """Gradients with a per-layer scale, so layers differ in importance."""
    for i, (_, layer) in enumerate(lora2_layers(model)):
        for name in ("lora_Qout", "lora_Qin", "lora_E", "lora_Pin", "lora_Pout"):
            p = layer.lora_E["default"] if name == "lora_E" else getattr(layer, name)["default"]
            p.grad = torch.randn(p.shape, generator=generator) * (i + 1)
        with torch.no_grad():  # an "optimizer step" that keeps E non-zero
            layer.lora_E["default"].add_(0.01 * torch.randn(layer.lora_E["default"].shape, generator=generator))


def prune(model, hooks, steps: int) -> None:
    """``steps`` fake training steps, each followed by the hooks (allocator) as in the loop."""
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        _fake_training_step(model, generator)
        hooks.after_optimizer_step(step)


def test_pruning_follows_the_cubic_budget_and_ends_at_the_target_rank():
    model, config = lora2_model()
    randomize_singular_values(model)
    hooks = training_hooks(model, config.adapter, config.train.max_steps)
    allocator = hooks.allocator
    start, end = config.adapter.pruning.steps(20)
    assert (start, end) == (2, 16)
    layers = len(list(lora2_layers(model)))
    generator = torch.Generator().manual_seed(0)
    frozen = None
    for step in range(1, 21):
        _fake_training_step(model, generator)
        hooks.after_optimizer_step(step)
        kept = sum(allocator.rank_pattern().values())
        nonzero = sum(int(torch.count_nonzero(m.lora_E["default"])) for _, m in lora2_layers(model))
        expected = int(2 * layers + (6 - 2) * layers * (1 - (step - 2) / 14) ** 3) if 2 < step < 16 else None
        if step <= start:
            assert kept == 6 * layers
        elif step < end:
            assert kept == expected == allocator.budget, step
            assert nonzero <= kept  # pruned singular values are exact zeros
        else:
            assert kept == 2 * layers and nonzero == kept
            pattern = [m.lora_mask["default"].clone() for _, m in lora2_layers(model)]
            if frozen is None:
                frozen = pattern
            assert all(torch.equal(a, b) for a, b in zip(frozen, pattern))  # frozen after end
    # the budget went to the layers the gradients made important (the later ones)
    kept_per_layer = list(allocator.rank_pattern().values())
    assert kept_per_layer[-1] >= kept_per_layer[0]


def test_allocator_state_round_trips_for_resume():
    model, config = lora2_model()
    randomize_singular_values(model)
    hooks = training_hooks(model, config.adapter, 20)
    prune(model, hooks, 5)
    state = hooks.state_dict()
    other = training_hooks(lora2_model()[0], config.adapter, 20)
    other.load_state_dict(state)
    assert torch.equal(other.allocator.scores(), hooks.allocator.scores())
    assert other.allocator.budget == hooks.allocator.budget


def test_pruned_adapter_save_load_round_trip_gives_identical_logits(tmp_path):
    model, config = lora2_model()
    randomize_singular_values(model)
    hooks = training_hooks(model, config.adapter, 20)
    prune(model, hooks, 20)
    pattern = hooks.allocator.rank_pattern()
    assert len(set(pattern.values())) > 1  # layers kept different ranks
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits

    path = save_adapter(model, tmp_path / "adapter")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["longtune_adapter"] == "lora2" and saved["outer_rank"] == 4 and saved["r"] == 6
    recorded = json.loads((path / "rank_pattern.json").read_text())
    assert {k.removeprefix("base_model.model."): v for k, v in recorded.items()} == {
        k.removeprefix("base_model.model."): v for k, v in pattern.items()}

    reloaded = load_adapter(tiny_llama(), path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, expected)
    masks = {n: m.lora_mask["default"] for n, m in lora2_layers(reloaded)}
    for name, layer in lora2_layers(model):
        assert torch.equal(masks[name], layer.lora_mask["default"])
        assert reloaded.get_submodule(name).lora_E["default"].shape == layer.lora_E["default"].shape


def test_importance_scores_a_small_fraction_of_adaloras_parameters():
    from peft import AdaLoraConfig, get_peft_model

    model, _ = lora2_model()
    lora2_scored = scored_parameter_count(model)
    ada = get_peft_model(tiny_llama(), AdaLoraConfig(
        init_r=6, target_r=2, total_step=20, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    # PEFT's AdaLoRA scores every parameter whose name holds "lora_" (A, B and E)
    ada_scored = sum(p.numel() for n, p in ada.named_parameters() if "lora_" in n)
    shapes = [(m.in_features, m.out_features) for _, m in lora2_layers(model)]
    assert lora2_scored == lora2_scored_parameter_count(shapes, 6, 4)
    assert ada_scored == adalora_scored_parameter_count(shapes, 6)
    fraction = lora2_scored / ada_scored
    print(f"LoRA² scores {lora2_scored} numbers, AdaLoRA {ada_scored}: {fraction:.1%}")
    assert fraction < 0.1  # hidden 64, k=4: 9 of every 129 numbers -> 7.0%

    # Llama-2-7B's q/k/v/o (4096 x 4096, 32 layers), r = 8, k = 8: the paper's ~98.5% fewer
    llama7b = [(4096, 4096)] * 128
    assert lora2_scored_parameter_count(llama7b, 8, 8) / adalora_scored_parameter_count(llama7b, 8) < 0.003


def test_adalora_baseline_applies_allocates_and_reloads(tmp_path):
    config = load_config(None, ["adapter.type=adalora", "adapter.rank=6", "adapter.pruning.target_rank=2",
                                "train.max_steps=10"])
    model = apply_adapter(tiny_llama(), config.adapter, config.train.max_steps)
    assert type(model.base_model).__name__ == "AdaLoraModel"
    assert any("embed_tokens.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    hooks = training_hooks(model, config.adapter, 10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 11):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        hooks.after_optimizer_step(step)
        optimizer.zero_grad()
    assert hooks.metrics()["ranks_kept"] <= 2 * 8

    # PEFT saves AdaLoRA pruned to its rank pattern; reloaded, it computes the same logits
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
    reloaded = load_adapter(tiny_llama(), save_adapter(model, tmp_path / "adalora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter_type", ["lora2", "adalora"])
def test_pruned_adapters_train_on_a_bf16_base_in_fp32_and_reload(adapter_type, tmp_path):
    """A bf16 base (a GPU's weights) under bf16 autocast: every trained tensor is fp32 (LoRA²'s
    factors start exactly orthonormal, not rounded to bf16), training prunes, a reload
    computes the same logits."""
    config = load_config(None, [f"adapter.type={adapter_type}", "adapter.rank=6", "adapter.lora2.outer_rank=4",
                                "adapter.pruning.target_rank=2", "train.max_steps=10"])
    model = apply_adapter(tiny_llama().to(torch.bfloat16), config.adapter, 10)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    if adapter_type == "lora2":
        assert orthogonality_loss(model).item() < 1e-5
    hooks = training_hooks(model, config.adapter, 10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(1, 11):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=IDS, labels=IDS).loss
        extra = hooks.extra_loss()
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        hooks.after_optimizer_step(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5 and hooks.metrics()["ranks_kept"] <= 2 * 8
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(IDS).logits
        reloaded = load_adapter(tiny_llama().to(torch.bfloat16), save_adapter(model, tmp_path / "a")).eval()
        got = reloaded(IDS).logits
    if adapter_type == "lora2":
        assert torch.equal(got, expected)
    else:  # PEFT reloads AdaLoRA cut to its rank pattern: other matmul shapes, other bf16 rounding
        torch.testing.assert_close(got, expected, atol=0.02, rtol=0)


def test_config_rejects_pruning_that_cannot_run():
    from longtune.config import ConfigError

    with pytest.raises(ConfigError, match="adapter.pruning.target_rank must be <= adapter.rank"):
        load_config(None, ["adapter.type=lora2", "adapter.rank=4", "adapter.pruning.target_rank=8"])
    with pytest.raises(ConfigError, match="give no steps to prune"):
        load_config(None, ["adapter.type=lora2", "train.max_steps=2", "adapter.pruning.start=0.6",
                           "adapter.pruning.end=0.7"])
    with pytest.raises(ConfigError, match="must be below"):
        load_config(None, ["adapter.pruning.start=0.9", "adapter.pruning.end=0.5"])
    with pytest.raises(ConfigError, match="does not combine with use_dora"):
        load_config(None, ["adapter.type=lora2", "adapter.use_dora=true"])


# ------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for perturb in (False, True):
            _ddp_run(rank, out_dir, perturb)
    finally:
        dist.destroy_process_group()


def _ddp_run(rank: int, out_dir: str, perturb: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model, config = lora2_model(seed=0)  # identical start on both ranks, as DDP requires
    hooks = training_hooks(model, config.adapter, 20)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(1, 21):
        ids = torch.randint(0, 128, (2, 24), generator=g)
        loss = ddp(input_ids=ids, labels=ids).loss + hooks.extra_loss()
        loss.backward()
        optimizer.step()
        if perturb and rank == 1:  # a rank whose scores drift must still follow rank 0
            for key in hooks.allocator.ema_ipt:
                hooks.allocator.ema_ipt[key].add_(torch.rand(hooks.allocator.ema_ipt[key].shape))
        hooks.after_optimizer_step(step)
        optimizer.zero_grad()
    masks = {n: m.lora_mask["default"].tolist() for n, m in lora2_layers(model)}
    # DDP re-broadcasts buffers (the masks) from rank 0 at each forward, but not
    # parameters: singular values zeroed by a different mask would stay different
    values = {n: m.lora_E["default"].tolist() for n, m in lora2_layers(model)}
    with open(os.path.join(out_dir, f"{'drifting' if perturb else 'same'}-rank{rank}.json"), "w") as f:
        json.dump({"masks": masks, "E": values, "budget": hooks.allocator.budget}, f)


def test_ddp_ranks_keep_identical_masks(tmp_path):
    """Two gloo processes train one DDP model on different data: once as is, once with
    rank 1's importance scores pushed off (as a non-deterministic kernel could)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, loopback_port(), str(tmp_path)), nprocs=2, join=True)
    for run in ("same", "drifting"):
        r0, r1 = (json.loads((tmp_path / f"{run}-rank{r}.json").read_text()) for r in (0, 1))
        assert r0["masks"] == r1["masks"], run
        assert r0["E"] == r1["E"], run
        kept = sum(sum(m) for m in r0["masks"].values())
        assert kept == r0["budget"] == 2 * 8
        assert len({sum(m) for m in r0["masks"].values()}) > 1  # a real allocation, not uniform
