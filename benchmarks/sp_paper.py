"""On paper, from `longtune plan` (no GPU, no measurement): what sequence-parallel S2-Attn
(issue #17) buys on one node of 8xA100-80GB, and what it sends compared with ring attention
and Ulysses.

    .venv/bin/python benchmarks/sp_paper.py [--out benchmarks/results/sp_paper.json]

Table 1: the longest context Llama-2-7B, 13B and 70B train at on 8xA100-80GB (LoRA+ r=8,
bf16, gradient checkpointing, chunked loss, S2-Attn split shift; the shipped recipes'
settings), without sequence parallelism (the recipes: the LongLoRA paper reached 100k, 64k
and 32k there), with P = 4 and groups of 1/4 (the paper's attention pattern: 4 groups, so
P <= 4) and with P = 8 and a fixed group size (finer groups: sparser attention than the
paper's at these lengths). For each, the best of DDP/FSDP x activation offload on or off
(offload only where its pinned host memory fits a p4de.24xlarge's 1,152 GiB with room).

Table 2: bytes one GPU sends per decoder layer, forward and backward, for halo S2 vs ring
attention vs Ulysses (``longtune.plan.communication_per_layer``, whose docstring derives
the formulas), Llama-2-7B and Llama-2-70B, 100k / 400k / 1M tokens, 8 and 32 GPUs.

Predictions, not measurements: ``benchmarks/sequence_parallel.py`` measures on gloo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import write_json  # noqa: E402
from longtune.config import load_config  # noqa: E402
from longtune.plan import (  # noqa: E402
    GPUS,
    GiB,
    communication_per_layer,
    context_step,
    max_context,
    model_shape,
    plan_run,
)

GPU = "a100-80gb"
NODE_HOST_GIB = 1152  # p4de.24xlarge
HOST_BUDGET_GIB = 0.8 * NODE_HOST_GIB  # pinned memory next to the OS, Ray's object store, the data path
MODELS = {  # model -> (recipe, the paper's one-node limit)
    "Llama-2-7B": ("llama2-7b-100k", 100_000),
    "Llama-2-13B": ("llama2-13b-64k", 65_536),
    "Llama-2-70B": ("llama2-70b-32k", 32_768),
}
# (label, sequence_parallel, group_size or None for the recipe's ratio of 1/4)
SP_SETTINGS = [("no SP (recipe's attention)", 1, None), ("SP 4, groups 1/4", 4, None),
               ("SP 8, groups 8192", 8, 8192), ("SP 8, groups 16384", 8, 16384)]
COMM_MODELS = {"Llama-2-7B": "meta-llama/Llama-2-7b-hf", "Llama-2-70B": "meta-llama/Llama-2-70b-hf"}
COMM_TOKENS = (100_000, 400_000, 1_000_000)
COMM_GPUS = (8, 32)
HALO_GROUP = 8192


def _config(recipe: str, sp: int, group: int | None, strategy: str, offload: bool, context: int):
    overrides = ["scaling.num_workers=8", f"scaling.sequence_parallel={sp}", f"train.strategy={strategy}",
                 f"model.activation_offload={str(offload).lower()}", f"model.target_context={context}",
                 "data.context_length=null"]
    if group is not None:
        overrides.append(f"attention.group_size={group}")
    return load_config(ROOT / "pipelines" / "configs" / f"{recipe}.yaml", overrides)


def longest_contexts() -> list[dict]:
    rows = []
    gpu = GPUS[GPU]
    for model, (recipe, paper) in MODELS.items():
        for label, sp, group in SP_SETTINGS:
            start = sp * group if group else 8192  # a context the setting admits, for loading
            best: dict[bool, dict] = {}
            for strategy in ("ddp", "fsdp"):
                for offload in (False, True):
                    config = _config(recipe, sp, group, strategy, offload, start)
                    n = max_context(config, gpu)
                    step = context_step(config)
                    plan = None
                    while n > 0:
                        plan = plan_run(_config(recipe, sp, group, strategy, offload, n), GPU,
                                        search_max_context=False)
                        host = plan.host_per_node_bytes / GiB
                        if host <= HOST_BUDGET_GIB:
                            break
                        # the offloaded layer inputs grow with the context: the longest the node's
                        # host memory holds
                        n = max(0, min(n - step, int(n * HOST_BUDGET_GIB / host) // step * step))
                    if not n or plan is None:
                        continue
                    row = {"model": model, "setting": label, "sequence_parallel": sp,
                           "group_size": group or n // 4, "strategy": strategy, "activation_offload": offload,
                           "max_context": n, "paper": paper, "vs_paper": round(n / paper, 2),
                           "peak_gib": round(plan.peak_bytes / GiB, 1), "peak_phase": plan.peak_phase,
                           "host_per_node_gib": round(host, 1), "tokens_per_rank": n // sp,
                           "halo_mib_per_layer": round(plan.halo_bytes_per_layer / 2**20, 1),
                           "step_seconds": round(plan.step_seconds, 1)}
                    # per offload choice, the longer context; then the simpler setting (DDP)
                    if offload not in best or n > best[offload]["max_context"]:
                        best[offload] = row
            for offload in (False, True):
                if offload in best and (not offload or best[True]["max_context"] > best.get(False, {}).get(
                        "max_context", 0)):
                    rows.append(best[offload])
    return rows


def communication() -> list[dict]:
    rows = []
    for model, hub_id in COMM_MODELS.items():
        s = model_shape(hub_id)
        for n in COMM_TOKENS:
            for gpus in COMM_GPUS:
                row = {"model": model, "tokens": n, "gpus": gpus, "halo_group_size": HALO_GROUP}
                for scheme in ("halo_s2", "ring", "ulysses"):
                    row[f"{scheme}_mib"] = round(
                        communication_per_layer(s, n, gpus, scheme, group_size=HALO_GROUP) / 2**20, 1)
                    row[f"{scheme}_mib_recompute"] = round(
                        communication_per_layer(s, n, gpus, scheme, group_size=HALO_GROUP, recompute=True) / 2**20, 1)
                row["ring_vs_halo"] = round(row["ring_mib"] / row["halo_s2_mib"], 1)
                row["ulysses_vs_halo"] = round(row["ulysses_mib"] / row["halo_s2_mib"], 1)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sp_paper.json"))
    args = parser.parse_args(argv)
    contexts = longest_contexts()
    print(f"Longest context per model on one node of 8x{GPUS[GPU].label} (longtune plan; predicted)")
    print(f"{'model':12s} {'setting':28s} {'strategy':8s} {'offload':7s} {'max context':>11s} "
          f"{'x paper':>7s} {'peak GiB':>8s} {'host GiB/node':>13s} {'halo MiB/layer':>14s} {'step s':>7s}")
    for r in contexts:
        print(f"{r['model']:12s} {r['setting']:28s} {r['strategy']:8s} {str(r['activation_offload']):7s} "
              f"{r['max_context']:>11,d} {r['vs_paper']:>7.2f} {r['peak_gib']:>8.1f} {r['host_per_node_gib']:>13.1f} "
              f"{r['halo_mib_per_layer']:>14.1f} {r['step_seconds']:>7.1f}")
    comm = communication()
    print()
    print(f"Bytes one GPU sends per decoder layer, forward + backward, bf16 (MiB; halo with groups of {HALO_GROUP}; "
          "in brackets with gradient checkpointing's recompute)")
    print(f"{'model':12s} {'tokens':>9s} {'GPUs':>4s} {'halo S2':>16s} {'ring':>20s} {'Ulysses':>20s}")
    for r in comm:
        print(f"{r['model']:12s} {r['tokens']:>9,d} {r['gpus']:>4d} "
              f"{r['halo_s2_mib']:>7.1f} ({r['halo_s2_mib_recompute']:>6.1f}) "
              f"{r['ring_mib']:>9.1f} ({r['ring_mib_recompute']:>8.1f}) "
              f"{r['ulysses_mib']:>9.1f} ({r['ulysses_mib_recompute']:>8.1f})")
    out = write_json(args.out, {"gpu": GPU, "host_budget_gib_per_node": HOST_BUDGET_GIB,
                                "longest_context": contexts, "communication_per_layer": comm,
                                "note": "predicted by longtune plan; not measured on GPUs"})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
