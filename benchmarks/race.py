"""A standing race: longtune against what a user would run instead, on the same model, data,
context and threads, one after the other.

    python benchmarks/race.py                                  # 2048 and 8192 tokens, 3 passes
    python benchmarks/race.py --contexts 2048 --passes 1 --steps 8   # a smoke run

Contenders, each in a fresh process, in turn within a pass (so a slower minute of the machine
slows all of them alike):
- ``hf``: a plain Hugging Face ``Trainer`` with PEFT, LongLoRA's LoRA+ recipe (r=8, alpha 16 on
  q/k/v/o; embeddings and norms trained, as LongLoRA's ``trainable_params="embed,norm"``), the
  corpus packed ``group_texts``-style (documents joined with EOS and cut into blocks:
  documents attend to each other), SDPA attention, bf16 autocast, gradient checkpointing.
- ``trl`` (when TRL is installed): TRL's ``SFTTrainer`` on the same documents with its
  padding-free packing (``packing=True, padding_free=True``: best-fit-decreasing packing,
  positions restarting at each document), the same PEFT adapter, SDPA, bf16, checkpointing.
- ``full`` and ``s2``: the ``longtune finetune`` job as a user starts it (``python
  pipelines/finetune.py``: a local Ray, one TorchTrainer worker holding the machine's threads,
  the worker reading its share of the blocks ``longtune prepare`` packed from the same corpus, positions
  restarting at each document, MLflow on a SQLite store), with full attention and S2-Attn.

The model is a random seed-shaped Llama (hidden 256, 6 layers, 8 heads, vocab 4096 = the seed
tokenizer's) saved once with its tokenizer; the corpus the embedded stdlib one, in its sorted
order. Speed is the steady state: the median wall-clock of the steps after the first
``--warmup`` (the Trainers: a callback's step boundaries; longtune: the ``train/step_time_s``
it logs to MLflow, log windows of ``--log-every`` steps, the first window left out), tokens a
step over it. Start-up (Ray, tokenizing, building the model) is not counted for anyone: it is
paid once a run, not per token. The table is the median over ``--passes`` per contender.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import median, write_json  # noqa: E402
from benchmarks.ray_overhead import job_settings, prepare, run_job, save_model  # noqa: E402

CONTENDERS = ("hf", "trl", "full", "s2")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def corpus_documents(tokens_needed: int, tokenizer) -> list[tuple[str, list[int]]]:
    """(text, token ids) of the embedded stdlib corpus's documents, as `longtune prepare`
    discovers them (files of at least data.min_doc_chars, in its order), as many as hold
    ``tokens_needed`` tokens: the Trainers tokenize what they are given up front, and the
    whole library would take minutes."""
    from longtune.config import Config
    from longtune.data.sources import discover

    docs, total = [], 0
    for entry in discover(["stdlib"], Config().data.min_doc_chars).files:
        text = Path(entry.uri).read_text(encoding="utf-8", errors="replace")
        ids = tokenizer(text)["input_ids"]
        docs.append((text, ids))
        total += len(ids) + 1
        if total >= tokens_needed:
            break
    return docs


def lora_plus(model):
    """PEFT LoRA r=8, alpha 16 on q/k/v/o, then embeddings and norms trained (LongLoRA's
    ``trainable_params="embed,norm"``)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES,
                                             task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "embed" in name or "norm" in name:
            param.requires_grad_(True)
    return model


def training_arguments(cls, out: str, steps: int, **extra):
    from longtune.precision import native_bf16

    # bf16 autocast where longtune's train.precision=auto takes it (AVX512-BF16 or AMX)
    return cls(output_dir=out, max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=1,
               learning_rate=2e-5, warmup_steps=0, weight_decay=0.0, lr_scheduler_type="constant",
               bf16=native_bf16("cpu"), use_cpu=True, gradient_checkpointing=True,
               gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=10**6, save_strategy="no",
               report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock of each optimizer step, from its start to its end (data loading included,
        as the Trainer runs it between steps)."""

        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def run_hf(model_dir: str, context: int, steps: int) -> dict:
    """HF Trainer + PEFT on group_texts blocks of the corpus."""
    from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for _, doc in corpus_documents(context * (steps + 1), tokenizer):
        ids += doc + [tokenizer.eos_token_id]
    blocks = [torch.tensor(ids[i * context:(i + 1) * context]) for i in range(len(ids) // context)][:steps]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    model = lora_plus(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa"))
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=training_arguments(TrainingArguments, out, steps), train_dataset=Blocks(),
                          callbacks=[timer])
        trainer.train()
    return {"step_s": timer.times, "tokens": [context] * len(timer.times)}


def run_trl(model_dir: str, context: int, steps: int) -> dict:
    """TRL's SFTTrainer with padding-free packing on the corpus's documents."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [text for text, _ in corpus_documents(context * (steps + 2), tokenizer)]
    model = lora_plus(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa"))
    timer = step_timer()
    tokens: list[int] = []

    class Counted:
        """The collator's batches' real tokens (a padding-free batch is one row of packed
        documents up to max_length; a step's tokens are what it trained on)."""

        def __init__(self, collator):
            self.collator = collator

        def __call__(self, examples):
            batch = self.collator(examples)
            tokens.append(int(batch["input_ids"].numel()))
            return batch

    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(SFTConfig, out, steps, max_length=context, packing=True, padding_free=True,
                                  dataset_text_field="text")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                             processing_class=tokenizer, callbacks=[timer])
        trainer.data_collator = Counted(trainer.data_collator)
        trainer.train()
    return {"step_s": timer.times, "tokens": tokens[:len(timer.times)]}


def steady(result: dict, warmup: int) -> tuple[float, float]:
    """(median step seconds, tokens/s) of the steps after the warm-up."""
    times, tokens = result["step_s"][warmup:], result["tokens"][warmup:]
    step = median(times)
    return step, median(tokens) / step


def run_contender(name: str, model_dir: str, context: int, args, tmp: Path, prepared: Path, index: int) -> dict:
    if name in ("hf", "trl"):
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, __file__, "--_trainer", name, model_dir, str(context), str(args.steps)]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        step, tok_s = steady(result, args.warmup)
        return {"step_s": step, "tokens_per_s": tok_s, "tokens_per_step": median(result["tokens"])}
    settings = job_settings(model_dir, context, name, args.steps, args.log_every)
    settings.append(f"data.prepared_path={prepared}")
    job = run_job(settings, args.steps, tmp / "mlflow.db", f"race-{name}-{context}-{index}", sample=False)
    step = median(job["step_s"])
    return {"step_s": step, "tokens_per_s": context / step, "tokens_per_step": context}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps a run")
    p.add_argument("--warmup", type=int, default=4, help="the Trainers' first steps left out")
    p.add_argument("--log-every", type=int, default=4, help="longtune's log window (its first one left out)")
    p.add_argument("--out", default="benchmarks/results/race.json")
    p.add_argument("--_trainer", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._trainer:
        name, model_dir, context, steps = args._trainer
        torch.manual_seed(0)
        result = (run_hf if name == "hf" else run_trl)(model_dir, int(context), int(steps))
        print(json.dumps(result))
        return
    if args.steps <= args.warmup or args.steps < 2 * args.log_every:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) and be at least 2 x --log-every "
                f"({args.log_every}): the first steps are warm-up")
    contenders = list(args.contenders)
    if "trl" in contenders:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install trl): racing without SFTTrainer", flush=True)
            contenders.remove("trl")
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="longtune-race-"))
    model_dir = save_model(tmp / "model")
    print(f"Race: {', '.join(contenders)}; a Llama of hidden 256, 6 layers, vocab 4096, LoRA r=8 + embeddings and "
          f"norms, bf16 autocast, gradient checkpointing, {threads} threads, {args.steps} steps a run, "
          f"{args.passes} passes, torch {torch.__version__}", flush=True)
    rows = []
    for context in args.contexts:
        prepared = prepare(model_dir, context, tmp / f"prepared-{context}")
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        for i in range(args.passes):
            for name in contenders:
                start = time.perf_counter()
                runs[name].append(run_contender(name, model_dir, context, args, tmp, prepared, i))
                r = runs[name][-1]
                print(f"  {context} pass {i + 1} {name}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        row = {"context": context, "threads": threads, "steps": args.steps, "passes": args.passes}
        for name in contenders:
            row[f"{name}_tokens_per_s"] = median(r["tokens_per_s"] for r in runs[name])
            row[f"{name}_step_s"] = median(r["step_s"] for r in runs[name])
            row[f"{name}_runs"] = runs[name]
        if "hf" in contenders:
            for name in contenders:
                # per pass: each pass's contenders ran back to back
                row[f"{name}_vs_hf"] = median(a["tokens_per_s"] / b["tokens_per_s"]
                                              for a, b in zip(runs[name], runs["hf"]))
        rows.append(row)
    names = {"hf": "HF Trainer + PEFT", "trl": "TRL SFTTrainer (padding-free)", "full": "longtune full",
             "s2": "longtune S2-Attn"}
    ratios = [c for c in contenders if c != "hf" and "hf" in contenders]
    print("\n| context | " + " | ".join(names[c] for c in contenders) + " | "
          + " | ".join(f"{c} / hf" for c in ratios) + " |")
    print("| --- " * (1 + len(contenders) + len(ratios)) + "|")
    for row in rows:
        print(f"| {row['context']} | " + " | ".join(f"{row[f'{c}_tokens_per_s']:,.0f} tok/s" for c in contenders)
              + " | " + " | ".join(f"{row[f'{c}_vs_hf']:.2f}x" for c in ratios)
              + " |")
    print(f"wrote {write_json(args.out, {'rows': rows})}")


if __name__ == "__main__":
    main()
