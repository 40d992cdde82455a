"""Ray Train wiring: a TorchTrainer with one hilum worker per Ray Train worker.

Ray owns placement and the process group (gloo on CPU, NCCL on GPU); the worker body is the same
``hilum.trainer.loop.train`` the local launcher runs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hilum.monitoring.console import VERBOSE_ENV, verbose

if TYPE_CHECKING:
    from hilum.launch.config import HilumConfig


def _use_gpu(cfg: "HilumConfig") -> bool:
    if cfg.cluster.device == "cuda":
        return True
    if cfg.cluster.device == "cpu":
        return False
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from hilum.cluster.quick_exit import freeze_at_exit
    from hilum.trainer.loop import train

    freeze_at_exit()
    # Always "resume from the latest complete checkpoint, if any": the launcher has refused a fresh
    # run into a store that holds checkpoints, so at the first start this finds none (or the one
    # `hilum resume` asked for), and after a failure, when Ray Train's FailureConfig restarts the
    # worker group with the same arguments, it finds the newest one.
    result = train(loop_config["cfg"], resume=True, report=lambda metrics: ray.train.report(metrics))
    if result.get("eval"):
        ray.train.report({**result.get("train", {}), "eval": result["eval"]})


# DS_ACCELERATOR is not here: hilum.trainer.engine sets it from the device it picks, before importing
# DeepSpeed, whichever launcher started the worker.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# Passed on to the workers when the launching environment sets them (see hilum.trainer.checkpoint.fault_drill,
# hilum.trainer.health.LossDrill and hilum.monitoring.console).
PASSED_ENV = ("HILUM_FAULT_DRILL", "HILUM_LOSS_DRILL", VERBOSE_ENV)


def worker_env() -> dict[str, str]:
    return {**WORKER_ENV, **{k: os.environ[k] for k in PASSED_ENV if k in os.environ}}


def ray_address(cfg: "HilumConfig") -> str | None:
    """The cluster to join: ``cluster.address``, else ``RAY_ADDRESS`` (which ``ray job submit``
    sets for its entrypoint), else None for an embedded local Ray."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None


def run_ray(cfg: "HilumConfig", resume: bool = False) -> dict[str, Any]:
    """Train on Ray (``resume`` is implied: see ``_ray_worker``)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hilum.trainer.engine import dist_backend

    address = ray_address(cfg)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            cpus = max(os.cpu_count() or 1, int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 0.999))
            # No preemption watcher (set before Ray starts, so that its processes inherit it; a
            # user's own setting wins): one machine has no node to watch, and Ray Train 2.60's
            # watcher logs a core-worker error line when it starts (ray-project/ray#53727).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # "local", not None: Ray's None joins the cluster that `ray start` last recorded under
            # /tmp/ray (and then refuses num_cpus), so a run meant to be embedded would land on it.
            # With the dashboard (on 127.0.0.1, Ray's default): Ray Train 2.60's placement-group
            # cleaner asks the state API, which it serves, whether the controller lives, and without
            # it logged a warning every second of the run (1.2 s more start-up).
            ray.init(address="local", num_cpus=cpus, include_dashboard=True, log_to_driver=True,
                     configure_logging=False)
    use_gpu = _use_gpu(cfg)
    try:  # Ray Train's own INFO lines (worker group starts, every report) only when asked for
        from ray.train import LoggingConfig

        run_extra = {"logging_config": LoggingConfig(log_level="INFO" if verbose() else "WARNING")}
    except ImportError:  # Ray Train before v2
        run_extra = {}
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=dist_backend("cuda" if use_gpu else "cpu")),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(cfg.run_dir.resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             worker_runtime_env={"env_vars": worker_env()}, **run_extra),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
