"""One typed configuration for every longtune job.

Defaults live here and nowhere else. They are the embedded default recipe (the seed model,
the stdlib corpus, 256 -> 1024 tokens on a local Ray: pipelines/configs/default.yaml states
it, and a test keeps the two equal); recipes for real models state the LongLoRA paper's
values (pipelines/configs/llama2-7b-32k.yaml). A job's config is built from three layers, later
ones winning: these defaults, a YAML file (``--config``), dotted command-line overrides
(``train.max_steps=50 adapter.rank=16``). Unknown keys are errors; every validation error
names the field, the bad value and what is allowed, and is raised as ``ConfigError`` before
Ray or any model is touched.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longtune.errors import LongtuneError

SEED_MODEL = "longtune/seed"
"""Model name that selects the small Llama longtune builds itself (the embedded default)."""

STDLIB_CORPUS = "stdlib"
"""Data source that selects the Python standard library's own source files."""


OUTPUTS_DIR = "outputs"
"""Where jobs write when their config names no place (relative to the working directory)."""


def outputs_path(*parts: str) -> Path:
    """``outputs/<parts...>``: a job's output directory when its config names none."""
    return Path(OUTPUTS_DIR, *parts)


def default_run_name(job: str) -> str:
    """``<job>-<date>-<time>``: the name of a run or search when its config names none."""
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


class ConfigError(LongtuneError, ValueError):
    """A configuration problem, worded for the user in one line."""


# train.precision -> model.dtype values it contradicts (longtune.precision resolves the rest)
_PRECISION_CONFLICTS = {
    "fp32": {"bfloat16": "bf16", "float16": "fp16"},
    "bf16": {"float16": "fp16"},
    "fp16": {"bfloat16": "bf16"},
}


def precision_conflict(dtype: str, precision: str) -> str | None:
    """Why ``model.dtype`` and ``train.precision`` contradict each other, or None."""
    fix = _PRECISION_CONFLICTS.get(precision, {}).get(dtype)
    if fix is None:
        return None
    compute = "float32" if precision == "fp32" else {"bf16": "bfloat16", "fp16": "float16"}[precision]
    keep = "auto or float32" if precision == "fp32" else f"auto, float32 or {compute}"
    return (
        f"train.precision={precision} computes in {compute} but model.dtype={dtype} loads {dtype} "
        f"weights: set model.dtype to {keep}, or train.precision to {fix} (or auto)"
    )


def fsdp_conflict(config: "Config") -> str | None:
    """Why train.strategy=fsdp cannot run ``config``, in one line naming the setting and what
    to use instead; None when it can (or the strategy is ddp)."""
    if config.train.strategy != "fsdp":
        return None
    if config.model.quantization != "none":
        return (
            f"model.quantization={config.model.quantization} does not run with train.strategy=fsdp: "
            "FSDP corrupts bitsandbytes' packed quantized weights when it shards them "
            "(bitsandbytes issue #1945); use train.strategy=ddp (a 4-bit 70B base fits one GPU) "
            "or model.quantization=none"
        )
    if config.adapter.type == "adalora":
        return (
            "adapter.type=adalora does not run with train.strategy=fsdp: PEFT's AdaLoRA allocator reads "
            "whole parameters and gradients, which FSDP shards; use adapter.type=lora2 (its allocator "
            "works on shards) or train.strategy=ddp"
        )
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def sequence_parallel_conflict(config: "Config") -> str | None:
    """Why scaling.sequence_parallel cannot run ``config``, in one line naming the setting and
    the valid values; None when it can (or it is 1)."""
    from longtune.attention.s2 import resolve_group_size

    p = config.scaling.sequence_parallel
    if p == 1:
        return None
    workers = config.scaling.num_workers
    if workers % p:
        return (
            f"scaling.sequence_parallel={p} must divide scaling.num_workers={workers} (workers = "
            f"data-parallel degree x sequence_parallel): use one of {_divisors(workers)}"
        )
    a = config.attention
    if a.type != "s2":
        return (
            f"scaling.sequence_parallel={p} needs attention.type=s2: full attention has no group "
            "structure to cut the sequence on (longtune has no ring attention); use attention.type=s2 "
            "or scaling.sequence_parallel=1"
        )
    if a.shift != "split":
        return (
            f"scaling.sequence_parallel={p} needs attention.shift=split: roll wraps the last shard's "
            "tokens onto the first's; use attention.shift=split or scaling.sequence_parallel=1"
        )
    n = config.context_length
    g = resolve_group_size(n, a.group_size, a.group_size_ratio)
    if n % g:
        return (
            f"scaling.sequence_parallel={p} needs whole S2 groups: the context length {n} is not a "
            f"multiple of the group size {g}; set data.context_length or attention.group_size so it is"
        )
    groups = n // g
    if groups % p:
        return (
            f"scaling.sequence_parallel={p} must divide the {groups} S2 groups of a sequence ({n} tokens / "
            f"group size {g}), so that shards end on group boundaries: use one of {_divisors(groups)}, or a "
            "smaller attention.group_size"
        )
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _in_unit_interval(name: str, value: float, *, closed_low: bool = False) -> float:
    low_ok = value >= 0 if closed_low else value > 0
    if not (low_ok and value <= 1):
        bracket = "[" if closed_low else "("
        raise ValueError(f"{name} must be in {bracket}0, 1], got {value}")
    return value


class ModelConfig(_Section):
    name_or_path: str = Field(
        SEED_MODEL,
        description=f"Hub id or local path of the base causal LM; `{SEED_MODEL}` builds the "
        "embedded seed model.",
    )
    target_context: int = Field(
        1024, gt=0, description="Context length to extend the model to, in tokens."
    )
    original_context: int | None = Field(
        None,
        gt=0,
        description="The base model's trained context; read from its config when unset.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype the base weights load in; auto = bfloat16 on GPU (float16 on GPUs "
        "without bf16), float32 on CPU or with train.precision=fp32. Trained parameters "
        "(LoRA, embeddings, norms) are float32 whatever this is.",
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="QLoRA: load the base's decoder linear layers quantized by bitsandbytes (the "
        "[qlora] extra): nf4 or fp4 (4-bit), int8 (LLM.int8); the LoRA factors, trained embeddings "
        "and norms stay unquantized in float32. Not with train.strategy=fsdp.",
    )
    quantization_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit layers dequantize to and compute in."
    )
    double_quantization: bool = Field(
        True, description="4-bit: quantize the quantization constants too (~0.4 bits a weight saved)."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward.")
    activation_offload: bool = Field(
        False,
        description="Keep the checkpointed layer inputs (layers x tokens x hidden) in pinned CPU memory "
        "from the forward to the backward: saves that much GPU memory at the cost of a device-to-host "
        "and a host-to-device copy of each per step (slower). Needs gradient_checkpointing; same loss "
        "and gradients.",
    )
    adapter_path: str | None = Field(
        None,
        description="A trained adapter (PEFT directory, e.g. a checkpoint's adapter/) applied on "
        "top of the base model by evaluate and export.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where the seed model is built and cached (default ~/.cache/longtune).",
    )


class SftConfig(_Section):
    template: Literal["auto", "chat", "llama2", "plain"] = Field(
        "auto",
        description="How conversations become text: chat = the tokenizer's chat template; "
        "llama2 = LongLoRA's [INST] format; plain = Alpaca's ### Instruction / ### Response; "
        "auto = the tokenizer's chat template when it has one, else llama2.",
    )
    system_prompt: str | None = Field(
        None,
        description="Default system message of the llama2/plain templates (a record's own "
        "system message wins); exported with the chat template.",
    )
    instruction_field: str = Field("instruction", description="Instruction field of LongAlpaca-style records.")
    input_field: str = Field("input", description="Optional input field, appended to the instruction.")
    output_field: str = Field("output", description="Response field of LongAlpaca-style records.")
    messages_field: str = Field(
        "messages", description="Field of chat records: a list of {role, content} messages."
    )
    train_on_prompt: bool = Field(
        False, description="Make prompt and system tokens loss targets too (off: responses only)."
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="An example longer than a block: truncate = cut tokens from the start of "
        "its first user message (never a response); drop = skip it. Both are counted.",
    )


class DataConfig(_Section):
    format: Literal["text", "sft"] = Field(
        "text",
        description="text: documents for continued pretraining (loss on every token); sft: "
        "instruction or chat records (loss on the responses, see data.sft).",
    )
    sources: list[str] = Field(
        default_factory=lambda: [STDLIB_CORPUS],
        description="Documents to train on: paths, globs or s3:// / gs:// URIs of text dirs, "
        f".jsonl/.json or .parquet files; `{STDLIB_CORPUS}` = the Python standard library; "
        "`stdlib-qa` = long-context questions about it (data.format sft).",
    )
    prepared_path: str | None = Field(
        None,
        description="A dataset written by `longtune prepare` (which writes to "
        "outputs/prepared/<tokenizer>-<context_length> when unset); when set, training reads "
        "it instead of `sources`.",
    )
    prepared_reader: Literal["workers", "ray_data"] = Field(
        "workers",
        description="How training reads `data.prepared_path`: workers = each worker (each "
        "sequence-parallel group's leader) reads its own contiguous, equal share of the parquet "
        "blocks, with no Ray Data actors running beside training; ray_data = Ray Data's "
        "streaming split. Sources without a prepared dataset always stream through Ray Data.",
    )
    text_field: str = Field("text", description="Text field of .jsonl/.json/.parquet records.")
    tokenizer: str | None = Field(
        None, description="Tokenizer name or path; the model's own when unset."
    )
    context_length: int | None = Field(
        None, gt=0, description="Block length in tokens; model.target_context when unset."
    )
    position_ids: Literal["document", "continuous"] = Field(
        "document",
        description="document: positions restart at each document start in a block; "
        "continuous: one range per block.",
    )
    remainder: Literal["drop", "pad"] = Field(
        "drop", description="What to do with the last, partial block: drop it or pad it."
    )
    min_doc_chars: int = Field(
        8000, ge=0, description="Documents shorter than this many characters are skipped."
    )
    max_doc_chars: int = Field(
        20_000_000,
        gt=0,
        description="Documents longer than this are skipped and counted, not tokenized.",
    )
    max_documents: int | None = Field(
        None,
        gt=0,
        description="Read at most this many records (documents, including ones then skipped), "
        "in source order; text files smaller than min_doc_chars bytes are not read or counted.",
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of documents held out for evaluation."
    )
    tokenize_concurrency: int = Field(
        1, gt=0, description="Tokenizer actors in the Ray Data actor pool."
    )
    tokenize_batch_size: int = Field(
        16, gt=0, description="Documents per tokenizer batch (and per first packing pass)."
    )
    pack_batch_tokens: int = Field(
        4_194_304,
        gt=0,
        description="Tokens per final packing batch, where the pieces left over from the "
        "first pass are packed together; the dropped or padded remainder is under one block "
        "per split per such batch.",
    )
    sft: SftConfig = Field(default_factory=SftConfig)

    @field_validator("sources")
    @classmethod
    def _sources_not_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not s.strip() for s in value):
            raise ValueError("data.sources must list at least one non-empty path or URI")
        return value


class AttentionConfig(_Section):
    type: Literal["s2", "full"] = Field(
        "s2", description="Training attention: s2 = shifted sparse attention, full = causal (packed "
        "documents kept apart by their own causal calls or varlen sequences, no [N, N] mask)."
    )
    group_size_ratio: float = Field(
        0.25, description="S2-Attn group size as a fraction of the sequence length."
    )
    group_size: int | None = Field(
        None, gt=1, description="Fixed S2-Attn group size in tokens (overrides the ratio)."
    )
    shift: Literal["split", "roll"] = Field(
        "split",
        description="split: shifted groups move by G/2, never look ahead; roll: the paper's "
        "Algorithm 1 (wraps around, leaks future tokens; for reproduction only).",
    )
    backend: Literal["auto", "sdpa", "flash", "varlen"] = Field(
        "auto",
        description="auto = flash-attn on CUDA when it imports and the GPU (sm80+, fp16/bf16) suits it, else "
        "torch's varlen_attn (torch >= 2.10) for packed/padded rows, else torch SDPA; says why once. "
        "sdpa = torch SDPA (CPU and GPU); flash = flash-attn; varlen = torch's built-in varlen flash kernel.",
    )

    @field_validator("group_size_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        return _in_unit_interval("attention.group_size_ratio", value)

    @field_validator("group_size")
    @classmethod
    def _even_group(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(f"attention.group_size must be even (it is shifted by half), got {value}")
        return value


class Lora2Config(_Section):
    outer_rank: int = Field(8, gt=0, description="Rank k of LoRA²'s outer planes (Qout, Pout).")


class PruningConfig(_Section):
    """Importance-based rank allocation, AdaLoRA's schedule (adapter.type lora2 or adalora)."""

    target_rank: int = Field(4, gt=0, description="Singular values kept per layer on average.")
    start: float = Field(
        0.1, ge=0, lt=1, description="Fraction of train.max_steps trained at full rank before pruning."
    )
    end: float = Field(
        0.8, gt=0, le=1,
        description="Fraction of train.max_steps at which the budget reaches target_rank; the "
        "pattern is frozen after it.",
    )
    every: int = Field(1, gt=0, description="Steps between re-allocations while the budget decays.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance, abs(w · grad).")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of its uncertainty.")
    orth_reg_weight: float = Field(0.1, ge=0, description="Weight of the orthogonality penalty.")

    def steps(self, max_steps: int) -> tuple[int, int]:
        """(start, end) as optimizer steps of a run of ``max_steps``."""
        return round(self.start * max_steps), round(self.end * max_steps)

    @model_validator(mode="after")
    def _order(self) -> "PruningConfig":
        if self.start >= self.end:
            raise ValueError(
                f"adapter.pruning.start ({self.start}) must be below adapter.pruning.end ({self.end})"
            )
        return self


class AdapterConfig(_Section):
    type: Literal["lora_plus", "lora", "lora2", "adalora"] = Field(
        "lora_plus",
        description="lora_plus: LongLoRA's LoRA with trainable embeddings and norms; "
        "lora: plain LoRA; lora2: LoRA² (multi-scale orthogonal, rank-pruned) with trainable "
        "embeddings and norms; adalora: PEFT's AdaLoRA with trainable embeddings and norms.",
    )
    rank: int = Field(8, gt=0, description="LoRA rank r (lora2, adalora: the initial rank).")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Linear layers to adapt; the attention q/k/v/o projections when unset."
    )
    trainable_modules: list[str] | None = Field(
        None,
        description="Fully trained modules for lora_plus/lora2/adalora; embeddings and all norms "
        "when unset.",
    )
    use_rslora: bool = Field(False, description="PEFT rank-stabilized LoRA scaling.")
    use_dora: bool = Field(False, description="PEFT weight-decomposed LoRA.")
    init_lora_weights: bool | str = Field(True, description="PEFT init_lora_weights.")
    lora2: Lora2Config = Field(default_factory=Lora2Config)
    pruning: PruningConfig = Field(default_factory=PruningConfig)


class FsdpConfig(_Section):
    """FSDP2 sharding (train.strategy=fsdp): each decoder layer and the rest of the model
    (embeddings, final norm, head) are sharded over the training workers."""

    reshard_after_forward: bool = Field(
        True,
        description="Free each decoder layer's gathered weights after its forward and gather them "
        "again in the backward: one layer's full weights on a worker at a time. false keeps every "
        "layer gathered from forward to backward (one all-gather per layer and micro-batch, not "
        "two; the whole base unsharded at the peak, as with DDP).",
    )
    cpu_offload: bool = Field(
        False,
        description="Keep the sharded parameters, gradients and optimizer state in CPU memory "
        "(GPU workers; the optimizer step runs on the CPU): for 70B models on few GPUs.",
    )


class TrainConfig(_Section):
    max_steps: int = Field(200, gt=0, description="Optimizer steps.")
    lr: float = Field(
        2e-4, gt=0, description="Peak learning rate (AdamW); LongLoRA uses 2e-5 on 7B+ models."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up, then constant.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size_per_worker: int = Field(2, gt=0, description="Blocks per micro-batch per worker.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    chunked_loss: bool = Field(
        True,
        description="Run the LM head and the loss over chunks of loss_chunk_tokens tokens, recomputed "
        "in the backward, so a block's [tokens, vocab] logits never exist at once (same loss and "
        "gradients, one more head forward). A model whose logits post-processing longtune does not "
        "know is trained on whole-block logits, with a warning.",
    )
    loss_chunk_tokens: int = Field(
        4096, gt=0, description="Tokens (of all the micro-batch's rows) per LM-head/loss chunk with "
        "train.chunked_loss: one chunk's fp32 logits are chunk x vocabulary x 4 bytes."
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute: auto = bf16 autocast on GPUs with bf16 (fp16 with loss scaling on "
        "older GPUs or with model.dtype=float16) and on CPUs with native bf16, else fp32; bf16, "
        "fp16 = that autocast (fp16 with a GradScaler); fp32 = fp32 weights, no autocast.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model; fsdp: FSDP2 shards the weights, "
        "gradients and optimizer state over the workers (train.fsdp), for models one GPU cannot hold.",
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    retain_host_memory: bool = Field(
        True,
        description="glibc only: in each CPU training worker, keep the host memory a step frees "
        "for the next step (no chunk mmap'd, trim threshold 1 GiB, one malloc arena: "
        "MALLOC_ARENA_MAX=1) instead of returning it to the kernel and faulting it in again "
        "(measured on 2 cores: minor faults 270k -> 33k a step, the step in a thread 7% faster, the "
        "finetune job 17%); the resident set stays nearer its peak between steps "
        "(longtune/train/host_memory.py).",
    )
    log_every: int = Field(10, gt=0, description="Log metrics every N steps.")
    checkpoint_every: int = Field(100, gt=0, description="Checkpoint every M steps and at the end.")
    seed: int = Field(0, description="Random seed.")
    run_name: str | None = Field(
        None, description="Ray Train run name; relaunching the same name resumes."
    )
    storage_path: str | None = Field(
        None,
        description="Checkpoint storage (local dir, s3://, gs://); ./outputs/ray when unset. "
        "Multi-node runs need shared storage.",
    )
    max_failures: int = Field(2, ge=-1, description="Worker restarts before the run fails.")
    keep_checkpoints: int = Field(
        2, gt=0, description="Checkpoints kept per run, the newest (a resume needs the last one)."
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        for b in value:
            if not 0 <= b < 1:
                raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(value)}")
        return value


class EvalConfig(_Section):
    lengths: list[int] = Field(
        default_factory=lambda: [256, 512, 1024], description="Context lengths to score."
    )
    stride: int = Field(256, gt=0, description="Sliding-window stride in tokens.")
    max_eval_tokens: int = Field(
        32_768, gt=0, description="Tokens of held-out text scored per length (recipes for "
        "real models score more)."
    )
    before_after: bool = Field(
        True,
        description="finetune: after training, score the interpolated base and the tuned model "
        "(perplexity by length, passkey) on the same documents and report both.",
    )
    passkey_lengths: list[int] = Field(
        default_factory=lambda: [256, 512, 1024], description="Passkey test lengths."
    )
    passkey_trials: int = Field(10, ge=0, description="Passkey trials per length.")
    passkey_seed: int = Field(
        0,
        description="Seed of the first passkey trial (trial i uses seed + i): the same keys "
        "and depths on every run.",
    )
    batch_size: int = Field(4, gt=0, description="Windows per forward pass.")
    loss_blocks: int = Field(
        16, ge=0, description="Held-out blocks scored (full attention) at each training checkpoint."
    )
    sft_examples: int = Field(
        64, ge=0, description="data.format sft: held-out examples whose response loss is scored."
    )
    sft_answer_tokens: int = Field(
        32,
        ge=0,
        description="data.format sft: held-out examples whose last response is at most this "
        "many tokens are also answered greedily and scored by exact match.",
    )

    @field_validator("lengths", "passkey_lengths")
    @classmethod
    def _positive_lengths(cls, value: list[int]) -> list[int]:
        if any(v <= 0 for v in value):
            raise ValueError(f"lengths must be positive token counts, got {value}")
        return value


class ExportConfig(_Section):
    output_dir: str | None = Field(
        None, description="Where the merged model is written; outputs/export/<name> when unset."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype of the exported model."
    )


class TuneConfig(_Section):
    name: str | None = Field(
        None,
        description="Search name (Ray Tune experiment, MLflow parent run, output folder); "
        "relaunching the same name resumes the search. tune-<date>-<time> when unset.",
    )
    num_samples: int = Field(6, gt=0, description="Trials to run.")
    max_steps: int = Field(
        40, gt=0, description="Optimizer steps per trial (each trial's train.max_steps; ASHA's max_t)."
    )
    eval_every: int = Field(
        10,
        gt=0,
        description="A trial scores eval.loss_blocks held-out blocks, checkpoints and reports "
        "every N steps: the results ASHA compares.",
    )
    metric: Literal["eval_loss", "eval_ppl", "loss"] = Field(
        "eval_loss",
        description="Objective: held-out loss or perplexity at the target context (full "
        "attention), or the training loss.",
    )
    mode: Literal["min", "max"] = Field("min", description="Minimize or maximize the metric.")
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="Search algorithm; optuna needs `pip install optuna`."
    )
    seed: int = Field(0, description="Seed of the search algorithm: the same trials on every run.")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials at once; derived from cluster resources when unset."
    )
    grace_period: int = Field(10, gt=0, description="ASHA: steps before a trial may be stopped.")
    reduction_factor: int = Field(
        3, gt=1, description="ASHA: a trial goes on past a rung if it is in the best 1/N there."
    )
    search_space: dict[str, Any] = Field(
        default_factory=lambda: {
            "attention.group_size_ratio": {"choice": [0.5, 0.25, 0.125]},
            "adapter.rank": {"choice": [4, 8, 16, 32]},
            "adapter.type": {"choice": ["lora_plus", "lora2"]},
            "train.lr": {"loguniform": [1e-5, 1e-3]},
        },
        description="Dotted config key -> {choice: [...]} | {uniform: [lo, hi]} | "
        "{loguniform: [lo, hi]}.",
    )
    output_dir: str | None = Field(
        None,
        description="Where the best config (YAML), the results table (CSV) and the plot are "
        "written; outputs/tune/<name> when unset.",
    )

    @field_validator("search_space")
    @classmethod
    def _space(cls, value: dict[str, Any]) -> dict[str, Any]:
        kinds = {"choice", "uniform", "loguniform"}
        for key, spec in value.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
                raise ValueError(
                    f"tune.search_space.{key} must be one of {{choice: [...]}}, "
                    f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, got {spec!r}"
                )
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ValueError(f"tune.search_space.{key}.{kind} must be a non-empty list, got {args!r}")
            if kind == "choice":
                continue
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
                raise ValueError(f"tune.search_space.{key}.{kind} must be [lo, hi] with lo < hi, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"tune.search_space.{key}.loguniform needs lo > 0, got {args!r}")
        return value

    @model_validator(mode="after")
    def _asha(self) -> "TuneConfig":
        if self.grace_period > self.max_steps:
            raise ValueError(
                f"tune.grace_period ({self.grace_period}) must be <= tune.max_steps ({self.max_steps})"
            )
        return self


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log runs to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory.",
    )
    experiment_name: str | None = Field(
        None, description="MLflow experiment; $MLFLOW_EXPERIMENT_NAME, else `longtune`."
    )
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics.")


class ScalingConfig(_Section):
    num_workers: int = Field(2, gt=0, description="Ray Train workers.")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="One GPU per worker; auto = when the cluster has GPUs."
    )
    cpus_per_worker: float = Field(
        0.5, gt=0, description="Logical CPUs each worker reserves (fractions leave Ray Data room)."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join; $RAY_ADDRESS, else a local Ray is started.",
    )
    local_num_cpus: int | None = Field(
        None,
        gt=0,
        description="Logical CPUs of a local Ray; enough for workers plus Ray Data when unset.",
    )
    local_dashboard: bool = Field(
        False,
        description="Start a local Ray with its dashboard (and the state API it serves); off, "
        "its ten processes do not take a small machine's cores from training (README: Ray's overhead).",
    )
    local_ray_idle_priority: bool = Field(
        True,
        description="A local Ray this job starts runs its workers at nice 0 (Ray's default: 15) "
        "and, while CPU workers train, its own processes (GCS, raylet, driver and controller "
        "threads) at idle CPU priority (Linux SCHED_IDLE): they no longer preempt the workers' "
        "torch threads (README: Ray's overhead). A cluster's processes are left as they are.",
    )
    sequence_parallel: int = Field(
        1,
        gt=0,
        description="Consecutive workers sharing each sequence (S2-Attn, split shift): each holds "
        "context_length / P tokens; num_workers = data-parallel degree x P.",
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    @model_validator(mode="after")
    def _precision(self) -> "Config":
        conflict = precision_conflict(self.model.dtype, self.train.precision)
        if conflict:
            raise ValueError(conflict)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        a = self.adapter
        if self.model.quantization != "none" and a.type in ("lora2", "adalora"):
            raise ValueError(
                f"model.quantization={self.model.quantization} trains adapter.type lora or lora_plus "
                f"(PEFT's LoRA on bitsandbytes layers); adapter.type={a.type} wraps plain linear "
                "layers only: use adapter.type=lora_plus or model.quantization=none"
            )
        if a.type in ("lora2", "adalora"):
            if a.pruning.target_rank > a.rank:
                raise ValueError(
                    f"adapter.pruning.target_rank must be <= adapter.rank ({a.rank}) for "
                    f"adapter.type={a.type}, got {a.pruning.target_rank}"
                )
            if a.use_dora or a.use_rslora:
                raise ValueError(f"adapter.type={a.type} does not combine with use_dora or use_rslora")
            start, end = a.pruning.steps(self.train.max_steps)
            if not start < end:
                raise ValueError(
                    f"adapter.pruning.start/end ({a.pruning.start}, {a.pruning.end}) of "
                    f"train.max_steps={self.train.max_steps} give no steps to prune in "
                    f"(steps {start} to {end}); use more steps or a wider range"
                )
        return self

    @model_validator(mode="after")
    def _sft(self) -> "Config":
        if self.data.format == "sft" and self.data.position_ids != "document":
            raise ValueError(
                "data.format=sft needs data.position_ids=document: positions restart at each "
                "example so packed examples do not attend to each other"
            )
        return self

    @model_validator(mode="after")
    def _fsdp(self) -> "Config":
        conflict = fsdp_conflict(self)
        if conflict:
            raise ValueError(conflict)
        return self

    @model_validator(mode="after")
    def _sequence_parallel(self) -> "Config":
        conflict = sequence_parallel_conflict(self)
        if conflict:
            raise ValueError(conflict)
        return self

    @property
    def context_length(self) -> int:
        """Block length of training data: data.context_length, else model.target_context."""
        return self.data.context_length or self.model.target_context

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> leaf value (for MLflow params and Tune search spaces)."""
        return flatten(self.to_dict())


# ---------------------------------------------------------------- loading


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "search_space":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be dotted, like train.max_steps")
    try:
        # YAML scalars: 50 -> int, 1e-4 -> float, true -> bool, [a, b] -> list, null -> None.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return parts, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = _parse_override(item)
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        return f"unknown config key {loc!r}"
    if kind == "value_error":
        # Our validators already name the field and the value.
        return msg.removeprefix("Value error, ")
    got = first.get("input")
    return f"{loc}: {msg[0].lower()}{msg[1:]}, got {got!r}" if loc else f"{msg}, got {got!r}"


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return data


def from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated. Raises ConfigError."""
    tree = _read_yaml(path) if path is not None else {}
    apply_overrides(tree, list(overrides or []))
    return from_dict(tree)


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of ``config`` with dotted-key overrides (used by Tune trials)."""
    tree = config.to_dict()
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return from_dict(tree)


# ---------------------------------------------------------------- reference docs


def reference_markdown() -> str:
    """The configuration reference table for README.md (a test keeps them in sync)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            type_name = _type_name(ann)
            lines.append(
                f"| `{prefix}{name}` | {type_name} | `{_show(default)}` | "
                f"{(field.description or '').replace('|', '/')} |"
            )

    walk(Config, "")
    return "\n".join(lines) + "\n"


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in get_args(ann))
    text = repr(ann) if not isinstance(ann, type) else ann.__name__
    text = text.replace("typing.", "").replace("NoneType", "None")
    return text.replace("|", "or")


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
