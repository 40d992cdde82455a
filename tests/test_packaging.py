"""hilum is one import namespace, installs from its lock, and runs from anywhere.

The distribution claims the import name `hilum` and nothing else: generic top-level names
(`kernels`, `trainer`, ...) collide with other distributions; transformers 5 depends on Hugging
Face's `kernels`, and hilum's own `kernels` once shadowed it.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import HILUM, OUTSIDE, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FOLDERS = tuple(PYPROJECT["tool"]["setuptools"]["package-dir"].values())  # trainer/, cluster/, ...


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_distribution_claims_only_the_hilum_import_name():
    claimed = sorted(name for name, dists in importlib.metadata.packages_distributions().items() if "hilum" in dists)
    assert claimed == ["hilum"]


def test_the_top_level_folders_are_namespace_portions_and_every_package_is_listed():
    """No __init__.py in the five folders: Python then prefers a regular package of the same name
    anywhere on sys.path, so the repository root on sys.path shadows nothing. Every package under
    them must be in pyproject's list, or wheels would miss it."""
    from hilum.launch.jobs import PACKAGES  # what a Ray job ships

    assert set(FOLDERS) == set(PACKAGES)
    assert not [f for f in FOLDERS if (ROOT / f / "__init__.py").exists()]
    found = {f"hilum.{f}" for f in FOLDERS}
    for folder in FOLDERS:
        found |= {"hilum." + ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / folder).rglob("__init__.py")}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found


def test_transformers_imports_its_own_kernels_even_from_the_repository_root():
    code = (
        "import sys, kernels, transformers\n"
        "import hilum.kernels.infonce\n"
        "from transformers import BertConfig, BertModel\n"
        "BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))\n"
        "print(kernels.__file__)\n"
    )
    theirs = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    for cwd in (ROOT, OUTSIDE):  # `python -c` puts the working directory first on sys.path
        out = run([sys.executable, "-c", code], cwd=cwd)
        assert Path(out.stdout.split()[-1]).resolve() == theirs


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_lock_is_exactly_what_pyproject_resolves_to():
    """Walks pyproject's requirements (dependencies, the test extra, the build system, pip) through
    the installed metadata of the locked versions: every requirement must be pinned at a version it
    allows, and every pin must be needed. A dependency edited without `make lock` fails here."""
    pins = locked()
    env = default_environment()
    roots = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"],
             *PYPROJECT["build-system"]["requires"], "pip"]
    todo, seen, problems = [(Requirement(r), "pyproject.toml") for r in roots], set(), []
    while todo:
        req, via = todo.pop()
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} (needed by {via}) is not in requirements.lock")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} (needed by {via}) does not allow the locked {name}=={pins[name]}")
        for extra in req.extras or {""}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            installed = importlib.metadata.distribution(name)
            assert installed.version == pins[name], f"{name} {installed.version} is installed, the lock says {pins[name]}"
            for sub in map(Requirement, installed.requires or []):
                if sub.marker is None or sub.marker.evaluate({**env, "extra": extra}):
                    todo.append((sub, f"{name}[{extra}]" if extra else name))
    unneeded = sorted(set(pins) - {name for name, _ in seen})
    assert not problems and not unneeded, "run `make lock`:\n" + "\n".join(problems + [f"{n} is locked but not needed" for n in unneeded])


def test_the_cli_works_from_outside_the_repository(tmp_path):
    assert "train" in run([*HILUM, "--help"], cwd=tmp_path).stdout
    run([*HILUM, "shards", "phantom", "--out", "data/phantom", "--train", "64", "--test", "32", "--size", "64",
         "--samples-per-shard", "32"], cwd=tmp_path)
    out = run([*HILUM, "train", "--config", str(ROOT / "configs" / "tiny-clip.yaml"), "--launcher", "local", "--workers", "1",
               "--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0",
               "--set", "data.batch_size=8", "--set", "data.num_workers=0", "--set", "eval.at_end=false",
               "--set", "monitoring.metrics_port=0"], cwd=tmp_path, timeout=600)
    assert (tmp_path / "runs" / "tiny-clip" / "metrics.jsonl").is_file(), out.stderr[-3000:]


def test_a_built_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """The wheel, not the editable install: its own virtual environment, hilum from the wheel alone
    (the locked dependencies come from this environment's site-packages, added as a plain path so
    that the editable install's finder is not)."""
    src = tmp_path / "src"
    for name in (*FOLDERS, "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("hilum-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "locked-deps.pth").write_text("\n".join(deps) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
        cwd=tmp_path)
    python = str(venv / "bin" / "python")
    where = run([python, "-c", "import hilum.kernels.infonce, hilum.trainer.loop, transformers; "
                               "from hilum.trainer.data.entities import extract_entities, load_knowledge; "
                               "assert extract_entities('Small left pleural effusion.') and load_knowledge(); "
                               "print(hilum.trainer.loop.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(site)
    assert "train" in run([str(venv / "bin" / "hilum"), "--help"], cwd=tmp_path).stdout
