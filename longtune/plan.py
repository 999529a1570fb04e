"""Memory and FLOPs of a training run, per GPU, before launch: ``longtune plan``.

    longtune plan --config pipelines/configs/llama2-7b-32k.yaml --gpu a100-80gb [--json]

From the model's config.json alone (a local directory, or one of the configs shipped in
``longtune/model_configs`` named by hub id; nothing is downloaded) and the run's config,
``plan_run`` predicts the peak of allocated tensor memory on one worker's GPU (what
``torch.cuda.max_memory_allocated`` reports) and where it is reached, whether that fits the
named GPU with a safety margin, the longest context that fits with the same settings, and
the FLOPs of a step.

How. Formulas that follow the code path a step really takes, tensor by tensor: what the
base model, the adapter (PEFT LoRA with its fp32 input casts, the fp32 trained copies of
embeddings and norms and the hooks that cast their outputs back), the attention backend,
the loss (stock or chunked, ``train/loss.py``), gradient checkpointing and AdamW allocate,
and what autograd keeps for the backward. The step is cut into phases (the forward, the
loss's backward, the last layer's recompute and backward, the embedding's backward, the
optimizer step); the peak is the largest phase, and ``breakdown`` is that phase's live set.

What was checked where. On the CPU, the real training step (``train/loop.py``'s model
build and ``optimizer_step``) is measured with a tensor-level tracker on tiny models and
compared with ``plan_run(..., device="cpu")`` (tests/test_plan.py): weights, trained copies,
AdamW, gradients, the checkpointed layer inputs, one layer's recompute, the LM head and
the loss (chunked or not), in fp32 and in bf16 weights with bf16 autocast (the dtype layout
of a GPU run). The CPU runs S2-Attn through SDPA with a hand-written backward, the GPU
through flash-attn / torch varlen kernels: the attention terms of the GPU backends
(``flash``, ``varlen``, CUDA ``sdpa``), DDP's gradient buckets, the CUDA caching
allocator's rounding and the kernels' internal workspaces are modelled from their source
and only a GPU can check them (``benchmarks/gpu_check.py`` prints predicted vs measured).

FSDP (``train.strategy=fsdp``, train/parallel.py): the same step's activations, with the
weights, trained parameters, gradients and AdamW state sharded over ``scaling.num_workers``
ranks and the working set FSDP2 gathers added phase by phase (two decoder layers while one
computes, the root from forward to backward, unsharded gradients and reduce-scatter
buffers; ``_fsdp_phases`` says what and from which part of torch's source), checked on the
CPU against the tracked per-rank peak of a real 2-rank gloo step (tests/test_plan.py). On
GPUs the weights are gathered in bf16 (MixedPrecisionPolicy), which the CPU path does not
use: that, and the CUDA streams' timing of the prefetch, only a GPU can check.

Sequence parallelism (``scaling.sequence_parallel`` = P, attention/sequence_parallel.py,
train/sequence.py): a rank holds N/P tokens of each block, so every activation term (the
checkpointed layer inputs, one layer's recompute, the attention's, the LM head and loss) is
that of N/P tokens, with S2's groups of the whole sequence; every rank holds the whole
block's ids, positions, labels and loss mask (the group's leader broadcasts them); the
halo adds, per layer, the straddling group's tensors, a copy of the attention output and
the gradients its cuts make (``_halo_terms``, the ``sequence_parallel_halo`` term). The
model is replicated over the group (DDP) or sharded over all ``scaling.num_workers`` ranks
(FSDP), as without it. FLOPs are one rank's (``step_flops``); the halo's bytes per layer are
in ``--json`` and ``communication_per_layer`` compares them with ring attention's and
Ulysses'. Checked on the CPU against the tracked per-rank peak of a real 2-rank gloo step
with ``optimizer_step(sequence=...)`` (tests/test_plan.py); the halo's terms on a GPU (NCCL
buffers, flash kernels on the straddling group) are modelled, not measured.

Assumptions, stated in every plan: ``attention.backend: auto`` on a GPU is flash-attn (the
cluster YAMLs install it); rows may hold several documents when ``data.position_ids`` is
``document`` (the default), so a backend that builds document masks (CUDA SDPA for S2) is
charged its worst case; rows of one document each cost no masks. Full
attention (``attention.type: full``) is longtune's: one group of the whole row, each
document its own causal call (CPU) or varlen sequence (CUDA), no [N, N] mask.

No Ray and no MLflow here; torch is imported for dtypes only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtune.config import SEED_MODEL, Config, ConfigError, with_overrides

GiB = 2**30
MiB = 2**20

SAFETY_MARGIN = 0.10
"""Share of the GPU kept free: the caching allocator's fragmentation and estimate error."""
RESERVED_BYTES = 1 * GiB
"""Kept for what no tensor accounts for: the CUDA context, NCCL buffers, cuBLAS workspaces."""
UTILISATION = 0.40
"""Model FLOPs utilisation the step-time estimate assumes (dense bf16 peak x this)."""
MAX_CONTEXT_CAP = 1 << 24
"""The longest context ``max_context`` searches up to (16M tokens)."""
GPUS_PER_NODE = 8
"""GPUs per node of every instance type in ``INSTANCE_GPUS``: host memory is summed over this
many workers (fewer when scaling.num_workers is smaller)."""

MODEL_CONFIGS = Path(__file__).with_name("model_configs")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GPU:
    """A GPU kind: its memory as torch reports it (``total_memory``), whether it computes
    bf16 natively, and its dense bf16 tensor-core peak."""

    name: str
    label: str
    memory_bytes: int
    bf16: bool
    peak_tflops: float

    @property
    def budget_bytes(self) -> int:
        """What a run may allocate and still fit: the memory less the safety margin and the
        reserve for the CUDA context and communication buffers."""
        return int(self.memory_bytes * (1 - SAFETY_MARGIN) - RESERVED_BYTES)


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", "NVIDIA A100 40GB", 40_536 * MiB, True, 312.0),
    "a100-80gb": GPU("a100-80gb", "NVIDIA A100 80GB", 81_152 * MiB, True, 312.0),
    "h100-80gb": GPU("h100-80gb", "NVIDIA H100 80GB (SXM)", 81_559 * MiB, True, 989.0),
    "h200": GPU("h200", "NVIDIA H200 141GB", 143_771 * MiB, True, 989.0),
}

INSTANCE_GPUS: dict[str, str] = {
    # AWS
    "p4d.24xlarge": "a100-40gb",
    "p4de.24xlarge": "a100-80gb",
    "p5.48xlarge": "h100-80gb",
    "p5e.48xlarge": "h200",
    "p5en.48xlarge": "h200",
    # Google Cloud (the A2/A3 machine types attach their GPUs themselves)
    "a2-highgpu-8g": "a100-40gb",
    "a2-ultragpu-8g": "a100-80gb",
    "a3-highgpu-8g": "h100-80gb",
    "a3-megagpu-8g": "h100-80gb",
    "a3-ultragpu-8g": "h200",
}
"""Cloud instance type -> the GPU it carries (tests plan each recipe on its cluster's GPU)."""


def gpu_named(name: str) -> GPU:
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError(f"unknown GPU {name!r}: plan knows {', '.join(GPUS)}") from None


# ---------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read from a config.json."""

    source: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """name -> (in, out, bias) of one decoder layer's linear layers."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias), "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias), "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias), "down_proj": (i, h, self.mlp_bias),
        }

    def layer_linear_params(self) -> int:
        return sum(a * b + (b if bias else 0) for a, b, bias in self.linear_shapes().values())

    def layer_norm_params(self) -> int:
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return embed + head + self.hidden + self.layers * (self.layer_linear_params() + self.layer_norm_params())


def shipped_models() -> list[str]:
    """The hub ids whose config.json ships with longtune (``model_configs/<org>--<name>.json``)."""
    return sorted(p.stem.replace("--", "/", 1) for p in MODEL_CONFIGS.glob("*.json"))


def model_shape(name_or_path: str, cache_dir: str | None = None) -> ModelShape:
    """The shape of ``name_or_path``: a local directory holding a config.json (or the file
    itself), a shipped hub id, or the seed model. Raises ConfigError naming what it tried."""
    if name_or_path == SEED_MODEL:
        return _seed_shape(cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _shape_from_file(path / "config.json", name_or_path)
    if path.is_file():
        return _shape_from_file(path, name_or_path)
    shipped = MODEL_CONFIGS / (name_or_path.replace("/", "--", 1) + ".json")
    if "/" in name_or_path and shipped.is_file():
        return _shape_from_file(shipped, f"{name_or_path} (shipped config)")
    raise ConfigError(
        f"model.name_or_path={name_or_path!r}: plan works offline and needs a local directory with a "
        f"config.json or one of the shipped configs: {', '.join(shipped_models())}"
    )


def _seed_shape(cache_dir: str | None) -> ModelShape:
    from longtune import seed

    built = seed.seed_model_dir(cache_dir) / "config.json"
    if built.is_file():
        return _shape_from_file(built, SEED_MODEL)
    # not built yet: the shape it will have (seed.seed_model_config), without building it
    raw = {"model_type": "llama", "vocab_size": seed.SEED_VOCAB_SIZE, "max_position_embeddings": seed.SEED_CONTEXT,
           "tie_word_embeddings": False, **seed.SEED_SHAPE}
    return _shape_from_dict(raw, SEED_MODEL)


def _shape_from_file(path: Path, source: str) -> ModelShape:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read a model config from {str(path)!r}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"cannot read a model config from {str(path)!r}: not a JSON object")
    return _shape_from_dict(raw, source)


def _shape_from_dict(raw: dict[str, Any], source: str) -> ModelShape:
    kind = raw.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: plan models the decoder layers of {', '.join(MODEL_TYPES)} models, "
            f"this config has model_type={kind!r}"
        )
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        shape = dict(
            hidden=hidden, intermediate=int(raw["intermediate_size"]), layers=int(raw["num_hidden_layers"]),
            heads=heads, kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads), vocab=int(raw["vocab_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: the model config lacks a usable {exc} (hidden_size, intermediate_size, "
                          "num_hidden_layers, num_attention_heads, vocab_size are needed)") from None
    bias = bool(raw.get("attention_bias", False))
    window = None
    if kind == "mistral":
        window = raw.get("sliding_window")
    elif kind in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        window = raw.get("sliding_window")
    return ModelShape(
        source=source, model_type=kind, **shape,
        tied=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if kind == "qwen2" else bias, o_bias=False if kind == "qwen2" else bias,
        mlp_bias=bool(raw.get("mlp_bias", False)), qk_norm=kind == "qwen3",
        sliding_window=int(window) if window else None,
        max_positions=int(raw.get("max_position_embeddings") or 0),
    )


# ---------------------------------------------------------------- what the run trains


@dataclass(frozen=True)
class Trainables:
    """Parameter counts of what the adapter trains (all fp32) and how."""

    lora: int  # adapter factors (LoRA A/B, LoRA² factors, AdaLoRA A/E/B)
    saved: int  # PEFT modules_to_save copies (embeddings, norms, a head)
    largest: int  # the largest single trained tensor
    targets: tuple[str, ...]  # the linear layers carrying an adapter
    rank_inner: int  # per adapted linear: the widths of its adapter's intermediate activations
    embed_trained: bool
    norms_trained: bool
    head_trained: bool  # a trained output head (a tied, trained embedding; or lm_head saved)
    allocator_state: int  # LoRA²/AdaLoRA importance EMAs
    layer_saved: int = 0  # the trained copies (norms) in one decoder layer
    final_norm_trained: bool = False

    @property
    def total(self) -> int:
        return self.lora + self.saved


def trainables(config: Config, shape: ModelShape) -> Trainables:
    a = config.adapter
    if a.use_dora:
        raise ConfigError("adapter.use_dora=true: plan does not model DoRA "
                          "(it rebuilds every adapted weight each forward)")
    targets = tuple(a.target_modules) if a.target_modules else ("q_proj", "k_proj", "v_proj", "o_proj")
    unknown = [t for t in targets if t not in LINEARS]
    if unknown:
        raise ConfigError(f"adapter.target_modules={list(targets)}: plan models {', '.join(LINEARS)}, not {unknown}")
    shapes = shape.linear_shapes()
    r, k = a.rank, a.lora2.outer_rank
    per_layer, inner = 0, 0
    for t in targets:
        n_in, n_out, _ = shapes[t]
        if a.type == "lora2":
            per_layer += k * n_in + r * k + r + k * r + n_out * k
            inner = 2 * k + 2 * r
        elif a.type == "adalora":
            per_layer += r * n_in + r + n_out * r
            inner = r
        else:
            per_layer += r * (n_in + n_out)
            inner = r
    lora = per_layer * shape.layers
    embed = head = norms = final_norm = False
    saved = layer_saved = 0
    if a.type in ("lora_plus", "lora2", "adalora"):
        names = set(a.trainable_modules or ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm")
                    + (("q_norm", "k_norm") if shape.qk_norm and not a.trainable_modules else ()))
        known = {"embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"}
        unknown = sorted(names - known)
        if unknown:
            raise ConfigError(f"adapter.trainable_modules: plan models {', '.join(sorted(known))}, not {unknown}")
        embed = "embed_tokens" in names
        head = "lm_head" in names or (shape.tied and embed)
        if embed:
            saved += shape.vocab * shape.hidden
        if "lm_head" in names and not shape.tied:
            saved += shape.vocab * shape.hidden
        layer_saved = shape.hidden * (("input_layernorm" in names) + ("post_attention_layernorm" in names))
        if shape.qk_norm:
            layer_saved += shape.head_dim * (("q_norm" in names) + ("k_norm" in names))
        saved += shape.layers * layer_saved
        final_norm = "norm" in names
        saved += shape.hidden if final_norm else 0
        norms = "input_layernorm" in names or "post_attention_layernorm" in names
    factors = [max(r * shapes[t][0], r * shapes[t][1], k * shapes[t][0], k * shapes[t][1]) for t in targets]
    largest = max(factors + ([shape.vocab * shape.hidden] if (embed or head) else []))
    # importance EMAs: LoRA²'s two over its inner factors (Qin, E, Pin); PEFT AdaLoRA's three
    # (importance, its EMA, the uncertainty's) over every factor
    inner_params = shape.layers * len(targets) * (2 * r * k + r)
    allocator = 2 * inner_params if a.type == "lora2" else 3 * lora if a.type == "adalora" else 0
    return Trainables(lora, saved, largest, targets, inner, embed, norms, head, allocator, layer_saved, final_norm)


# ---------------------------------------------------------------- dtypes and backends


@dataclass(frozen=True)
class Layout:
    """Bytes per element: base weights (w), the residual stream / activations (a, = w), the
    matmul compute dtype (c: autocast's, else w), and whether autocast is on."""

    w: int
    a: int
    c: int
    autocast: bool
    describe: dict[str, Any]


def layout(config: Config, device: str, bf16_native: bool | None) -> Layout:
    from longtune.precision import resolve_precision

    p = resolve_precision(config.model, config.train, device, bf16_native=bf16_native)
    w = p.weights.itemsize
    c = p.compute.itemsize if p.compute is not None else w
    return Layout(w, w, c, p.compute is not None, p.describe())


def attention_backend(config: Config, device: str) -> str:
    """The kernel the plan charges: ``cpu-sdpa`` (the CPU's SDPA with the hand-written S2
    backward), ``flash``, ``varlen``, ``cuda-sdpa`` for S2-Attn, and for longtune's full
    attention on a GPU (one group of the whole row); ``full-sdpa`` for full attention on the
    CPU (torch's fused causal kernel with its own backward, as the model's own SDPA runs it)."""
    if device == "cpu" and config.attention.type == "full":
        return "full-sdpa"
    if device == "cpu":
        return "cpu-sdpa"
    backend = config.attention.backend
    return {"auto": "flash", "sdpa": "cuda-sdpa"}.get(backend, backend)


# ---------------------------------------------------------------- FSDP2 (train.strategy=fsdp)


@dataclass(frozen=True)
class Sharding:
    """How ``train.strategy=fsdp`` holds the model on one of ``world`` ranks
    (train/parallel.py): element counts of the groups ``fully_shard`` makes (frozen and
    trained apart, as they are gathered in different dtypes off the GPU) and the bytes of
    one gathered copy of each.

    Groups: one per decoder layer; an untied input embedding; the root (the loss module:
    the head, the final norm, a tied embedding); the frozen originals of PEFT's trained
    copies, which no forward runs, in groups of their own that are never gathered."""

    world: int
    reshard: bool  # train.fsdp.reshard_after_forward
    offload: bool  # train.fsdp.cpu_offload on a GPU worker: the shards live in host memory
    mixed: bool  # MixedPrecisionPolicy: gathered in the compute dtype (GPUs with autocast)
    layer: int  # bytes of one decoder layer, gathered
    embedding: int  # bytes of the untied input embedding's group, gathered (0: tied, in the root)
    root: int  # bytes of the root group, gathered
    layer_grads: int  # bytes of one layer's trained parameters' gradients, unsharded
    embedding_grads: int
    root_grads: int
    layer_trained: int  # elements trained in one decoder layer (its reduce-scatter, fp32)
    embedding_trained: int
    trained_bytes: int  # bytes per element of a gathered trained parameter and its gradient
    gloo: bool  # CPU ranks: gloo's reduce-scatter works on a copy of its whole input


def sharding(config: Config, s: ModelShape, tr: Trainables, lay: Layout, device: str) -> Sharding:
    f = config.train.fsdp
    mixed = device == "cuda" and lay.autocast
    # gathered dtypes: the compute dtype under mixed precision, else each parameter's own
    # (frozen base: the weights dtype; trained parameters: fp32)
    frozen_b, trained_b = (lay.c, lay.c) if mixed else (lay.w, 4)
    vh = s.vocab * s.hidden
    layer_trained = tr.lora // s.layers + tr.layer_saved
    layer_frozen = s.layer_linear_params() + s.layer_norm_params() - tr.layer_saved
    embed_trained = vh if (tr.embed_trained and not s.tied) else 0
    embed_frozen = 0 if s.tied else vh - embed_trained
    # the root's one V x H weight: the head (untied) or the tied embedding-and-head
    root_trained = (vh if tr.head_trained else 0) + (s.hidden if tr.final_norm_trained else 0)
    root_frozen = vh + s.hidden - root_trained
    return Sharding(
        world=config.scaling.num_workers, reshard=f.reshard_after_forward,
        offload=f.cpu_offload and device == "cuda", mixed=mixed,
        layer=layer_frozen * frozen_b + layer_trained * trained_b,
        embedding=embed_frozen * frozen_b + embed_trained * trained_b,
        root=root_frozen * frozen_b + root_trained * trained_b,
        layer_grads=layer_trained * trained_b, embedding_grads=embed_trained * trained_b,
        root_grads=root_trained * trained_b,
        layer_trained=layer_trained, embedding_trained=embed_trained, trained_bytes=trained_b,
        gloo=device == "cpu",
    )


def fsdp_refusal(config: Config) -> str | None:
    """Why plan cannot model this fsdp run (one line naming the setting), or None."""
    if config.train.strategy != "fsdp":
        return None
    if config.adapter.type == "lora2":
        return ("train.strategy=fsdp with adapter.type=lora2: plan does not model LoRA²'s allocator and "
                "orthogonality penalty under FSDP (they gather adapter factors whole on every rank); plan "
                "adapter.type=lora_plus for the rest of the run's memory, or train.strategy=ddp")
    return None


# ---------------------------------------------------------------- the estimate


@dataclass
class Plan:
    """A run's predicted memory (bytes, per GPU) and compute."""

    model: str
    gpu: GPU | None
    device: str
    context: int
    batch: int
    backend: str
    layout: dict[str, Any]
    phases: dict[str, dict[str, int]]
    peak_phase: str
    peak_bytes: int
    max_context: int | None
    flops: dict[str, float]
    step_seconds: float | None
    params: dict[str, int]
    assumptions: list[str] = field(default_factory=list)
    host_bytes: int = 0  # pinned host memory per worker: activation offload's layer inputs
    host_offload_bytes: int = 0  # host memory per worker: train.fsdp.cpu_offload's shards
    strategy: str = "ddp"
    workers_per_node: int = 1
    sequence_parallel: int = 1  # P ranks share each sequence (scaling.sequence_parallel)
    halo_pass_bytes: int = 0  # one halo, one direction, one pass (halo_bytes)
    halo_bytes_per_layer: int = 0  # what an interior rank sends per layer per micro-batch

    @property
    def host_per_node_bytes(self) -> int:
        """Host memory the offloads need on one node (its workers' together)."""
        return (self.host_bytes + self.host_offload_bytes) * self.workers_per_node

    @property
    def breakdown(self) -> dict[str, int]:
        return self.phases[self.peak_phase]

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.peak_bytes <= self.gpu.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        gib = lambda b: round(b / GiB, 3)  # noqa: E731
        out: dict[str, Any] = {
            "model": self.model, "device": self.device, "context": self.context, "batch_per_worker": self.batch,
            "attention_backend": self.backend, "precision": self.layout,
            "peak_gib": gib(self.peak_bytes), "peak_phase": self.peak_phase,
            "breakdown": {k: gib(v) for k, v in self.breakdown.items() if v},
            "phases_gib": {name: gib(sum(terms.values())) for name, terms in self.phases.items()},
            "max_context": self.max_context,
            "flops_per_step": self.flops["step"], "attention_flops_share": round(self.flops["attention_share"], 4),
            "attention_flops_s2_vs_full": round(self.flops["s2_vs_full"], 4),
            "params": self.params, "host_pinned_gib": gib(self.host_bytes), "assumptions": self.assumptions,
            "strategy": self.strategy,
            "sequence_parallel": self.sequence_parallel,
        }
        if self.sequence_parallel > 1:
            out.update(tokens_per_rank=self.context // self.sequence_parallel,
                       halo_bytes_per_layer=self.halo_bytes_per_layer, halo_pass_bytes=self.halo_pass_bytes)
        if self.strategy == "fsdp":
            out.update(host_fsdp_offload_gib=gib(self.host_offload_bytes),
                       host_per_node_gib=gib(self.host_per_node_bytes), workers_per_node=self.workers_per_node)
        if self.gpu is not None:
            out.update(gpu=self.gpu.name, gpu_gib=gib(self.gpu.memory_bytes), budget_gib=gib(self.gpu.budget_bytes),
                       fits=self.fits, utilisation=UTILISATION,
                       step_seconds=round(self.step_seconds, 3) if self.step_seconds is not None else None)
        return out


def plan_run(config: Config, gpu: str | GPU | None = None, *, device: str = "cuda",
             bf16_native: bool | None = None, search_max_context: bool = True) -> Plan:
    """The plan of ``config``'s training run on one worker. ``gpu``: a name of ``GPUS`` (the
    CLI's --gpu), for the fit and the step time; ``device="cpu"`` plans the CPU code path
    instead (what the tests measure). Raises ConfigError for what plan does not model."""
    refusal = fsdp_refusal(config) or sequence_parallel_refusal(config)
    if refusal:
        raise ConfigError(refusal)
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"plan: device must be cuda or cpu, got {device!r}")
    spec = gpu_named(gpu) if isinstance(gpu, str) else gpu
    if device == "cuda" and bf16_native is None:
        bf16_native = spec.bf16 if spec is not None else True
    shape = model_shape(config.model.name_or_path, config.model.cache_dir)
    trained = trainables(config, shape)
    lay = layout(config, device, bf16_native)
    backend = attention_backend(config, device)
    n = config.context_length
    phases, host, notes, offloaded = _phases(config, shape, trained, lay, backend, device, n)
    if device == "cuda":
        if config.attention.backend == "auto":
            notes.append("attention.backend=auto is planned as flash-attn (the cluster YAMLs install it); "
                         "without it auto runs torch's varlen kernel on packed rows (the same memory) or SDPA")
        if config.train.strategy == "fsdp":
            notes.append("modelled from their source, not yet measured on a GPU: the attention kernels' terms, "
                         "FSDP2's bf16 gathers and prefetch on CUDA streams, CPU offload, activation offload; "
                         "the CPU's FSDP step (2 gloo ranks, bf16 and fp32 weights) matched its tracked peak within 1%")
        else:
            notes.append("modelled from their source, not yet measured on a GPU: the attention kernels' terms, "
                         "DDP's buckets, activation offload; the rest matched the CPU step's tracked peak within 2%")
    elif config.data.position_ids == "document":
        notes.append("the CPU plan charges no document masks (rows of one document each)")
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    peak = sum(phases[peak_phase].values())
    max_ctx = None
    if spec is not None and search_max_context:
        max_ctx = max_context(config, spec, device=device, bf16_native=bf16_native)
    flops = step_flops(config, shape, trained, n)
    seconds = flops["step"] / (spec.peak_tflops * 1e12 * UTILISATION) if spec is not None else None
    notes = [*notes, f"per worker: {config.train.batch_size_per_worker} block(s) of {n} tokens per micro-batch, "
             f"{config.train.grad_accum_steps} micro-batch(es) per step, {config.scaling.num_workers} worker(s)"]
    params = {"base": shape.params(), "trained": trained.total, "adapter": trained.lora, "saved_modules": trained.saved}
    sp = config.scaling.sequence_parallel
    halo_pass = halo_per_layer = 0
    if sp > 1:
        g = _group_size(config, n)
        halo_pass = halo_bytes(shape, g, config.train.batch_size_per_worker, lay.c)
        # forward (and the recompute's forward) to the next rank, the gradient back to the previous
        halo_per_layer = halo_pass * (3 if config.model.gradient_checkpointing else 2)
        notes.append(f"scaling.sequence_parallel={sp}: each rank holds {n // sp} of the {n} tokens of a block "
                     f"(groups of {g}); a rank sends its neighbour {halo_per_layer / MiB:.1f} MiB per layer per "
                     f"micro-batch ({halo_pass / MiB:.1f} MiB per halo: forward"
                     + (", recompute" if config.model.gradient_checkpointing else "") + " and its gradient back); "
                     "the step time leaves that communication out")
    return Plan(shape.source, spec, device, n, config.train.batch_size_per_worker, backend, lay.describe, phases,
                peak_phase, peak, max_ctx, flops, seconds, params, notes, host, offloaded,
                config.train.strategy, min(config.scaling.num_workers, GPUS_PER_NODE), sp, halo_pass, halo_per_layer)


def _peak_bytes(config: Config, gpu: GPU | None, device: str = "cuda", bf16_native: bool | None = None) -> int:
    return plan_run(config, gpu, device=device, bf16_native=bf16_native, search_max_context=False).peak_bytes


def max_context(config: Config, gpu: GPU, *, device: str = "cuda", bf16_native: bool | None = None) -> int:
    """The longest model.target_context (in multiples of 1024 tokens, blocks of that length;
    under sequence parallelism multiples of ``context_step``, so that every rank holds whole
    S2 groups) whose plan fits ``gpu`` with every other setting as configured; 0 when none
    does. Raises ConfigError when sequence parallelism admits no context to search."""
    refusal = sequence_parallel_refusal(config)
    if refusal:
        raise ConfigError(refusal)

    def fits(n: int) -> bool:
        trial = with_overrides(config, {"model.target_context": n, "data.context_length": None})
        return _peak_bytes(trial, gpu, device, bf16_native) <= gpu.budget_bytes

    step = context_step(config)
    if not fits(step):
        return 0
    low, high = 1, 2
    while high * step <= MAX_CONTEXT_CAP and fits(high * step):
        low, high = high, high * 2
    if high * step > MAX_CONTEXT_CAP:
        return MAX_CONTEXT_CAP
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * step) else (low, mid)
    return low * step


def _group_size(config: Config, n: int) -> int:
    """S2's group size for ``n`` tokens, by ``longtune.attention.s2.resolve_group_size``'s
    rule (repeated here: importing the attention package imports transformers, seconds of
    a plan's run; a test keeps the two equal)."""
    if config.attention.type == "full":
        return n  # full attention: one group of the whole row
    if config.attention.group_size is not None:
        return config.attention.group_size
    g = int(n * config.attention.group_size_ratio)
    return max(2, g - g % 2)


# bytes a quantized weight takes in bitsandbytes: 4 bits plus one absmax per block of 64
# (fp32, or with double quantization 8 bits plus an fp32 per 256 of those); LLM.int8: a byte
# plus an fp32 scale per output row (under 0.1% here, left out)
QUANTIZED_BYTES_PER_WEIGHT = {"4bit": 0.5 + 4 / 64, "4bit-double": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


def _quant_key(config: Config) -> str:
    q = config.model
    if q.quantization == "int8":
        return "int8"
    return "4bit-double" if q.double_quantization else "4bit"


def base_weight_bytes(config: Config, s: ModelShape, w: int) -> int:
    """The frozen base's bytes: every weight in ``w`` bytes, or with model.quantization the
    decoder's linear layers quantized (transformers leaves embeddings, norms and the head)."""
    if config.model.quantization == "none":
        return s.params() * w
    linear = s.layers * s.layer_linear_params()
    return int(linear * QUANTIZED_BYTES_PER_WEIGHT[_quant_key(config)]) + (s.params() - linear) * w


def _phases(config: Config, s: ModelShape, tr: Trainables, lay: Layout, backend: str, device: str, n: int):
    """The live tensor bytes of each phase of one optimizer step (see the module docstring)."""
    t_cfg = config.train
    b = t_cfg.batch_size_per_worker
    sp = config.scaling.sequence_parallel
    seq = n  # the whole block: every rank of a sequence-parallel group holds its ids
    g_whole = _group_size(config, seq)
    n = seq // sp  # this rank's tokens (scaling.sequence_parallel shards each block)
    tok = b * n  # tokens of a micro-batch on this rank
    fs = sharding(config, s, tr, lay, device) if t_cfg.strategy == "fsdp" else None
    stored_w = lay.w
    # FSDP's mixed precision gathers every weight in the compute dtype, trained ones too:
    # the layers read bf16 weights (autocast casts none), the residual stream is bf16, and
    # PEFT's adapters, whose weights are then bf16, cast no input to fp32
    adapter_cast = lay.autocast and not (fs is not None and fs.mixed)
    if fs is not None and fs.mixed:
        lay = Layout(lay.c, lay.c, lay.c, True, lay.describe)
    a, c, w = lay.a, lay.c, lay.w
    h, i, qd, kvd = s.hidden, s.intermediate, s.q_dim, s.kv_dim
    notes: list[str] = []
    gc = config.model.gradient_checkpointing
    offload = config.model.activation_offload and device == "cuda"

    # ------------------------------------------------------------ static
    static = {
        "base_weights": base_weight_bytes(config, s, w),
        "trainable_params": tr.total * 4,
        "optimizer_state": tr.total * 8 + tr.allocator_state * 4,
    }
    if config.model.quantization != "none":
        # bitsandbytes dequantizes a layer's weight to the compute dtype for each matmul
        # (forward, and again for the input gradient): one layer's widest weight at a time
        q_c = 4 if config.model.quantization_compute_dtype == "float32" else 2
        static["dequantized_weight"] = max(a_ * b_ for a_, b_, _ in s.linear_shapes().values()) * q_c
        notes.append(f"base quantized ({config.model.quantization}): decoder linear layers at "
                     f"{QUANTIZED_BYTES_PER_WEIGHT[_quant_key(config)] * 8:.2f} bits a weight; embeddings, "
                     "norms and the LM head unquantized")
    if config.scaling.num_workers > 1 and device == "cuda":
        static["ddp_buckets"] = tr.total * 4  # gradient_as_bucket_view=False: a second copy
    all_grads = tr.total * 4
    # the head's gradient (a tied, trained embedding's too) arises in the loss's backward;
    # an untied embedding's only at the very end
    head_grad = s.vocab * h * 4 if tr.head_trained else 0
    embed_grad = s.vocab * h * 4 if tr.embed_trained and not s.tied else 0
    small_grads = all_grads - embed_grad - head_grad
    tied_embed_extra = s.vocab * h * 4 if tr.embed_trained and s.tied else 0  # before it is summed in
    accumulating = t_cfg.grad_accum_steps > 1  # later micro-batches find every gradient there

    # ------------------------------------------------------------ per layer, per token
    lora_set = set(tr.targets)
    shapes = s.linear_shapes()

    def norm_saved(width: int, trained: bool, input_counted: bool, dtype: int | None = None) -> int:
        """RMSNorm over an input of ``dtype`` bytes (the activations' by default): x.to(fp32)
        kept by pow (the input itself when it is fp32, counted elsewhere if
        ``input_counted``), and the normalised x in the input dtype kept by a trained
        weight's mul."""
        dtype = dtype or a
        out = 4 * width if (dtype != 4 or not input_counted) else 0
        return out + (dtype * width if trained else 0)

    def linear_saved(name: str) -> int:
        """What one linear keeps for its backward. A frozen weight's matmul keeps no input
        (its gradient is grad @ W); an adapter's first factor keeps its input, which PEFT
        casts to fp32 and autocast then to the compute dtype (a copy), or x itself."""
        if name not in lora_set:
            return 0
        n_in, n_out, _ = shapes[name]
        kept = (c * n_in if adapter_cast else 0) + c * tr.rank_inner
        if config.adapter.type == "adalora":
            kept += c * n_out  # PEFT's SVDLinear keeps its update's output (measured)
        return kept

    def reads_as_is(names: tuple[str, ...]) -> bool:
        """Whether an adapter factor keeps the very tensor these layers read (no autocast,
        or FSDP's bf16-gathered adapters under mixed precision: no cast of their input)."""
        return not adapter_cast and bool(lora_set & set(names))

    trained_norms = tr.norms_trained
    norm1 = norm_saved(h, trained_norms, input_counted=gc)
    norm1 += a * h if reads_as_is(("q_proj", "k_proj", "v_proj")) else 0
    qkv = sum(linear_saved(p) for p in ("q_proj", "k_proj", "v_proj"))
    if s.qk_norm:
        qkv += norm_saved(qd, trained_norms, False, c) + norm_saved(kvd, trained_norms, False, c)
    attn_saved, attn_bwd, attn_fixed, attn_step, attn_note = _attention(
        config, s, lay, backend, b, n, out_kept=reads_as_is(("o_proj",)), group=g_whole, sharded=sp > 1)
    halo = _halo_terms(s, lay, b, n, g_whole) if sp > 1 else None
    if attn_note:
        notes.append(attn_note)
    o_lin = linear_saved("o_proj")
    h_mid = a * h if a == 4 else 0  # fp32 residual: the second norm saves its input itself
    norm2 = norm_saved(h, trained_norms, input_counted=True) + h_mid
    norm2 += a * h if reads_as_is(("gate_proj", "up_proj")) else 0
    # the MLP keeps gate's output (SiLU's input), SiLU's output and up's output (the
    # product's factors); down_proj's frozen matmul keeps nothing, an adapted one the
    # product (as is, or PEFT's cast), which its backward frees before the product's runs
    gate_up = sum(linear_saved(p) for p in ("gate_proj", "up_proj"))
    mlp = 3 * c * i + gate_up
    down_lora = "down_proj" in lora_set
    # the recompute's forward at down_proj: the product and down's base output besides the
    # saved factors; the residual and the norm's output still held as locals; PEFT's fp32
    # copy of the product and its cast for an adapted down_proj
    mlp_forward_peak = 4 * c * i + c * h + (a * h if a != 4 else 0)
    mlp_forward_peak += 0 if reads_as_is(("gate_proj", "up_proj")) else a * h
    if down_lora:
        mlp_forward_peak += (4 * i if c != 4 and adapter_cast else 0) + (c * i if adapter_cast else 0)
    layer_saved = norm1 + qkv + o_lin + norm2 + mlp  # per token, without attention
    # the MLP's backward: d(product) and d(both factors), with the incoming gradient
    mlp_bwd = 3 * c * i + a * h
    lora_bwd = (4 + c) * h if (adapter_cast and lora_set) else 0  # PEFT's fp32 cast, backwards
    pre_attention = norm1 + qkv + o_lin  # what is still saved when the attention's backward runs
    # autocast casts frozen fp32 weights at each call, and their matmuls keep the copy for
    # the input gradient: the layer's, less those whose backward has run
    weight_copies_mlp = weight_copies_attn = 0
    if lay.autocast and w != c:
        sizes = {k: a_ * b_ for k, (a_, b_, _) in shapes.items()}
        weight_copies_mlp = c * (sum(sizes.values()) - sizes["down_proj"])
        weight_copies_attn = c * sum(sizes[k] for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    weight_copies = weight_copies_mlp

    # ------------------------------------------------------------ shared activations
    ckpt_tensor = a * h * tok
    # ids, positions, labels, loss mask (int64) of the whole block; RoPE's cos/sin of this rank's tokens
    shared = {"inputs_and_rope": b * seq * (8 * 4) + 2 * a * b * n * s.head_dim}
    if offload:
        # the layer inputs wait in pinned host memory; the GPU holds the one in use
        ckpt_live, ckpt_fwd = 2 * ckpt_tensor, 2 * ckpt_tensor
        host = s.layers * ckpt_tensor
        notes.append(f"activation offload: {host / GiB:.1f} GiB of layer inputs in pinned host memory per worker")
    else:
        host = 0
        ckpt_live = s.layers * ckpt_tensor  # h_0 .. h_{L-1} (h_L is the final norm's input)
        ckpt_fwd = s.layers * ckpt_tensor

    # ------------------------------------------------------------ the LM head and the loss
    head = _head_terms(config, s, tr, lay, b, n, trained_cast=adapter_cast or not lay.autocast)

    phases: dict[str, dict[str, int]] = {}

    def phase(name: str, **terms: int) -> None:
        phases[name] = {**static, **{k: v for k, v in terms.items()}}

    grads_in_backward = all_grads if accumulating else small_grads
    # sequence parallelism's halo (``_halo_terms``): the straddling group's tensors, kept from
    # a layer's recompute to its attention's backward; the forward's and backward's transients
    halo_saved = halo["saved"] if halo else 0
    if gc:
        phase(
            "forward",
            gradients=all_grads if accumulating else 0,
            checkpointed_activations=ckpt_fwd + ckpt_tensor + shared["inputs_and_rope"],
            layer_recompute=tok * (a * h + 3 * c * i),
            attention=attn_step,
            autocast_weight_copies=weight_copies,
            sequence_parallel_halo=halo["forward"] if halo else 0,
        )
        phase(
            "loss_forward",
            gradients=all_grads if accumulating else 0,
            checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
            lm_head_loss=head["forward"],
            attention=attn_fixed,
        )
        phase(
            "loss_backward",
            gradients=all_grads if accumulating else 0,
            checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
            lm_head_loss=head["backward"],
            attention=attn_fixed,
        )
        phase(
            "last_layer_backward (mlp)",
            sequence_parallel_halo=halo_saved,
            gradients=grads_in_backward + (0 if accumulating else head_grad),
            checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
            layer_recompute=tok * (layer_saved + mlp_bwd),
            attention=tok * attn_saved + attn_fixed,
            autocast_weight_copies=weight_copies,
        )
        # RMSNorm's backward (post_attention_layernorm) runs in fp32: its x.to(fp32) and some
        # five [T, H] fp32 temporaries (pow's, mean's, the products'), the MLP freed by then
        phase(
            "last_layer_backward (norm)",
            sequence_parallel_halo=halo_saved,
            gradients=grads_in_backward + (0 if accumulating else head_grad),
            checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
            layer_recompute=tok * (pre_attention + 4 * h + 5 * 4 * h + (a * h if a != 4 else 0)),
            attention=tok * attn_saved + attn_fixed,
            autocast_weight_copies=weight_copies_attn,
        )
        phase(
            "last_layer_recompute (mlp)",
            sequence_parallel_halo=halo_saved,
            gradients=grads_in_backward + (0 if accumulating else head_grad),
            checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
            # with the gradient arriving from the layers above (and, in a narrower dtype, the
            # final norm's last one still in flight)
            layer_recompute=tok * (layer_saved - mlp + mlp_forward_peak + gate_up + (2 if a != 4 else 1) * a * h),
            attention=tok * attn_saved + attn_fixed,
            autocast_weight_copies=weight_copies_mlp + (c * i * h if lay.autocast and w != c else 0),
        )
        if halo:
            # the output's gradient cut by the shard's two cats: o_proj's input gradient and
            # the zero-padded gradients of both slices of the local output, before the kernels'
            phase(
                "last_layer_backward (halo)",
                gradients=grads_in_backward + (0 if accumulating else head_grad),
                checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
                layer_recompute=tok * (pre_attention + a * h + c * qd + lora_bwd),
                attention=tok * attn_saved + attn_fixed,
                autocast_weight_copies=weight_copies_attn,
                sequence_parallel_halo=halo_saved + halo["cat_backward"],
            )
        phase(
            "last_layer_backward (attention)",
            gradients=grads_in_backward + (0 if accumulating else head_grad),
            checkpointed_activations=ckpt_live + shared["inputs_and_rope"],
            layer_recompute=tok * (pre_attention + a * h + c * qd + lora_bwd),
            attention=tok * (attn_saved + attn_bwd) + attn_fixed,
            autocast_weight_copies=weight_copies_attn,
            sequence_parallel_halo=halo["backward"] if halo else 0,
        )
    else:
        per_layer = tok * (layer_saved + attn_saved) + halo_saved
        phase(
            "loss_backward",
            gradients=all_grads if accumulating else 0,
            checkpointed_activations=shared["inputs_and_rope"] + ckpt_tensor,
            layer_recompute=s.layers * per_layer,
            lm_head_loss=head["backward"],
            attention=attn_fixed,
            autocast_weight_copies=s.layers * weight_copies,
        )
        phase(
            "last_layer_backward (mlp)",
            gradients=grads_in_backward + (0 if accumulating else head_grad),
            checkpointed_activations=shared["inputs_and_rope"],
            layer_recompute=s.layers * per_layer + tok * mlp_bwd,
            attention=attn_fixed,
            autocast_weight_copies=s.layers * weight_copies,
        )
    phase(
        "embedding_backward",
        gradients=all_grads + tied_embed_extra,
        checkpointed_activations=shared["inputs_and_rope"] + tok * (4 + a) * h,
    )
    opt_temp = tr.total * 4 if device == "cuda" else 2 * tr.largest * 4  # foreach vs per tensor
    phase("optimizer_step", gradients=all_grads, optimizer_step_temporaries=opt_temp)
    if fs is None:
        return phases, host, notes, 0
    phases, offloaded, fsdp_notes = _fsdp_phases(phases, fs, s, tr, stored_w, accumulating,
                                                 shared["inputs_and_rope"], ckpt_tensor)
    return phases, host, notes + fsdp_notes, offloaded


ACTIVATION_TERMS = ("checkpointed_activations", "layer_recompute", "lm_head_loss", "attention",
                    "autocast_weight_copies", "sequence_parallel_halo")


def _fsdp_phases(ddp: dict[str, dict[str, int]], fs: Sharding, s: ModelShape, tr: Trainables, w: int,
                 accumulating: bool, inputs: int, layer_input: int):
    """The phases of ``ddp`` (the same step's activations, phase by phase) as FSDP2 holds
    the weights (torch 2.13's ``torch/distributed/fsdp/_fully_shard``; see ``Sharding``), and
    the moments FSDP adds (a group's all-gather, the reduce-scatters of the final callback).
    ``inputs``: the step's ids, positions and RoPE tables; ``layer_input``: one layer's input.

    - every rank keeps 1/W of the base weights (in their dtype), of the trained parameters,
      their gradients and AdamW's state (fp32): ``*_sharded``; with
      ``train.fsdp.cpu_offload`` on a GPU all four are in host memory instead;
    - a gathered group costs twice its size while it computes: FSDP2 all-gathers into one
      flat buffer and copies it out into per-parameter unsharded tensors. In the forward it
      keeps the flat buffer until the next group's copy-out has ended ("implicit forward
      prefetching": ``AllGatherState``, dropped in the next group's ``wait_for_unshard``):
      three layers' worth at that copy-out, two while a layer computes. In the backward it
      frees the flat buffer after the copy-out, but all-gathers the group that runs next (the
      layer below) as soon as this one's backward starts (``_backward_prefetch``): two.
      https://docs.pytorch.org/docs/stable/notes/fsdp.html ("FSDP Prefetch Nuances")
      describes the same implicit forward prefetch for FSDP1;
    - ``reshard_after_forward: false``: every layer stays gathered from its forward to its
      backward (the whole base unsharded, as with DDP, from the end of the forward);
    - the root (the loss module: head, final norm, tied embedding) is never resharded after
      its forward (FSDP2 special-cases the root, ``_fsdp_state.py``); it and the input
      embedding (whose input, the token ids, needs no gradient) are resharded and
      reduce-scattered in the backward's final callback, the root first: both gathered, with
      their trained parameters' unsharded gradients, until then;
    - a group's trained parameters' gradients are unsharded (in the gathered dtype) until its
      reduce-scatter, which copies them into an fp32 buffer of the group's size and keeps
      that buffer until the next group's reduce-scatter (``reduce_scatter_max_input_buffers``
      = 1); gloo's reduce-scatter (CPU) also copies its whole input; gradients accumulate in
      fp32 shards;
    - no DDP buckets."""
    world = max(fs.world, 1)
    layers = s.layers
    base = 0 if fs.offload else s.params() * w // world
    params = 0 if fs.offload else tr.total * 4 // world
    optimizer = 0 if fs.offload else (tr.total * 8 + tr.allocator_state * 4) // world
    all_grads = tr.total * 4
    head_grad = s.vocab * s.hidden * 4 if tr.head_trained else 0
    embed_grad = fs.embedding_trained * 4
    root_trained = fs.root_grads // fs.trained_bytes
    L, E, R = fs.layer, fs.embedding, fs.root
    # one rank alone gathers nothing: FSDP2 copies the shard into the unsharded parameters
    # directly, without an all-gather output (``wait_for_unshard``, world size 1)
    flat = 1 if world > 1 else 0
    # reshard_after_forward=false: the layers (and the embedding) stay gathered to their backward
    held = layers * L
    held_embedding = 0 if fs.reshard else E
    # a tied, trained embedding's gradient from the embedding's backward, before it is summed
    # into the head's (the root's unsharded gradient)
    tied_extra = s.vocab * s.hidden * fs.trained_bytes if (tr.embed_trained and s.tied) else 0

    def reduce_scatter(trained: int) -> int:
        """A group's reduce-scatter: its fp32 input, the reduced shard while it is added to the
        gradient's (or moved to the host), and gloo's copy of the input."""
        rs_out = trained * 4 // world if (accumulating or fs.offload) else 0
        return trained * 4 + rs_out + (trained * 4 if fs.gloo and world > 1 else 0)

    def build(ddp_terms: dict[str, int] | None, *, layers_: int = 0, embedding: int = 0, root: int = 0,
              grads: int = 0, unsharded: int = 0, rs: int = 0, activations: dict[str, int] | None = None,
              optimizer_temp: int = 0) -> dict[str, int]:
        terms = {
            "base_weights_sharded": base, "trainable_params_sharded": params, "optimizer_state_sharded": optimizer,
            "gradients_sharded": 0 if fs.offload else (all_grads if accumulating else grads) // world,
            "gathered_layers": layers_, "gathered_embedding": embedding, "gathered_root": root,
            "unsharded_gradients": unsharded, "reduce_scatter_buffers": rs,
        }
        terms.update(activations if activations is not None else
                     {k: (ddp_terms or {}).get(k, 0) for k in ACTIVATION_TERMS})
        if optimizer_temp:
            terms["optimizer_step_temporaries"] = optimizer_temp
        return terms

    in_backward = all_grads - embed_grad - head_grad  # the layers' (reduced as they finish; counted whole)
    out: dict[str, dict[str, int]] = {}
    if E:
        # the embedding's copy-out: its all-gather output and unsharded weight, the root's too
        out["embedding_forward"] = build(None, embedding=(1 + flat) * E, root=(1 + flat) * R,
                                         activations={"checkpointed_activations": inputs})
    if "forward" in ddp:
        first_acts = dict(ddp["forward"], checkpointed_activations=ddp["forward"]["checkpointed_activations"]
                          - layer_input, layer_recompute=0, attention=0, autocast_weight_copies=0)
    else:  # no checkpointing: the last layer's forward finds the other layers' saved activations
        lb = ddp["loss_backward"]
        first_acts = {k: lb.get(k, 0) * (layers - 1) // layers for k in ("layer_recompute", "autocast_weight_copies")}
        first_acts["checkpointed_activations"] = lb.get("checkpointed_activations", 0)
    # the last layer's copy-out in the forward: the layer above's all-gather output is still held
    out["layer_all_gather"] = build(None, layers_=(1 + 2 * flat) * L if fs.reshard else held + 2 * flat * L,
                                    embedding=held_embedding, root=R,
                                    activations={k: v for k, v in first_acts.items() if k in ACTIVATION_TERMS})
    for name, terms in ddp.items():
        if name == "forward":
            out[name] = build(terms, layers_=(1 + flat) * L if fs.reshard else held + flat * L,
                              embedding=held_embedding, root=R)
        elif name == "loss_forward":
            # the last layer's all-gather output waits for the root's post-forward
            out[name] = build(terms, layers_=flat * L if fs.reshard else held + flat * L,
                              embedding=held_embedding, root=R)
        elif name == "loss_backward":
            out[name] = build(terms, layers_=0 if fs.reshard else held, embedding=held_embedding, root=R)
        elif name.startswith("last_layer_"):
            out[name] = build(terms, layers_=(1 + flat) * L if fs.reshard else held, embedding=held_embedding,
                              root=R, grads=in_backward, unsharded=fs.root_grads + fs.layer_grads)
        elif name == "embedding_backward":
            out[name] = build(terms, embedding=E, root=R, grads=in_backward,
                              unsharded=fs.root_grads + fs.embedding_grads + tied_extra,
                              rs=fs.layer_trained * 4)  # layer 0's input buffer, until the next reduce
            if fs.root_grads:
                out["root_reduce_scatter"] = build(
                    None, embedding=E, grads=in_backward + (head_grad if not (accumulating or fs.offload) else 0),
                    unsharded=fs.root_grads + fs.embedding_grads, rs=reduce_scatter(root_trained), activations={})
            if fs.embedding_grads:
                out["embedding_reduce_scatter"] = build(  # the reduced shard: the last gradient's
                    None, grads=all_grads,
                    unsharded=fs.embedding_grads, rs=reduce_scatter(fs.embedding_trained), activations={})
        elif name == "optimizer_step":
            # foreach AdamW over the DTensor shards on a GPU; on the CPU (offloaded) per tensor
            temp = 0 if fs.offload else terms.get("optimizer_step_temporaries", 0) // world
            out[name] = build(None, grads=all_grads, activations={}, optimizer_temp=temp)
        else:  # pragma: no cover - every phase of _phases is mapped above
            raise AssertionError(f"plan: no FSDP mapping for phase {name!r}")
    notes = [f"train.strategy=fsdp over {world} rank(s): base weights, trained parameters, gradients and AdamW "
             f"state sharded; one decoder layer gathered is {L / GiB:.2f} GiB"
             + (", held twice over while it computes (FSDP2's prefetch), three times at a copy-out" if fs.reshard
                else "; reshard_after_forward=false keeps every layer gathered from its forward to its backward")
             + f"; the root (head, final norm{', tied embedding' if s.tied else ''}) stays gathered: "
             f"{R / GiB:.2f} GiB"
             + (" (weights gathered in the compute dtype: MixedPrecisionPolicy)" if fs.mixed else "")]
    offloaded = 0
    if fs.offload:
        offloaded = (s.params() * w + tr.total * 4 + all_grads + tr.total * 8 + tr.allocator_state * 4
                     + 2 * tr.largest * 4) // world
        notes.append(f"train.fsdp.cpu_offload: the shards of the weights, trained parameters, gradients and AdamW "
                     f"state ({offloaded / GiB:.1f} GiB per worker) in host memory, the optimizer step on the CPU")
    notes.append(f"loading: rank 0 reads the whole base into host memory ({s.params() * w / GiB:.1f} GiB) "
                 "and broadcasts it into the shards; the other ranks build on the meta device")
    return out, offloaded, notes


def _head_terms(config: Config, s: ModelShape, tr: Trainables, lay: Layout, b: int, n: int,
                trained_cast: bool = True) -> dict[str, int]:
    """The final norm, the LM head and the cross-entropy, forward and backward, stock or
    chunked (train/loss.py): bytes live at each one's peak. ``trained_cast``: autocast
    casts a trained (fp32) head (not when FSDP gathered it in the compute dtype)."""
    a, c, w = lay.a, lay.c, lay.w
    h, v = s.hidden, s.vocab
    tok, targets = b * n, b * (n - 1)
    t = config.train
    # final norm: x.to(fp32) (the fp32 input itself, h_L, when activations are fp32), and the
    # normalised x for a trained weight; a frozen head keeps no input
    norm = 4 * h * tok + (a * h * tok if tr.norms_trained else 0)
    head_input = (c if lay.autocast else a) * h * tok if tr.head_trained else 0
    head_weight_cast = c * v * h if (lay.autocast and ((tr.head_trained and trained_cast) or w != c)) else 0
    logits_dtype = c if lay.autocast else 4 if tr.head_trained else w
    head_grad = v * h * 4 if tr.head_trained else 0
    step = max(1, t.loss_chunk_tokens // max(b, 1)) if t.chunked_loss else None
    chunked = step is not None and step < n - 1

    def ce(rows: int, with_logits: bool) -> tuple[int, int]:
        """(forward peak, backward peak) bytes of lm_head + cross_entropy over ``rows`` rows."""
        fp32_copy = 4 * rows * v if (logits_dtype != 4 or b > 1) else 0
        logits = logits_dtype * rows * v if with_logits else 0
        fwd = logits + fp32_copy + 4 * rows * v
        # log_softmax's saved output, nll_loss's gradient, log_softmax's gradient
        bwd = 12 * rows * v
        return fwd, bwd

    if not chunked:
        rows_fwd = tok if not t.chunked_loss else targets  # the stock path scores every position
        fwd, bwd = ce(targets, True)
        fwd += (logits_dtype * (rows_fwd - targets) * v)
        # the cross-entropy's backward runs before the head's: no head gradient exists yet
        return {
            "forward": norm + head_input + head_weight_cast + fwd,
            "backward": norm + head_input + head_weight_cast + bwd,
            "head_grad": head_grad,
        }
    rows = b * step
    fwd, bwd = ce(rows, True)
    recompute = logits_dtype * rows * v + (4 * rows * v if logits_dtype != 4 else 0) + 4 * rows * v
    grads_of_chunks = a * h * targets  # each chunk's d(hidden), held until the split's backward
    final_hidden = a * h * tok  # the chunks' checkpoints keep their inputs: the final hidden states
    # a trained head's weight gradient, summed over the chunks already done: in the compute
    # dtype under autocast (next to this chunk's own cast of the weight), else the fp32 .grad
    head_partial = (c * v * h if lay.autocast else head_grad) if tr.head_trained else 0
    return {
        "forward": norm + final_hidden + fwd + head_weight_cast,
        "backward": norm + final_hidden + max(bwd, recompute) + grads_of_chunks + head_weight_cast + head_partial,
        "head_grad": head_grad,
    }


def _attention(config: Config, s: ModelShape, lay: Layout, backend: str, b: int, n: int, out_kept: bool,
               *, group: int | None = None, sharded: bool = False):
    """Attention's bytes: (saved per token, backward extra per token, fixed bytes for the
    whole step (masks), forward transient bytes, a note). ``n``: the tokens of a row this
    rank attends over; ``group``: S2's group size (the whole sequence's under sequence
    parallelism, else that of ``n``); ``sharded``: a shard of a longer sequence, whose
    shifted heads are split even when it is one group (``always_shift``)."""
    a, c = lay.a, lay.c
    e = max(a, c)  # RoPE's output: q (compute dtype) times cos (activation dtype)
    qd, kvd, heads = s.q_dim, s.kv_dim, s.heads
    rep = s.heads // s.kv_heads
    packed = config.data.position_ids == "document"
    tok = b * n
    note = None
    fixed = 0
    g_all = group if group is not None else _group_size(config, n)
    window = s.sliding_window if s.sliding_window and s.sliding_window < n else None
    if backend == "full-sdpa" and window is not None:
        return _windowed_segments(s, lay, b, n, window)
    if backend == "cpu-sdpa":
        g = g_all
        pad = (-n % g) if n > g else 0
        grow = (n + pad) / n
        q = c * qd  # cast to the compute dtype when RoPE left it wider, else q itself
        k = c * (qd if rep > 1 else kvd)
        v = c * (qd if rep > 1 else kvd)
        # the hand-written backward's function keeps q, k, v (cast, repeated, padded to whole
        # groups) and its output, and a log-sum-exp per token and head
        saved = (q + k + v + c * qd) * grow + 4 * heads * grow
        bwd = 3 * c * qd * grow + (2 * c * kvd if rep > 1 else 0) + (e * (qd + kvd) if e != c else 0)
        transient = tok * (e * (qd + kvd) + c * kvd)
        return saved, bwd, fixed, transient, note
    if backend in ("flash", "varlen"):
        split_rep = (sharded or n > g_all) and (heads // 2) % rep
        kv = qd if split_rep else kvd
        # the kernel keeps its gathered q/k/v and its output (per half of the heads); the
        # [T, H, D] buffer it is scattered into is kept only by an fp32 adapter on o_proj
        saved = c * qd + 2 * c * kv + c * qd + (c * qd if out_kept else 0) + 4 * heads
        bwd = (c * qd / 2 + c * (qd + 2 * kv) / 2 + 2 * qd + 2 * c * (qd + 2 * kv))
        transient = tok * (e * (qd + kvd) + c * kvd + (c * (qd + kvd) if e != c else 0))
        return saved, bwd, fixed, transient, note
    if backend == "cuda-sdpa":
        g = g_all
        kq = c * qd
        saved = 3 * kq + kq + (kq if out_kept else 0) + 4 * heads  # q, k, v repeated, the spans' outputs, out
        bwd = 6 * kq  # plain autograd: each piece's slice backward allocates its input's size
        if packed and config.attention.type == "s2":  # full attention: each document its own call
            groups = math.ceil(n / g)
            fixed = b * (2 * groups) * g * g * (1 + c)  # worst case: every group holds a document start
            note = (f"attention.backend=sdpa with packed rows: up to {fixed / GiB:.1f} GiB of per-group document "
                    "masks (varlen/flash need none; rows of one document need none)")
        transient = tok * (e * (qd + kvd) + 3 * kq)
        return saved, bwd, fixed, transient, note
    if backend != "full-sdpa":
        raise ValueError(f"unknown attention backend {backend!r}")
    # full attention on the CPU, a causal row (the plan's CPU rows are one document each):
    # torch's SDPA, GQA native, no mask; q, k, v and the kernel's output (laid out
    # [B, N, H, D]: the transpose and .contiguous() are views of it), its log-sum-exp
    saved = c * qd + 2 * c * kvd + c * qd + 4 * heads
    bwd = c * (qd + 2 * kvd) + (4 * qd if lay.c != 4 else 0)  # dq, dk, dv and flash's fp32 dq accumulator
    transient = tok * (e * (qd + kvd) + 2 * c * qd)
    return saved, bwd, fixed, transient, note


def _windowed_segments(s: ModelShape, lay: Layout, b: int, n: int, window: int):
    """Full attention under a sliding window on the CPU (attention/segments.py): blocks of
    ``window`` queries over at most twice as many keys, each a fused SDPA call with a small
    band mask (plain autograd), never an [N, N] mask."""
    c = lay.c
    e = max(lay.a, c)
    qd, kvd, heads = s.q_dim, s.kv_dim, s.heads
    kv = qd if s.heads > s.kv_heads else kvd  # repeat_kv materialises the kv heads
    # q, the repeated k and v, each block's output and log-sum-exp (SDPA's saved tensors)
    saved = c * qd + 2 * c * kv + c * qd + 4 * heads
    bwd = c * (qd + 2 * kv) + c * qd  # dq, dk, dv and the gradient of the [B, N, H, D] buffer
    transient = b * n * (e * (qd + kvd) + 2 * c * qd)
    fixed = 2 * window * 2 * window  # the band masks: two shapes of [w, 2w] bool at most
    return saved, bwd, fixed, transient, None


# ---------------------------------------------------------------- sequence parallelism


def shifted_kv_heads(s: ModelShape) -> int:
    """The kv heads a rank sends its neighbour under sequence parallelism: those the shifted
    half of the query heads (heads H/2 .. H-1) read, or, when a kv head is shared by both
    halves, the shifted query heads' repeated copies (``sequence_parallel.py``)."""
    hu, rep = s.heads // 2, s.heads // s.kv_heads
    return s.kv_heads - hu // rep if hu % rep == 0 else s.heads - hu


def halo_bytes(s: ModelShape, group_size: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes of one halo: the last G/2 keys and values of the shifted kv heads, one pass,
    one direction (``[2, B, Hkv_shifted, G/2, D]`` in the compute dtype). A rank sends one
    to the next rank in each forward (and in each recompute) and one gradient of the same
    size back to the previous rank in the backward."""
    return 2 * batch * shifted_kv_heads(s) * (group_size // 2) * s.head_dim * dtype_bytes


def _halo_terms(s: ModelShape, lay: Layout, b: int, n: int, g: int) -> dict[str, int]:
    """Bytes sequence-parallel S2-Attn adds to one layer of a rank holding ``n`` tokens of a
    row whose group size is ``g`` (``sequence_parallel_s2_attention``, a rank after the
    first: it receives a halo and recomputes the straddling group).

    - ``saved``: what the straddling group's attention keeps from a layer's (re)computed
      forward to its backward: q_ext [B, H-H/2, G, D] (half of it zeros), k_ext and v_ext
      [B, Hkv_s, G, D], SDPA's repeated kv heads (GQA), its output [B, G, H-H/2, D] and
      log-sum-exp (fp32);
    - ``forward``: at the shard's last cat, besides what the unsharded layer holds: the
      output's copy [B, L, H, D], the first G/2 rows' cat, the straddling group's tensors,
      the tail sent and the halo received ([2, B, Hkv_s, G/2, D] each), casts of RoPE's
      wider q/k to the compute dtype, and a shared kv head's repeated keys and values
      [B, H, L, D] x 2 (of which the shifted heads are sent);
    - ``cat_backward``: the output's gradient cut by the two cats: each slice's backward
      zero-pads its piece to the whole [B, L, H, D] (two of them live while o_proj's input
      gradient is), and the straddling output's gradient;
    - ``backward``: at the shard's own kernel backward, the keys' and values' gradients
      [B, Hkv, L, D] already accumulated from the halo path (the tail's and the straddling
      group's slices), in RoPE's output dtype.

    The G-sized terms are small next to a shard's unless L is a few groups; the L-sized
    ones (one output copy forward, two output gradients, the kv gradients backward) are
    the cost of the cats and slices the exchange is built from."""
    c, e = lay.c, max(lay.a, lay.c)
    heads, d = s.heads, s.head_dim
    hq = heads - heads // 2  # the shifted query heads
    rep = heads // s.kv_heads
    whole = (heads // 2) % rep == 0
    hkv_s = shifted_kv_heads(s)
    half = g // 2
    tail = halo_bytes(s, g, b, c)
    qd, kvd = s.q_dim, s.kv_dim
    strad_out = b * g * hq * d * c
    saved = (b * hq * g * d * c + 2 * b * hkv_s * g * d * c + (2 * b * hq * g * d * c if whole and rep > 1 else 0)
             + strad_out + 4 * b * hq * g)
    casts = (tail + b * hq * half * d * c + 2 * b * hkv_s * half * d * c) if e != c else 0
    repeated = 0 if whole else 2 * e * b * n * qd  # repeat_kv's whole [B, H, L, D], then the shifted heads
    forward = c * b * n * qd + b * half * heads * d * c + saved + 2 * tail + casts + repeated
    return {
        "tail": tail,
        "saved": saved,
        "forward": forward,
        "cat_backward": 2 * c * b * n * qd + strad_out,
        "backward": 2 * e * b * n * kvd,
    }


COMMUNICATION_SCHEMES = ("halo_s2", "ring", "ulysses")


def communication_per_layer(s: ModelShape, n: int, gpus: int, scheme: str, *, batch: int = 1,
                            group_size: int = 8192, dtype_bytes: int = 2, grad_bytes: int | None = None,
                            recompute: bool = False) -> int:
    """Bytes one GPU sends for one decoder layer's attention in one forward and backward,
    when ``gpus`` GPUs (P) share each sequence of ``n`` tokens (N), ``batch`` rows (B) per
    micro-batch. Keys/values have the model's Hkv (GQA) heads, queries H, head_dim D, every
    tensor in ``dtype_bytes`` (bf16: 2) and gradients in ``grad_bytes`` (default the same).
    A GPU receives as much as it sends (interior ranks of the halo; every rank otherwise).
    ``recompute``: gradient checkpointing runs each layer's forward twice, and each scheme
    repeats its forward communication in the recompute.

    - ``halo_s2`` (longtune, S2-Attn split shift, shards on group boundaries): the forward
      sends the next rank the last G/2 keys and values of the shifted kv heads
      Hkv_s (= Hkv/2 when a kv head serves one half of the query heads):
      ``2 * B * Hkv_s * G/2 * D`` elements; the backward sends as many gradients back.
      Per GPU: ``2 * B * Hkv_s * G * D * bytes`` = ``B * Hkv * G * D * 2 bytes`` forward and
      backward in bf16 with Hkv_s = Hkv/2: independent of N and of P.
    - ``ring`` (ring attention / context parallel, full causal attention; zigzag or striped
      layouts move the same bytes): each GPU holds N/P tokens; the forward passes every
      K/V block around the ring in P-1 steps: ``(P-1) * 2 * B * N/P * Hkv * D`` elements;
      the backward passes the K/V blocks around again and the dK/dV accumulators with them:
      twice the forward (in ``grad_bytes`` for dK/dV). Per GPU, bf16:
      ``3 * (P-1)/P * 2 * B * N * Hkv * D * 2`` bytes: ~linear in N, ~flat in P.
    - ``ulysses`` (DeepSpeed-Ulysses / ALST all-to-all): the forward all-to-alls q, k, v from
      sequence shards to head shards and the output back, each GPU sending (P-1)/P of
      its B * N/P tokens' q (H heads), k, v (Hkv each) and output (H); the backward the same
      for dO, dQ, dK, dV. Per GPU: ``2 * (P-1)/P * B * N/P * (2H + 2Hkv) * D * 2`` bytes.
      It needs P to divide H; with P > Hkv the kv heads are replicated to P (counted so).

    Only the attention's exchange is counted: not the gradient all-reduce or FSDP's
    gathers, which every scheme shares."""
    if scheme not in COMMUNICATION_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(COMMUNICATION_SCHEMES)}, got {scheme!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    grad = dtype_bytes if grad_bytes is None else grad_bytes
    forward_passes = 2 if recompute else 1
    if gpus == 1:
        return 0
    d, hkv, heads = s.head_dim, s.kv_heads, s.heads
    if scheme == "halo_s2":
        elements = 2 * batch * shifted_kv_heads(s) * (group_size // 2) * d  # one halo, one direction
        return elements * (dtype_bytes * forward_passes + grad)
    local = batch * n / gpus  # tokens per GPU
    if scheme == "ring":
        kv = (gpus - 1) * 2 * local * hkv * d  # elements of K and V passed in one ring
        return int(kv * (dtype_bytes * forward_passes + dtype_bytes + grad))
    if heads % gpus:
        raise ValueError(f"ulysses shards the {heads} attention heads over the GPUs: {gpus} GPUs do not divide them")
    kv_heads = max(hkv, gpus)
    share = (gpus - 1) / gpus * local * d
    forward = share * (2 * heads + 2 * kv_heads)  # q, k, v in, the output back
    return int(forward * dtype_bytes * forward_passes + forward * grad)


def sequence_parallel_refusal(config: Config) -> str | None:
    """Why plan cannot search contexts for this sequence-parallel run (one line naming the
    setting and the valid values), or None. The group count of a row is N / G: with
    ``attention.group_size_ratio`` = 1/k it is k at every context, so P must divide k; a
    fixed ``attention.group_size`` G admits every P (contexts that are multiples of P x G)."""
    p = config.scaling.sequence_parallel
    a = config.attention
    if p == 1 or a.group_size is not None:
        return None
    k = round(1 / a.group_size_ratio)
    if abs(k * a.group_size_ratio - 1) > 1e-9:
        return (f"scaling.sequence_parallel={p} with attention.group_size_ratio={a.group_size_ratio}: plan "
                "searches contexts only where the number of S2 groups is fixed (ratio 1/k) or the group "
                "size is (attention.group_size); set one of those")
    if k % p:
        valid = [d for d in range(1, k + 1) if k % d == 0]
        return (f"scaling.sequence_parallel={p} can never divide the {k} S2 groups of a row that "
                f"attention.group_size_ratio={a.group_size_ratio} makes at every context: use one of {valid}, "
                "or a fixed attention.group_size")
    return None


def context_step(config: Config) -> int:
    """The contexts ``max_context`` tries are multiples of this: 1024 tokens, and under
    sequence parallelism whole groups on every rank (N a multiple of P x G for a fixed G;
    G = N/k even for a ratio of 1/k)."""
    p = config.scaling.sequence_parallel
    if p == 1:
        return 1024
    if config.attention.group_size is not None:
        return p * config.attention.group_size
    k = round(1 / config.attention.group_size_ratio)
    return math.lcm(1024, 2 * k)


# ---------------------------------------------------------------- FLOPs


def step_flops(config: Config, s: ModelShape, tr: Trainables, n: int) -> dict[str, float]:
    """FLOPs of one optimizer step on one worker, and attention's share; matmuls only.
    Frozen weights: forward, recompute (with gradient checkpointing) and the input gradient;
    attention: forward, recompute and a backward of twice the forward. Under
    ``scaling.sequence_parallel`` P, one rank's: its N/P tokens through every layer and the
    head, S2 over groups of the whole sequence's G, and (ranks after the first) the
    straddling group's G x G causal attention for the shifted heads."""
    t = config.train
    b = t.batch_size_per_worker
    sp = config.scaling.sequence_parallel
    g_whole = _group_size(config, n)
    n //= sp  # this rank's tokens under sequence parallelism
    tok = b * n
    gc = config.model.gradient_checkpointing
    passes = 3 if gc else 2  # forward (+ recompute) + input gradient of frozen weights
    linear = 2 * tok * s.layer_linear_params() * s.layers * passes
    adapter = 2 * tok * tr.lora * 4  # adapter factors: forward, recompute, input and weight gradients
    # causal: QK^T and PV over half the square (under sequence parallelism this rank's 1/P of it)
    full_fwd = 2 * b * n * (n * sp) * s.q_dim * s.layers
    if config.attention.type == "s2":
        g = min(g_whole, n)
        attn_fwd = 2 * b * n * g * s.q_dim * s.layers
        if sp > 1:  # a rank after the first recomputes its straddling group: G queries over G keys
            attn_fwd += 2 * b * g * g * (s.heads - s.heads // 2) * s.head_dim * s.layers
    else:
        attn_fwd = full_fwd
    attn_mult = (4 if gc else 3)
    attention = attn_fwd * attn_mult
    head_passes = 2 + (1 if tr.head_trained else 0)
    if t.chunked_loss and max(1, t.loss_chunk_tokens // max(b, 1)) < n - 1:
        head_passes += 1  # each chunk's head is recomputed in the backward
    head = 2 * tok * s.hidden * s.vocab * head_passes
    micro = linear + adapter + attention + head
    return {
        "step": micro * t.grad_accum_steps,
        "attention_share": attention / micro,
        "s2_vs_full": (attn_fwd / full_fwd) if config.attention.type == "s2" else 1.0,
        "per_token": micro / tok,
    }


# ---------------------------------------------------------------- output


def format_plan(plan: Plan) -> str:
    d = plan.to_dict()
    lines = [
        f"model      {plan.model}   ({plan.params['base'] / 1e9:.2f}B parameters, "
        f"{plan.params['trained'] / 1e6:.1f}M trained)",
        f"run        {plan.context} tokens x {plan.batch} per micro-batch, attention {plan.backend}, "
        f"weights {plan.layout['weights']}, autocast {plan.layout['autocast']}, {plan.strategy}"
        + (f", sequence parallel over {plan.sequence_parallel} ranks ({plan.context // plan.sequence_parallel} "
           "tokens each)" if plan.sequence_parallel > 1 else ""),
    ]
    if plan.gpu is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"gpu        {plan.gpu.label}: {plan.gpu.memory_bytes / GiB:.1f} GiB, budget "
                     f"{plan.gpu.budget_bytes / GiB:.1f} GiB ({SAFETY_MARGIN:.0%} margin, "
                     f"{RESERVED_BYTES / GiB:.0f} GiB reserved)")
    lines.append(f"peak       {plan.peak_bytes / GiB:.2f} GiB per GPU, during {plan.peak_phase}"
                 + (f": {verdict}" if plan.gpu is not None else ""))
    for name, value in plan.breakdown.items():
        if value:
            lines.append(f"  {name:28s} {value / GiB:9.2f} GiB")
    lines.append("phases     " + ", ".join(f"{k} {v:.2f}" for k, v in d["phases_gib"].items()) + " (GiB)")
    if plan.host_bytes or plan.host_offload_bytes:
        parts = ([f"{plan.host_bytes / GiB:.1f} GiB of offloaded layer inputs (pinned)"] if plan.host_bytes else []) \
            + ([f"{plan.host_offload_bytes / GiB:.1f} GiB of FSDP shards"] if plan.host_offload_bytes else [])
        lines.append(f"host       {' + '.join(parts)} per worker; {plan.host_per_node_bytes / GiB:.1f} GiB for "
                     f"{plan.workers_per_node} worker(s) on a node")
    if plan.max_context is not None:
        cap = " (the search's cap)" if plan.max_context >= MAX_CONTEXT_CAP else ""
        lines.append(f"max context {plan.max_context} tokens fit with these settings{cap}")
    f = plan.flops
    lines.append(f"flops      {f['step']:.3g} per step per worker; attention {f['attention_share']:.0%} of them"
                 + (f" (S2 computes {f['s2_vs_full']:.0%} of full attention's)" if f["s2_vs_full"] != 1.0 else ""))
    if plan.step_seconds is not None:
        lines.append(f"step time  ~{plan.step_seconds:.1f} s at {UTILISATION:.0%} of {plan.gpu.peak_tflops:.0f} "
                     "TFLOPS (bf16 dense)")
    for note in plan.assumptions:
        lines.append(f"note       {note}")
    return "\n".join(lines)


def plan_command(config: Config, gpu: str | None = None, as_json: bool = False) -> int:
    """``longtune plan``: print the plan (a table, or one JSON object with --json). Exit code
    0 when the run fits the GPU, 1 when it does not (so ``longtune plan ... && ray job
    submit ...`` launches only what fits); bad input is a ConfigError (exit 2)."""
    if gpu is None:
        raise ConfigError("plan needs --gpu, one of " + ", ".join(GPUS))
    plan = plan_run(config, gpu)
    print(json.dumps(plan.to_dict()) if as_json else format_plan(plan))
    return 0 if plan.fits else 1


__all__ = [
    "GPU", "GPUS", "INSTANCE_GPUS", "ModelShape", "Plan", "format_plan", "gpu_named", "max_context",
    "model_shape", "plan_command", "plan_run", "shipped_models", "step_flops",
]
