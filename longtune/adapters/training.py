"""What an adapter adds to the training loop, beyond its forward pass.

    hooks = training_hooks(peft_model, config.adapter, config.train.max_steps)
    loss = model(...).loss + hooks.extra_loss()      # LoRA²: the orthogonality penalty
    loss.backward(); optimizer.step()
    hooks.after_optimizer_step(step)                 # before zero_grad: reads the gradients
    optimizer.zero_grad()

LoRA and LoRA+ add nothing. LoRA² adds its orthogonality penalty and its rank allocator.
AdaLoRA (PEFT) adds its own penalty inside its forward; its allocator runs here.

No Ray, no MLflow here: plain torch + PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from longtune.adapters.lora2 import RankAllocator, orthogonality_loss
from longtune.config import AdapterConfig


class AdapterHooks:
    """No extra loss, nothing after the optimizer step (LoRA, LoRA+)."""

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Lora2Hooks(AdapterHooks):
    def __init__(self, model: nn.Module, cfg: AdapterConfig, max_steps: int) -> None:
        p = cfg.pruning
        start, end = p.steps(max_steps)
        self.model = model
        self.weight = p.orth_reg_weight
        self.allocator = RankAllocator(
            model, target_rank=p.target_rank, start=start, end=end, every=p.every, beta1=p.beta1, beta2=p.beta2
        )
        self._last_orth = float("nan")

    def extra_loss(self) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        penalty = orthogonality_loss(self.model)
        self._last_orth = penalty.item()
        return self.weight * penalty

    def after_optimizer_step(self, step: int) -> None:
        self.allocator.step(step)

    def metrics(self) -> dict[str, float]:
        kept = self.allocator.rank_pattern()
        return {
            "rank_budget": float(self.allocator.budget),
            "ranks_kept": float(sum(kept.values())),
            "orth_loss": self._last_orth,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "allocator" in state:
            self.allocator.load_state_dict(state["allocator"])


class AdaLoraHooks(AdapterHooks):
    """PEFT's AdaLoRA: its orthogonality penalty, and ``update_and_allocate`` after each
    optimizer step. Its importance EMAs live inside PEFT and are not checkpointed: a resumed
    AdaLoRA run restarts them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        tuner = model.base_model
        self.weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
        # (is an A factor, parameter): A is r x in (rows orthonormal), B is out x r (columns)
        self.factors = [("lora_A" in n, p) for n, p in model.named_parameters()
                        if ("lora_A" in n or "lora_B" in n) and tuner.trainable_adapter_name in n]

    def extra_loss(self) -> torch.Tensor | None:
        """PEFT's penalty: the mean of ||A Aᵀ - I|| and ||Bᵀ B - I|| over the factors. PEFT
        adds it to the model's ``loss`` only when labels are passed; the loop computes the
        language loss itself (as token sums), so it is added here."""
        if self.weight == 0 or not self.factors:
            return None
        terms = []
        with torch.autocast(self.factors[0][1].device.type, enabled=False):
            for is_a, p in self.factors:
                cov = p @ p.T if is_a else p.T @ p
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.weight * torch.stack(terms).mean()

    def after_optimizer_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def metrics(self) -> dict[str, float]:
        kept = 0
        for module in self.model.modules():
            ranknum = getattr(module, "ranknum", None)
            if isinstance(ranknum, nn.ParameterDict):
                kept += sum(int((module.lora_E[a] != 0).sum()) for a in module.lora_E)
        return {"ranks_kept": float(kept)}


def training_hooks(model: nn.Module, cfg: AdapterConfig, max_steps: int) -> AdapterHooks:
    """The hooks for ``model`` (a PeftModel built by ``apply_adapter`` from ``cfg``)."""
    if cfg.type == "lora2":
        return Lora2Hooks(model, cfg, max_steps)  # the allocator refuses a model without LoRA² layers
    if cfg.type == "adalora":
        return AdaLoraHooks(model)
    return AdapterHooks()
