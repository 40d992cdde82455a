"""Config validation: bad configs are refused with the field and the reason, before any worker."""

from __future__ import annotations

import subprocess

import pytest

from hilum.launch.config import ConfigError, build_config, load_config, parse_yaml
from tests.conftest import HILUM, OUTSIDE, ROOT


def refuse(raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_config(raw, list(overrides))
    return str(info.value)


def test_shipped_config_loads():
    cfg = load_config(ROOT / "configs" / "tiny-clip.yaml")
    assert cfg.train.zero_stage == 2 and cfg.cluster.num_workers == 2
    assert cfg.objectives[0].name == "clip"
    assert cfg.monitoring.metrics_host == "127.0.0.1"


def test_misspelled_key_is_named_with_suggestion():
    msg = refuse({"optim": {"lrr": 0.1}})
    assert "optim.lrr: unknown key" in msg and "did you mean 'lr'" in msg


def test_string_where_number_belongs():
    msg = refuse({"optim": {"lr": "fast"}})
    assert "optim.lr" in msg and "valid number" in msg and "'fast'" in msg
    # strict: a numeric-looking string is still a string
    assert "data.batch_size" in refuse({"data": {"batch_size": "32"}})


def test_out_of_range_and_bad_choice():
    assert "optim.lr" in refuse({"optim": {"lr": -1.0}})
    assert "train.zero_stage" in refuse({"train": {"zero_stage": 4}})
    assert "cluster.launcher" in refuse({"cluster": {"launcher": "slurm"}})
    assert "optim.betas" in refuse({"optim": {"betas": [0.9, 1.5]}})
    assert "objectives.0.name" in refuse({"objectives": [{"name": "clipp"}]})
    assert "objectives.0.weight" in refuse({"objectives": [{"name": "clip", "weight": -1}]})


def test_overrides_are_typed_and_dotted():
    cfg = build_config({}, ["optim.lr=3e-4", "train.zero_stage=3", "objectives.0.weight=2", "cluster.address=auto"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.zero_stage == 3 and cfg.objectives[0].weight == 2.0 and cfg.cluster.address == "auto"
    assert "optim.lr" in refuse({}, ["optim.lr=abc"])
    assert "optim.nope: unknown key" in refuse({}, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_config({}, ["optim.lr"])


def test_yaml_exponent_floats_are_numbers():
    assert parse_yaml("lr: 3e-4\nb: 1.5e3\nc: 10") == {"lr": 3e-4, "b": 1500.0, "c": 10}


def test_cli_refuses_bad_config_before_any_worker(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "tiny-clip.yaml").read_text().replace("lr: 1.0e-3", "lr: fast").replace("batch_size: 32", "batch_sise: 32"))
    proc = subprocess.run([*HILUM, "train", "--config", str(bad), "--set", f"run.output_dir={tmp_path}/runs"],
                          capture_output=True, text=True, timeout=120, cwd=OUTSIDE)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr and "data.batch_sise: unknown key" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    assert "ray" not in proc.stderr.lower() and "deepspeed" not in proc.stderr.lower()


def test_cli_refuses_missing_data_before_any_worker(tmp_path):
    proc = subprocess.run(
        [*HILUM, "train", "--config", str(ROOT / "configs" / "tiny-clip.yaml"),
         "--set", f"data.train_manifest={tmp_path}/nope.json", "--set", f"run.output_dir={tmp_path}/runs"],
        capture_output=True, text=True, timeout=120, cwd=OUTSIDE,
    )
    assert proc.returncode == 2
    assert "data.train_manifest" in proc.stderr and "nope.json" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "resume", "shards"])
def test_help(command):
    proc = subprocess.run([*HILUM, command, "--help"], capture_output=True, text=True, timeout=60, cwd=OUTSIDE)
    assert proc.returncode == 0 and "usage: hilum" in proc.stdout


def test_batches_larger_than_this_machine_are_refused_before_any_worker(phantom_dir, tmp_path):
    """GradCache invites per-rank batches of tens of thousands; their CPU-decoded batches on the
    way (float32, loader prefetch + training prefetch) must fit in memory when every rank runs here."""
    import os

    from hilum.launch.preflight import host_bytes_per_rank, preflight
    from tests.conftest import tiny_config

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    sections = dict(cluster={"launcher": "local", "device": "cpu", "num_workers": 2}, gradcache={"enabled": True, "chunk_size": 8})
    cfg = build_config(tiny_config(phantom_dir, tmp_path, data={"batch_size": 64, "num_workers": 2}, **sections))
    assert host_bytes_per_rank(cfg) == 64 * 1 * 64**2 * 4 * (2 * 2 + 2 + 1)  # 64² grey float32, 7 batches
    preflight(cfg)  # fits
    batch = memory // (64**2 * 4 * 7 * 2) + 1  # two ranks' batches just past this machine's memory
    cfg = build_config(tiny_config(phantom_dir, tmp_path, data={"batch_size": batch, "num_workers": 2}, **sections))
    with pytest.raises(ConfigError, match=r"data.batch_size: 2 ranks × \d+ images of 1×64² hold at least [\d.]+ GiB"):
        preflight(cfg)
    # Ranks on a Ray cluster elsewhere: nothing to compare with here.
    remote = dict(sections, cluster={"launcher": "ray", "device": "cpu", "num_workers": 2, "address": "ray://head:10001"})
    preflight(build_config(tiny_config(phantom_dir, tmp_path, data={"batch_size": batch, "num_workers": 2}, **remote)))
