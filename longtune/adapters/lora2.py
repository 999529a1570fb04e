"""LoRA²: multi-scale orthogonal low-rank adaptation with importance-based rank pruning
(arXiv 2408.06854), as a PEFT LoRA layer.

The update of a frozen ``W`` (out x in) is an SVD-like triplet whose singular vectors are
themselves low-rank, "two LoRAs in mutually orthogonal planes":

    dW = Pout · Pin · diag(E) · Qin · Qout · alpha / r

    Qout  k x in    outer plane, input side        Pout  out x k   outer plane, output side
    Qin   r x k     inner plane, input side        Pin   k x r     inner plane, output side
    E     r         singular values, zero at the start (so dW = 0)

``k`` is ``adapter.lora2.outer_rank``, ``r`` the initial inner rank ``adapter.rank``. What we
do differently from the released code (Godz-z/LoRA-2), and why:

- The forward pass never builds ``dW``: ``x -> Qout -> Qin -> E -> Pin -> Pout`` costs about
  ``k·(in + out)`` per token, like a rank-k LoRA; the released code multiplies out an
  ``in x out`` matrix on every call.
- ``merge`` / ``unmerge`` add and subtract exactly ``get_delta_weight`` (the released
  merge multiplies two full products elementwise, which is not the adapter's update).
- The factors start semi-orthogonal (``E`` still starts at zero): the orthogonality penalty
  starts at 0 and ``E``'s first gradients are projections of the weight gradient onto unit
  directions; with N(0, 0.02) factors, as released, they are ~1e-3 of that.
- The importance of a singular value is scored only on the small inner factors and ``E``
  (``r + 2·r·k`` numbers per layer; AdaLoRA scores ``r·(1 + in + out)``), and every
  rank of a DDP job prunes the same values: the scores rank 0 computed are broadcast.
- Under FSDP2 (train.strategy=fsdp) the factors are DTensor shards between steps: the
  importance EMAs are kept per shard (elementwise, no communication), the scores are
  gathered whole only when the masks are recomputed, the masks stay whole on every rank,
  and the orthogonality penalty is taken over the gathered factors.

Saved adapters are PEFT adapters (``save_pretrained``) whose config records the LoRA² layer
(``outer_rank``) and whose weights carry the pruned pattern (the ``lora_mask`` buffer; pruned
singular values are exact zeros), so a reload has the trained shapes and gives identical
logits. Load them with ``longtune.adapters.load_adapter``, which registers the layer with
PEFT first: a plain ``PeftModel.from_pretrained`` does not know it.

No Ray, no MLflow here: plain torch + PEFT.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraLayer
from torch import nn

from longtune.distributed import broadcast_, full_tensor, gathered, local_part, local_shard, mesh_device

FACTORS = ("lora_Qout", "lora_Qin", "lora_E", "lora_Pin", "lora_Pout")
SCORED = ("lora_Qin", "lora_E", "lora_Pin")  # the small inner factors: importance lives here
ADAPTER_MARKER = "lora2"


@dataclass
class Lora2PeftConfig(LoraConfig):
    """PEFT's LoraConfig plus what a LoRA² layer needs; ``r`` is the initial inner rank."""

    outer_rank: int = field(default=8, metadata={"help": "Rank k of the outer planes Qout, Pout."})
    longtune_adapter: str = field(default=ADAPTER_MARKER, metadata={"help": "Adapter kind (for loading)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora or self.use_rslora:
            raise ValueError("LoRA² does not combine with use_dora or use_rslora")
        self._register_custom_module({nn.Linear: Lora2Linear})


class Lora2Linear(nn.Module, LoraLayer):
    """A LoRA² adapter around an ``nn.Linear`` (PEFT custom-module route)."""

    adapter_layer_names = FACTORS
    other_param_names = ("r", "outer_rank", "lora_alpha", "scaling", "lora_dropout", "lora_mask")

    def __init__(self, base_layer: nn.Module, adapter_name: str, *, config: Lora2PeftConfig,
                 r: int, lora_alpha: float, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        for name in FACTORS:
            setattr(self, name, nn.ParameterDict({}))
        self.lora_mask = BufferDict({}, persistent=True)
        self.outer_rank: dict[str, int] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config.lora_dropout, config.outer_rank,
                          init_weights=config.init_lora_weights)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     outer_rank: int, init_weights: bool | str = True, **_: Any) -> None:
        if r <= 0 or outer_rank <= 0:
            raise ValueError(f"LoRA² ranks must be positive, got r={r}, outer_rank={outer_rank}")
        self.r[adapter_name] = r
        self.outer_rank[adapter_name] = outer_rank
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        k, n_in, n_out = outer_rank, self.in_features, self.out_features
        shapes = {"lora_Qout": (k, n_in), "lora_Qin": (r, k), "lora_E": (r,),
                  "lora_Pin": (k, r), "lora_Pout": (n_out, k)}
        for name, shape in shapes.items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape, dtype=torch.float32))
        self.lora_mask[adapter_name] = torch.ones(r, dtype=torch.bool)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        for name in FACTORS:
            # PEFT's move also casts to the base's dtype: the factors train in fp32 whatever the
            # base (a bf16 Qout would round away orthogonality and small updates), and are
            # initialised after the move so they start exactly orthonormal
            factors = getattr(self, name)
            factors[adapter_name] = nn.Parameter(factors[adapter_name].detach().float())
        self.reset_lora2_parameters(adapter_name, init_weights)
        self.set_adapter(self.active_adapters)

    def reset_lora2_parameters(self, adapter_name: str, init_weights: bool | str = True) -> None:
        with torch.no_grad():
            for name in ("lora_Qout", "lora_Qin", "lora_Pin", "lora_Pout"):
                nn.init.orthogonal_(getattr(self, name)[adapter_name])
            e = self.lora_E[adapter_name]
            if init_weights is False:  # PEFT's "not an identity" init, for tests
                nn.init.normal_(e, std=0.1)
            else:
                e.zero_()

    # ---------------------------------------------------------------- the update

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """dW (out x in) of ``adapter``, in the base weight's dtype; computed in fp32."""
        qout, qin, e, pin, pout = (getattr(self, n)[adapter].float() for n in FACTORS)
        delta = pout @ ((pin * e) @ (qin @ qout)) * self.scaling[adapter]
        return delta.to(self.get_base_layer().weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_E:
                continue
            qout, qin, e, pin, pout = (getattr(self, n)[adapter] for n in FACTORS)
            h = self._cast_input_dtype(self.lora_dropout[adapter](x), qout.dtype)
            # never dW: five thin products, the widest k x max(in, out)
            h = F.linear(F.linear(h, qout), qin) * e
            h = F.linear(F.linear(h, pin), pout)
            result = result + (h * self.scaling[adapter]).to(out_dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in adapter_names or list(self.active_adapters):
            if adapter not in self.lora_E or adapter in self.merged_adapters:
                continue
            weight = self.get_base_layer().weight
            merged = weight.data + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter} seems to be broken")
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data = weight.data - self.get_delta_weight(adapter)

    def __repr__(self) -> str:
        return "lora2." + super().__repr__()


# -------------------------------------------------------------------- model-level helpers


def lora2_layers(model: nn.Module) -> Iterator[tuple[str, Lora2Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, Lora2Linear):
            yield name, module


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Singular values kept (``lora_mask``) per LoRA² layer of ``model``; empty without any."""
    return {name: int(layer.lora_mask[a].sum()) for name, layer in lora2_layers(model) for a in layer.lora_mask}


def semi_orthogonality(matrix: torch.Tensor) -> torch.Tensor:
    """||M Mᵀ - I||_F over the smaller Gram matrix: zero exactly when M's rows (wide M) or
    columns (tall M) are orthonormal. Each LoRA² factor can be orthonormal only that way."""
    m = matrix.float()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=m.device, dtype=m.dtype))


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """The mean semi-orthogonality penalty over every factor of every LoRA² layer (each
    plane Qout, Qin, Pin, Pout), in fp32 whatever autocast is active. Zero when the model
    has no LoRA² layer.

    Sharded factors (FSDP2 DTensors, as they are between steps) are gathered whole first,
    differentiably: every rank computes the same penalty and its gradient reaches each
    rank's shard. A collective then: every rank calls it at the same point of the step."""
    planes = [full_tensor(getattr(layer, n)[adapter]) for _, layer in lora2_layers(model)
              for adapter in layer.active_adapters if adapter in layer.lora_E
              for n in FACTORS if n != "lora_E"]
    if not planes:
        return torch.zeros((), device=mesh_device(next(model.parameters())))
    with torch.autocast(planes[0].device.type, enabled=False):
        return torch.stack([semi_orthogonality(m) for m in planes]).mean()


def scored_parameter_count(model: nn.Module) -> int:
    """How many numbers the rank allocator scores for importance (inner factors and E)."""
    return sum(getattr(layer, n)[a].numel() for _, layer in lora2_layers(model)
               for a in layer.lora_E for n in SCORED)


# -------------------------------------------------------------------- the rank allocator


@dataclass(frozen=True)
class BudgetSchedule:
    """AdaLoRA's global budget: the full ``initial`` total rank up to step ``start``, then a
    cubic decay to ``target`` at step ``end``, held from then on (the pattern frozen). Masks
    are recomputed every ``every`` steps while it decays, and at ``end``."""

    initial: int
    target: int
    start: int
    end: int
    every: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"pruning needs 0 <= start < end steps, got start={self.start}, end={self.end}")
        if not 0 < self.target <= self.initial:
            raise ValueError(f"the target budget {self.target} must be in (0, {self.initial}]")

    def budget(self, step: int) -> int:
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.target
        remaining = 1 - (step - self.start) / (self.end - self.start)
        return int(self.target + (self.initial - self.target) * remaining**3)

    def masks_at(self, step: int) -> bool:
        return step > self.start and (step % self.every == 0 or step >= self.end)


class RankAllocator:
    """Importance-based pruning of LoRA² singular values to a global budget.

    Call ``step(global_step)`` after each ``optimizer.step()`` and before ``zero_grad`` (it
    reads the gradients). The importance of a parameter is the EMA of ``|w · grad|`` times
    the EMA of that value's deviation from its average (``beta1``, ``beta2``); a singular
    value's score is its own plus the mean over its row of ``Qin`` and column of ``Pin``.
    The lowest-scored values beyond the budget are zeroed (and recorded in each layer's
    ``lora_mask``); from ``schedule.end`` on the pattern is frozen and re-applied each step.

    Sharded factors (FSDP2): the EMAs are this rank's parts, the scores and ``state_dict``
    gather them whole (collectives every rank calls alike), the masks are whole on every
    rank and each rank zeroes its own part of ``E``.
    """

    def __init__(self, model: nn.Module, *, target_rank: int, start: int, end: int, every: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.layers = [(name, layer, a) for name, layer in lora2_layers(model) for a in layer.lora_E]
        if not self.layers:
            raise ValueError("RankAllocator: the model has no LoRA² layers")
        initial = sum(layer.r[a] for _, layer, a in self.layers)
        self.schedule = BudgetSchedule(initial, target_rank * len(self.layers), start, end, every)
        self.beta1, self.beta2 = beta1, beta2
        self.ema_ipt: dict[str, torch.Tensor] = {}  # this rank's parts under FSDP
        self.ema_unc: dict[str, torch.Tensor] = {}
        self.budget = initial
        # what each EMA key scores: its sharding (and device) are the parameter's
        self._params = {self._key(name, factor, a): getattr(layer, factor)[a]
                        for name, layer, a in self.layers for factor in SCORED}

    def _key(self, name: str, factor: str, adapter: str) -> str:
        return f"{name}.{factor}.{adapter}"

    @torch.no_grad()
    def update_importance(self) -> None:
        for name, layer, adapter in self.layers:
            for factor in SCORED:
                p = getattr(layer, factor)[adapter]
                if p.grad is None:
                    continue
                key = self._key(name, factor, adapter)
                ipt = (local_shard(p) * local_shard(p.grad)).abs().float()  # elementwise: per shard
                if key not in self.ema_ipt:
                    self.ema_ipt[key] = torch.zeros_like(ipt)
                    self.ema_unc[key] = torch.zeros_like(ipt)
                self.ema_ipt[key].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                self.ema_unc[key].mul_(self.beta2).add_((ipt - self.ema_ipt[key]).abs(), alpha=1 - self.beta2)

    def _score(self, name: str, layer: Lora2Linear, factor: str, adapter: str) -> torch.Tensor:
        key = self._key(name, factor, adapter)
        param = self._params[key]
        if key not in self.ema_ipt:  # no gradient seen yet
            part = torch.zeros_like(local_shard(param), dtype=torch.float32)
        else:
            part = self.ema_ipt[key] * self.ema_unc[key]
        return gathered(part, param)  # whole (on every rank) under FSDP

    def scores(self) -> torch.Tensor:
        """Every singular value's importance, layer after layer, as one vector (whole on
        every rank: a collective under FSDP)."""
        parts = []
        for name, layer, adapter in self.layers:
            parts.append(self._score(name, layer, "lora_E", adapter)
                         + self._score(name, layer, "lora_Qin", adapter).mean(dim=1)
                         + self._score(name, layer, "lora_Pin", adapter).mean(dim=0))
        return torch.cat(parts)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        scores = self.scores()
        # identical gradients give identical scores, but a tie or a non-deterministic kernel
        # must not let two ranks keep different singular values
        broadcast_(scores, self.device)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, budget, sorted=False).indices] = True
        offset = 0
        for _, layer, adapter in self.layers:
            r = layer.r[adapter]
            layer.lora_mask[adapter].copy_(keep[offset:offset + r].to(layer.lora_mask[adapter].device))
            offset += r
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for _, layer, adapter in self.layers:
            e = layer.lora_E[adapter]
            local_shard(e).masked_fill_(~local_part(layer.lora_mask[adapter], e), 0.0)

    def step(self, global_step: int) -> None:
        s = self.schedule
        if global_step < s.end:
            self.update_importance()
        self.budget = s.budget(global_step)
        if global_step > s.end:
            self.apply_masks()  # the frozen pattern: pruned values stay zero
        elif s.masks_at(global_step):
            self.mask_to_budget(self.budget)

    def rank_pattern(self) -> dict[str, int]:
        """Singular values kept per adapted layer."""
        return {name: int(layer.lora_mask[a].sum()) for name, layer, a in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """The EMAs whole (gathered under FSDP: every rank calls this) and the budget: the
        same record whatever the strategy or number of ranks that wrote it."""
        def whole(emas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: gathered(v, self._params[k]) for k, v in emas.items()}

        return {"ema_ipt": whole(self.ema_ipt), "ema_unc": whole(self.ema_unc), "budget": self.budget}

    @property
    def device(self) -> torch.device:
        """Where the factors compute, and the allocator's collectives run (a sharded
        factor's mesh device, which is not its shard's under CPU offload)."""
        _, layer, adapter = self.layers[0]
        return mesh_device(layer.lora_E[adapter])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the EMAs as the factors are placed now (device, and this rank's part
        under FSDP), wherever the state was saved or read."""
        def placed(emas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: local_part(v, self._params[k]) if k in self._params else v.to(self.device)
                    for k, v in emas.items()}

        self.ema_ipt = placed(state["ema_ipt"])
        self.ema_unc = placed(state["ema_unc"])
        self.budget = int(state["budget"])


def adalora_scored_parameter_count(shapes: list[tuple[int, int]], rank: int) -> int:
    """Numbers AdaLoRA scores for importance at ``rank``: its A (r x in), B (out x r) and E,
    for layers of (in, out) ``shapes``."""
    return sum(rank * (1 + n_in + n_out) for n_in, n_out in shapes)


def lora2_scored_parameter_count(shapes: list[tuple[int, int]], rank: int, outer_rank: int) -> int:
    """Numbers LoRA² scores: Qin (r x k), Pin (k x r) and E, whatever the layer's size."""
    return len(shapes) * rank * (1 + 2 * outer_rank)


__all__ = [
    "BudgetSchedule",
    "Lora2Linear",
    "Lora2PeftConfig",
    "RankAllocator",
    "adalora_scored_parameter_count",
    "lora2_layers",
    "lora2_scored_parameter_count",
    "orthogonality_loss",
    "rank_pattern",
    "scored_parameter_count",
    "semi_orthogonality",
]
