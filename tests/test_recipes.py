"""The cluster recipes and the Dockerfile, checked as far as this machine can: schemas, the
commands they run, and that the image carries every package hilum installs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

RECIPES = ROOT / "cluster" / "recipes"


def _hilum_args(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "hilum", command
    return words[1:]


def _check_hilum_command(command: str) -> None:
    """The command parses with hilum's own CLI and its --set overrides name real config fields."""
    from hilum.launch.cli import _shortcuts, build_parser
    from hilum.launch.config import build_config

    args = build_parser().parse_args(_hilum_args(command))
    build_config({}, _shortcuts(args))


def test_ray_cluster_launcher_recipe_fits_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((RECIPES / "aws-h100.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0  # the head does not train
    gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
    assert gpu and all(n["resources"]["GPU"] == 8 for n in gpu)
    assert "--gpus all" in config["docker"]["run_options"]
    assert any("--ray-client-server-port=10001" in c for c in config["head_start_ray_commands"])


def test_kuberay_rayjob_runs_a_valid_hilum_command_on_gpu_workers():
    job = yaml.safe_load((RECIPES / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _check_hilum_command(spec["entrypoint"])
    assert "--address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"].split(".")[0] == ray.__version__.split(".")[0]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm"  # DataLoader shared memory beyond Docker's 64 MB default
        volumes = {v["name"] for v in group["template"]["spec"]["volumes"]}
        assert set(mounts) <= volumes


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_cuda_installs_every_package_and_prebuilds_deepspeed_ops():
    import tomllib

    steps = _dockerfile()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1].strip('"') for word, rest in steps if word == "ARG" and "=" in rest}
    assert re.match(r"nvidia/cuda:[\d.]+-cudnn-devel-", args["BASE"])  # devel: nvcc for DeepSpeed's ops
    assert "8.0" in args["TORCH_ARCH"] and "9.0" in args["TORCH_ARCH"]  # A100 and H100
    copied = {src for word, rest in steps if word == "COPY" and not rest.startswith("--from") for src in rest.split()[:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied, folders - copied
    assert {"pyproject.toml", "README.md", "requirements.lock"} <= copied
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    # the locked set, then hilum without a resolution of its own, and DeepSpeed at the lock's version
    assert "-r requirements.lock" in runs and "--no-deps --no-build-isolation ." in runs
    assert "^deepspeed==' requirements.lock" in runs
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "TORCH_CUDA_ARCH_LIST" in runs
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in env and "NCCL_SOCKET_IFNAME" in env
    assert "HF_HUB_OFFLINE=1" in env
    exposed = " ".join(rest for word, rest in steps if word == "EXPOSE")
    assert "9400" in exposed and "10001" in exposed
    cmd = json.loads(next(rest for word, rest in steps if word == "CMD"))
    for command in cmd[-1].split("&&"):
        from hilum.launch.cli import build_parser

        build_parser().parse_args(_hilum_args(command.strip()))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data"} <= set(ignored)  # the build context stays small


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipes_are_yaml_without_secrets(recipe):
    text = (RECIPES / recipe).read_text()
    yaml.safe_load(text)
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|aws_secret_access_key)\s*[:=]", text)
