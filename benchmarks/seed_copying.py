"""Does a seed-sized Llama learn to copy, and so to retrieve a passkey, within the first
run's budget? (#18) The measurement behind the README's "The LongLoRA comparison in
miniature": the seed recipe (longtune.seed: stdlib code at 256 tokens, its optimizer,
schedule and step) with rows mixed in that reward copying, and two probes every ``--every`` steps:

* copy probe: 32 held-out rows, each a random 16-token span, 40 tokens of code, the same
  span again. The mean loss on the second copy against the first: a model that copies
  (an induction head) scores the second far below the first; one that does not scores
  both near chance (ln of the span alphabet's size).
* passkey @ 256: longtune's passkey test (longtune.eval.passkey) at the seed's own context.

    python benchmarks/seed_copying.py                              # 2 layers, number spans
    python benchmarks/seed_copying.py --layers 4 --pool all --copy 0.3 --passkey 0.5 --steps 400

Rows of a batch are drawn independently: ``--passkey`` of them packed passkey training
documents (longtune.data.passkey.passkey_training_ids, lengths 64..256, keys never an
evaluation trial's), ``--copy`` of them copy rows (random spans of 4-24 tokens, each repeated
after 0-100 tokens of stdlib code), the rest stdlib code. ``--pool numbers`` draws span tokens
from the tokenizer's number tokens (what a key is made of); ``all`` from every ordinary token.
Prints a line per probe and a table, writes benchmarks/results/seed_copying.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--passkey", type=float, default=0.3, help="fraction of rows of passkey documents")
    p.add_argument("--copy", type=float, default=0.5, help="fraction of copy rows")
    p.add_argument("--pool", choices=("numbers", "all"), default="numbers")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/seed_copying.json")
    a = p.parse_args(argv)
    if not 0 <= a.passkey + a.copy <= 1 or min(a.passkey, a.copy) < 0:
        p.error(f"--passkey ({a.passkey}) and --copy ({a.copy}) must be >= 0 and add up to at most 1")

    import torch
    from transformers import LlamaForCausalLM

    from longtune import seed as S
    from longtune.data.passkey import passkey_training_ids
    from longtune.eval.passkey import passkey_retrieval
    from longtune.models import extend_rope

    torch.set_num_threads(a.threads)
    ctx = S.SEED_CONTEXT
    tok = S.seed_tokenizer()
    train, held = S.seed_corpus_tokens(tok)
    cfg = S.seed_model_config(tok)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = a.layers, a.hidden, int(a.hidden * 2.75)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt, sched = S.seed_optimizer(model, a.steps, a.lr)
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    numbers = sorted(i for k, i in tok.get_vocab().items() if k.lstrip("\u0120").isdigit())
    pool = numbers if a.pool == "numbers" else list(range(200, len(tok)))  # past bytes and specials
    next_doc = [0]

    def passkey_row() -> list[int]:
        ids: list[int] = []
        while len(ids) < ctx:
            ids += passkey_training_ids(tok, ctx, next_doc[0], 64)
            next_doc[0] += 1
        return ids[:ctx]

    def copy_row() -> list[int]:
        ids: list[int] = []
        while len(ids) < ctx:
            span = [rng.choice(pool) for _ in range(rng.randint(4, 24))]
            gap = rng.randint(0, 100)
            s = rng.randrange(0, len(train) - gap - 1)
            ids += span + train[s : s + gap].tolist() + span
        return ids[:ctx]

    def batch() -> torch.Tensor:  # (batch, ctx)
        rows = []
        for _ in range(a.batch):
            u = rng.random()
            if u < a.passkey:
                rows.append(passkey_row())
            elif u < a.passkey + a.copy:
                rows.append(copy_row())
            else:
                s = int(torch.randint(0, len(train) - ctx - 1, (1,), generator=gen))
                rows.append(train[s : s + ctx].tolist())
        return torch.tensor(rows)

    def copy_probe(m) -> tuple[float, float]:
        r = random.Random(123)
        rows = []
        for _ in range(32):  # 20 code, 16 span, 40 code, 16 span: 92 tokens
            span = [r.choice(pool) for _ in range(16)]
            s0 = r.randrange(0, len(held) - 100)
            rows.append(held[s0 : s0 + 20].tolist() + span + held[s0 + 20 : s0 + 60].tolist() + span)
        x = torch.tensor(rows)  # (32, 92)
        m.eval()
        with torch.no_grad():
            logits = m(x).logits[:, :-1]  # (32, 91, vocab): position t predicts token t+1
        m.train()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none").view(32, -1)
        # the span's tokens after its first token: predicted at 20..34 (first), 76..90 (second)
        return nll[:, -15:].mean().item(), nll[:, 20:35].mean().item()

    def passkey(m, n: int) -> float:  # longtune's own test; it restores the model's train mode
        return passkey_retrieval(m, tok, [n], a.trials, progress=False).scores[n].accuracy

    print(f"{a.layers} layers, hidden {a.hidden}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; rows: {a.passkey:.0%} passkey, {a.copy:.0%} copy ({a.pool}: {len(pool)} tokens, "
          f"chance {math.log(len(pool)):.2f} nats), the rest code; lr {a.lr}, {a.steps} steps of {a.batch}x{ctx}",
          flush=True)
    rows = []
    start = time.perf_counter()
    for step in range(1, a.steps + 1):
        # fp32 on every CPU (the seed itself autocasts to bf16 where the CPU has it), so
        # the probes' numbers do not depend on the CPU's bf16 support
        loss = S.seed_step(model, batch(), opt, sched, bf16=False)
        if step % a.every == 0 or step == a.steps:
            seconds = time.perf_counter() - start
            second, first = copy_probe(model)
            row = {"step": step, "seconds": round(seconds, 1), "loss": round(loss, 3),
                   "heldout_ppl": round(S.heldout_perplexity(model, held, ctx, 32), 1),
                   "copy_first_nll": round(first, 2), "copy_second_nll": round(second, 2),
                   "passkey_256": passkey(model, ctx)}
            model.train()
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    interpolated = copy.deepcopy(model)
    interpolated.config.max_position_embeddings = 4 * ctx
    extend_rope(interpolated.config, 4 * ctx, ctx)
    interpolated.model.rotary_emb = type(model.model.rotary_emb)(interpolated.config)
    after = {"passkey_1024_interpolated": passkey(interpolated, 4 * ctx)}
    print(f"interpolated x4, no training: passkey @ 1024 {after['passkey_1024_interpolated']:.0%}")

    from rich.console import Console
    from rich.table import Table

    table = Table(title="copying and passkey retrieval while pretraining a seed-sized model")
    for col in ("step", "seconds", "held-out ppl", "copy: 1st / 2nd nll", "passkey @ 256"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["step"]), f"{r['seconds']:.0f}", f"{r['heldout_ppl']:.1f}",
                      f"{r['copy_first_nll']:.2f} / {r['copy_second_nll']:.2f}", f"{r['passkey_256']:.0%}")
    Console().print(table)
    out = write_json(a.out, {"args": vars(a), "pool_size": len(pool), "rows": rows, **after})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
