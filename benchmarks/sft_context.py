"""Does an SFT-tuned model use its prompt's long context? (#19) The measurement behind the
README's "Long-context SFT" numbers: up to ``--examples`` held-out examples of an SFT config
(default: the embedded demo, pipelines/configs/sft.yaml) scored twice, with their own prompt
and with another held-out record's context under the same question, for the interpolated
base and for base + ``--adapter``. A model that reads the context scores its own far better;
one that has only learnt the answers' form scores both alike.

    python benchmarks/sft_context.py --adapter outputs/ray/<run>/checkpoint_<...>/adapter

The context is everything before the prompt's last paragraph (stdlib-qa: the excerpt; the
question is the last paragraph). Examples that do not fit a block whole are left out.
Prints a table, writes benchmarks/results/sft_context.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="pipelines/configs/sft.yaml")
    p.add_argument("--adapter", required=True, help="the tuned adapter directory")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/sft_context.json")
    args = p.parse_args(argv)

    import torch

    from longtune.adapters import load_adapter
    from longtune.config import load_config
    from longtune.data.pack import DOC
    from longtune.data.pipeline import read_options, sft_template
    from longtune.data.sft import RecordError, encode_example
    from longtune.data.sources import discover, read_file
    from longtune.eval.sft import sft_scores
    from longtune.models import load_model, load_tokenizer_for

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    tokenizer = load_tokenizer_for(config.model)
    _, template = sft_template(config, tokenizer)
    records = [json.loads(row["text"]) for entry in discover(config.data.sources, config.data.min_doc_chars).files
               for row in read_file(entry, read_options(config)) if row["kind"] == DOC and row["split"] == "eval"]
    records = [r for r in records if len(r) == 2 and "\n\n" in r[0]["content"]]

    def encoded(messages):
        try:
            ex = encode_example(tokenizer, template, messages, max_tokens=config.context_length, overlong="drop")
        except RecordError:
            return None
        return ex.ids, ex.targets

    own, swapped = [], []
    for i, (user, answer) in enumerate(records):
        other = records[(i + 1) % len(records)][0]["content"].rsplit("\n\n", 1)[0]
        question = user["content"].rsplit("\n\n", 1)[1]
        a = encoded([user, answer])
        b = encoded([{"role": "user", "content": f"{other}\n\n{question}"}, answer])
        if a and b:
            own.append(a)
            swapped.append(b)
        if len(own) >= args.examples:
            break

    rows = {}
    start = time.perf_counter()
    for name, adapter in (("base + interpolation", None), ("tuned", args.adapter)):
        model, _ = load_model(config.model, on_gpu=False, for_training=False)
        if adapter:
            model = load_adapter(model, adapter)
        rows[name] = {
            "own_context": sft_scores(model, tokenizer, own, answer_tokens=config.eval.sft_answer_tokens, progress=False),
            "other_context": sft_scores(model, tokenizer, swapped, answer_tokens=config.eval.sft_answer_tokens,
                                        progress=False),
        }
    print(f"{len(own)} held-out examples ({time.perf_counter() - start:.0f} s)")
    print("| model | response loss, own context | response loss, another's | exact match, own | exact match, another's |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        o, s = r["own_context"], r["other_context"]
        print(f"| {name} | {o['response_loss']:.3f} | {s['response_loss']:.3f} | "
              f"{o.get('exact_match', 0):.0%} | {s.get('exact_match', 0):.0%} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "adapter": args.adapter, "examples": len(own), "rows": rows},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
