"""The cluster head's MLflow tracking server, with MLflow's authentication on.

    python clusters/mlflow_server.py --backend-store-uri URI --artifacts-destination URI \\
        --auth-dir DIR [--host 0.0.0.0] [--port 5000]

runs `mlflow server --app-name basic-auth`: every request needs a user name and password
(HTTP basic auth), and a request without them is answered 401. The one account is made from
the secret the user provides, in the same two variables MLflow's clients read, so the job
on the cluster logs with exactly what the server was started with:

    MLFLOW_TRACKING_USERNAME   the account (the server's admin)
    MLFLOW_TRACKING_PASSWORD   its password: at least 12 characters, never a default

Nothing has a default: without both variables, or with a short password, this exits 2 with
one line naming what is missing, and no server starts. DIR keeps the server's user database
(basic_auth.db), its auth config and the key that signs its UI's forms (0600 files, made on
first start). The password is read from the environment on the first start only (MLflow
creates the account then); to change it later, use MLflow's update-password API.

clusters/aws-a100.yaml, gcp-a100.yaml and kuberay-rayjob.yaml start the head's server with
this; clusters/rehearse.py does too, on loopback.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

MIN_PASSWORD = 12
USER, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def credentials(env: dict[str, str]) -> tuple[str, str]:
    """The account from the environment, or SystemExit(2) with one line saying what is wrong."""
    user, password = env.get(USER, "").strip(), env.get(PASSWORD, "")
    missing = [name for name, value in ((USER, user), (PASSWORD, password)) if not value]
    if missing:
        raise SystemExit(
            f"mlflow_server: {' and '.join(missing)} not set: the tracking server's account comes "
            "from the cluster's secret (clusters/README.md, 'MLflow credentials'); no default is used"
        )
    if len(password) < MIN_PASSWORD:
        raise SystemExit(f"mlflow_server: {PASSWORD} is {len(password)} characters; use at least {MIN_PASSWORD}")
    return user, password


def auth_files(auth_dir: Path) -> tuple[Path, str]:
    """The auth config (its user database in ``auth_dir``) and the form-signing key, made
    once and kept: a restarted server keeps its accounts and its UI sessions."""
    auth_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(auth_dir, 0o700)
    ini = auth_dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        # an authenticated account sees nothing it was not granted; the admin sees everything
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{(auth_dir / 'basic_auth.db').resolve()}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    key_file = auth_dir / "flask_secret_key"
    if not key_file.is_file():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return ini, key_file.read_text().strip()


def server_command(args: argparse.Namespace) -> list[str]:
    mlflow = shutil.which("mlflow", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return [
        mlflow or "mlflow", "server", "--app-name", "basic-auth",
        "--backend-store-uri", args.backend_store_uri,
        "--artifacts-destination", args.artifacts_destination,
        "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend-store-uri", required=True, help="runs, params, metrics (sqlite:///..., postgresql://...)")
    parser.add_argument("--artifacts-destination", required=True, help="artifacts (s3://..., gs://..., a local dir)")
    parser.add_argument("--auth-dir", required=True, type=Path, help="the server's user database and keys")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        user, password = credentials(dict(os.environ))
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    ini, key = auth_files(args.auth_dir)
    env = dict(os.environ)
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_USERNAME=user,  # read on the first start, when MLflow creates the account
        MLFLOW_AUTH_ADMIN_PASSWORD=password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=key,
    )
    # the server itself is not a client: its own requests need no account
    for name in (USER, PASSWORD):
        env.pop(name, None)
    cmd = server_command(args)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # the server in this process: signals reach it, not a wrapper
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
