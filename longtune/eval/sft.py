"""Evaluation of supervised fine-tuning (``data.format: sft``) on held-out examples.

- ``response_loss``: the mean next-token cross-entropy over the response tokens (the
  examples' targets, EOS included) of up to ``eval.sft_examples`` held-out examples, each
  scored alone with full attention and positions from 0.
- ``exact_match``: of those examples, the ones whose last response is at most
  ``eval.sft_answer_tokens`` tokens are prompted with everything before that response and
  answered greedily; a trial passes when the answer, decoded without special tokens and
  stripped of surrounding whitespace, equals the reference. ``exact_match_trials`` says how
  many were answered.

The held-out examples are the eval split of ``data.sources`` (read on the driver, the same
records, template and truncation as training) or of ``data.prepared_path`` (its eval
blocks, unpacked).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from longtune.config import Config
from longtune.eval.errors import EvalError
from longtune.eval.perplexity import _device_of, _progress, full_attention_eval

Example = tuple[np.ndarray, np.ndarray]  # ids (n,) int32, targets (n,) int8


def load_eval_examples(config: Config, tokenizer) -> list[Example]:
    """Up to ``eval.sft_examples`` held-out examples as (ids, targets)."""
    limit = config.eval.sft_examples
    if limit == 0:
        return []
    if config.data.prepared_path:
        examples = _prepared_examples(config.data.prepared_path, tokenizer, limit)
    else:
        examples = _source_examples(config, tokenizer, limit)
    if not examples:
        raise EvalError(
            f"no held-out SFT examples in {config.data.prepared_path or config.data.sources} "
            "(data.eval_fraction too small for so few records?); raise data.eval_fraction or set "
            "eval.sft_examples=0"
        )
    return examples


def _source_examples(config: Config, tokenizer, limit: int) -> list[Example]:
    from longtune.data.pack import DOC
    from longtune.data.pipeline import read_options, sft_template
    from longtune.data.sft import RecordError, encode_example
    from longtune.data.sources import discover, read_file

    import json

    d = config.data
    if d.eval_fraction <= 0:
        raise EvalError("data.eval_fraction is 0: no SFT examples are held out; set it > 0 or eval.sft_examples=0")
    opts = read_options(config)
    _, template = sft_template(config, tokenizer)
    out: list[Example] = []
    for entry in discover(d.sources, d.min_doc_chars).files:
        for row in read_file(entry, opts):
            if row["kind"] != DOC or row["split"] != "eval":
                continue
            try:
                ex = encode_example(
                    tokenizer, template, json.loads(row["text"]), max_tokens=config.context_length,
                    overlong=d.sft.overlong, train_on_prompt=d.sft.train_on_prompt,
                )
            except RecordError:
                continue  # counted by prepare; not an eval example either
            out.append((ex.ids, ex.targets))
            if len(out) >= limit:
                return out
    return out


def _prepared_examples(path: str, tokenizer, limit: int) -> list[Example]:
    import pyarrow.parquet as pq

    from longtune.data.manifest import check_manifest, read_manifest
    from longtune.data.pack import unpack_examples
    from longtune.data.sources import resolve
    from longtune.data.tokenize import vocab_hash

    fs, root = resolve(path)
    manifest = read_manifest(fs, root, path)
    check_manifest(manifest, path, vocab_hash(tokenizer), None)
    if manifest.get("data_format") != "sft":
        raise EvalError(f"{path} holds text blocks, not SFT examples (prepare it with data.format=sft)")
    out: list[Example] = []
    for name in manifest["splits"].get("eval", {}).get("files", []):
        with fs.open_input_file(f"{root.rstrip('/')}/{name}") as f:
            table = pq.read_table(f)
        arrays = [np.stack(table[c].to_numpy(zero_copy_only=False)) for c in ("input_ids", "position_ids", "loss_mask")]
        out += unpack_examples(*arrays)
        if len(out) >= limit:
            break
    return out[:limit]


def last_response(targets: np.ndarray) -> tuple[int, int]:
    """[start, end) of the last run of targets."""
    idx = np.flatnonzero(targets)
    end = int(idx[-1]) + 1
    breaks = np.flatnonzero(np.diff(idx) > 1)
    start = int(idx[breaks[-1] + 1]) if len(breaks) else int(idx[0])
    return start, end


def sft_scores(model, tokenizer, examples: list[Example], *, answer_tokens: int, console=None,
               progress: bool = True) -> dict[str, float]:
    """``response_loss``, ``exact_match`` and ``exact_match_trials`` of ``model`` on
    ``examples`` (see the module docstring)."""
    device = _device_of(model)
    total, count = 0.0, 0
    passed, trials = 0, 0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with full_attention_eval(model), torch.inference_mode(), _progress(console, progress, "examples") as bar:
        task = bar.add_task("SFT eval", total=len(examples))
        for ids, targets in examples:
            x = torch.as_tensor(ids, dtype=torch.long, device=device)[None]  # (1, n)
            positions = torch.arange(x.shape[1], device=device)[None]
            logits = model(input_ids=x, position_ids=positions).logits[0, :-1].float()  # (n-1, V)
            mask = torch.as_tensor(targets[1:], dtype=torch.bool, device=device)  # token t+1 is a target
            nll = F.cross_entropy(logits[mask], x[0, 1:][mask], reduction="sum")
            total += float(nll)
            count += int(mask.sum())
            start, end = last_response(targets)
            if 0 < start and end - start <= answer_tokens:
                reference = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True).strip()
                out = model.generate(
                    input_ids=x[:, :start], attention_mask=torch.ones_like(x[:, :start]), do_sample=False,
                    max_new_tokens=end - start + 2, eos_token_id=eos, pad_token_id=pad,
                )
                answer = tokenizer.decode(out[0, start:].tolist(), skip_special_tokens=True).strip()
                passed += answer == reference
                trials += 1
            bar.advance(task)
    if not count:
        raise EvalError("the held-out SFT examples have no response tokens to score")
    scores = {"response_loss": total / count}
    if trials:
        scores["exact_match"] = passed / trials
    scores["exact_match_trials"] = float(trials)
    return scores
