"""What a run prints: hilum's lines, the libraries' warnings, and everything with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import OUTSIDE

SPEAK = """
    import logging
    from hilum.monitoring.console import configure_console, printed_to_log
    configure_console("%(name)s %(levelname)s %(message)s")
    logging.getLogger("hilum").info("hilum step line")
    logging.getLogger("hilum").debug("hilum bookkeeping")
    logging.getLogger("ray.train._internal.session").info("Reporting training result 1")
    logging.getLogger("ray.train").warning("a Ray Train warning")
    logging.getLogger("DeepSpeed").info("DeepSpeed info")
    logging.getLogger("DeepSpeed").warning("Attempting to get learning rate from scheduler before it has started")
    logging.getLogger("DeepSpeed").warning("a DeepSpeed warning")
    with printed_to_log(logging.getLogger("hilum")):
        print("op built successfully")
    try:
        with printed_to_log(logging.getLogger("hilum")):
            print("why the op build failed")
            raise RuntimeError
    except RuntimeError:
        pass
"""


def speak(verbose: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "HILUM_VERBOSE"}
    if verbose:
        env["HILUM_VERBOSE"] = "1"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SPEAK)], capture_output=True, text=True, timeout=60,
                         cwd=OUTSIDE, env=env)
    assert out.returncode == 0, out.stderr
    assert "op built successfully" not in out.stdout  # a library's print never reaches stdout raw
    return [line.split(" ", 2)[-1] for line in out.stderr.splitlines()]


def test_only_hilum_speaks_at_info_and_known_noise_is_dropped():
    assert speak(verbose=False) == ["hilum step line", "a Ray Train warning", "a DeepSpeed warning",
                                    "why the op build failed"]


def test_verbose_shows_everything():
    shown = speak(verbose=True)
    for line in ("hilum step line", "hilum bookkeeping", "Reporting training result 1", "DeepSpeed info",
                 "Attempting to get learning rate from scheduler before it has started", "op built successfully"):
        assert line in shown, line


@pytest.mark.parametrize("argv", [["--verbose", "checkpoints", "x"], ["train", "--config", "c.yaml", "-v"],
                                  ["launch", "c.yaml", "--verbose"], ["resume", "runs/x", "-v"]])
def test_verbose_reaches_every_worker(argv, monkeypatch):
    from hilum.cluster.ray_runner import worker_env
    from hilum.launch.cli import build_parser
    from hilum.monitoring.console import VERBOSE_ENV, set_verbose

    monkeypatch.setenv(VERBOSE_ENV, "0")  # off, and restored (unset) after the test
    args = build_parser().parse_args(argv)
    assert args.verbose is True
    assert build_parser().parse_args([a for a in argv if a not in ("-v", "--verbose")]).verbose is False
    set_verbose(args.verbose)  # as main() does; local workers inherit the environment, Ray's get worker_env()
    assert os.environ[VERBOSE_ENV] == "1" and worker_env()[VERBOSE_ENV] == "1"
