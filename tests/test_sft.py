"""Long-context supervised fine-tuning (data.format sft): records, templates, prompt-masked
targets, truncation, packing, bad inputs, `longtune prepare`, a 2-worker run, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from longtune.data.pack import pack_examples, unpack_examples
from longtune.data.sft import (
    RecordError,
    SftFields,
    conversation_text,
    encode_example,
    named_template,
    record_messages,
    resolve_template,
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


def decoded(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


# ---------------------------------------------------------------- targets


def test_only_the_response_and_its_eos_are_targets(tok):
    messages = record_messages({"instruction": "kalo mi nu", "input": "pe ra", "output": "so ti"})
    assert messages == [{"role": "user", "content": "kalo mi nu\n\npe ra"},
                        {"role": "assistant", "content": "so ti"}]
    template = named_template("plain")
    ex = encode_example(tok, template, messages, max_tokens=1000)
    text, _ = conversation_text(tok, template, messages)
    assert text == "### Instruction:\nkalo mi nu\n\npe ra\n\n### Response:\nso ti<|endoftext|>"
    targets = np.flatnonzero(ex.targets)
    # one contiguous run at the very end: exactly the response and EOS
    assert targets.tolist() == list(range(len(ex.ids) - len(targets), len(ex.ids)))
    assert decoded(tok, ex.ids[targets]) == "so ti<|endoftext|>"
    assert ex.ids[-1] == tok.eos_token_id and ex.targets[-1] == 1
    assert decoded(tok, ex.ids[ex.targets == 0]) == "### Instruction:\nkalo mi nu\n\npe ra\n\n### Response:\n"


def test_every_assistant_turn_of_a_chat_is_a_target_and_nothing_else(tok):
    messages = record_messages({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ka lo"},
        {"role": "assistant", "content": "mi"},
        {"role": "user", "content": "nu pe"},
        {"role": "assistant", "content": "ra so"},
    ]})
    template = named_template("llama2", "unused: the record has its own system message")
    ex = encode_example(tok, template, messages, max_tokens=1000)
    text, spans = conversation_text(tok, template, messages)
    assert text == ("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nka lo [/INST] mi <|endoftext|>"
                    "[INST] nu pe [/INST] ra so <|endoftext|>")
    assert [text[a:b] for a, b in spans] == [" mi <|endoftext|>", " ra so <|endoftext|>"]
    runs = np.split(np.flatnonzero(ex.targets), np.flatnonzero(np.diff(np.flatnonzero(ex.targets)) > 1) + 1)
    assert [decoded(tok, ex.ids[r]) for r in runs] == [" mi <|endoftext|>", " ra so <|endoftext|>"]
    assert "be brief" in decoded(tok, ex.ids[ex.targets == 0])
    # train_on_prompt: everything is a target
    assert encode_example(tok, template, messages, max_tokens=1000, train_on_prompt=True).targets.all()


def test_the_default_system_prompt_is_baked_into_the_named_templates(tok):
    messages = [{"role": "user", "content": "ka"}, {"role": "assistant", "content": "lo"}]
    text, _ = conversation_text(tok, named_template("llama2", "be kind"), messages)
    assert text == "[INST] <<SYS>>\nbe kind\n<</SYS>>\n\nka [/INST] lo <|endoftext|>"
    text, _ = conversation_text(tok, named_template("plain", "be kind"), messages)
    assert text.startswith("be kind\n\n### Instruction:\nka")


def test_a_tokenizers_own_chat_template_is_used_and_its_end_of_turn_is_a_target(tok):
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(tok.name_or_path)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    name, template = resolve_template(chat, "auto")
    assert name == "chat"
    messages = [{"role": "user", "content": "ka lo"}, {"role": "assistant", "content": "mi nu"}]
    ex = encode_example(chat, template, messages, max_tokens=1000)
    assert decoded(chat, ex.ids[ex.targets == 1]) == "mi nu<|im_end|>\n"
    im_end = chat.convert_tokens_to_ids("<|im_end|>")
    assert ex.ids.tolist().count(im_end) == 2  # one per turn: parsed as the special token
    assert resolve_template(tok, "auto")[0] == "llama2"  # no chat template of its own
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template(tok, "chat")


# ---------------------------------------------------------------- overlong


def test_truncation_cuts_the_start_of_the_prompt_never_the_response(tok, make_text):
    document = make_text(1, 400)
    messages = record_messages({"instruction": document + "\nkalo?", "output": "mi nu pe"})
    template = named_template("plain")
    whole = encode_example(tok, template, messages, max_tokens=10_000)
    ex = encode_example(tok, template, messages, max_tokens=200)
    assert len(ex.ids) == 200 and ex.truncated == len(whole.ids) - 200
    # the response, the question at the end of the prompt and the template's opening survive
    assert decoded(tok, ex.ids[ex.targets == 1]) == "mi nu pe<|endoftext|>"
    assert ex.ids[-30:].tolist() == whole.ids[-30:].tolist()
    assert decoded(tok, ex.ids).startswith("### Instruction:\n")
    assert decoded(tok, ex.ids).endswith("\nkalo?\n\n### Response:\nmi nu pe<|endoftext|>")
    with pytest.raises(RecordError, match="more than a block of 200") as err:
        encode_example(tok, template, messages, max_tokens=200, overlong="drop")
    assert err.value.kind == "long"
    # a response longer than the block cannot be saved by cutting the prompt
    long_answer = record_messages({"instruction": "ka", "output": document})
    with pytest.raises(RecordError, match="without its first user message") as err:
        encode_example(tok, template, long_answer, max_tokens=200)
    assert err.value.kind == "long"


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize("record, reason", [
    ({"output": "x"}, "neither 'messages' nor 'instruction'"),
    ({"instruction": "x"}, "no field 'output'"),
    ({"instruction": "x", "output": "  "}, "empty response"),
    ({"instruction": 3, "output": "x"}, "field 'instruction' is int, not a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}, "role 'tool'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "where a user turn belongs"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]},
     "content is int, not a string"),
    ({"messages": "hi"}, "not a list of messages"),
    (["not", "an", "object"], "a JSON list, not an object"),
])
def test_bad_records_are_refused_with_their_reason(record, reason):
    with pytest.raises(RecordError, match=reason):
        record_messages(record)


def test_configurable_fields_and_a_trailing_user_turn(tok):
    fields = SftFields(instruction="q", input="ctx", output="a", messages="turns")
    assert record_messages({"q": "ka", "a": "lo"}, fields)[1]["content"] == "lo"
    chat = record_messages({"turns": [{"role": "user", "content": "ka"}, {"role": "assistant", "content": "lo"},
                                      {"role": "user", "content": "unanswered"}]}, fields)
    assert [m["role"] for m in chat] == ["user", "assistant"]
    with pytest.raises(RecordError, match="special token '<\\|endoftext\\|>'"):
        encode_example(tok, named_template("plain"),
                       [{"role": "user", "content": "ka<|endoftext|>"}, {"role": "assistant", "content": "lo"}],
                       max_tokens=100)


# ---------------------------------------------------------------- packing


def test_examples_are_packed_whole_first_fit_with_positions_restarting_and_padding_masked():
    ex = [(np.arange(n, dtype=np.int32) + 100 * i, (np.arange(n) >= n // 2).astype(np.int8))
          for i, n in enumerate([6, 5, 3, 2, 7])]
    packed = pack_examples(ex, 10, pad_id=-1)
    # first fit: [6, 3] then [5, 2] then [7]; each block padded
    assert packed.ids.shape == (3, 10) and packed.padding == 30 - 23
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    assert packed.ids[0, :9].tolist() == list(range(6)) + [200, 201, 202]
    assert packed.ids[0, 9] == -1 and packed.loss_mask[0, 9] == 0
    assert packed.positions[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    back = unpack_examples(packed.ids, packed.positions, packed.loss_mask)
    assert sorted(tuple(i.tolist()) for i, _ in back) == sorted(tuple(i.tolist()) for i, _ in ex)
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([(np.zeros(11, np.int32), np.ones(11, np.int8))], 10, 0)


# ---------------------------------------------------------------- prepare, through Ray


def write_sft_corpus(path: Path, make_text, n: int = 40) -> Path:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"instruction": make_text(i, 20 + 15 * i) + " kalo?", "output": make_text(100 + i, 4)})
        else:
            rows.append({"messages": [
                {"role": "user", "content": make_text(i, 30)}, {"role": "assistant", "content": make_text(200 + i, 3)},
                {"role": "user", "content": "mi?"}, {"role": "assistant", "content": make_text(300 + i, 2)},
            ]})
    bad = [
        {"instruction": "x"},  # missing its response
        {"instruction": "x", "output": ""},  # empty response
        {"instruction": ["x"], "output": "y"},  # not a string
        {"messages": [{"role": "user", "content": "x"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},  # unknown role
    ]
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "records.jsonl", "w") as f:
        for row in rows[:10] + bad[:3] + rows[10:] + bad[3:]:
            f.write(json.dumps(row) + "\n")
        f.write('{"instruction": "not closed\n')  # invalid JSON
    return path / "records.jsonl"


def test_prepare_sft_counts_every_skip_truncates_and_keeps_examples_whole(ray_local, tmp_path, tiny_model_dir,
                                                                         make_text):
    import pyarrow.parquet as pq

    from longtune.config import load_config
    from longtune.data.pipeline import prepare

    source = write_sft_corpus(tmp_path / "data", make_text)
    out = tmp_path / "prepared"
    config = load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.target_context=128", "data.format=sft",
        f"data.sources=[{source}]", "data.eval_fraction=0.2", f"data.prepared_path={out}",
        "data.sft.template=plain",
    ])
    manifest = prepare(config)
    sft = manifest["sft"]
    assert manifest["data_format"] == "sft" and sft["template"] == "plain"
    assert sft["examples"]["invalid"] == 6
    kept = sft["examples"]["kept"]
    assert kept["train"] + kept["eval"] + sft["examples"]["dropped_too_long"] == 40
    assert kept["eval"] > 0 and sft["examples"]["truncated"] > 0  # the longer instructions
    reasons = " | ".join(s["reason"] for s in manifest["skipped"])
    for reason in ("no field 'output'", "empty response", "is list, not a string", "no assistant turn",
                   "role 'robot'", "not valid JSON"):
        assert reason in reasons
    assert sum(int(n) for n in [sft["examples"]["invalid"]]) == 6
    table = pq.read_table(out / manifest["splits"]["train"]["files"][0])
    ids = np.stack(table["input_ids"].to_numpy(zero_copy_only=False))
    pos = np.stack(table["position_ids"].to_numpy(zero_copy_only=False))
    mask = np.stack(table["loss_mask"].to_numpy(zero_copy_only=False))
    assert ids.shape[1] == 128
    examples = unpack_examples(ids, pos, mask)
    assert len(examples) == kept["train"]  # no example split across blocks
    assert int(mask.sum()) == sft["target_tokens"]["train"]
    assert manifest["tokens"]["in_blocks"]["train"] == manifest["tokens"]["tokenized"]["train"]

    # evaluation reads the same held-out examples from the prepared blocks as from the records
    from longtune.config import with_overrides
    from longtune.eval.sft import load_eval_examples
    from longtune.models import load_tokenizer_for

    tokenizer = load_tokenizer_for(config.model)
    prepared = load_eval_examples(config, tokenizer)
    direct = load_eval_examples(with_overrides(config, {"data.prepared_path": None}), tokenizer)
    as_set = lambda examples: sorted((tuple(i.tolist()), tuple(t.tolist())) for i, t in examples)  # noqa: E731
    assert len(prepared) == kept["eval"] and as_set(prepared) == as_set(direct)


def test_prepare_sft_reads_a_parquet_dataset_and_fails_when_nothing_is_left(ray_local, tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from longtune.config import load_config
    from longtune.data.errors import DataError
    from longtune.data.pipeline import prepare

    # the layout of a Hugging Face chat dataset saved with to_parquet: a list<struct> column
    messages = [[{"role": "user", "content": f"ka {i}"}, {"role": "assistant", "content": f"lo {i}"}] for i in range(30)]
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.table({"messages": messages}), tmp_path / "hf" / "train.parquet")
    base = [f"model.name_or_path={tiny_model_dir}", "model.target_context=64", "data.format=sft",
            "data.eval_fraction=0.2"]
    manifest = prepare(load_config(None, base + [f"data.sources=[{tmp_path / 'hf'}]",
                                                 f"data.prepared_path={tmp_path / 'p1'}"]))
    assert sum(manifest["sft"]["examples"]["kept"].values()) == 30
    assert manifest["sft"]["template"] == "llama2"  # auto, and the tiny tokenizer has no template

    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": ""}\n{"messages": []}\n')
    with pytest.raises(DataError, match="no training examples left .* 2 records invalid"):
        prepare(load_config(None, base + [f"data.sources=[{tmp_path / 'bad.jsonl'}]",
                                          f"data.prepared_path={tmp_path / 'p2'}"]))
    assert not (tmp_path / "p2").exists()


# ---------------------------------------------------------------- a run, end to end


@pytest.mark.slow
def test_sft_trains_on_two_workers_scores_before_and_after_and_exports_a_chat_model(
    ray_local, tmp_path, tiny_model_dir, run_config, make_text
):
    """A 2-worker S2-Attn SFT run on a bf16 base with real Ray and MLflow: the response loss
    falls, the before/after table is logged, the export carries the chat template and runs
    in transformers' text-generation pipeline."""
    import mlflow
    from transformers import pipeline

    from longtune.config import with_overrides
    from longtune.export import export_model
    from longtune.finetune import finetune

    source = write_sft_corpus(tmp_path / "data", make_text, n=60)
    config = run_config(
        "data.format=sft", f"data.sources=[{source}]", "data.sft.template=plain",
        "data.sft.system_prompt=ka lo", "attention.type=s2", "model.dtype=bfloat16",
        "train.max_steps=8", "train.lr=3e-3", "train.run_name=sft", "eval.before_after=true",
        "eval.sft_examples=8", "eval.sft_answer_tokens=8",
    )
    result = finetune(config)
    m = result.metrics
    assert m["response_loss"] < m["response_loss_before"]
    assert 0 <= m["exact_match"] <= 1 and m["exact_match_trials"] > 0

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert "eval/response_loss" in run.data.metrics and "eval/exact_match" in run.data.metrics
    description = run.data.tags["mlflow.note.content"]
    assert "response loss" in description and "template plain" in description

    out = tmp_path / "export"
    export_model(with_overrides(config, {"model.adapter_path": result.checkpoint_path,
                                         "export.output_dir": str(out)}))
    from longtune.export import MARKER

    assert json.loads((out / MARKER).read_text())["chat_template"] == "plain"
    generate = pipeline("text-generation", model=str(out), device="cpu")
    assert "### Instruction:" in generate.tokenizer.chat_template
    reply = generate([{"role": "user", "content": "kalo mi?"}], max_new_tokens=4, do_sample=False)
    conversation = reply[0]["generated_text"]
    assert conversation[0] == {"role": "user", "content": "kalo mi?"} and conversation[-1]["role"] == "assistant"
    prompt = generate.tokenizer.apply_chat_template(
        [{"role": "user", "content": "kalo mi?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "ka lo\n\n### Instruction:\nkalo mi?\n\n### Response:\n"  # as trained


def test_the_stdlib_qa_source_is_generated_once_and_reads_as_sft_records(tmp_path, monkeypatch):
    """`data.sources: [stdlib-qa]`: the demo's records, cached under $LONGTUNE_CACHE, read
    through the SFT reader; every prompt holds its answer near its start."""
    from longtune.data.pack import DOC
    from longtune.data.sources import ReadOptions, discover, read_file

    monkeypatch.setenv("LONGTUNE_CACHE", str(tmp_path))
    (entry,) = discover(["stdlib-qa"], 8000).files
    assert entry.kind == "jsonl" and Path(entry.uri).is_relative_to(tmp_path)
    mtime = Path(entry.uri).stat().st_mtime_ns
    assert Path(discover(["stdlib-qa"], 0).files[0].uri).stat().st_mtime_ns == mtime  # cached
    rows = list(read_file(entry, ReadOptions("text", 8000, 10**9, 0.1, format="sft")))
    assert len(rows) > 500 and all(r["kind"] == DOC for r in rows)
    assert {r["split"] for r in rows} == {"train", "eval"}
    for row in rows[:50]:
        user, answer = json.loads(row["text"])
        assert answer["content"] in user["content"][: len(user["content"]) // 4]


def test_an_sft_evaluation_is_reported_by_response_not_by_length():
    from rich.console import Console

    from longtune.config import load_config
    from longtune.eval.passkey import PasskeyReport
    from longtune.eval.report import EvalReport, description, results_table

    report = EvalReport(None, PasskeyReport(), sft={"response_loss": 4.25, "exact_match": 0.25,
                                                     "exact_match_trials": 8.0})
    assert report.metrics() == {"response_loss": 4.25, "exact_match": 0.25, "exact_match_trials": 8.0}
    console = Console(record=True, width=100)
    console.print(results_table(report))
    shown = console.export_text()
    assert "4.2500" in shown and "2/8 (25%)" in shown and "perplexity" not in shown
    text = description(load_config(None, ["data.format=sft"]), report)
    assert "| response loss | 4.2500 |" in text and "| exact match | 25% of 8 |" in text
    assert "| length |" not in text
