"""Object stores against a real S3-compatible server on loopback (moto's server mode, with its
request signatures checked against an IAM user; clusters/rehearse.py's ObjectStore): the
checks every job makes before it starts, and an export to and from a bucket. The endpoint and
credentials reach longtune the way a MinIO user sets them: AWS_ENDPOINT_URL and the standard
AWS variables."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import environment as shared_environment
from conftest import load_script

from longtune.cli import main
from longtune.storage import PROBE_PREFIX, Store, StorageError, check_stores, download_dir, upload_dir


def environment(values: dict[str, str], drop_aws: bool = True):
    return shared_environment(values, drop=("AWS_",) if drop_aws else ())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rehearse = load_script("clusters/rehearse.py")
    with rehearse.ObjectStore(tmp_path_factory.mktemp("object-store"), bucket="lt-test") as server:
        yield server


@pytest.fixture
def store_env(store, tmp_path):
    # no ~/.aws of the machine's user, no instance metadata: only what the test sets
    isolated = {"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_CONFIG_FILE": str(tmp_path / "none")}
    with environment({**store.env(), **isolated}):
        yield store


def test_a_good_store_passes_and_the_write_probe_leaves_nothing(store_env):
    check_stores([Store("train.storage_path", store_env.uri("ckpt"), write=True),
                  Store("data.sources", store_env.uri("corpus"), write=False)])
    assert not [k for k in store_env.keys() if PROBE_PREFIX in k]


def test_a_missing_bucket_is_named(store_env):
    with pytest.raises(StorageError) as err:
        check_stores([Store("train.storage_path", "s3://no-such-bucket/ckpt", write=True)])
    message = str(err.value)
    assert "train.storage_path s3://no-such-bucket/ckpt" in message
    assert "bucket 'no-such-bucket' does not exist" in message
    assert store_env.endpoint in message and "\n" not in message


def test_a_wrong_endpoint_is_named(store_env):
    wrong = "http://127.0.0.1:9"  # the discard port: nothing listens there
    with environment({"AWS_ENDPOINT_URL": wrong}, drop_aws=False), pytest.raises(StorageError) as err:
        check_stores([Store("data.sources", store_env.uri("corpus"), write=False)])
    assert f"cannot reach the object store at {wrong} (AWS_ENDPOINT_URL)" in str(err.value)


def test_wrong_credentials_are_refused(store_env):
    with environment({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, drop_aws=False), pytest.raises(StorageError) as err:
        check_stores([Store("data.prepared_path", store_env.uri("prepared"), write=False)])
    assert "access denied by" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_no_credentials_are_named(store_env):
    bare = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    with environment(bare), pytest.raises(StorageError) as err:
        os.environ.pop("AWS_ACCESS_KEY_ID", None)
        os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
        check_stores([Store("train.storage_path", store_env.uri("ckpt"), write=True)])
    assert "no AWS credentials were found" in str(err.value)


def test_finetune_stops_before_training_on_a_missing_bucket(store_env, capsys, tmp_path):
    code = main(["finetune", f"model.name_or_path={tmp_path / 'never-built'}",
                 "train.storage_path=s3://no-such-bucket/checkpoints"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [
        f"longtune finetune: train.storage_path s3://no-such-bucket/checkpoints: bucket 'no-such-bucket' "
        f"does not exist at {store_env.endpoint} (AWS_ENDPOINT_URL); create it or fix the URI"
    ]


def test_prepare_stops_on_an_unreachable_source(store_env, capsys):
    with environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, drop_aws=False):
        code = main(["prepare", f"data.sources=[{store_env.uri('corpus')}]"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("longtune prepare: data.sources s3://lt-test/corpus: cannot reach")


def test_directories_round_trip_with_the_named_files_last(store_env, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.bin", "z_marker.json"):
        (src / name).write_bytes(name.encode() * 1000)
    upload_dir(src, store_env.uri("round"), last=("a.txt",))
    back = download_dir(store_env.uri("round"), tmp_path / "back")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == \
        ["a.txt", "sub/b.bin", "z_marker.json"]
    assert (back / "sub/b.bin").read_bytes() == (src / "sub/b.bin").read_bytes()


def test_export_from_and_to_a_bucket(store_env, tmp_path, tiny_tokenizer_path):
    """A checkpoint in the bucket (as Ray Train leaves it) is exported into the bucket; the
    marker comes last; a prefix holding something else is refused; the export loads."""
    from test_export import build_trained
    from transformers import AutoModelForCausalLM

    from longtune.export import MARKER, ExportError, export_model, read_marker

    _, model_dir, adapter_dir, ids, expected, _ = build_trained("llama", tmp_path / "built", tiny_tokenizer_path)
    checkpoint = tmp_path / "checkpoint_000003"
    shutil.copytree(adapter_dir, checkpoint / "adapter")
    (checkpoint / "config.yaml").write_text(
        f"model:\n  name_or_path: {model_dir}\n  target_context: 128\n")
    ckpt_uri = store_env.uri("ckpts/run1/checkpoint_000003")
    upload_dir(checkpoint, ckpt_uri)

    out = store_env.uri("exports/run1")
    from longtune.config import load_config

    config = load_config(None, [f"model.name_or_path={model_dir}", "model.target_context=128",
                                f"model.adapter_path={ckpt_uri}", f"export.output_dir={out}"])
    assert export_model(config) == out
    record = read_marker(out)
    assert record["checkpoint"] == ckpt_uri and record["adapter"] == f"{ckpt_uri}/adapter"
    keys = [k for k in store_env.keys("exports/run1/")]
    assert f"exports/run1/{MARKER}" in keys and "exports/run1/model.safetensors" in keys

    local = download_dir(out, tmp_path / "exported")
    import torch

    merged = AutoModelForCausalLM.from_pretrained(str(local))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - expected).abs().max().item() < 1e-3

    # again onto the previous export: replaced; onto a prefix holding other objects: refused
    assert export_model(config) == out
    store_env.client().put_object(Bucket=store_env.bucket, Key="exports/other/notes.txt", Body=b"mine")
    other = config.model_copy(update={"export": config.export.model_copy(update={"output_dir": store_env.uri("exports/other")})})
    with pytest.raises(ExportError, match="is not a longtune export"):
        export_model(other)
    # untouched (pyarrow's empty "directory" marker of the prefix aside, which the write probe leaves)
    assert [k for k in store_env.keys("exports/other/") if not k.endswith("/")] == ["exports/other/notes.txt"]
