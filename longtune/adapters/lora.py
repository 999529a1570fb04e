"""LongLoRA's LoRA+ through PEFT: LoRA on the attention projections, plus fully trained
embeddings and normalization layers (without them LoRA does not extend context).

    model = apply_adapter(model, config.adapter)      # a peft.PeftModel
    ...train...
    save_adapter(model, "outputs/adapter")            # PEFT format, written atomically
    model = load_adapter(fresh_base, "outputs/adapter")

What is trained, per ``adapter.type``:
- ``lora_plus``: LoRA (r, alpha) on ``target_modules`` (the attention q/k/v/o projections when
  unset) and, as PEFT ``modules_to_save``, ``trainable_modules`` (when unset: every
  ``nn.Embedding`` and every normalization layer — for Llama/Mistral/Qwen2
  ``["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]``, plus
  ``q_norm``/``k_norm`` on Qwen3/Gemma3). An untied output head is *not* trained: LongLoRA
  trains ``embed,norm`` only.
- ``lora``: LoRA only.
- ``lora2``: LoRA² layers (``longtune.adapters.lora2``) on ``target_modules``, plus the
  saved modules as for ``lora_plus``; a ``RankAllocator`` prunes them while training.
- ``adalora``: PEFT's AdaLoRA on ``target_modules``, plus the saved modules as for
  ``lora_plus`` (the baseline LoRA² is measured against).

Tied input/output embeddings (``tie_word_embeddings=True``): the embedding is also the output
head. Training it as a plain ``modules_to_save`` would copy the input embedding and leave
the head on the frozen original, silently untying them (and merging would then write an
untied model). When the embedding is trained on a tied model we set PEFT's
``ensure_weight_tying=True``: the head is wrapped too and shares the trained copy, so there
is one trained matrix (counted and optimized once), the saved adapter reloads tied and
``merge_and_unload`` returns a model that is still tied.

Precision: every trained parameter (LoRA, LoRA², AdaLoRA factors, the saved embeddings and
norms) is held in fp32 whatever the base's dtype, after ``apply_adapter`` and
``load_adapter``. PEFT upcasts only the LoRA factors; a bf16 norm weight of ~1.0 cannot take
AdamW's ~lr-sized steps (bf16 spacing near 1.0 is 2^-7 = 0.0078, lr 2e-5): on a bf16 base
LoRA+'s "train the norms" would train nothing. The trained modules still compute like the
base's: their outputs are cast back to the base dtype, so the residual stream (and the
checkpointed layer inputs, the largest activations at long context) stays bf16 instead of
being promoted to fp32 by an fp32 embedding. The output head is the exception: its logits
are left as computed (a tied head under autocast gives bf16 logits, as the base would).
Outside autocast the trained modules cast their inputs up to fp32 themselves, so a bf16
model with an adapter also runs without autocast (evaluation).

No Ray, no MLflow here: plain torch + transformers + PEFT.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import ModulesToSaveWrapper, load_peft_weights
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

from longtune.adapters.lora2 import ADAPTER_MARKER, Lora2PeftConfig, rank_pattern
from longtune.atomic import publish_dir
from longtune.config import AdapterConfig

RANK_PATTERN_FILE = "rank_pattern.json"  # LoRA²: singular values kept per layer
SAVES_MODULES = ("lora_plus", "lora2", "adalora")  # types that also train embeddings and norms


# ---------------------------------------------------------------- what to adapt


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the Linear layers directly inside the model's self-attention modules
    (``["q_proj", "k_proj", "v_proj", "o_proj"]`` for Llama, Mistral, Qwen2/3, Gemma), in
    module order. Found by inspection: an attention module is one whose class name ends in
    "Attention". Raises ValueError naming the model class when none is found."""
    names: list[str] = []
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        for child_name, child in module.named_children():
            if _is_linear(child) and child_name not in names:
                names.append(child_name)
    if not names:
        raise ValueError(
            f"found no attention projections in {_model_class(model)}: no module whose class "
            "name ends in 'Attention' holds Linear layers; set adapter.target_modules"
        )
    return names


def trainable_modules(model: nn.Module) -> list[str]:
    """LongLoRA's fully trained modules as PEFT ``modules_to_save`` names: every
    ``nn.Embedding`` (for decoder LMs: the input embedding) and every normalization layer
    (class name ending in "Norm", e.g. ``LlamaRMSNorm``, ``nn.LayerNorm``), embeddings first.

    Names are the modules' last components (``input_layernorm``, ``norm``, ...). PEFT matches
    ``modules_to_save`` by suffix, so a short name that would also catch some other module
    is replaced by the full dotted paths of the intended modules."""
    model = _unwrap(model)
    all_names = [name for name, _ in model.named_modules() if name]
    embeddings, norms = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Embedding):
            embeddings.append(name)
        elif type(module).__name__.endswith("Norm"):
            norms.append(name)
    intended = embeddings + norms
    if not intended:
        raise ValueError(f"found no embeddings or normalization layers in {_model_class(model)}")
    wanted = set(intended)
    result: list[str] = []
    for leaf in dict.fromkeys(name.rsplit(".", 1)[-1] for name in intended):
        caught = {n for n in all_names if n.endswith(leaf)}
        if caught <= wanted:
            result.append(leaf)
        else:  # the short name would also train something else: name them in full
            result.extend(n for n in intended if n.rsplit(".", 1)[-1] == leaf)
    return result


# ---------------------------------------------------------------- apply


def lora_config(model: nn.Module, cfg: AdapterConfig, max_steps: int | None = None) -> LoraConfig:
    """The PEFT config for ``cfg`` on ``model`` (target and saved modules resolved).
    ``adalora`` needs the run's ``max_steps`` (its budget schedule is in steps)."""
    targets = list(cfg.target_modules) if cfg.target_modules else attention_projections(model)
    saved: list[str] | None = None
    if cfg.type in SAVES_MODULES:
        saved = list(cfg.trainable_modules) if cfg.trainable_modules else trainable_modules(model)
        _check_matches(model, saved, "adapter.trainable_modules")
    elif cfg.trainable_modules:
        warnings.warn(
            f"adapter.trainable_modules={cfg.trainable_modules} is ignored: adapter.type=lora "
            "trains LoRA only (use lora_plus to train whole modules)",
            stacklevel=3,
        )
    _check_matches(model, targets, "adapter.target_modules")
    common = {
        "task_type": TaskType.CAUSAL_LM,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "modules_to_save": saved,
        "init_lora_weights": cfg.init_lora_weights,
        "ensure_weight_tying": bool(saved) and _trains_tied_embedding(model, saved),
    }
    if cfg.type == "lora2":
        return Lora2PeftConfig(r=cfg.rank, outer_rank=cfg.lora2.outer_rank, **common)
    if cfg.type == "adalora":
        if max_steps is None:
            raise ValueError("adapter.type=adalora needs the run's max_steps for its budget schedule")
        p = cfg.pruning
        start, end = p.steps(max_steps)
        return AdaLoraConfig(
            init_r=cfg.rank, target_r=p.target_rank, tinit=start, tfinal=max_steps - end,
            deltaT=p.every, beta1=p.beta1, beta2=p.beta2, orth_reg_weight=p.orth_reg_weight,
            total_step=max_steps, **common,
        )
    return LoraConfig(r=cfg.rank, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, **common)


def apply_adapter(model: nn.Module, cfg: AdapterConfig, max_steps: int | None = None) -> PeftModel:
    """Wrap ``model`` (a transformers causal LM, modified in place) in a PEFT adapter as
    ``cfg`` says; only the adapter (and the saved modules) is trainable."""
    if isinstance(model, PeftModel):
        raise TypeError("apply_adapter expects a base model, got a PeftModel that already has an adapter")
    peft_config = lora_config(model, cfg, max_steps)
    with _quiet_peft():
        adapted = get_peft_model(model, peft_config)
    trained_in_fp32(adapted)
    return adapted


def trained_in_fp32(model: PeftModel) -> bool:
    """Hold every trained parameter of ``model`` in fp32 (in place; tied parameters stay one
    tensor) and make the saved modules compute like the base's (see the module docstring):
    the trainable parameters, and every parameter of the modules_to_save copies whether or
    not it requires grad now (a loaded adapter computes as it trained). Returns whether any
    parameter was cast (only on a base below fp32). Idempotent."""
    cast = False
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    for wrapper in _saved_wrappers(model):
        for copy in wrapper.modules_to_save.values():
            params.update((id(p), p) for p in copy.parameters())
    for param in params.values():
        if param.is_floating_point() and param.dtype != torch.float32:
            # .data keeps the Parameter object: a tied head keeps pointing at the same tensor
            param.data = param.data.float()
            cast = True
    head = _output_head(model)
    for wrapper in _saved_wrappers(model):
        base_dtype = next((p.dtype for p in wrapper.original_module.parameters() if p.is_floating_point()), None)
        if base_dtype is None or base_dtype == torch.float32:
            continue
        for copy in wrapper.modules_to_save.values():
            if getattr(copy, "_longtune_base_dtype", None) is not None:
                continue
            copy._longtune_base_dtype = base_dtype
            copy.register_forward_pre_hook(_inputs_up_outside_autocast)
            if wrapper is not head and wrapper.original_module is not head:
                copy.register_forward_hook(functools.partial(_output_to, base_dtype))
    return cast


# ---------------------------------------------------------------- save / load


def save_adapter(
    model: PeftModel, path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Save the adapter in PEFT format (``save_pretrained``) at ``path``.

    ``state_dict``: the model's state (whole tensors, keys as ``model.state_dict()``'s) to
    take the adapter's weights from instead of the model itself, e.g. the trained
    parameters gathered from the shards of an FSDP model (longtune/train/parallel.py); it
    needs no frozen base weights.

    Written to a temporary directory beside ``path`` and renamed into place, so readers see
    either the previous complete adapter or the new complete one; an existing directory at
    ``path`` is moved aside only after the new one is complete, then deleted."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter expects a peft.PeftModel, got {type(model).__name__}")

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **({} if state_dict is None else {"state_dict": state_dict}))
        pattern = rank_pattern(model)
        if pattern:  # for people: the weights file's lora_mask buffers are the record loaded
            (tmp / RANK_PATTERN_FILE).write_text(json.dumps(pattern, indent=1) + "\n")

    return publish_dir(path, write)


def load_adapter(
    base_model: nn.Module, path: str | os.PathLike[str], trainable: bool = False
) -> PeftModel:
    """Load a PEFT adapter saved by ``save_adapter`` onto ``base_model`` (built from the same
    base weights). ``trainable=True`` leaves the adapter and saved modules trainable, e.g. to
    resume training. Raises FileNotFoundError / ValueError for a missing or non-PEFT path
    (checked here, so a local typo never turns into a Hub lookup)."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"adapter path {str(directory)!r} does not exist")
    config_file = directory / CONFIG_NAME
    if not directory.is_dir() or not config_file.is_file():
        raise ValueError(f"{str(directory)!r} is not a PEFT adapter directory (no {CONFIG_NAME})")
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        peft_type = saved.get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{str(config_file)!r} is not a valid PEFT adapter config") from exc
    if not peft_type:
        raise ValueError(f"{str(config_file)!r} is not a PEFT adapter config (no peft_type)")
    if not any((directory / name).is_file() for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise ValueError(
            f"{str(directory)!r} has no adapter weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME})"
        )
    with _quiet_peft():
        model = PeftModel.from_pretrained(
            base_model, str(directory), is_trainable=trainable, config=_lora2_config(saved)
        )
    if trained_in_fp32(model):
        _reload_saved_modules(model, directory)
    return model


def _reload_saved_modules(model: PeftModel, directory: Path) -> None:
    """PEFT loads the saved (fp32) modules into copies in the base's dtype, rounding them;
    ``trained_in_fp32`` then widened the copies: copy the saved values in again, so a reload
    computes as the adapter trained. Only the modules_to_save: the adapter layers loaded in
    fp32 already (and AdaLoRA's would be resized twice)."""
    device = next(model.parameters()).device
    weights = load_peft_weights(str(directory), device=str(device))
    adapter = model.active_adapter
    loaded, missing = set(), []
    with torch.no_grad():
        for name, wrapper in model.named_modules():
            if not isinstance(wrapper, ModulesToSaveWrapper) or adapter not in wrapper.modules_to_save:
                continue
            for key, param in wrapper.modules_to_save[adapter].named_parameters():
                saved = weights.get(f"{name}.{key}")
                if saved is not None:
                    param.copy_(saved)
                    loaded.add(id(param))
                else:
                    missing.append((f"{name}.{key}", param))
    unloaded = [key for key, param in missing if id(param) not in loaded]  # a tied head shares a loaded one
    if unloaded:
        warnings.warn(
            f"adapter {str(directory)!r}: no saved values for {unloaded[:3]}; those modules keep "
            "PEFT's copy in the base model's dtype",
            stacklevel=3,
        )


def _lora2_config(saved: dict) -> Lora2PeftConfig | None:
    """The config of a saved LoRA² adapter (which registers its layer with PEFT); None for
    any other adapter, which PEFT reads by itself."""
    if saved.get("longtune_adapter") != ADAPTER_MARKER:
        return None
    fields = set(Lora2PeftConfig.__dataclass_fields__)
    return Lora2PeftConfig(**{k: v for k, v in saved.items() if k in fields and k != "peft_type"})


# ---------------------------------------------------------------- logging


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts for logging, each shared (tied) tensor counted once:
    trainable, total (frozen base weights and trained copies included), lora (LoRA/DoRA
    factors) and saved_modules (trainable copies of the modules_to_save)."""
    counts = dict(trainable=0, total=0, lora=0, saved_modules=0)
    for name, param in model.named_parameters():  # named_parameters drops shared duplicates
        n = param.numel()
        counts["total"] += n
        if not param.requires_grad:
            continue
        counts["trainable"] += n
        if ".lora_" in name or name.startswith("lora_"):
            counts["lora"] += n
        elif ".modules_to_save." in name:
            counts["saved_modules"] += n
    return counts


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_peft():
    """PEFT 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing``: a
    FutureWarning users cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _saved_wrappers(model: nn.Module) -> list[ModulesToSaveWrapper]:
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def _output_head(model: nn.Module) -> nn.Module | None:
    get_out = getattr(_unwrap(model), "get_output_embeddings", None)
    return get_out() if get_out is not None else None


def _output_to(dtype: torch.dtype, module: nn.Module, args, output):
    """Forward hook: a trained module's floating output in the base's ``dtype``."""
    if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dtype != dtype:
        return output.to(dtype)
    return output


def _inputs_up_outside_autocast(module: nn.Module, args):
    """Forward pre-hook: outside autocast, floating inputs in the fp32 of the trained
    weights (a bf16 activation meeting an fp32 weight would fail); under autocast the
    kernels cast themselves and nothing is copied."""
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32]
    if not floats or torch.is_autocast_enabled(floats[0].device.type):
        return None
    return tuple(a.float() if any(a is f for f in floats) else a for a in args)


def _is_linear(module: nn.Module) -> bool:
    # A PEFT-wrapped Linear keeps the original as base_layer.
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _model_class(model: nn.Module) -> str:
    return type(_unwrap(model)).__name__


def _check_matches(model: nn.Module, names: list[str], field: str) -> None:
    """Every name must match some module the way PEFT matches (by name suffix)."""
    module_names = [n for n, _ in model.named_modules() if n]
    missing = [name for name in names if not any(n.endswith(name) for n in module_names)]
    if missing:
        raise ValueError(f"{field}: no module named {missing} in {_model_class(model)}")


def _trains_tied_embedding(model: nn.Module, saved: list[str]) -> bool:
    """True when the input embedding is tied to the output head and one of them is saved."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    inp, out = get_in(), get_out()
    if inp is None or out is None or getattr(out, "weight", None) is not inp.weight:
        return False
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    tied_names = [names.get(id(inp), ""), names.get(id(out), "")]
    return any(n and n.endswith(s) for n in tied_names for s in saved)

