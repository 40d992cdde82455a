"""The ``hilum`` command line.

    hilum train --config configs/tiny-clip.yaml [--set optim.lr=3e-4 ...] [--resume]
    hilum launch configs/tiny-clip.yaml [--address ray://HEAD:10001] [--set ...]
    hilum stop RUN_DIR
    hilum resume RUN_DIR [--set train.max_steps=400 ...]
    hilum shards phantom --out data/phantom
    hilum shards build (--mimic ROOT | --csv TABLE) --out URL [--resize 512 --workers 8 ...]
    hilum shards verify MANIFEST_URL
    hilum checkpoints RUN_DIR
    hilum status RUN_DIR [--watch]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hilum.cluster.quick_exit import freeze_at_exit
from hilum.launch.config import (
    RESOLVED_CONFIG,
    ConfigError,
    HilumConfig,
    dump_config,
    load_config,
    load_run_config,
    resolve_paths,
)
from hilum.launch.jobs import JOB_FILE, JobRecord, driver_state, job_state, mark_driver, stop, submit
from hilum.monitoring.console import configure_console, set_verbose
from hilum.trainer.data.storage import redact_url

log = logging.getLogger("hilum.launch")



def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by its dotted name, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--launcher", choices=("ray", "local"), help="shortcut for --set cluster.launcher=…")
    p.add_argument("--address", help="Ray cluster address (shortcut for --set cluster.address=…); default: embedded local Ray")
    p.add_argument("--workers", type=int, help="shortcut for --set cluster.num_workers=…")
    _verbose_arg(p, default=argparse.SUPPRESS)


def _verbose_arg(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="also show Ray's, Ray Train's and DeepSpeed's INFO lines, in this process and every worker")


def _shortcuts(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.launcher:
        extra.append(f"cluster.launcher={args.launcher}")
    if args.address:
        extra.append(f"cluster.address={args.address}")
    if args.workers is not None:
        extra.append(f"cluster.num_workers={args.workers}")
    return list(args.overrides) + extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hilum", description="Distributed medical vision-language pre-training.")
    _verbose_arg(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a config (validated before any worker starts)",
                       description="Train a dual encoder from a YAML config. The run directory is run.output_dir/run.name.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny-clip.yaml")
    _config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run.output_dir/run.name from its latest complete checkpoint (start fresh if it has none)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; start nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="start a run in the background: a Ray job on a cluster, or a detached driver here",
                       description="Validate the config, create the run directory and start the run without waiting: "
                                   "with --address as a Ray job on that cluster (ray://HOST:10001, auto, or "
                                   "http://HOST:8265), without it as a detached driver on this machine. Prints the run's "
                                   "directory and job id; follow it with `hilum status RUN_DIR`.")
    p.add_argument("config", help="YAML config")
    _config_args(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("stop", help="stop a launched run (its driver and workers); `hilum resume` continues it")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("resume", help="continue a run from its latest complete checkpoint",
                       description="Continue a run from its latest complete checkpoint, with the config saved in RUN_DIR. "
                                   "--set may change fields such as train.max_steps.")
    p.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
    _config_args(p)
    p.add_argument("--foreground", action="store_true",
                   help="a launched run is resumed in the background the way it was launched; run it here instead")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="a run's state, step, throughput, last checkpoint, and per-rank step-time breakdown, MFU, memory",
                       description="The job's state (for launched runs), then each rank's metrics endpoint (or, once the "
                                   "run has ended, its last snapshot).")
    p.add_argument("run_dir")
    p.add_argument("--watch", action="store_true", help="refresh live until the run ends (Ctrl-C to leave)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("checkpoints", help="list a run's complete checkpoints")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_checkpoints)

    p = sub.add_parser("export", help="write a checkpoint as one fp32 model + config + tokenizer (hilum.launch.export.from_pretrained loads it)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the latest complete one)")
    p.set_defaults(func=cmd_export)

    shards = sub.add_parser("shards", help="build WebDataset shards").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("phantom", help="generate the synthetic chest-radiograph data set (shards, manifests, tokenizer)")
    p.add_argument("--out", default="data/phantom")
    p.add_argument("--train", type=int, default=2048, help="training samples")
    p.add_argument("--test", type=int, default=256, help="held-out samples")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.set_defaults(func=cmd_phantom)

    p = shards.add_parser(
        "build", help="convert MIMIC-CXR-JPG or a CSV-described data set into shards and manifests",
        description="Write WebDataset shards and one manifest per split (train.json, validate.json, ...) to any fsspec "
                    "URL. FINDINGS and IMPRESSION are extracted from free-text reports. Re-running the same command "
                    "finishes an interrupted build.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--mimic", metavar="ROOT", help="MIMIC-CXR-JPG 2.x root (holds files/ and the mimic-cxr-2.0.0-*.csv[.gz] tables)")
    source.add_argument("--csv", metavar="TABLE", help="CSV with columns image, report|report_file|findings/impression, optional split, view, key")
    p.add_argument("--reports", metavar="ROOT", help="--mimic: root of the MIMIC-CXR reports (files/pXX/pSUBJECT/sSTUDY.txt); default: the JPG root")
    p.add_argument("--out", required=True, help="output directory URL (local path, s3://bucket/prefix, ...)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--resize", type=int, metavar="PIXELS", help="shrink images so the shorter side is PIXELS (default: keep the files as they are)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of resized images")
    p.add_argument("--views", help="comma-separated views to keep (default: PA,AP for --mimic, all for --csv); '' keeps all")
    p.add_argument("--min-words", type=int, default=3, help="drop reports with fewer words (findings + impression)")
    p.add_argument("--unsectioned", choices=("skip", "findings"), default="skip",
                   help="a report with neither FINDINGS nor IMPRESSION: skip it (counted), or use its whole text as findings")
    p.add_argument("--label-columns", default="", help="--csv: comma-separated numeric label columns")
    p.add_argument("--entities", choices=("rules", "llm", "none"), default="rules",
                   help="(severity, location, category) triplets in each sample's JSON: the offline rule-based extractor, "
                        "an LLM behind an OpenAI-compatible endpoint (--llm-url, --llm-model), or none")
    p.add_argument("--llm-url", help="--entities llm: API base of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--llm-model", help="--entities llm: the model name the server knows")
    p.add_argument("--llm-prompt", help="--entities llm: prompt file (default: hilum's, asking for a JSON list of triplets)")
    p.add_argument("--llm-api-key-env", metavar="NAME", help="--entities llm: environment variable holding the API key")
    p.add_argument("--llm-cache", metavar="DIR", help="--entities llm: cache replies here (a re-run asks only for what is missing)")
    p.add_argument("--llm-concurrency", type=int, default=8, help="--entities llm: requests in flight")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="build processes")
    p.add_argument("--seed", type=int, default=0, help="seeds the order of samples across shards")
    _storage_args(p)
    p.set_defaults(func=cmd_shards_build)

    p = shards.add_parser("verify", help="decode every sample of a manifest's shards and check the counts",
                          description="Exit status 0 when every sample decodes, has a report, keys are unique and the "
                                      "manifest's counts match the shards; 1 otherwise, listing each problem.")
    p.add_argument("manifest", help="manifest URL, e.g. s3://bucket/mimic/train.json")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    _storage_args(p)
    p.set_defaults(func=cmd_shards_verify)
    return parser


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000 (credentials: AWS_* environment)")
    p.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec storage options as JSON")


def _llm_extractor(args: argparse.Namespace) -> Any:
    """The LLM entity extractor of ``shards build --entities llm`` (None for the other extractors)."""
    if args.entities != "llm":
        if args.llm_url or args.llm_model:
            raise ConfigError("--llm-url/--llm-model are used with --entities llm only")
        return None
    if not (args.llm_url and args.llm_model):
        raise ConfigError("--entities llm needs --llm-url (an OpenAI-compatible API base) and --llm-model")
    from hilum.trainer.data.llm_entities import DEFAULT_PROMPT, LLMExtractor

    prompt = args.llm_prompt or str(DEFAULT_PROMPT)
    if not Path(prompt).is_file():
        raise ConfigError(f"--llm-prompt: {prompt} is not a file")
    return LLMExtractor(args.llm_url, args.llm_model, prompt, args.llm_api_key_env, args.llm_cache,
                        concurrency=args.llm_concurrency)


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        options = json.loads(args.storage_options)
    except ValueError as err:
        raise ConfigError(f"--storage-options is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object")
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    return options


# ---------------------------------------------------------------------------------------------


def _launch(cfg: HilumConfig, resume: bool) -> dict[str, Any]:
    from hilum.launch.preflight import preflight

    preflight(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / RESOLVED_CONFIG)
    log.info("run directory %s (%s launcher, %d workers)", run_dir, cfg.cluster.launcher, cfg.cluster.num_workers)
    t0 = time.perf_counter()
    mark_driver(run_dir, "RUNNING")
    try:
        if cfg.cluster.launcher == "local":
            from hilum.cluster.local import run_local

            result = run_local(cfg, resume)
        else:
            from hilum.cluster.ray_runner import run_ray

            result = run_ray(cfg, resume)
    except SystemExit:
        mark_driver(run_dir, "STOPPED")
        raise
    except BaseException as err:
        mark_driver(run_dir, "FAILED", error=f"{type(err).__name__}: {err}"[:2000])
        raise
    mark_driver(run_dir, "SUCCEEDED")
    log.info("finished in %.0fs", time.perf_counter() - t0)
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        ev = json.loads(eval_file.read_text())
        zs = ev.get("zero_shot", {})
        print(
            f"hilum: {cfg.run.name} done: zero-shot accuracy {zs.get('accuracy', float('nan')):.3f} "
            f"(chance {zs.get('chance', float('nan')):.3f}, {zs.get('samples', 0)} held-out samples); "
            f"results in {eval_file}"
        )
    return result


def _latest_checkpoint(cfg: HilumConfig) -> str | None:
    from hilum.trainer.checkpoint import store_for

    found = store_for(cfg).latest_complete()
    return redact_url(found.url) if found else None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_paths(load_config(args.config, _shortcuts(args)))
    if args.dry_run:
        from hilum.launch.preflight import preflight

        preflight(cfg)
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    latest = _latest_checkpoint(cfg)
    if latest and not args.resume:
        raise ConfigError(
            f"run {cfg.run.name} already has checkpoints (latest {latest}); "
            "pass --resume to continue it, or choose another run.name"
        )
    if args.resume and latest:
        log.info("resuming from %s", latest)
    _launch(cfg, resume=args.resume)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    cfg = load_run_config(run_dir, _shortcuts(args))
    latest = _latest_checkpoint(cfg)
    if latest is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint to resume from (looked in {redact_url(cfg.checkpoint_url)})")
    record = JobRecord.load(run_dir)
    if record is not None:
        state = job_state(run_dir, record)
        if state in ("PENDING", "RUNNING"):
            raise ConfigError(f"{cfg.run.name} is still {state.lower()} (job {record.job_id}); `hilum stop {run_dir}` first")
    log.info("resuming from %s", latest)
    if record is not None and not args.foreground:
        _background(cfg, record.address, resume=True)
        return 0
    _launch(cfg, resume=True)
    return 0


def _background(cfg: HilumConfig, address: str | None, resume: bool) -> None:
    from hilum.launch.preflight import preflight

    preflight(cfg)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / RESOLVED_CONFIG)
    mark_driver(run_dir, "PENDING")
    record = submit(run_dir, address, resume, cfg.run.name)
    where = f"Ray job {record.job_id} on {address}" if record.kind == "ray" else f"driver process {record.job_id} (log: {run_dir / 'driver.log'})"
    print(f"hilum: {cfg.run.name} {'resumed' if resume else 'launched'} as {where}\n"
          f"  run directory: {run_dir}\n  follow: hilum status {run_dir} --watch\n  stop:   hilum stop {run_dir}")


def cmd_launch(args: argparse.Namespace) -> int:
    cfg = resolve_paths(load_config(args.config, _shortcuts(args)))
    record = JobRecord.load(cfg.run_dir)
    if record is not None and job_state(cfg.run_dir, record) in ("PENDING", "RUNNING"):
        raise ConfigError(f"run {cfg.run.name} is already running (job {record.job_id}): `hilum status {cfg.run_dir}`")
    latest = _latest_checkpoint(cfg)
    if latest:
        raise ConfigError(f"run {cfg.run.name} already has checkpoints (latest {latest}): `hilum resume {cfg.run_dir}` "
                          "continues it; or choose another run.name")
    # The address is where the job goes; inside the job the driver joins that cluster as "auto".
    _background(cfg, cfg.cluster.address, resume=False)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    record = JobRecord.load(run_dir)
    if record is None:
        raise ConfigError(f"{run_dir} was not started by `hilum launch` (no {JOB_FILE}): stop its `hilum train` with Ctrl-C")
    state = job_state(run_dir, record)
    if state not in ("PENDING", "RUNNING"):
        print(f"hilum: {run_dir.name} is not running ({state})")
        return 0
    stop(run_dir, record)
    print(f"hilum: stopped {run_dir.name} (job {record.job_id}); `hilum resume {run_dir}` continues it from its latest checkpoint")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hilum.monitoring.status import show

    run_dir = Path(args.run_dir)
    if not (run_dir / RESOLVED_CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a hilum run directory (no {RESOLVED_CONFIG})")
    record = JobRecord.load(run_dir)
    if record is not None:
        where = f"Ray job {record.job_id} on {record.address}" if record.kind == "ray" else f"driver process {record.job_id} on this machine"
        print(f"job: {job_state(run_dir, record)} ({where})")
        error = driver_state(run_dir).get("error")
        if error:
            print(f"driver error: {error}")
    starts = run_dir / "workers" / "rank0.jsonl"
    if starts.is_file():
        lines = [json.loads(line) for line in starts.read_text().splitlines() if line.strip()]
        if len(lines) > 1:  # restarts: after failures (Ray Train) or by `hilum resume`
            print(f"workers started {len(lines)} times; the last start continued after step {lines[-1]['from_step']} "
                  f"on {lines[-1]['host']}")
    show(run_dir, watch=args.watch, interval_s=args.interval)
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from hilum.trainer.checkpoint import store_for

    store = store_for(load_run_config(Path(args.run_dir)))
    found = store.list_complete()
    if not found:
        print(f"no complete checkpoints in {redact_url(store.url)}")
        return 1
    for c in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.saved_at))
        print(f"step {c.step:>8}  {store.size(c) / 2**20:8.1f} MiB  {when}  {c.world_size} ranks  {redact_url(c.url)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hilum.launch.export import export

    ckpt = export(Path(args.run_dir), Path(args.out), args.step)
    print(f"exported step {ckpt.step} of {args.run_dir} to {args.out} (load with hilum.launch.export.from_pretrained)")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from hilum.trainer.data.phantom_dataset import build_phantom_dataset

    t0 = time.perf_counter()
    manifests = build_phantom_dataset(args.out, args.train, args.test, args.size, args.seed, args.samples_per_shard)
    for split, m in manifests.items():
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards -> {m.source}")
    print(f"phantom data set written to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_shards_build(args: argparse.Namespace) -> int:
    from collections import Counter

    from hilum.trainer.data.shard_build import ImageOptions, build
    from hilum.trainer.data.sources import FRONTAL_VIEWS, Filters, csv_records, mimic_records

    storage = _storage_options(args)
    if args.views is None:
        views = FRONTAL_VIEWS if args.mimic else ()
    else:
        views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    filters = Filters(views=views, min_words=args.min_words, unsectioned=args.unsectioned, entities=args.entities,
                      llm=_llm_extractor(args))
    if args.resize is not None and args.resize < 1:
        raise ConfigError("--resize must be a positive number of pixels")
    t0 = time.perf_counter()
    skipped: Counter[str] = Counter()
    if args.mimic:
        records = mimic_records(args.mimic, args.reports, filters, storage, skipped)
    else:
        labels = tuple(c.strip() for c in args.label_columns.split(",") if c.strip())
        records = csv_records(args.csv, filters, labels, storage, skipped)
    if not records:
        print(f"hilum: no usable records (skipped: {dict(skipped)})", file=sys.stderr)
        return 1
    summary = build(records, args.out, args.samples_per_shard, ImageOptions(args.resize, args.quality), args.workers,
                    args.seed, storage, progress=True, source_skipped=skipped)
    for split, m in summary.manifests.items():
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards -> {m.source}")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.skipped.items())) or "none"
    print(f"skipped: {reasons}")
    print(f"{summary.shards_written} shards written, {summary.shards_reused} kept from an earlier run, "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    from hilum.trainer.data.shard_build import verify

    report = verify(args.manifest, _storage_options(args), args.workers)
    for problem in report.problems:
        print(f"problem: {problem}")
    state = "OK" if report.ok else f"{len(report.problems)} problems"
    print(f"{report.manifest}: {report.samples} samples read in {report.shards} shards "
          f"(manifest: {report.expected}): {state}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    freeze_at_exit()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    configure_console("%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `hilum stop` sends SIGTERM: exit through Python, so the driver records it and Ray shuts down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"hilum: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        if args.command != "shards":
            raise
        print(f"hilum: {err}", file=sys.stderr)  # a missing table or a malformed CSV: no traceback needed
        return 2
    except Exception as err:  # a worker stopped the run as diverged: exit 3, no traceback
        from hilum.trainer.health import DIVERGED_EXIT_CODE, diverged_message

        message = diverged_message(err)
        if message is None:
            raise
        print(f"hilum: {message}", file=sys.stderr)
        return DIVERGED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
