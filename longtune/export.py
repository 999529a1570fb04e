"""`longtune export`: merge a trained adapter into its base model and save a plain Hugging
Face model directory that loads with the extended context and no longtune or PEFT installed.

    longtune export --model BASE --adapter CKPT_OR_ADAPTER [--out DIR] [export.dtype=bfloat16]

Reads top to bottom: find the adapter (a PEFT directory, or a training checkpoint holding
``adapter/`` and ``config.yaml``) -> refuse an output that is not a previous export -> load
the base in fp32 with linear position interpolation to ``model.target_context`` (written
into its config before the weights load, longtune.models) -> apply the adapter -> merge
(LoRA deltas into the projections; the trained embeddings and norms, PEFT
``modules_to_save``, replace the originals) -> check the merge (logits, no PEFT names, tied
embeddings still one matrix) -> cast to ``export.dtype`` -> save the model, its tokenizer and
``longtune_export.json`` into a temporary directory beside the target -> rename into place.

The saved config.json carries ``rope_parameters = {"rope_type": "linear", "factor": ...}``
and ``max_position_embeddings = target_context``, so plain
``AutoModelForCausalLM.from_pretrained(dir)`` gives the extended model.

Decisions:
- A checkpoint's ``config.yaml`` names the base and context the adapter was trained for.
  When they differ from the export config (model.name_or_path, model.target_context, or the
  resolved position-interpolation factor), the export is refused with both values named:
  merging an adapter into a base it was not trained on gives a silently wrong model.
- The target directory is replaced only when it is a previous export (it holds
  ``longtune_export.json``) or is empty; anything else is refused before any work is done.
  The replacement is atomic per rename: readers see the old export or the new one.
- Tied input/output embeddings (LoRA+ trains them as one matrix, see
  longtune.adapters.lora) stay tied after the merge; this is checked. An adapter that was
  trained with the tie broken (a foreign PEFT adapter) is exported untied, faithful to what
  the adapter computes, with a warning.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from longtune.atomic import publish_dir
from longtune.config import SEED_MODEL, Config, ModelConfig, outputs_path
from longtune.errors import LongtuneError, one_line

MARKER = "longtune_export.json"
"""The file that makes a directory a longtune export (and so replaceable by the next one)."""

PEFT_NAME_PARTS = ("lora_", "base_layer", "modules_to_save", "original_module", "base_model.model")
"""Parameter-name fragments that only PEFT-wrapped modules have."""

MERGE_ATOL = 1e-3
"""Largest |merged - adapted| logit difference (fp32, before the cast) accepted."""

QUANTIZED_MERGE_ATOL = 0.05
"""The same for a quantized base: the merged fp32 model against the quantized base + adapter,
which computes in model.quantization_compute_dtype (bf16 by default). Measured: README "QLoRA"."""


class ExportError(LongtuneError, RuntimeError):
    """The export cannot be done as configured; the message says why and what to change."""


@dataclass(frozen=True)
class AdapterSource:
    adapter_dir: Path  # the PEFT directory (adapter_config.json + weights)
    checkpoint_dir: Path | None  # the training checkpoint it came from, when it did


# ---------------------------------------------------------------- export


def export_model(config: Config, *, console=None) -> Path | str:
    """Merge ``model.adapter_path`` into ``model.name_or_path`` (extended to
    ``model.target_context``) and save it at ``export.output_dir``. Returns the directory
    (the URI, for an export to an object store)."""
    from longtune.storage import StorageError, check_stores, is_remote, job_stores

    try:
        check_stores(job_stores(config, "export"))
    except StorageError as err:
        raise ExportError(str(err)) from None
    remote_in, remote_out = is_remote(config.model.adapter_path), is_remote(config.export.output_dir)
    if not (remote_in or remote_out):
        return _export(config, console)
    return _export_remote(config, console)


def _export_remote(config: Config, console) -> Path | str:
    """An export whose adapter or output is on an object store: the adapter is copied here,
    the model is exported into a local temporary directory, then uploaded with its
    ``longtune_export.json`` last (an object store has no rename: a reader that finds the
    marker finds a whole export)."""
    import tempfile

    from longtune.storage import StorageError, download_dir, is_remote

    m, e = config.model, config.export
    updates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="longtune-export-") as tmp:
        if is_remote(m.adapter_path):
            # <storage>/<run>/checkpoint_N keeps its last two names: they label the default output
            parts = m.adapter_path.rstrip("/").split("/")[-2:]
            try:
                local = download_dir(m.adapter_path, Path(tmp, "in", *parts))
            except (StorageError, OSError) as err:
                raise ExportError(f"cannot copy model.adapter_path {m.adapter_path!r}: {one_line(err)}") from None
            updates["model"] = m.model_copy(update={"adapter_path": str(local)})
        if is_remote(e.output_dir):
            check_remote_replaceable(e.output_dir)
            updates["export"] = e.model_copy(update={"output_dir": str(Path(tmp, "out", "model"))})
        local_config = config.model_copy(update=updates)
        target = _export(local_config, console, adapter_origin=m.adapter_path)
        if not is_remote(e.output_dir):
            return target
        try:
            publish_remote(target, e.output_dir)
        except (StorageError, OSError) as err:  # readers see no export: its marker was not written
            raise ExportError(f"cannot upload the export to {e.output_dir!r}: {one_line(err)}") from None
        return e.output_dir


def _export(config: Config, console=None, adapter_origin: str | None = None) -> Path:
    """export_model on this machine's file system. ``adapter_origin``: where the adapter
    was copied from, for the record."""
    from rich.console import Console

    from longtune.adapters import load_adapter
    from longtune.models import ModelError, load_model, load_tokenizer_for, model_path

    console = console or Console(stderr=True)
    m = config.model

    # ---------------------------------------------------------------- inputs, fail fast
    source = find_adapter(m.adapter_path)
    target = output_dir(config, source)
    check_replaceable(target)
    try:
        base_path = model_path(m)  # builds the seed model (once) when named
        check_base(base_path, m.trust_remote_code)
        if source.checkpoint_dir is not None:
            check_checkpoint_matches(config, source.checkpoint_dir, base_path)
    except ModelError as err:
        raise ExportError(str(err)) from None
    used = f"adapter {source.adapter_dir}" + (
        f" (from checkpoint {source.checkpoint_dir})" if source.checkpoint_dir else ""
    )
    console.print(f"[bold]longtune export[/]: {m.name_or_path} -> {m.target_context} tokens, {used}",
                  soft_wrap=True)

    # ---------------------------------------------------------------- base + adapter, fp32
    fp32 = m.model_copy(update={"dtype": "float32"})
    try:
        base, info = load_model(fp32, for_training=False, path=base_path)
        tokenizer = load_tokenizer_for(m)
    except (OSError, ValueError) as err:  # ModelError is a ValueError
        raise ExportError(f"cannot load the base model {m.name_or_path!r}: {one_line(err)}") from None
    base.eval()
    tied_before = _tied(base)
    try:
        adapted = load_adapter(base, source.adapter_dir)
    except (OSError, ValueError, RuntimeError) as err:  # missing, not PEFT, or shapes that do not fit
        raise ExportError(
            f"cannot apply adapter {str(source.adapter_dir)!r} to {m.name_or_path!r}: {one_line(err)}"
        ) from None
    adapted.eval()

    # ---------------------------------------------------------------- merge and check
    probe = torch.randint(0, base.config.vocab_size, (1, min(32, m.target_context)),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(input_ids=probe).logits
    quantized = m.quantization != "none"
    if quantized:
        # The adapter was trained on the quantized base: merge it into that base's own
        # weights, dequantized (the original weights would differ by the quantization error
        # the adapter learnt to live with), as a plain fp32 model.
        try:
            plain = load_model(fp32, for_training=False, path=base_path)[0].dequantize()
        except (OSError, ValueError, RuntimeError) as err:
            raise ExportError(f"cannot dequantize the {m.quantization} base {m.name_or_path!r}: {one_line(err)}") from None
        adapted = load_adapter(plain, source.adapter_dir)
        adapted.eval()
    merged = adapted.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        merge_diff = (merged(input_ids=probe).logits - expected).abs().max().item()
    atol = QUANTIZED_MERGE_ATOL if quantized else MERGE_ATOL
    if not merge_diff <= atol:
        raise ExportError(
            f"the merged model's logits differ from the adapter's{' on the quantized base' if quantized else ''} "
            f"by {merge_diff:.3g}, more than {atol:g}"
        )
    leaked = [k for k in merged.state_dict() if any(part in k for part in PEFT_NAME_PARTS)]
    if leaked:
        raise ExportError(f"PEFT wrapper names left in the merged model: {leaked[:5]}")
    tied_after = _tied(merged)
    if tied_before and not tied_after:
        console.print("[yellow]warning[/]: the base model ties its input and output embeddings, the "
                      "adapter trained them apart; the export has untied embeddings (as the adapter "
                      "computes)", soft_wrap=True)
    merged.config.tie_word_embeddings = tied_after

    # ---------------------------------------------------------------- cast and save
    merged = merged.to(getattr(torch, config.export.dtype))
    merged.config.use_cache = True
    tokenizer.model_max_length = m.target_context
    template = sft_chat_template(config, source, tokenizer)
    if template is not None:
        tokenizer.chat_template = template[1]  # prompted as it was trained
    record = {
        "format": 1,
        "base": m.name_or_path,
        "base_path": str(base_path),
        "adapter": _origin(source.adapter_dir, m.adapter_path, adapter_origin),
        "checkpoint": _origin(source.checkpoint_dir, m.adapter_path, adapter_origin)
        if source.checkpoint_dir else None,
        "original_context": info["original_context"],
        "target_context": m.target_context,
        "interpolation_factor": info["interpolation_factor"],
        "rope_parameters": dict(merged.config.rope_parameters or {}),
        "dtype": config.export.dtype,
        "tied_embeddings": tied_after,
        "merge_max_abs_diff": merge_diff,
        "quantization": m.quantization,
        "chat_template": template[0] if template else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    publish(target, lambda tmp: _write(tmp, merged, tokenizer, record))
    return target


def export_command(config: Config) -> int:
    """`longtune export`: export, say where the model is and how to check it; one-line
    errors and exit 1."""
    from rich.console import Console

    console = Console(stderr=True)
    target = export_model(config, console=console)  # an ExportError reaches the command line: exit 1
    record = read_marker(target)
    console.print(
        # the factor applied, not rope_parameters' top level (nested per layer type on Gemma 3)
        f"exported: {target} ({record['dtype']}, context {record['target_context']}, positions "
        f"interpolated x{record['interpolation_factor']:g}, merge check max |diff| "
        f"{record['merge_max_abs_diff']:.2g})",
        soft_wrap=True,
    )
    from longtune.storage import is_remote

    if is_remote(str(target)):
        # transformers reads local directories (or hub ids), not bucket URIs
        copy = "gcloud storage cp -r" if str(target).startswith("gs://") else "aws s3 cp --recursive"
        console.print(f"Copy it to the machine that serves it: {copy} {target} ./model", soft_wrap=True, markup=False)
        return 0
    check = (
        "from transformers import AutoModelForCausalLM as M; "
        f"m = M.from_pretrained({str(target)!r}); "
        "print(m.config.rope_parameters, m.config.max_position_embeddings)"
    )
    console.print(f'Check it with: python -c "{check}"', soft_wrap=True, markup=False)
    return 0


# ---------------------------------------------------------------- inputs


def find_adapter(adapter_path: str | None) -> AdapterSource:
    """The PEFT directory to merge: ``adapter_path`` itself, or the ``adapter/`` inside a
    training checkpoint (a directory with ``adapter/`` and ``config.yaml``)."""
    if not adapter_path:
        raise ExportError("model.adapter_path is not set: pass --adapter DIR (a PEFT adapter or a "
                          "training checkpoint)")
    path = Path(adapter_path).expanduser().absolute()
    if not path.exists():
        raise ExportError(f"adapter path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ExportError(f"adapter path {str(path)!r} is not a directory")
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").is_file():
        ckpt = path if (path / "config.yaml").is_file() else None
        return AdapterSource(path / "adapter", ckpt)
    if (path.parent / "config.yaml").is_file() and path.name == "adapter":
        return AdapterSource(path, path.parent)  # a checkpoint's adapter/, named directly
    return AdapterSource(path, None)


def check_base(base_path: str, trust_remote_code: bool = False) -> None:
    """The base model's config must load (a local path that does not exist is named as such,
    not looked up on the Hub)."""
    from transformers import AutoConfig

    if base_path.startswith(("/", ".", "~")) and not Path(base_path).expanduser().exists():
        raise ExportError(f"base model {base_path!r} does not exist")
    try:
        AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot load the base model {base_path!r}: {one_line(err)}") from None


def check_checkpoint_matches(config: Config, checkpoint_dir: Path, base_path: str) -> None:
    """Refuse a checkpoint trained for another base model or another extension."""
    from transformers import AutoConfig

    from longtune.models import original_context

    trained = _checkpoint_model_config(checkpoint_dir / "config.yaml")
    m = config.model
    if not _same_model(trained.name_or_path, m.name_or_path):
        raise ExportError(
            f"checkpoint {checkpoint_dir} was trained on model.name_or_path={trained.name_or_path}, "
            f"the export config says {m.name_or_path}: pass model.name_or_path={trained.name_or_path}"
        )
    if trained.target_context != m.target_context:
        raise ExportError(
            f"checkpoint {checkpoint_dir} was trained for model.target_context={trained.target_context}, "
            f"the export config says {m.target_context}: pass model.target_context={trained.target_context}"
        )
    if trained.quantization != m.quantization:
        raise ExportError(
            f"checkpoint {checkpoint_dir} was trained on a model.quantization={trained.quantization} base, "
            f"the export config says {m.quantization}: pass model.quantization={trained.quantization} "
            "(the adapter is merged into the base it was trained on)"
        )
    base_config = AutoConfig.from_pretrained(base_path, trust_remote_code=m.trust_remote_code)
    was, now = original_context(base_config, trained), original_context(base_config, m)
    if was != now:
        raise ExportError(
            f"checkpoint {checkpoint_dir} extended the model from {was} tokens "
            f"(model.original_context), the export config from {now}: pass model.original_context={was}"
        )


def sft_chat_template(config: Config, source: AdapterSource, tokenizer) -> tuple[str, str] | None:
    """(name, Jinja text) of the template an SFT adapter was trained with: from the
    checkpoint's config.yaml when there is one (the run's own data.format and data.sft),
    else from this config; None for an adapter trained on text."""
    from longtune.config import DataConfig
    from longtune.data.sft import resolve_template

    data = config.data
    if source.checkpoint_dir is not None:
        try:
            raw = yaml.safe_load((source.checkpoint_dir / "config.yaml").read_text(encoding="utf-8")) or {}
            section = raw.get("data") or {}
            data = DataConfig.model_validate(
                {k: section[k] for k in ("format", "sft") if k in section and k in DataConfig.model_fields}
            )
        except (OSError, yaml.YAMLError, AttributeError, ValidationError) as err:
            raise ExportError(f"cannot read the data section of {source.checkpoint_dir}/config.yaml: "
                              f"{one_line(err)}") from None
    if data.format != "sft":
        return None
    try:
        return resolve_template(tokenizer, data.sft.template, data.sft.system_prompt)
    except ValueError as err:
        raise ExportError(str(err)) from None


def _checkpoint_model_config(path: Path) -> ModelConfig:
    """The ``model`` section of a checkpoint's config.yaml. Only that section is read, and
    keys this version does not know are dropped, so checkpoints written by an older
    longtune (whose other sections may differ) still export."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        section = raw.get("model") or {}
        return ModelConfig.model_validate({k: v for k, v in section.items() if k in ModelConfig.model_fields})
    except (OSError, yaml.YAMLError, AttributeError, ValidationError) as err:
        raise ExportError(f"cannot read the model section of {path}: {one_line(err)}") from None


def output_dir(config: Config, source: AdapterSource) -> Path:
    """export.output_dir, else outputs/export/<base>-<target context>-<adapter>."""
    if config.export.output_dir:
        return Path(config.export.output_dir).expanduser().absolute()
    base = "seed" if config.model.name_or_path == SEED_MODEL else Path(config.model.name_or_path).name
    if source.checkpoint_dir is not None:  # <storage>/<run name>/checkpoint_000004
        label = f"{source.checkpoint_dir.parent.name}-{source.checkpoint_dir.name}"
    else:
        label = source.adapter_dir.name
    return outputs_path("export", f"{base}-{config.model.target_context}-{label}").absolute()


def check_replaceable(target: Path) -> None:
    """An existing target must be a previous export (or an empty directory)."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink():
        if (target / MARKER).is_file() or not any(target.iterdir()):
            return
    raise ExportError(
        f"export.output_dir {str(target)!r} exists and is not a longtune export (no {MARKER}); "
        "choose another --out or remove it"
    )


# ---------------------------------------------------------------- writing


def read_marker(target: Path | str) -> dict[str, Any]:
    """The ``longtune_export.json`` of an export, local or on an object store."""
    from longtune.storage import filesystem, is_remote

    if not is_remote(str(target)):
        return json.loads((Path(target) / MARKER).read_text(encoding="utf-8"))
    fs, root = filesystem(str(target))
    with fs.open_input_stream(f"{root.rstrip('/')}/{MARKER}") as f:
        return json.loads(f.read().decode("utf-8"))


def check_remote_replaceable(uri: str) -> None:
    """An export.output_dir URI must hold nothing, or a previous export."""
    from longtune.storage import PROBE_PREFIX, list_files

    files = list_files(uri)
    if files and MARKER not in files and not all(f.startswith(PROBE_PREFIX) for f in files):
        raise ExportError(
            f"export.output_dir {uri!r} holds objects and is not a longtune export (no {MARKER}); "
            "choose another --out or remove them"
        )


def publish_remote(local: Path, uri: str) -> None:
    """Upload the finished export ``local`` to ``uri``: first the previous export's marker
    goes (from then on readers see no export), then its files the new one lacks, then the
    new files with the marker last."""
    from longtune.storage import delete_files, list_files, upload_dir

    check_remote_replaceable(uri)  # again: something may have appeared meanwhile
    old = list_files(uri)
    if MARKER in old:
        delete_files(uri, [MARKER])
    new = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    delete_files(uri, [f for f in old if f != MARKER and f not in new])
    upload_dir(local, uri, last=(MARKER,))


def publish(target: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary directory beside ``target``, then rename it into
    place; a previous export at ``target`` is moved aside only once the new one is complete."""
    def write_and_recheck(tmp: Path) -> None:
        write(tmp)
        check_replaceable(target)  # again: something may have appeared meanwhile

    publish_dir(target, write_and_recheck)


def _write(tmp: Path, model, tokenizer, record: dict[str, Any]) -> None:
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    # transformers writes the weights through a private temporary file (mode 0600): give every
    # file the permissions the user's umask gives, so a server running as another user can read it
    mask = os.umask(0)
    os.umask(mask)
    for file in tmp.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~mask)
    (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")  # last


# ---------------------------------------------------------------- helpers


def _origin(local: Path, adapter_path: str | None, origin: str | None) -> str:
    """``local`` (below the copy of ``adapter_path``) as the path it was copied from."""
    if not origin or not adapter_path:
        return str(local)
    rel = Path(local).relative_to(Path(adapter_path)).as_posix()
    return origin.rstrip("/") + ("" if rel == "." else f"/{rel}")


def _tied(model) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and out is not None and getattr(out, "weight", None) is inp.weight


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
