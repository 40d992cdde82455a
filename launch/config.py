"""The one typed configuration schema of a hilum run, loaded from YAML and validated at launch.

Every section is a strict pydantic model: unknown keys, wrong types and out-of-range values are
refused before any worker starts, and the error names the dotted field (``optim.lr``) and the
reason. Objective terms are registered in :mod:`hilum.trainer.objectives`; their config classes join the
schema through that registry when the config is validated, so a new term — hilum's, or one from a
module that ``plugins:`` names — needs no edit here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
import importlib
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from hilum.trainer.objectives import TermConfig, objective_config_types

RESOLVED_CONFIG = "config.yaml"  # a run directory's copy of the config it was started with


class ConfigError(ValueError):
    """A configuration was refused; the message names every offending field."""


class _Section(BaseModel):
    # strict: a string never silently becomes a number; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def _refuse_literal_credentials(options: dict[str, Any]) -> dict[str, Any]:
    from hilum.trainer.data.storage import literal_secrets

    secrets = literal_secrets(options)
    if secrets:
        raise ValueError(
            f"credentials must not be written into the config ({', '.join(secrets)}): set them in the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3) or reference an environment variable as '${NAME}'"
        )
    return options


class RunSection(_Section):
    name: str = Field("hilum", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = "runs"
    seed: int = Field(0, ge=0)
    checkpoint_dir: str | None = Field(
        None, description="URL of the directory holding this run's checkpoints: a local path or s3://bucket/prefix "
                          "(with run.storage_options); None: RUN_DIR/checkpoints"
    )
    # fsspec options for checkpoint_dir, e.g. {endpoint_url: "http://minio:9000"}; credentials as
    # in data.storage_options: from the environment or as ${NAME} references, never literals.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    deterministic: bool = Field(
        False, description="deterministic algorithms and seeded everything: a run interrupted at any step and resumed "
                           "ends with the parameters of an uninterrupted run (bitwise on CPU; see the README for GPUs)"
    )

    @field_validator("storage_options")
    @classmethod
    def _no_literal_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _refuse_literal_credentials(options)


class AugmentSection(_Section):
    # No horizontal flip: reports say "left" and "right", and flipping would make them lie.
    crop_scale_min: float = Field(0.8, gt=0.0, le=1.0)
    brightness: float = Field(0.1, ge=0.0, le=1.0)
    contrast: float = Field(0.1, ge=0.0, le=1.0)


class DataSection(_Section):
    train_manifest: str = "data/phantom/train.json"
    eval_manifest: str | None = "data/phantom/test.json"
    image_size: int = Field(64, ge=16, le=2048)
    in_chans: Literal[1, 3] = 1
    batch_size: int = Field(32, ge=1, description="samples per rank per step (micro-batch)")
    num_workers: int = Field(1, ge=0, le=64)
    shuffle_buffer: int = Field(256, ge=0)
    context_length: int = Field(64, ge=8, le=4096)
    text: Literal["report", "findings", "impression"] = "report"
    augment: AugmentSection = Field(default_factory=AugmentSection)
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where JPEGs are decoded: gpu = batched nvJPEG on the training GPU (loader workers only "
                            "read and parse); cpu = PIL in the loader workers; auto = gpu on CUDA devices, else cpu"
    )
    prefetch: int = Field(
        2, ge=0, le=16, description="batches the training process prepares ahead (GPU decode, copy to the device) in a "
                                    "background thread with its own CUDA stream; 0 prepares each batch inline"
    )
    read_ahead_mb: int = Field(
        32, ge=0, le=4096, description="each loader worker fetches its next shard bytes in a background thread, up to "
                                       "this many MiB ahead of its tar parser (hides object-storage latency); 0 = off"
    )
    tokenizer_threads: int = Field(
        0, ge=0, le=64, description="threads each loader worker tokenises a batch with (a third of a GPU-decode "
                                    "worker's time); 0 = auto: the rank's cluster.cpus_per_worker shared out among "
                                    "its training process and loader workers, 1 to 4"
    )
    # Passed to fsspec for manifest and shard URLs, e.g. {endpoint_url: "http://minio:9000"} for an
    # S3-compatible store. Credentials come from the environment (AWS_ACCESS_KEY_ID, ...) or, here,
    # as references to environment variables ({key: "${MINIO_KEY}"}): never as literals, so a saved
    # or printed config holds no secret.
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("storage_options")
    @classmethod
    def _no_literal_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _refuse_literal_credentials(options)

    @property
    def read_ahead_bytes(self) -> int:
        return self.read_ahead_mb << 20

    def decodes_on_device(self, device_type: str) -> bool:
        """Whether JPEGs decode on the training device (``decode``) for a worker on ``device_type``."""
        return self.decode == "gpu" or (self.decode == "auto" and device_type == "cuda")


class ImageTowerSection(_Section):
    model: str = "vit_tiny_patch16_224"
    # Passed to timm.create_model, e.g. {img_size: 64, patch_size: 8, depth: 4}.
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="local file with the tower's weights (.pth or .safetensors)")
    channels_last: bool = Field(True, description="on CUDA, feed images in channels-last (NHWC) memory, cuDNN's fast "
                                                  "path for convolutions; no effect on CPU")


class TextTowerSection(_Section):
    tokenizer: str = Field("data/phantom/tokenizer", description="local tokenizer directory")
    pretrained: str | None = Field(None, description="local transformers model directory; None builds from `config`")
    # transformers BertConfig fields for a randomly initialised tower (vocab_size comes from the tokenizer).
    config: dict[str, Any] = Field(default_factory=dict)
    pooling: Literal["cls", "mean"] = "mean"
    freeze: bool = False


class ModelSection(_Section):
    embed_dim: int = Field(128, ge=1)
    image: ImageTowerSection = Field(default_factory=ImageTowerSection)
    text: TextTowerSection = Field(default_factory=TextTowerSection)
    init_temperature: float = Field(0.07, gt=0.0, le=1.0)
    max_logit_scale: float = Field(100.0, gt=1.0)


class OptimSection(_Section):
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(default_factory=lambda: [0.9, 0.98], min_length=2, max_length=2)
    eps: float = Field(1e-6, gt=0.0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping")


class HealthSection(_Section):
    """Spike and collapse detection (hilum.trainer.health): each finding is a warning, a metric
    (hilum_health_events) and a line in RUN_DIR/health_events.jsonl."""

    enabled: bool = True
    spike_deviations: float = Field(6.0, gt=0.0, description="a spike: the loss over its running median by this many "
                                                             "robust deviations (1.4826 x MAD) ...")
    spike_steps: int = Field(3, ge=1, description="... for this many consecutive steps")
    spike_window: int = Field(100, ge=8, description="healthy steps the running median is taken over")
    collapse_steps: int = Field(50, ge=1, description="steps a collapse sign must last before it is reported")
    min_logit_scale: float = Field(1.0, ge=0.0, description="a collapse: exp(logit_scale) at or below this (logits "
                                                            "that no longer separate pairs)")
    chance_tolerance: float = Field(0.01, ge=0.0, description="a collapse: a term within this fraction of its "
                                                              "chance level (ln N for InfoNCE) after warm-up")
    min_embedding_variance: float = Field(0.01, ge=0.0, description="a collapse: the total variance of a batch's "
                                                                    "unit-norm image or text embeddings below this")


class TrainSection(_Section):
    max_steps: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(3, ge=1)
    sample_log: bool = Field(False, description="append each step's sample keys to RUN_DIR/samples/rankN.jsonl: "
                                                "an audit of which samples trained which step, across restarts")
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU"
    )
    max_bad_steps: int = Field(3, ge=1, description="consecutive steps with a non-finite loss or gradient norm "
                                                    "(each skipped) before the run stops as diverged (exit code 3)")
    rollback: bool = Field(False, description="on a loss spike, reload the last healthy checkpoint from before it, "
                                              "skip the data that preceded the spike, and continue")
    max_rollbacks: int = Field(3, ge=1, description="rollbacks before a run whose spikes keep coming back stops")
    health: HealthSection = Field(default_factory=HealthSection)
    cudnn_benchmark: bool = Field(
        True, description="CUDA: let cuDNN time its convolution algorithms for each new input shape and keep the "
                          "fastest (batch shapes are fixed here); off under run.deterministic"
    )

    @model_validator(mode="after")
    def _rollback_needs_checkpoints(self) -> "TrainSection":
        if self.rollback and self.checkpoint_every == 0:
            raise ValueError("train.rollback needs checkpoints to roll back to: set train.checkpoint_every above 0")
        return self


class GradCacheSection(_Section):
    """Gradient caching: the contrastive batch per rank is ``data.batch_size`` (the global one
    ``ranks × data.batch_size``), encoded ``chunk_size`` samples at a time, so activation memory
    follows the chunk while the loss sees every negative."""

    enabled: bool = False
    chunk_size: int = Field(64, ge=1, description="samples per encoder pass; the last chunk may be smaller")


class ClusterSection(_Section):
    launcher: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Train TorchTrainer; local: one process per worker on this node, no Ray"
    )
    num_workers: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0)
    address: str | None = Field(
        None, description="Ray cluster address; None: RAY_ADDRESS if set, else an embedded local Ray")
    max_failures: int = Field(
        0, ge=-1, description="Ray launcher: restarts of the worker group after a worker or node fails, each from the "
                              "latest complete checkpoint (Ray Train's FailureConfig); -1: unlimited"
    )


class MonitoringSection(_Section):
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9400, ge=0, le=65535, description="rank r on node uses port + local_rank; 0: any free port")
    enabled: bool = True
    pushgateway: str | None = Field(None, description="Prometheus pushgateway URL: metrics are also pushed at every log step and at the end")
    peak_tflops: float | None = Field(None, gt=0.0, description="the device's dense peak for MFU; None: from the built-in table (GPUs)")
    straggler_factor: float = Field(1.5, gt=1.0, description="a rank whose mean step time exceeds the job median by this factor is flagged")
    phase_timing: bool = Field(True, description="time forward/loss/backward/optimizer separately (synchronises CUDA at phase ends)")
    module_grad_norms: bool = Field(True, description="at each log step, the gradient norm of each tower and part (under "
                                                      "ZeRO a collective per parameter) and the update/weight ratio")


class ZeroShotSection(_Section):
    # class name -> prompts (ensembled); None uses the phantom data set's classes and prompts.
    prompts: dict[str, list[str]] | None = None


class EvalSection(_Section):
    at_end: bool = True
    every_steps: int = Field(0, ge=0, description="0: only at the end")
    batch_size: int = Field(128, ge=1)
    max_samples: int = Field(0, ge=0, description="0: the whole eval manifest")
    zero_shot: ZeroShotSection = Field(default_factory=ZeroShotSection)


def _objective_terms() -> TypeAdapter:
    """The registered terms' configs as one union on ``name``, built when a config is validated
    (so that terms registered by plugins count)."""
    types = objective_config_types()
    term = types[0] if len(types) == 1 else Annotated[Union[tuple(types)], Field(discriminator="name")]
    return TypeAdapter(list[term])


def import_plugins(modules: Any) -> None:
    """Import the modules a config's ``plugins:`` names: each registers its terms."""
    for name in modules if isinstance(modules, list) else []:
        if not isinstance(name, str):
            continue  # the field's own validation names it
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"plugins: cannot import {name!r}: {err}") from None


class HilumConfig(_Section):
    plugins: list[str] = Field(
        default_factory=list, description="modules imported before the objectives are read, each registering its "
                                          "terms (a method outside hilum); every worker must be able to import them"
    )
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    objectives: list[SerializeAsAny[TermConfig]] = Field(
        default_factory=lambda: _objective_terms().validate_python([{"name": "clip"}]), min_length=1
    )
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    gradcache: GradCacheSection = Field(default_factory=GradCacheSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    monitoring: MonitoringSection = Field(default_factory=MonitoringSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        if isinstance(data, dict):
            import_plugins(data.get("plugins"))
        return data

    @field_validator("objectives", mode="wrap")
    @classmethod
    def _registered_terms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, list) and all(isinstance(v, TermConfig) for v in value):
            return handler(value)
        return handler(_objective_terms().validate_python(value))

    @model_validator(mode="after")
    def _check_objectives(self) -> "HilumConfig":
        names = [term.name for term in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {names}")
        if sum(term.weight for term in self.objectives) <= 0:
            raise ValueError("at least one objective needs a weight > 0")
        for term in self.objectives:
            term.check(self)
        if self.data.decode == "gpu" and self.cluster.device == "cpu":
            raise ValueError("data.decode is 'gpu' but cluster.device is 'cpu'; use 'auto' or 'cpu'")
        if self.gradcache.enabled and self.gradcache.chunk_size > self.data.batch_size:
            raise ValueError(
                f"gradcache.chunk_size ({self.gradcache.chunk_size}) is larger than data.batch_size "
                f"({self.data.batch_size}), the contrastive batch per rank it divides"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def checkpoint_url(self) -> str:
        return self.run.checkpoint_dir or str(self.run_dir / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Hash of the whole resolved config, recorded in each checkpoint's COMPLETE marker."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# YAML loading: PyYAML follows YAML 1.1, where "3e-4" is a string. Users write learning rates that
# way, so the loader also resolves exponent floats without a dot.
class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {dotted!r}")
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {assignment!r}: {where} is not an index of a {len(node)}-item list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {assignment!r}: {where} holds a value, not a section")
    value = parse_yaml(raw) if raw.strip() else ""
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {assignment!r}: {dotted} is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value


def _suggest(loc: tuple[Any, ...]) -> str:
    """'did you mean' for a misspelled key, from the fields of the section it sits in."""
    model: Any = HilumConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    fields = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    names = _term_names()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in names))
        field = ".".join(str(p) for p in loc)
        if not field:  # a check across sections: its message names the fields
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key{_suggest(loc)}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # an objective term's name
            tag = str((e.get("ctx") or {}).get("tag", ""))
            known = sorted(names)
            close = difflib.get_close_matches(tag, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            what = f"unknown objective {tag!r}{hint}" if e["type"] == "union_tag_invalid" else "missing"
            lines.append(f"  {field}.name: {what}; known: {', '.join(known)}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"  {field}: {e['msg']}{shown}")
    return "\n".join(lines)


def _term_names() -> set[str]:
    return {tag for t in objective_config_types() for tag in get_args(t.model_fields["name"].annotation)}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; lists and values in ``update`` replace those in ``base``."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in _OPAQUE_DICTS:
            _merge(base[key], value)
        else:
            base[key] = value
    return base


# Free-form mappings whose keys belong to another library: a file's value replaces the default.
_OPAQUE_DICTS = {"kwargs", "config", "prompts"}


def build_config(raw: dict[str, Any] | None, overrides: list[str] = (), source: str = "<dict>") -> HilumConfig:
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"invalid configuration ({source}): the top level must be a mapping")
    # Overrides land on the defaults merged with the file, so `--set objectives.0.weight=2` works
    # whether or not the file lists objectives.
    tree = _merge(HilumConfig().to_dict(), json.loads(json.dumps(raw or {})))
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return HilumConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] = ()) -> HilumConfig:
    """Read a YAML config, apply ``--set`` overrides, validate. Raises ConfigError naming fields."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    return build_config(raw, overrides, source=str(path))


def resolve_paths(cfg: HilumConfig, base: Path | None = None) -> HilumConfig:
    """Make every local path absolute: Ray workers run in another working directory.

    URLs with a scheme (``s3://``, ``gs://``, ``http://``) are left as they are.
    """
    base = Path(base or os.getcwd())

    def fix(p: str | None) -> str | None:
        if p is None or "://" in p or os.path.isabs(p):
            return p
        return str((base / p).resolve())

    data = cfg.data.model_copy(update={"train_manifest": fix(cfg.data.train_manifest), "eval_manifest": fix(cfg.data.eval_manifest)})
    text = cfg.model.text.model_copy(update={"tokenizer": fix(cfg.model.text.tokenizer), "pretrained": fix(cfg.model.text.pretrained)})
    image = cfg.model.image.model_copy(update={"weights": fix(cfg.model.image.weights)})
    model = cfg.model.model_copy(update={"text": text, "image": image})
    run = cfg.run.model_copy(update={"output_dir": fix(cfg.run.output_dir), "checkpoint_dir": fix(cfg.run.checkpoint_dir)})
    return cfg.model_copy(update={"data": data, "model": model, "run": run})


def load_run_config(run_dir: str | os.PathLike[str], overrides: list[str] = ()) -> HilumConfig:
    """The config a run directory was started with (``--set`` may change fields), following a moved directory."""
    run_dir = Path(run_dir)
    saved = run_dir / RESOLVED_CONFIG
    if not saved.is_file():
        raise ConfigError(f"{run_dir} is not a hilum run directory (no {RESOLVED_CONFIG})")
    cfg = build_config(parse_yaml(saved.read_text()), list(overrides), source=str(saved))
    if cfg.run_dir.resolve() != run_dir.resolve():
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(run_dir.resolve().parent),
                                                                        "name": run_dir.name})})
    return resolve_paths(cfg)


def dump_config(cfg: HilumConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
