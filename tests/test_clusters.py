"""clusters/: the launcher YAMLs against Ray's own cluster-config validator, the KubeRay
RayJob, the Dockerfile and the walkthrough, checked against the installed ray and mlflow and
against the files of this repository. No cloud is contacted."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from longtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER_YAMLS = sorted(p.name for p in CLUSTERS.glob("*.yaml") if p.name != "kuberay-rayjob.yaml")
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
CHECKOUT = "/home/ray/longtune"  # where the YAMLs and the Dockerfile put this repository
PLACEHOLDER = re.compile(r"YOUR-[A-Z]+(?:-[A-Z]+)*")
# A path into this repository, as the files and the walkthrough name them (not /home/ray/...).
REPO_PATH = re.compile(r"(?<![\w/.-])((?:pipelines|clusters|longtune|tests|benchmarks)(?:/[\w.-]+)+)")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{RAYJOB.name} must hold exactly one RayJob, found {len(jobs)}"
    return jobs[0]


def click_options(command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return click_options(start)


def mlflow_server_options() -> set[str]:
    from mlflow.cli import server

    return click_options(server)


def auth_server_options() -> set[str]:
    """The flags of clusters/mlflow_server.py, from its own parser."""
    from conftest import load_script

    parser = load_script("clusters/mlflow_server.py").build_parser()
    return {o for action in parser._actions for o in action.option_strings}


AUTH_SERVER = "/home/ray/longtune/clusters/mlflow_server.py"
MLFLOW_ENV = ". /home/ray/.longtune/mlflow.env"


def flags_after(command: str, program: list[str]) -> list[str]:
    """The --flags of `program` (e.g. ["ray", "start"]) in a shell command line."""
    words = shlex.split(command.replace(";", " ; "))
    n = len(program)
    for i in range(len(words) - n + 1):
        if words[i : i + n] == program:
            rest = []
            for word in words[i + n :]:
                if word in (";", "&&", "||", ">", "2>&1", "<") or word.startswith(">"):
                    break
                rest.append(word)
            return [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    raise AssertionError(f"no `{' '.join(program)}` in {command!r}")


def effective_setup(config: dict, node_type: str) -> list[str]:
    """The setup commands the launcher runs on a node of this type: the head gets
    setup_commands + head_setup_commands; a worker gets setup_commands +
    worker_setup_commands, unless its node type has worker_setup_commands of its own,
    which then replace both (ray.autoscaler._private.autoscaler._get_node_type_specific_fields)."""
    full = prepare_config(copy.deepcopy(config))
    if node_type == full["head_node_type"]:
        return full["head_setup_commands"]
    return full["available_node_types"][node_type].get("worker_setup_commands", full["worker_setup_commands"])


# ---------------------------------------------------------------- the launcher YAMLs


def test_there_is_a_launcher_yaml_per_cloud():
    assert LAUNCHER_YAMLS == ["aws-a100.yaml", "gcp-a100.yaml"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_own_validator(name):
    """What `ray up` does before it contacts the cloud: fill in the provider's defaults,
    merge the setup commands, check the Docker settings, then validate against
    ray/autoscaler/ray-schema.json and the launcher's own rules."""
    validate_config(prepare_config(load(name)))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_the_validator_is_not_vacuous(name):
    typo = load(name)
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(typo))
    no_resources = load(name)
    for node_type in no_resources["available_node_types"].values():
        del node_type["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate_config(prepare_config(no_resources))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_image_gpu_workers_and_autoscaling(name):
    config = load(name)
    assert config["docker"]["image"] == IMAGE
    assert not {"head_image", "worker_image"} & set(config["docker"])
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) == 1
    (gpu,) = gpu_types.values()
    assert gpu["resources"]["GPU"] == 8
    machine = gpu["node_config"].get("InstanceType") or gpu["node_config"].get("machineType")
    # 80 GB A100s: the long recipes do not fit 40 GB ones (tests/test_plan.py plans them)
    assert machine == {"aws-a100.yaml": "p4de.24xlarge", "gcp-a100.yaml": "a2-ultragpu-8g"}[name]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_every_node_installs_longtune_and_gpu_nodes_its_gpu_extra(name):
    config = load(name)
    assert config["file_mounts"][CHECKOUT] == "."
    for node_type, spec in config["available_node_types"].items():
        commands = effective_setup(config, node_type)
        assert any(re.search(rf"pip install .*{CHECKOUT}(\s|$)", c) for c in commands), (node_type, commands)
        installs_gpu_extra = any(f"{CHECKOUT}[gpu]" in c for c in commands)
        assert installs_gpu_extra == (spec["resources"].get("GPU", 0) > 0), node_type
        if spec["resources"].get("GPU", 0):  # the QLoRA recipes' bitsandbytes
            assert any(f"{CHECKOUT}[qlora]" in c for c in commands), node_type


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_token_authentication_on_every_node(name):
    config = load(name)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]  # all nodes, all commands
    # the token itself, from `ray get-auth-token --generate` on the launching machine
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_ray_start_commands_use_real_flags(name):
    config = load(name)
    options = ray_start_options()
    head = " ; ".join(config["head_start_ray_commands"])
    worker = " ; ".join(config["worker_start_ray_commands"])
    head_flags = flags_after(head, ["ray", "start"])
    assert {"--head", "--autoscaling-config"} <= set(head_flags)
    assert set(head_flags) <= options
    assert set(flags_after(worker, ["ray", "start"])) <= options
    assert "--address=$RAY_HEAD_IP:6379" in worker


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_mlflow_server_on_the_head_and_every_node_pointed_at_it(name):
    config = load(name)
    scheme = {"aws-a100.yaml": "s3://", "gcp-a100.yaml": "gs://"}[name]
    head_env = dict(o.removeprefix("--env ").split("=", 1) for o in config["docker"]["head_run_options"])
    backend = head_env["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith(("sqlite:////", "postgresql://"))
    assert head_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith(scheme)

    head = " ; ".join(config["head_start_ray_commands"])
    # the server is MLflow's, with authentication, started by clusters/mlflow_server.py
    server_flags = flags_after(head, ["python", AUTH_SERVER])
    assert set(server_flags) <= auth_server_options()
    assert {"--backend-store-uri", "--artifacts-destination", "--auth-dir", "--host", "--port"} <= set(server_flags)
    assert "--port 5000" in head
    assert (ROOT / "clusters" / "mlflow_server.py").is_file()
    # the account comes from the file the user makes, mounted on every node, read before
    # the server and before Ray starts (so jobs and training workers log with it)
    assert config["file_mounts"]["/home/ray/.longtune/mlflow.env"] == "~/.longtune/mlflow.env"
    assert MLFLOW_ENV in head[: head.index(AUTH_SERVER)]
    # the server starts before Ray, whose environment then carries its address to the
    # job drivers (longtune resolves it there and passes it to the training workers)
    assert head.index(AUTH_SERVER) < head.index("ray start")
    assert re.search(r"set -a; \. /home/ray/\.longtune/mlflow\.env; set \+a;\s*"
                     r"export MLFLOW_TRACKING_URI=http://.+:5000;\s*ray start --head", head)
    worker = " ; ".join(config["worker_start_ray_commands"])
    assert "export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000;" in worker
    assert MLFLOW_ENV in worker[: worker.index("ray start")]
    # the server's client libraries for the bucket and for PostgreSQL, on the head
    head_setup = " ".join(config["head_setup_commands"])
    assert {"s3://": "boto3", "gs://": "google-cloud-storage"}[scheme] in head_setup
    assert "psycopg2" in head_setup
    assert "mlflow[auth]" in head_setup  # the basic-auth app's own dependencies


def test_gpu_workers_can_write_checkpoints_to_the_bucket():
    """The launchers give their own cloud identity only to the head; Ray Train writes
    checkpoints from the workers, so the worker node types name one that reaches the bucket."""
    aws = load("aws-a100.yaml")
    gcp = load("gcp-a100.yaml")
    for config, key in ((aws, "IamInstanceProfile"), (gcp, "serviceAccounts")):
        for name, spec in config["available_node_types"].items():
            if name != config["head_node_type"]:
                assert key in spec["node_config"], name
    for name, spec in gcp["available_node_types"].items():
        if spec["resources"].get("GPU"):
            assert {"onHostMaintenance": "TERMINATE"} in spec["node_config"]["scheduling"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_local_file_mounts_exist(name):
    for remote, local in load(name)["file_mounts"].items():
        if not local.startswith("~"):  # the token lives in the user's home, not the repo
            assert (ROOT / local).exists(), (remote, local)


# ---------------------------------------------------------------- the KubeRay RayJob


def test_rayjob_parses_and_runs_a_recipe_that_exists():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["python", "pipelines/finetune.py"]
    assert (ROOT / words[1]).is_file()
    recipe = words[words.index("--config") + 1]
    assert (ROOT / recipe).is_file()
    load_config(ROOT / recipe)
    # the entrypoint runs in the checkout the image carries, uploaded as the working dir
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == CHECKOUT


def test_rayjob_entrypoint_parses_with_the_real_cli():
    """The entrypoint's arguments as the job would run them, stopped at --print-config."""
    words = shlex.split(rayjob()["spec"]["entrypoint"])
    done = subprocess.run([sys.executable, *words[1:], "--print-config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["scaling"]["use_gpu"] is True


def test_rayjob_cluster_version_auth_gpus_and_mlflow():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    containers = {c["name"]: c for c in head_pod["containers"]}
    assert head_pod["containers"][0]["name"] == "ray-head"  # KubeRay's Ray container comes first
    options = ray_start_options()
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert {f"--{key}" for key in group["rayStartParams"]} <= options

    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert workers["minReplicas"] == 0 < workers["maxReplicas"]
    images = {c["image"] for c in [*head_pod["containers"], worker]}
    assert len(images) == 1  # one image, built from clusters/Dockerfile

    mlflow = containers["mlflow"]
    assert mlflow["command"][:2] == ["python", AUTH_SERVER]
    assert {w for w in mlflow["command"] if w.startswith("--")} <= auth_server_options()
    assert mlflow["command"][mlflow["command"].index("--port") + 1] == "5000"
    env = {e["name"]: e for e in containers["ray-head"]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://$(POD_IP):5000"
    # one Secret's account: the server creates it, the driver and every worker log with it
    for container in (mlflow, containers["ray-head"], worker):
        named = {e["name"]: e for e in container["env"]}
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert named[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}, container["name"]
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    claim = head_pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)


def test_dockerfile_builds_on_the_ray_image_and_holds_the_checkout_where_the_rayjob_looks():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.MULTILINE).group(1) == IMAGE
    assert re.search(r"^COPY .*\. (\S+)$", text, re.MULTILINE).group(1) == CHECKOUT
    assert f'"{CHECKOUT}[gpu]"' in text
    assert (CLUSTERS / "Dockerfile.dockerignore").read_text().count(".venv") == 1


# ---------------------------------------------------------------- names, placeholders, docs


@pytest.mark.parametrize("name", [*LAUNCHER_YAMLS, "kuberay-rayjob.yaml", "Dockerfile", "README.md"])
def test_files_name_only_paths_that_exist(name):
    text = (CLUSTERS / name).read_text()
    named = {p.rstrip(".") for p in REPO_PATH.findall(text)}  # a path may end a sentence
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"clusters/{name} names paths that are not in the repository: {missing}"


@pytest.mark.parametrize("name", [*LAUNCHER_YAMLS, "kuberay-rayjob.yaml"])
def test_placeholders_are_the_ones_the_header_lists(name):
    text = (CLUSTERS / name).read_text()
    header = text.split("\n\n", 1)[0]
    used = set(PLACEHOLDER.findall(text))
    assert used, "the cloud-specific values are placeholders"
    assert used == set(PLACEHOLDER.findall(header)), "every placeholder is listed at the top"


@pytest.mark.parametrize("name", [*LAUNCHER_YAMLS, "kuberay-rayjob.yaml"])
def test_every_yaml_key_is_commented(name):
    """Every key has a comment on its line or on the line just above."""
    lines = (CLUSTERS / name).read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        is_key = re.match(r"^\s*(?:- )?[A-Za-z_][\w./-]*:(\s|$)", line)
        commented = "#" in line or (i and lines[i - 1].lstrip().startswith("#"))
        if is_key and not commented:
            bare.append(f"{i + 1}: {line.strip()}")
    assert not bare, f"clusters/{name}: keys without a comment: {bare}"


def test_walkthrough_commands_name_real_recipes_and_yamls():
    text = (CLUSTERS / "README.md").read_text()
    for command in ("ray up", "ray dashboard", "ray job submit --working-dir . -- python pipelines/finetune.py",
                    "ray job logs --follow", "ray attach", "-p 5000", "ray down"):
        assert command in text, command
    recipes = set(re.findall(r"--config (pipelines/configs/[\w.-]+\.yaml)", text))
    recipes |= set(re.findall(r"`(pipelines/configs/[\w.-]+\.yaml)`", text))
    assert recipes
    for recipe in recipes:
        load_config(ROOT / recipe)
    for yaml_name in re.findall(r"clusters/([\w.-]+\.yaml)", text):
        assert (CLUSTERS / yaml_name).is_file(), yaml_name


@pytest.mark.parametrize("recipe, model, context", [
    ("llama2-7b-100k.yaml", "meta-llama/Llama-2-7b-hf", 100_000),
    ("llama2-13b-64k.yaml", "meta-llama/Llama-2-13b-hf", 65_536),
    ("llama2-70b-32k.yaml", "meta-llama/Llama-2-70b-hf", 32_768),
    ("llama2-7b-32k.yaml", "meta-llama/Llama-2-7b-hf", 32_768),
])
def test_one_node_recipes_have_the_longlora_settings(recipe, model, context):
    c = load_config(ROOT / "pipelines" / "configs" / recipe)
    assert (c.model.name_or_path, c.model.target_context, c.model.original_context) == (model, context, 4096)
    assert (c.adapter.type, c.adapter.rank, c.adapter.alpha) == ("lora_plus", 8, 16)
    assert (c.attention.type, c.attention.group_size_ratio) == ("s2", 0.25)
    assert (c.train.lr, c.train.warmup_steps, c.train.max_steps, tuple(c.train.betas)) == (2e-5, 20, 1000, (0.9, 0.95))
    assert c.scaling.num_workers * c.train.batch_size_per_worker * c.train.grad_accum_steps == 64
    assert c.scaling.use_gpu is True and c.scaling.num_workers == 8  # one 8-GPU node
    assert c.train.storage_path.startswith("s3://")  # shared storage: workers on any node
    text = (CLUSTERS / "README.md").read_text()
    assert f"pipelines/configs/{recipe}" in text
