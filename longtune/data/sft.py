"""Supervised fine-tuning data (``data.format: sft``): instruction and chat records ->
conversations -> token ids with a loss target mask -> packed blocks.

Pure Python/numpy, no Ray: the pipeline calls these inside its Ray Data steps, evaluation
calls them on the driver, the tests call them directly.

Records. A LongAlpaca-style record has ``instruction`` (and optional ``input``) and
``output``; a chat record has ``messages``, a list of ``{role, content}`` with roles system
(first only), user and assistant, user and assistant alternating, at least one assistant
turn. Field names are configurable (``data.sft``). A record that breaks a rule is skipped
with its reason (``RecordError``), never fatal.

Prompting. Every template is a Jinja chat template, rendered by the tokenizer's
``apply_chat_template``: the tokenizer's own (``template: chat``, or ``auto`` when it has
one) or one of longtune's named ones (``llama2``: LongLoRA's ``[INST]`` format; ``plain``:
Alpaca's ``### Instruction`` / ``### Response``), with ``data.sft.system_prompt`` baked in
as the default system message. The same text is the chat template of an exported model, so
it is prompted at inference exactly as it was trained.

Targets. For each assistant turn i, the conversation up to turn i with the generation
prompt and the conversation through turn i are rendered; the characters between the two
(the response and the template's end of turn: EOS, or ``<|im_end|>``) are the target
span. The whole conversation is tokenized once with offsets, and a token is a target when
it starts inside a target span. A template whose renderings are not prefixes of each other
cannot be masked this way and is refused. Content holding one of the tokenizer's special
tokens (``</s>``, ``<|im_start|>``...) is skipped: it would tokenize as control tokens.

Overlong examples (more tokens than a block): ``truncate`` cuts tokens from the start of
the first user message's content (the long document of a LongAlpaca record), never from a
response or the template; an example whose responses and template alone overflow is
dropped. ``drop`` drops every overlong example. Both are counted.

Packing (``longtune.data.pack``) never splits an example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")
TEMPLATES = ("auto", "chat", "llama2", "plain")

# LongLoRA's supervised-fine-tune.py prompt ("prompt_no_input_llama2"), as Meta's Llama-2
# chat format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>
_LLAMA2 = (
    "{%- set ns = namespace(system=DEFAULT_SYSTEM) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set sys = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' if loop.first and ns.system else '' -%}"
    "{{ (bos_token if bos_token else '') + '[INST] ' + sys + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{%- else -%}{{ raise_exception('role ' + m['role'] + ' is not system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# Alpaca's layout; the separator comes before a turn, so nothing follows a response's EOS.
# (Text is written as {{ expressions }}: a {%- tag would strip the newlines around it.)
_PLAIN = (
    "{%- set ns = namespace(system=DEFAULT_SYSTEM) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{ bos_token if bos_token else '' }}"
    "{{ ns.system + '\\n\\n' if ns.system else '' }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ ('' if loop.first else '\\n\\n') + '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ m['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('role ' + m['role'] + ' is not system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_NAMED = {"llama2": _LLAMA2, "plain": _PLAIN}


class RecordError(ValueError):
    """A record that cannot become a training example; ``reason`` says why, ``kind`` is
    ``"long"`` for one that does not fit a block, else ``"error"``."""

    def __init__(self, reason: str, kind: str = "error"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass(frozen=True)
class SftFields:
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"


def named_template(name: str, system_prompt: str | None = None) -> str:
    """longtune's Jinja text for template ``name`` (llama2 | plain), with ``system_prompt``
    as the default system message (a record's own system message wins)."""
    if name not in _NAMED:
        raise ValueError(f"data.sft.template: no template {name!r}; longtune has {sorted(_NAMED)}")
    return "{%- set DEFAULT_SYSTEM = " + json.dumps(system_prompt or "") + " -%}" + _NAMED[name]


def resolve_template(tokenizer, template: str, system_prompt: str | None = None) -> tuple[str, str]:
    """(name, Jinja text) of the template a job uses: ``chat`` = the tokenizer's own chat
    template (which must exist), ``auto`` = it when there is one, else ``llama2``."""
    if template not in TEMPLATES:
        raise ValueError(f"data.sft.template must be one of {TEMPLATES}, got {template!r}")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if template == "chat" or (template == "auto" and own):
        if not own:
            raise ValueError(
                "data.sft.template=chat, but the tokenizer has no chat template; use "
                "template: llama2 or plain"
            )
        return "chat", own
    name = "llama2" if template == "auto" else template
    return name, named_template(name, system_prompt)


# ------------------------------------------------------------------ records -> messages


def _text_field(record: dict, name: str, what: str, *, required: bool = True) -> str:
    if name not in record or record[name] is None:
        if required:
            fields = ", ".join(list(record)[:8])
            raise RecordError(f"no field {name!r} ({what}); fields: {fields}")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not a string")
    return value


def record_messages(record: Any, fields: SftFields = SftFields()) -> list[dict[str, str]]:
    """One record as a conversation (a list of {role, content}); RecordError if it is not a
    valid instruction or chat record."""
    if not isinstance(record, dict):
        raise RecordError(f"a JSON {type(record).__name__}, not an object")
    if fields.messages in record:
        return check_messages(record[fields.messages], fields.messages)
    if fields.instruction not in record:
        keys = ", ".join(list(record)[:8])
        raise RecordError(
            f"neither {fields.messages!r} nor {fields.instruction!r} (data.sft fields); fields: {keys}"
        )
    instruction = _text_field(record, fields.instruction, "the instruction")
    extra = _text_field(record, fields.input, "the input", required=False)
    output = _text_field(record, fields.output, "the response")
    if not instruction.strip():
        raise RecordError(f"empty instruction (field {fields.instruction!r})")
    if not output.strip():
        raise RecordError(f"empty response (field {fields.output!r})")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def check_messages(messages: Any, name: str = "messages") -> list[dict[str, str]]:
    """``messages`` checked: a list of {role, content} strings, roles system (first only),
    then user and assistant alternating from user, at least one non-empty assistant turn,
    no empty response. A trailing user turn (nothing answers it) is dropped."""
    if not isinstance(messages, list):
        raise RecordError(f"field {name!r} is {type(messages).__name__}, not a list of messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{name}[{i}] is not an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            raise RecordError(f"{name}[{i}].{bad} is {type(m[bad]).__name__}, not a string")
        if role not in ROLES:
            raise RecordError(f"{name}[{i}] has role {role!r}; the templates know {', '.join(ROLES)}")
        out.append({"role": role, "content": content})
    body = out[1:] if out and out[0]["role"] == "system" else out
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = i + (len(out) - len(body))
            raise RecordError(
                f"{name}[{where}] is a {m['role']} turn where a {expected} turn belongs (a system "
                "message first, then user and assistant alternating)"
            )
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"{name}[{i + len(out) - len(body)}] is an empty response")
    if not any(m["role"] == "assistant" for m in body):
        raise RecordError(f"{name} has no assistant turn: nothing to train on")
    if body[-1]["role"] == "user":
        out = out[:-1]
    return out


# ------------------------------------------------------------------ messages -> tokens


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # (n,) int32
    targets: np.ndarray  # (n,) int8: 1 where the token is a loss target
    truncated: int  # prompt tokens cut from the start of the first user message


def _render(tokenizer, template: str, messages, generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as exc:
        raise RecordError(f"the chat template refuses the conversation: {exc}") from None


def _special_strings(tokenizer) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted(s for s in found if s)


def conversation_text(tokenizer, template: str, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its targets: each
    assistant turn with what the template closes it with."""
    full = _render(tokenizer, template, messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], True)
        through = _render(tokenizer, template, messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise RecordError(
                "the chat template renders a conversation's beginning differently from the whole "
                "conversation, so responses cannot be told from prompts"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_example(
    tokenizer,
    template: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
) -> Example:
    """Token ids and targets of one conversation, at most ``max_tokens`` long (see the
    module docstring for truncation); RecordError for a conversation that cannot be one."""
    specials = _special_strings(tokenizer)
    for i, m in enumerate(messages):
        hit = next((s for s in specials if s in m["content"]), None)
        if hit is not None:
            raise RecordError(f"message {i} ({m['role']}) holds the special token {hit!r}")
    text, spans = conversation_text(tokenizer, template, messages)
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int32)
    starts = np.asarray([a for a, _ in enc.offsets], dtype=np.int64)
    ends = np.asarray([b for _, b in enc.offsets], dtype=np.int64)
    targets = np.zeros(len(ids), dtype=np.int8)
    for a, b in spans:
        targets[(starts >= a) & (starts < b)] = 1
    if train_on_prompt:
        targets[:] = 1
    if not targets.any():
        raise RecordError("no response token survives tokenization")
    cut = 0
    if len(ids) > max_tokens:
        excess = len(ids) - max_tokens
        if overlong != "truncate":
            raise RecordError(f"{len(ids):,} tokens, more than a block of {max_tokens:,}", kind="long")
        first = next(m for m in messages if m["role"] == "user")
        a = text.find(first["content"])
        b = a + len(first["content"])
        # only whole tokens of the first user message's content (not the template around it)
        inside = np.flatnonzero((starts >= a) & (ends <= b)) if a >= 0 else np.zeros(0, np.int64)
        if len(inside) < excess:
            raise RecordError(
                f"{len(ids):,} tokens; without its first user message it would still be "
                f"{len(ids) - len(inside):,}, more than a block of {max_tokens:,}",
                kind="long",
            )
        keep = np.ones(len(ids), dtype=bool)
        keep[inside[:excess]] = False
        ids, targets, cut = ids[keep], targets[keep], excess
    return Example(ids=ids, targets=targets, truncated=cut)
