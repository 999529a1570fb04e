"""`longtune finetune` (longtune/finetune.py over longtune/train/) on a real local Ray Train with
a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from longtune.config import load_config

pytestmark = pytest.mark.slow


def mlflow_run(tmp_path: Path, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(run_id)


def test_saved_adapter_reloads_with_plain_peft_identically(tmp_path, tiny_model_dir, run_config):
    """Train a few steps with the loop's own pieces, checkpoint, and reload with plain PEFT."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from longtune.train.checkpoint import TrainState, write_checkpoint
    from longtune.train.loop import build_model, build_optimizer, optimizer_step

    config = run_config()
    model = build_model(config, tiny_model_dir, torch.device("cpu"))
    params, optimizer, scheduler = build_optimizer(config, model)
    gen = torch.Generator().manual_seed(0)
    blocks = iter([{"input_ids": torch.randint(0, 300, (2, 128), generator=gen),
                    "position_ids": torch.arange(128).repeat(2, 1)} for _ in range(3)])
    for _ in range(3):
        optimizer_step(model, [next(blocks)], params, optimizer, scheduler, config, torch.autocast("cpu", enabled=False))
    write_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, TrainState(step=3), config.to_yaml())

    probe = torch.randint(0, 300, (1, 128), generator=gen)
    model.eval()
    with torch.no_grad():
        trained = model(probe).logits
    # A user's reload: the base with the extended rope scaling (as `longtune export` writes
    # it into config.json), then plain PEFT.
    base_config = AutoConfig.from_pretrained(tiny_model_dir)
    base_config.rope_parameters = {**base_config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base_config)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "ckpt" / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(probe).logits
    assert torch.equal(trained, again)
    with torch.no_grad():
        untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base_config)(probe).logits
    assert not torch.allclose(trained, untouched)  # the adapter really changed the model


def test_a_run_checkpoints_tracks_resumes_exactly_and_survives_a_killed_worker(ray_local, tmp_path, run_config):
    """One DDP run on 2 workers, launched three times (each launch of a Ray Train run costs
    more than its steps, so one job serves what three used to):

    1. 4 steps with the before/after scoring: the final checkpoint holds everything a resume
       needs, the MLflow run has the params, per-step metrics, artifacts and both scores;
    2. the same run name relaunched for 8 steps, a worker killed right after step 7: the
       relaunch resumes at step 4, Ray Train restarts the workers from the step-6 checkpoint
       (the one written one step before the crash: nothing before it redone) and every step
       is logged once;
    3. 8 steps in one go ("straight"): the stopped, relaunched and restarted run equals it,
       every rank training on the same blocks at every step and ending with the same weights.
    """
    from safetensors.torch import load_file

    from longtune.finetune import finetune
    from longtune.tracking import read_table
    from longtune.train import background
    from longtune.train.probes import KillOnce, RecordBlocks, RecordWorkerSetup, read_records

    def launch(name, steps, *extra, probes=()):
        # small packing batches: many bundles from parallel tasks, finishing in any order
        config = run_config(f"train.max_steps={steps}", f"train.run_name={name}", "data.pack_batch_tokens=512",
                            *extra)
        return config, finetune(config, probes=(RecordBlocks(str(tmp_path / "blocks" / name)), *probes))

    # ------------------------------------------------ 1. 4 steps, checkpointed, tracked, scored
    config, result = launch("resumed", 4, "eval.before_after=true")

    # the final checkpoint holds everything a resume needs
    ckpt = Path(result.checkpoint_path)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "optimizer.pt", "scheduler.pt", "config.yaml", "state.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 1 * 128
    assert load_config(ckpt / "config.yaml") == config
    assert result.metrics["step"] == 4 and "eval_loss" in result.metrics

    # the MLflow run: params, per-step metrics, the adapter, the config, the loss curve
    client, run = mlflow_run(tmp_path, result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.target_context"] == "128"
    assert run.data.params["attention.group_size_ratio"] == "0.25"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    # MLflow's UI: one chart section per group
    assert {"train/lr", "train/tokens_per_s", "train/step_time_s", "train/data_wait_s", "train/peak_memory_mb",
            "eval/loss"} <= set(run.data.metrics)
    assert {k.split("/")[0] for k in run.data.metrics} == {"train", "eval"}, sorted(run.data.metrics)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "finetuning"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.yaml", "plots"} <= artifacts
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    local = Path(client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # before/after: the interpolated base and the tuned model on the same held-out tokens
    assert result.metrics["eval_tokens_128_before"] == result.metrics["eval_tokens_128"] > 0
    assert result.metrics["ppl_128"] != result.metrics["ppl_128_before"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ppl_128")] == [0, 4]
    # the description says what was trained and holds the before/after table, also an artifact
    described = run.data.tags["mlflow.note.content"]
    assert "| model | " in described and "-> 128 tokens" in described and "lora_plus r=" in described
    assert "| before training | " in described and "| after training | " in described
    table = read_table(client, run.info.run_id, "before_after.json")
    assert list(table["model"]) == ["before training", "after training"]
    assert list(table["ppl_128"]) == pytest.approx([result.metrics["ppl_128_before"], result.metrics["ppl_128"]])
    assert list(table["tokens_128"]) == [result.metrics["eval_tokens_128"]] * 2

    # ------------------------------------------------ 2. relaunched to 8 steps, a worker killed after step 7
    marker = tmp_path / "killed"
    setups = tmp_path / "worker_setup"
    _, resumed = launch("resumed", 8, "train.max_failures=1", probes=(
        KillOnce(step=7, rank=1, marker=str(marker)), RecordWorkerSetup(str(setups), os.getpid())))
    assert marker.read_text() == "7"  # the worker really died at step 7
    # scaling.local_ray_idle_priority: while the workers train, the local Ray's own processes
    # run at idle priority and the workers at normal priority, the restarted workers too
    # (forked by the lowered raylet, they take normal priority back: this test runs as root)
    policies = read_records(setups, field=None)
    assert sorted(policies) == [0, 1] and sorted(policies[0]) == [5, 6, 7, 8]
    for rank, steps in policies.items():
        for step, record in steps.items():
            # the thread that trains (and its torch threads) normal; the worker's Ray threads idle
            assert record["training_thread"] == "other", (rank, step, record)
            assert record["worker"] == ["idle", "other"], (rank, step, record)
            assert record["ray"]["gcs_server"] == ["idle"], (rank, step, record)
            if background.may_raise_priority():
                assert record["ray"]["raylet"] == ["idle"], (rank, step, record)
            # train.retain_host_memory: a CPU worker's threads share glibc's main arena
            assert record["malloc_arena_max"] == "1", (rank, step, record)
    assert resumed.metrics["step"] == 8
    client, second = mlflow_run(tmp_path, resumed.mlflow_run_id)
    assert second.info.status == "FINISHED"
    resumed_from = sorted((m.step, int(m.value))
                          for m in client.get_metric_history(second.info.run_id, "train/resumed_from_step"))
    # the relaunch at the first launch's last checkpoint, then the restart after the kill at the
    # checkpoint written one step before the crash: nothing before it redone
    assert resumed_from == [(4, 4), (6, 6)]
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "train/loss")]
    assert steps == [6, 8]  # every step of the relaunch logged once: none lost, none repeated
    state = json.loads((Path(resumed.checkpoint_path) / "state.json").read_text())
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 2 * 128  # no step counted twice

    # ------------------------------------------------ 3. the uninterrupted run
    _, straight = launch("straight", 8)
    blocks = {name: read_records(tmp_path / "blocks" / name) for name in ("resumed", "straight")}
    assert blocks["resumed"] == blocks["straight"]
    assert sorted(blocks["straight"]) == [0, 1] and sorted(blocks["straight"][0]) == list(range(1, 9))
    assert blocks["straight"][0][1] != blocks["straight"][1][1]  # the ranks share out the blocks
    a = load_file(Path(resumed.adapter_path) / "adapter_model.safetensors")
    b = load_file(Path(straight.adapter_path) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    opt_a = torch.load(Path(resumed.checkpoint_path) / "optimizer.pt", weights_only=True)
    opt_b = torch.load(Path(straight.checkpoint_path) / "optimizer.pt", weights_only=True)
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert sa["step"] == sb["step"] == 8
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], atol=1e-8, rtol=1e-4)


def test_not_enough_cpus_fails_fast(ray_local, run_config):
    from longtune.finetune import finetune
    from longtune.train.trainer import TrainingSetupError

    config = run_config("scaling.num_workers=8",
                         "scaling.cpus_per_worker=1")
    with pytest.raises(TrainingSetupError, match=r"not enough resources: 8 workers x 1 CPU"):
        finetune(config)


def _last_per_step(client, run_id: str, key: str) -> dict[int, float]:
    """A metric's value per step, the last one logged winning (a restarted worker logs again)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def test_fsdp_trains_like_ddp_resumes_from_its_shards_and_survives_a_killed_worker(
    ray_local, tmp_path, tiny_model_dir, run_config
):
    """train.strategy=fsdp through finetune on 2 Ray Train workers (gloo), fp32, the same data
    as a DDP run: the loss at every one of the first 6 steps within 1e-5 relative, the held-out
    loss and the adapter within 1e-5, an adapter plain PEFT loads with longtune's logits. A run
    stopped at its step-3 checkpoint, relaunched, and then losing a worker after step 5 (Ray
    Train restarts the workers from the shards of step 3) ends equal to the uninterrupted run:
    the losses of steps 4-6, the adapter, and the AdamW state in the shards. The blocks come
    from a `longtune prepare` dataset that the workers read themselves (data.prepared_reader:
    workers): the resume skips exactly the blocks trained on before."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from longtune.adapters import load_adapter
    from longtune.data.pipeline import prepare
    from longtune.finetune import finetune
    from longtune.models import load_model
    from longtune.train.probes import KillOnce

    prepared = f"data.prepared_path={tmp_path / 'prepared'}"
    prepare(run_config(prepared))

    def run(name, strategy, steps, *extra, probes=()):
        config = run_config(f"train.max_steps={steps}", f"train.run_name={name}", f"train.strategy={strategy}",
                            "train.precision=fp32", "train.log_every=1", "train.checkpoint_every=3", prepared,
                            *extra)
        assert config.data.prepared_reader == "workers"
        return config, finetune(config, probes=probes)

    _, ddp = run("ddp", "ddp", 6)
    config, fsdp = run("fsdp", "fsdp", 6)
    run("stopped", "fsdp", 3)
    marker = tmp_path / "killed"
    _, resumed = run("stopped", "fsdp", 6, "train.max_failures=1",
                     probes=(KillOnce(step=5, rank=1, marker=str(marker)),))

    client, _ = mlflow_run(tmp_path, fsdp.mlflow_run_id)
    losses = {name: _last_per_step(client, r.mlflow_run_id, "train/loss")
              for name, r in (("ddp", ddp), ("fsdp", fsdp), ("resumed", resumed))}
    assert sorted(losses["fsdp"]) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert losses["fsdp"][step] == pytest.approx(losses["ddp"][step], rel=1e-5), step
    assert losses["fsdp"][6] != losses["fsdp"][1]
    assert fsdp.metrics["eval_loss"] == pytest.approx(ddp.metrics["eval_loss"], rel=1e-5)
    ckpt = Path(fsdp.checkpoint_path)
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "optimizer.pt").exists()
    a, b = load_file(Path(fsdp.adapter_path) / "adapter_model.safetensors"), \
        load_file(Path(ddp.adapter_path) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)

    # plain PEFT on the extended base, as a user reloads it: longtune's logits
    probe = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    base, _ = load_model(config.model, for_training=False, path=tiny_model_dir)
    with torch.no_grad():
        ours = load_adapter(base, fsdp.adapter_path).eval()(input_ids=probe).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=base.config)
        theirs = PeftModel.from_pretrained(plain, fsdp.adapter_path).eval()(input_ids=probe).logits
    assert torch.equal(ours, theirs)

    # longtune export merges it, longtune evaluate scores it: the DDP adapter's results
    from longtune.config import with_overrides
    from longtune.eval.report import evaluate
    from longtune.export import export_model

    merged = export_model(with_overrides(config, {"model.adapter_path": fsdp.adapter_path,
                                                  "export.output_dir": str(tmp_path / "export")}))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(input_ids=probe).logits
    torch.testing.assert_close(exported, ours, atol=1e-4, rtol=0)
    scores = {}
    for name, result in (("fsdp", fsdp), ("ddp", ddp)):
        report, _ = evaluate(with_overrides(config, {"model.adapter_path": result.adapter_path,
                                                     "tracking.enabled": False}))
        scores[name] = {k: v for k, v in report.metrics().items() if k.startswith("ppl_")}
    assert scores["fsdp"] and scores["fsdp"].keys() == scores["ddp"].keys()
    for key, ppl in scores["ddp"].items():
        assert scores["fsdp"][key] == pytest.approx(ppl, rel=1e-4), key

    # stopped, relaunched, a worker killed: the uninterrupted run
    assert marker.read_text() == "5"
    resumed_from = [int(m.value) for m in client.get_metric_history(resumed.mlflow_run_id, "train/resumed_from_step")]
    assert resumed_from == [3, 3]  # the relaunch, then the restart after the kill
    for step in (4, 5, 6):
        assert losses["resumed"][step] == pytest.approx(losses["fsdp"][step], rel=1e-6), step
    c = load_file(Path(resumed.adapter_path) / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-6, rtol=1e-6, msg=key)
    for name, result in (("fsdp", fsdp), ("resumed", resumed)):
        dcp_to_torch_save(Path(result.checkpoint_path) / "sharded", tmp_path / f"{name}.pt")
    straight, again = (torch.load(tmp_path / f"{n}.pt", weights_only=False)["optimizer"]["state"]
                       for n in ("fsdp", "resumed"))
    assert straight and again.keys() == straight.keys()
    for key, state in straight.items():
        assert int(again[key]["step"]) == int(state["step"]) == 6
        torch.testing.assert_close(again[key]["exp_avg_sq"], state["exp_avg_sq"], atol=1e-9, rtol=1e-5, msg=key)


def test_fsdp_refuses_a_quantized_base_before_training(tmp_path, tiny_model_dir, run_config):
    import shutil

    from longtune.finetune import finetune
    from longtune.train.trainer import TrainingSetupError

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, quantized)
    config_json = json.loads((quantized / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config_json))
    config = run_config("train.strategy=fsdp", f"model.name_or_path={quantized}", "train.run_name=quantized")
    with pytest.raises(TrainingSetupError, match=r"train.strategy=fsdp cannot shard the quantized base .*"
                                                 r"bitsandbytes.*use train.strategy=ddp"):
        finetune(config)
    assert not (tmp_path / "ray" / "quantized").exists()  # nothing started


def test_eval_settings_that_would_fail_after_training_fail_before_it(ray_local, tmp_path, run_config):
    from longtune.finetune import finetune
    from longtune.train.trainer import TrainingSetupError

    config = run_config("eval.before_after=true",
                         "eval.passkey_trials=1", "eval.passkey_lengths=[16]", "train.run_name=early")
    with pytest.raises(TrainingSetupError, match=r"eval.passkey_lengths: 16 is too short.*before_after=false"):
        finetune(config)
    assert not (tmp_path / "ray" / "early").exists()  # no training started


def test_lora2_trains_on_two_workers_with_s2_and_prunes_to_target(ray_local, tmp_path, tiny_model_dir, run_config):
    """LoRA² through the real loop on a bf16 base (a GPU's weights): orthogonality penalty,
    allocator after each step, masks in the checkpoint, allocator state for resume; the
    adapter reloads and merges."""
    from longtune.adapters import load_adapter
    from longtune.adapters.lora2 import lora2_layers
    from longtune.models import load_model
    from longtune.finetune import finetune

    config = run_config("train.max_steps=6", "train.run_name=lora2",
                         "adapter.type=lora2", "adapter.rank=4", "adapter.lora2.outer_rank=4",
                         "adapter.pruning.target_rank=2", "attention.type=s2", "model.dtype=bfloat16")
    result = finetune(config)
    ckpt = Path(result.checkpoint_path)
    assert (ckpt / "adapter_state.pt").is_file()
    pattern = json.loads((ckpt / "adapter" / "rank_pattern.json").read_text())
    assert len(pattern) == 8 and sum(pattern.values()) == 2 * 8  # 2 layers x q,k,v,o at target
    assert result.metrics["ranks_kept"] == 16 and result.metrics["rank_budget"] == 16
    assert result.metrics["orth_loss"] >= 0

    client, run = mlflow_run(tmp_path, result.mlflow_run_id)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/ranks_kept")][-1] == 16

    model, _ = load_model(config.model, on_gpu=False, for_training=False, path=tiny_model_dir)
    model = load_adapter(model, ckpt / "adapter")
    kept = {n: int(m.lora_mask["default"].sum()) for n, m in lora2_layers(model)}
    assert kept == pattern
    for _, layer in lora2_layers(model):  # pruned singular values are exact zeros
        assert torch.all(layer.lora_E["default"][~layer.lora_mask["default"]] == 0)
