"""Corpus preparation speed: tokens per second from files on disk to packed blocks on disk.

    python benchmarks/data.py                  # the stdlib corpus, seed tokenizer, blocks of 1024
    python benchmarks/data.py --context-length 4096 --workers 2

Three measurements on the same corpus (the default one: the standard library's .py files of
at least 8000 characters) with the same tokenizer (the seed BPE):
  (a) longtune   `longtune.data.prepare`: Ray Data read tasks, a pool of --workers tokenizer
                 actors, two packing passes, parquet + manifest. Ray is started before the
                 clock (as on a cluster); actor start-up, reading and writing are timed.
  (b) datasets   what users otherwise write (transformers' run_clm.py recipe): Hugging Face
                 `datasets` load_dataset("text", sample_by="document") -> map(tokenize,
                 num_proc=--workers) -> map(group_texts, num_proc=--workers) -> to_parquet,
                 with EOS appended to each document like (a).
  (c) raw        the tokenizer alone in one process on texts already in memory, no packing,
                 no I/O: the speed limit of one core (times --workers is the machine's limit).
Tokens counted are tokenized tokens including one EOS per document. Each method runs
--repeats times, interleaved (raw, datasets, longtune, raw, ...) so that a busy machine slows
all alike, each run from scratch (fresh datasets cache, fresh output); the best run counts.
Prints a table and writes benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (c) is one core; actors set it too
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtune.config import from_dict  # noqa: E402
from longtune.data.stdlib import stdlib_files  # noqa: E402
from longtune.seed import seed_tokenizer  # noqa: E402

MIN_DOC_CHARS = 8000


def corpus() -> tuple[list[Path], list[str]]:
    """The default corpus as prepare reads it: stdlib .py files >= 8000 chars, UTF-8 only."""
    paths, texts = [], []
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) >= MIN_DOC_CHARS and "\x00" not in text:
            paths.append(path)
            texts.append(text)
    return paths, texts


def bench_raw(texts: list[str], tokenizer, batch: int = 16) -> dict:
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        encodings = backend.encode_batch_fast(texts[i : i + batch], add_special_tokens=False)
        tokens += sum(len(e.ids) + 1 for e in encodings)  # + EOS, as the others count
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def bench_longtune(work: Path, context_length: int, workers: int, cache_dir: str | None) -> dict:
    work.mkdir(parents=True)
    import ray

    from rich.console import Console

    from longtune.data import prepare
    from longtune.runtime import init_ray, local_cpus_needed

    config = from_dict(
        {
            "model": {"cache_dir": cache_dir, "target_context": context_length},
            "data": {
                "prepared_path": str(work / "out"),
                "eval_fraction": 0.0,
                "min_doc_chars": MIN_DOC_CHARS,
                "tokenize_concurrency": workers,
            },
        }
    )
    init_ray(config)
    start = time.perf_counter()
    manifest = prepare(config, console=Console(quiet=True))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {
        "tokens": sum(manifest["tokens"]["tokenized"].values()),
        "seconds": seconds,
        "pipeline_seconds": manifest["elapsed_s"],
        "blocks": sum(manifest["blocks"].values()),
        "ray_logical_cpus": local_cpus_needed(config),
    }


def bench_datasets(work: Path, paths: list[Path], tokenizer, context_length: int, workers: int) -> dict:
    import datasets

    work.mkdir(parents=True)
    datasets.disable_progress_bars()
    eos = tokenizer.eos_token_id
    cache = work / "hf-cache"

    def tokenize(batch):
        out = tokenizer(batch["text"])
        return {k: [ids + [eos] if k == "input_ids" else ids + [1] for ids in v] for k, v in out.items()}

    def group_texts(examples):  # transformers/examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // context_length) * context_length
        result = {
            k: [t[i : i + context_length] for i in range(0, total_length, context_length)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    start = time.perf_counter()
    raw = datasets.load_dataset(
        "text", data_files=[str(p) for p in paths], sample_by="document", cache_dir=str(cache),
        split="train",
    )
    tokenized = raw.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
    blocks = tokenized.map(group_texts, batched=True, num_proc=workers)
    blocks.to_parquet(str(work / "datasets.parquet"))
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in tokenized["input_ids"])  # after the clock: counting only
    return {"tokens": tokens, "seconds": seconds, "blocks": len(blocks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2, help="tokenizer actors / num_proc")
    parser.add_argument("--cache-dir", default=None, help="seed tokenizer cache (model.cache_dir)")
    parser.add_argument("--only", nargs="+", choices=["longtune", "datasets", "raw"],
                        default=["raw", "datasets", "longtune"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the best counts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()

    tokenizer = seed_tokenizer(args.cache_dir)  # built (and cached) before any clock starts
    paths, texts = corpus()
    load_before = os.getloadavg()[0]  # others' work on a shared machine skews every number
    runs: dict[str, list[dict]] = {key: [] for key in args.only}
    work = Path(tempfile.mkdtemp(prefix="longtune-bench-data-"))
    try:
        for r in range(args.repeats):
            if "raw" in args.only:
                runs["raw"].append(bench_raw(texts, tokenizer))
            if "datasets" in args.only:
                runs["datasets"].append(
                    bench_datasets(work / f"datasets-{r}", paths, tokenizer, args.context_length, args.workers)
                )
            if "longtune" in args.only:
                runs["longtune"].append(
                    bench_longtune(work / f"longtune-{r}", args.context_length, args.workers, args.cache_dir)
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {}
    for key, measured in runs.items():
        best = dict(min(measured, key=lambda m: m["seconds"]))
        best["tokens_per_s"] = best["tokens"] / best["seconds"]
        best["all_seconds"] = [round(m["seconds"], 3) for m in measured]
        results[key] = best

    from rich.console import Console
    from rich.table import Table

    labels = {
        "longtune": "(a) longtune prepare (Ray Data)",
        "datasets": "(b) HF datasets map + group_texts",
        "raw": "(c) raw tokenizer, 1 process",
    }
    table = Table(title=f"prepare: {len(texts)} stdlib files, seed tokenizer, blocks of {args.context_length}, {args.workers} workers")
    for col in ("method", "tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for key in ("longtune", "datasets", "raw"):
        if key in results:
            r = results[key]
            table.add_row(labels[key], f"{r['tokens']:,}", f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}")
    Console().print(table)

    report = {
        "corpus": {"files": len(texts), "chars": sum(map(len, texts)), "min_doc_chars": MIN_DOC_CHARS},
        "context_length": args.context_length,
        "workers": args.workers,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
