"""Object stores (s3://, gs://, and S3-compatible servers such as MinIO): checked before a job
starts, and directories copied to and from them.

Every job that reads or writes a URI checks its stores first (``check_stores``): the bucket
is reached and exists, the credentials are accepted, and where the job writes, a probe object
is written and deleted (pyarrow then keeps an empty "directory" marker of the prefix, a
zero-byte ``prefix/`` object, so that the prefix still exists). A typo in a bucket name, a wrong endpoint or missing credentials is
then one line before any model is built, not a traceback from a Ray worker hours in.

Which store a URI reaches is the standard configuration of the AWS SDKs, which pyarrow (and
through it Ray Train and Ray Data), boto3 and MLflow all read:

- ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``): an S3-compatible server, e.g.
  ``http://minio.internal:9000``; unset means AWS S3 itself;
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` with ~/.aws/credentials,
  or an instance role;
- ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``).

A URI may also carry pyarrow's parameters (``s3://bucket/path?endpoint_override=...``), but
only the environment reaches every component, so that is what the cluster YAMLs set.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from longtune.errors import LongtuneError

REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
"""A URI with a scheme (s3://, gs://, file://, ...), as opposed to a local path."""
PROBE_PREFIX = ".longtune-probe-"


class StorageError(LongtuneError, RuntimeError):
    """An object store a job needs cannot be used; the message names it and why."""


@dataclass(frozen=True)
class Store:
    """One URI a job needs, and what for."""

    setting: str  # the config key that names it, e.g. "train.storage_path"
    uri: str
    write: bool  # the job writes there (probed with a small object), else only reads


def is_remote(uri: str | None) -> bool:
    return bool(uri) and bool(REMOTE.match(str(uri)))


def filesystem(uri: str):
    """``(pyarrow filesystem, path on it)`` of a URI, with the error a user can act on."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise StorageError(f"cannot open {uri!r}: {_first_line(exc)}") from None


def endpoint(uri: str) -> str:
    """Where ``uri``'s requests go, as the user configured it (for messages)."""
    if uri.startswith("s3://"):
        query = re.search(r"[?&]endpoint_override=([^&]+)", uri)
        if query:
            return f"{query.group(1)} (endpoint_override in the URI)"
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(name):
                return f"{os.environ[name]} ({name})"
        return "AWS S3 (no AWS_ENDPOINT_URL set)"
    return uri.split("://", 1)[0] + "://"


# ------------------------------------------------------------------ checks


OBJECT_STORES = ("s3", "gs", "gcs")
"""The URI schemes ``check_stores`` checks: object stores, whose buckets and credentials can
be wrong. Other URIs (file://, hdfs://) are opened as they are."""


def check_stores(stores: list[Store]) -> None:
    """Raise StorageError naming the first store that cannot be used as asked."""
    checked: set[tuple[str, bool]] = set()
    for store in stores:
        scheme = store.uri.split("://", 1)[0].lower() if is_remote(store.uri) else ""
        if scheme not in OBJECT_STORES or (store.uri, store.write) in checked:
            continue
        checked.add((store.uri, store.write))
        check_store(store)


def check_store(store: Store) -> None:
    from pyarrow.fs import FileType

    fs, path = filesystem(store.uri)
    bucket = path.split("/", 1)[0]
    where = f"{store.setting} {_redact(store.uri)}"
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise StorageError(f"{where}: {_explain(exc, store.uri)}") from None
    if info.type == FileType.NotFound:
        raise StorageError(
            f"{where}: bucket {bucket!r} does not exist at {endpoint(store.uri)}; create it or fix the URI"
        )
    if not store.write:
        return
    probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"longtune checks it can write here; this object is deleted at once\n")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(f"{where}: cannot write there: {_explain(exc, store.uri)}") from None


def _explain(exc: OSError, uri: str) -> str:
    """One line for a failed request: which endpoint, and the likely fix."""
    text = _first_line(exc)
    at = endpoint(uri)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't resolve" in text:
        return f"cannot reach the object store at {at}: {_after_colon(text)}"
    if "ACCESS_DENIED" in text or "HTTP status 403" in text or "InvalidAccessKeyId" in text:
        return f"access denied by {at}: {_credentials_hint(uri)}"
    if uri.startswith("s3://") and not _has_aws_credentials():
        return f"{at} refused the request and no AWS credentials were found: {_credentials_hint(uri)}"
    return f"request to {at} failed: {text}"


def _credentials_hint(uri: str) -> str:
    if uri.startswith("s3://"):
        return ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the node's "
                "instance role) and that they may use this bucket")
    return "check the credentials of this store and that they may use this bucket"


def _has_aws_credentials() -> bool:
    """Whether the AWS credential chain (environment, profile files, container or instance
    role) yields any credentials. Asked only after a request failed: an instance-metadata
    lookup is a network call. Without botocore installed, assume it does."""
    try:
        import botocore.session
    except ImportError:
        return True
    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # noqa: BLE001 (a malformed profile is itself "no usable credentials")
        return False


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _after_colon(text: str) -> str:
    # "... curlCode: 7, Could not connect to server; Details: ..." -> the curl part
    match = re.search(r"curlCode: \d+, ([^;]+)", text)
    return match.group(1) if match else text


def _redact(uri: str) -> str:
    """A URI as it may be printed: no access_key/secret_key/session_token parameter values."""
    return re.sub(r"((?:access_key|secret_key|session_token)=)[^&]*", r"\1***", uri)


# ------------------------------------------------------------------ copies


def upload_dir(local: str | Path, uri: str, *, last: tuple[str, ...] = ()) -> None:
    """Copy the directory ``local`` to ``uri``, file by file; the files named in ``last``
    (relative paths) go after all the others, so a reader that waits for them sees a whole
    directory (an object store has no rename)."""
    fs, root = filesystem(uri)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: str(p.relative_to(local)) in last)  # stable: `last` ones at the end
    for path in files:
        rel = path.relative_to(local).as_posix()
        with open(path, "rb") as src, fs.open_output_stream(f"{root.rstrip('/')}/{rel}") as dst:
            while chunk := src.read(16 * 2**20):
                dst.write(chunk)


def download_dir(uri: str, local: str | Path) -> Path:
    """Copy everything below ``uri`` into the directory ``local``; returns it."""
    from pyarrow.fs import FileSelector, FileType

    fs, root = filesystem(uri)
    root = root.rstrip("/")
    local = Path(local)
    info = fs.get_file_info(root)
    if info.type == FileType.NotFound:
        raise StorageError(f"{uri} does not exist")
    for entry in fs.get_file_info(FileSelector(root, recursive=True)):
        if entry.type != FileType.File:
            continue
        target = local / entry.path[len(root) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(entry.path) as src, open(target, "wb") as dst:
            while chunk := src.read(16 * 2**20):
                dst.write(chunk)
    return local


def list_files(uri: str) -> list[str]:
    """Paths below ``uri``, relative to it (empty when it does not exist)."""
    from pyarrow.fs import FileSelector, FileType

    fs, root = filesystem(uri)
    root = root.rstrip("/")
    if fs.get_file_info(root).type == FileType.NotFound:
        return []
    entries = fs.get_file_info(FileSelector(root, recursive=True))
    return sorted(e.path[len(root) :].lstrip("/") for e in entries if e.type == FileType.File)


def delete_files(uri: str, rel_paths: list[str]) -> None:
    fs, root = filesystem(uri)
    for rel in rel_paths:
        fs.delete_file(f"{root.rstrip('/')}/{rel}")


def job_stores(config, job: str) -> list[Store]:
    """The object stores a job (prepare, finetune, tune, export) reads and writes."""
    d, stores = config.data, []
    sources = [Store("data.sources", s, write=False) for s in d.sources]
    if job == "prepare":
        stores += sources
        if d.prepared_path:
            stores.append(Store("data.prepared_path", d.prepared_path, write=True))
    elif job in ("finetune", "tune"):
        # with prepared_path set, training reads the prepared dataset, not the sources
        stores += [Store("data.prepared_path", d.prepared_path, write=False)] if d.prepared_path else sources
        if config.train.storage_path:
            stores.append(Store("train.storage_path", config.train.storage_path, write=True))
    elif job == "export":
        if config.model.adapter_path:
            stores.append(Store("model.adapter_path", config.model.adapter_path, write=False))
        if config.export.output_dir:
            stores.append(Store("export.output_dir", config.export.output_dir, write=True))
    return [s for s in stores if is_remote(s.uri)]
