"""What every hilum process pays to start and to end: the exit without the last cycle
collections, the ninja that DeepSpeed's JIT builds run, which Ray cluster a run joins, and the
imports of the commands that only read a run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import OUTSIDE


def run_python(code: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         cwd=OUTSIDE)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_exit_freezes_after_every_other_handler_and_loses_no_buffered_write(tmp_path):
    target = tmp_path / "unflushed.txt"
    out = run_python(f"""
        import atexit, gc, sys
        # Registered first, so it runs last: it sees what the freeze left.
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
        from hilum.cluster.quick_exit import freeze_at_exit
        freeze_at_exit()
        freeze_at_exit()  # a second call registers nothing more
        atexit.register(lambda: print("later handler ran, frozen yet:", gc.get_freeze_count() > 0, flush=True))
        held = open({str(target)!r}, "w", buffering=1 << 20)  # a module global, never flushed or closed
        held.write("every byte" * 1000)
        print("running, frozen:", gc.get_freeze_count() > 0, flush=True)
    """)
    assert out.stdout.splitlines() == ["running, frozen: False", "later handler ran, frozen yet: False",
                                       "frozen at exit: True"]
    # Reference counting still frees (and so flushes) what the modules held as they are cleared.
    assert target.read_text() == "every byte" * 1000


def test_every_hilum_command_ends_with_the_freeze(tmp_path):
    out = run_python(f"""
        import atexit, gc
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
        from hilum.launch.cli import main
        try:
            main(["status", {str(tmp_path / "no-run")!r}])
        except (SystemExit, FileNotFoundError, ValueError):
            pass
    """)
    assert out.stdout.splitlines()[-1] == "frozen at exit: True"


def test_deepspeed_builds_with_the_interpreters_ninja(tmp_path, monkeypatch):
    from hilum.trainer import engine

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin"]))
    engine._prefer_interpreters_ninja()
    assert os.environ["PATH"] == os.pathsep.join(["/usr/local/bin", "/usr/bin"])  # no ninja there: unchanged

    (bin_dir / "ninja").write_text("")
    engine._prefer_interpreters_ninja()
    engine._prefer_interpreters_ninja()  # once only
    assert os.environ["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/local/bin", "/usr/bin"]


def test_a_run_without_an_address_joins_ray_address_or_starts_its_own(monkeypatch):
    from hilum.cluster.ray_runner import ray_address
    from hilum.launch.config import build_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(build_config({})) is None  # embedded: ray.init(address="local")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` gives its entrypoint
    assert ray_address(build_config({})) == "10.0.0.5:6379"
    assert ray_address(build_config({}, ["cluster.address=ray://head:10001"])) == "ray://head:10001"


def test_commands_that_read_a_run_do_not_import_torchvision():
    """`hilum status` and the launcher read checkpoints' stream positions: 2 s more each with
    torchvision, paid by every status poll."""
    out = run_python("""
        import sys
        import hilum.launch.cli, hilum.trainer.checkpoint
        print("torchvision" in sys.modules)
    """)
    assert out.stdout.split() == ["False"]
