"""The language-model loss of packed blocks, as token sums: what training optimizes and
what it logs and evaluates.

Sums, not means: a step's loss is the sum of token losses over its micro-batches and ranks
divided by the global number of target tokens, so a padded block weighs what its real tokens
weigh, and 2 workers x 1 block per step train exactly as 1 worker x 2 blocks.

The chunked LM head (``LanguageModelLoss`` with ``chunk_tokens``). At long context the
largest tensors of a LoRA step are the logits: [tokens, vocab], held in fp32 for the
cross-entropy and again for its gradient (16k tokens x 32k vocabulary: 2 GiB each). The
chunked loss runs the model up to its final hidden states, then the LM head and the
cross-entropy over ``chunk_tokens`` tokens at a time, each chunk under activation
checkpointing: its logits are freed as soon as its loss is summed and recomputed, chunk by
chunk, in the backward. At most one chunk's logits (and their gradient) exist at a time, for
one extra forward of the head. The arithmetic is the stock path's, row by row, so the loss
and every gradient (LoRA factors, trained embeddings, a tied head, saved modules) agree
with it to rounding.

What the head does after the decoder is read from the model's own forward (the installed
transformers' source): the Llama pattern (``hidden_states = outputs.last_hidden_state``,
sliced by ``logits_to_keep``, ``logits = self.lm_head(hidden_states)``), optionally followed
by a known post-processing of the logits: Gemma 2/3's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``. A model whose forward does anything else is
scored by the stock path (all logits at once), with one warning naming it.

The final hidden states are taken from the decoder's output by a forward hook while the
*whole* model runs its own forward (asked for no logits: ``logits_to_keep`` = no position),
so every hook on the model (S2-Attn's per-forward cache, PEFT's) runs as it always does. The
loss is a module so that the data-parallel wrapper (DDP, FSDP) wraps *it*: DDP only
prepares its gradient sync when its own forward runs, and a loss that called the inner
model around the wrapper would silently train each rank on its own gradient.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the label of a position that is not a target (transformers' convention)


def block_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids, labels of a batch of packed blocks ([B, N] each). A document's
    first token is not a target: nothing before it in the block belongs to its document (as
    transformers' DataCollatorWithFlattening does); padding is not a target either."""
    ids = batch["input_ids"].long()
    positions = batch["position_ids"].long()
    labels = ids.masked_fill(positions == 0, IGNORE)
    if "loss_mask" in batch:
        labels = labels.masked_fill(batch["loss_mask"] == 0, IGNORE)
    return ids, positions, labels


def target_count(labels: torch.Tensor) -> int:
    """Next-token targets in ``labels`` [B, N]: position t predicts labels[:, t + 1]."""
    return int((labels[:, 1:] != IGNORE).sum())


def token_loss_sum(model, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the targets of ``labels`` (fp32 scalar), from
    the logits of the whole block at once (the stock path): the model's own ``loss`` is a
    mean, and PEFT's AdaLoRA adds its orthogonality penalty to it. ``labels`` may run one
    token past ``ids`` (a shard of a sequence: its last token's target is the next shard's
    first, ``longtune/train/sequence.py``)."""
    logits = model(input_ids=ids, position_ids=positions).logits  # [B, N, V]
    return F.cross_entropy(
        logits[:, : labels.shape[1] - 1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


class LanguageModelLoss(nn.Module):
    """``forward(input_ids, position_ids, labels) -> fp32 scalar``: the summed next-token
    cross-entropy of ``model`` (a transformers causal LM, or a PEFT wrapper of one) over the
    targets of ``labels`` ([B, N] each; ``IGNORE`` is not a target).

    ``chunk_tokens``: the LM head and the loss run over that many tokens at a time (see the
    module docstring); None = the stock path. Wrap this module, not the model, in DDP/FSDP.
    ``chunked`` says whether the chunked path is in use (False for None or for a model whose
    head it cannot reproduce exactly)."""

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None) -> None:
        super().__init__()
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_fsdp1(model):
            raise TypeError(
                f"LanguageModelLoss got a {type(model).__name__}: wrap the loss in the data-parallel "
                "wrapper (DDP(LanguageModelLoss(model))), not the model, or its gradient sync is bypassed"
            )
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"train.loss_chunk_tokens must be a positive number of tokens, got {chunk_tokens}")
        self.model = model
        self.chunk_tokens = chunk_tokens
        # a plain object, not a submodule: the head's modules are already the model's
        self._head = None if chunk_tokens is None else chunked_head(model)

    @property
    def chunked(self) -> bool:
        return self._head is not None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._head is None:
            return token_loss_sum(self.model, input_ids, position_ids, labels)
        hidden = self._head.final_hidden(self.model, input_ids, position_ids)  # [B, N, H]
        # labels: [B, N], or [B, N + 1] for a shard of a sequence (see token_loss_sum)
        return chunked_loss_sum(hidden[:, : labels.shape[1] - 1], labels[:, 1:], self._head.logits, self.chunk_tokens)


def chunked_loss_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int,
) -> torch.Tensor:
    """Sum of the cross-entropies of ``logits_of(hidden)`` against ``targets`` (``IGNORE``
    excluded), over chunks of about ``chunk_tokens`` tokens (whole rows of the batch, split
    along the sequence) so that one chunk's logits exist at a time. hidden [B, T, H] ->
    logits_of -> [B, T, V]; targets [B, T]. Under autograd each chunk is checkpointed: its
    logits are recomputed in the backward. One chunk is computed as is (nothing to save)."""
    batch, length = targets.shape
    step = max(1, chunk_tokens // max(batch, 1))  # sequence positions per chunk
    if step >= length:
        return _chunk_loss(logits_of, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for h, t in zip(hidden.split(step, dim=1), targets.split(step, dim=1)):  # [B, c, H], [B, c]
        if recompute:
            total = total + checkpoint(_chunk_loss, logits_of, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(logits_of, h, t)
    return total


def _chunk_loss(logits_of, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits_of(hidden)  # [B, c, V]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


# ---------------------------------------------------------------- what the head does


@dataclass(frozen=True)
class ChunkedHead:
    """How a causal LM turns final hidden states into logits, as its forward does it:
    ``lm_head`` then ``post`` (a logits post-processing, or None)."""

    causal_lm: nn.Module  # the transformers model (inside any PEFT wrapper)
    post: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.causal_lm.lm_head(hidden)  # looked up each call: PEFT may swap it
        return logits if self.post is None else self.post(self.causal_lm, logits)

    def final_hidden(self, model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state [B, N, H] (what ``lm_head`` reads), from a forward
        of the whole ``model`` that computes no logits."""
        captured: list[torch.Tensor] = []

        def keep(_module, _args, output):
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = self.causal_lm.model.register_forward_hook(keep)
        try:
            no_position = torch.zeros(0, dtype=torch.long, device=ids.device)
            model(input_ids=ids, position_ids=positions, logits_to_keep=no_position)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"{type(self.causal_lm).__name__}: expected its decoder to run once per forward, "
                f"it ran {len(captured)} times; set train.chunked_loss=false"
            )
        return captured[0]


def _softcap(causal_lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = causal_lm.config.final_logit_softcapping
    if cap is None:
        return logits
    logits = logits / cap
    logits = torch.tanh(logits)
    return logits * cap


def _times_logit_scale(causal_lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits * causal_lm.logit_scale


def _over_logits_scaling(causal_lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits / causal_lm.config.logits_scaling


_HIDDEN = (  # the statements after the decoder call, as ast.unparse writes them
    r"hidden_states = (outputs\.last_hidden_state|outputs\[0\])",
    r"hidden_states = slice_logits_to_keep\(hidden_states, logits_to_keep\)",
    r"logits = self\.lm_head\(hidden_states\)",
)
_POST: dict[tuple[str, ...], Callable | None] = {  # the statements after the head -> what they do
    (): None,
    (
        (
            "if self.config.final_logit_softcapping is not None:\n"
            "    logits = logits / self.config.final_logit_softcapping\n"
            "    logits = torch.tanh(logits)\n"
            "    logits = logits * self.config.final_logit_softcapping"
        ),
    ): _softcap,
    ("logits = logits * self.logit_scale",): _times_logit_scale,
    ("logits = logits / self.config.logits_scaling",): _over_logits_scaling,
}
_WARNED: set[str] = set()


def chunked_head(model: nn.Module) -> ChunkedHead | None:
    """The head of ``model`` (a causal LM or a PEFT wrapper of one) when its forward is one the
    chunked loss reproduces exactly (module docstring); else None, warning once per model
    class that the stock path is used."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    post, reason = _read_forward(causal_lm)
    if reason is None:
        return ChunkedHead(causal_lm, post)
    name = type(causal_lm).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"train.chunked_loss: {name} is trained on its whole-block logits (the stock loss), "
            f"not in chunks: {reason}",
            stacklevel=3,
        )
    return None


def _read_forward(causal_lm: nn.Module) -> tuple[Callable | None, str | None]:
    """(post-processing, None) when ``causal_lm.forward`` is its decoder, its head and a known
    post-processing of the logits; (None, why not) otherwise."""
    if not isinstance(getattr(causal_lm, "model", None), nn.Module) or not isinstance(
        getattr(causal_lm, "lm_head", None), nn.Module
    ):
        return None, "it has no .model decoder and .lm_head"
    forward = type(causal_lm).forward
    if forward not in _READ:
        _READ[forward] = _read_source(forward)
    return _READ[forward]


_READ: dict[Callable, tuple[Callable | None, str | None]] = {}  # one parse per forward


def _read_source(forward: Callable) -> tuple[Callable | None, str | None]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None, "the source of its forward cannot be read"
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef):
        return None, "its forward is not a plain function"
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    call = next((i for i, s in enumerate(body) if _is_decoder_call(s)), None)
    if call is None:
        return None, "its forward does not call self.model(...) as outputs"
    if not all(_assigns(s) == {"output_router_logits"} for s in body[:call]):
        return None, "its forward does more than call its decoder before the head"
    rest = [ast.unparse(s) for s in body[call + 1 :]]
    if len(rest) < len(_HIDDEN) or not all(re.fullmatch(p, s) for p, s in zip(_HIDDEN, rest)):
        return None, "its forward does not apply lm_head to the decoder's last hidden state as Llama does"
    rest = rest[len(_HIDDEN) :]
    end = next((i for i, s in enumerate(rest) if s == "loss = None" or s.startswith("if labels is not None")), None)
    tail = tuple(rest[:end]) if end is not None else None
    if tail not in _POST:
        return None, "its forward post-processes the logits in a way the chunked loss does not know"
    return _POST[tail], None


def _is_decoder_call(statement: ast.stmt) -> bool:
    """``outputs = self.model(...)`` (annotated or not)."""
    if not isinstance(statement, (ast.Assign, ast.AnnAssign)) or _assigns(statement) != {"outputs"}:
        return False
    value = statement.value
    return isinstance(value, ast.Call) and ast.unparse(value.func) == "self.model"


def _assigns(statement: ast.stmt) -> set[str]:
    if isinstance(statement, ast.Assign):
        return {ast.unparse(t) for t in statement.targets}
    if isinstance(statement, ast.AnnAssign):
        return {ast.unparse(statement.target)}
    return set()


def _is_fsdp1(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)
