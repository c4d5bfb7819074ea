"""Typed, validated run configuration.

A config is YAML (or a dict built in code) checked by pydantic before anything is
built or trained. Every error names its field (``data.path``, ``train.batch_size``)
and becomes exit code 2 on the command line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)


class ConfigError(ValueError):
    """A bad config, data path or data file; the message names the field or file."""


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


def _existing_dir(v: Path) -> Path:
    if not v.is_dir():
        raise ValueError(f"directory does not exist: {v}")
    return v


ExistingDir = Annotated[Path, AfterValidator(_existing_dir)]


class _DataBase(_Strict):
    augment: bool = Field(False, description="random crop (pad 4) + horizontal flip of training images")


class DigitsData(_DataBase):
    """scikit-learn's 8x8 handwritten digits (1,797 images), shipped with the package: works offline."""

    name: Literal["digits"]
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)


class Cifar10Data(_DataBase):
    """CIFAR-10 in its standard python format (``cifar-10-batches-py``)."""

    name: Literal["cifar10"]
    path: Path = Path("data/cifar10")
    download: bool = True
    augment: bool = True

    @model_validator(mode="after")
    def _path_or_download(self) -> "Cifar10Data":
        if not self.download and not self.path.exists():
            raise ValueError(f"path: {self.path} does not exist and download is false")
        return self


class ImageFolderData(_DataBase):
    """``path/<split>/<class>/*.jpg|png`` image tree (e.g. the cifar10-jpeg archive, extracted)."""

    name: Literal["image_folder"]
    path: ExistingDir
    train_split: str = "train"
    test_split: str = "test"
    image_size: PositiveInt | None = Field(None, description="resize to this square size; default: keep")
    max_per_class: PositiveInt | None = Field(None, description="read at most this many images per class and split")


class IdxData(_DataBase):
    """MNIST-style idx files: ``train-images-idx3-ubyte[.gz]`` etc. in one folder."""

    name: Literal["idx"]
    path: ExistingDir
    train_images: str = "train-images-idx3-ubyte"
    train_labels: str = "train-labels-idx1-ubyte"
    test_images: str = "t10k-images-idx3-ubyte"
    test_labels: str = "t10k-labels-idx1-ubyte"


class SyntheticData(_DataBase):
    """Random tensors of any shape with labels from a fixed random teacher (throughput runs)."""

    name: Literal["synthetic"]
    shape: list[PositiveInt] = Field(default_factory=lambda: [3, 32, 32], min_length=1, max_length=3)
    num_classes: int = Field(10, ge=2)
    train_size: PositiveInt = 4096
    test_size: PositiveInt = 1024


DataConfig = Annotated[
    Union[DigitsData, Cifar10Data, ImageFolderData, IdxData, SyntheticData], Field(discriminator="name")
]

# -------------------------------------------------------------------------- model


class MLPModel(_Strict):
    name: Literal["mlp"]
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 256, 256], min_length=1)
    batch_norm: bool = True

    def num_blocks(self) -> int:
        return len(self.hidden) + 1  # hidden layers + classifier


class VGGModel(_Strict):
    name: Literal["vgg"]
    widths: list[PositiveInt] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1)
    convs_per_block: PositiveInt = 2

    def num_blocks(self) -> int:
        return len(self.widths) + 1


class ResNetModel(_Strict):
    name: Literal["resnet"]
    widths: list[PositiveInt] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1)
    depths: list[PositiveInt] = Field(default_factory=lambda: [2, 2, 2, 2], min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> "ResNetModel":
        if len(self.widths) != len(self.depths):
            raise ValueError(f"depths: needs one entry per width ({len(self.widths)}), got {len(self.depths)}")
        return self

    def num_blocks(self) -> int:
        return 1 + sum(self.depths) + 1  # stem + residual blocks + classifier


class DNICNNModel(_Strict):
    """The DNI paper's CIFAR CNN: three 5x5 conv blocks (BN, ReLU, pool) and a linear classifier."""

    name: Literal["dni_cnn"]
    channels: PositiveInt = 128
    kernel_size: PositiveInt = 5

    def num_blocks(self) -> int:
        return 4


ModelConfig = Annotated[Union[MLPModel, VGGModel, ResNetModel, DNICNNModel], Field(discriminator="name")]

# ------------------------------------------------------------------------ methods


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names become directory names: no separators, no '..'


class _MethodBase(_Strict):
    label: str | None = Field(
        None, pattern=NAME_PATTERN, description="run name in a comparison; default: the method name"
    )

    def display_name(self) -> str:
        return self.label or self.name  # type: ignore[attr-defined]


class BackpropMethod(_MethodBase):
    """End-to-end backprop (E2EBP), the reference, under one of the synchronous schedules (Ray runtime)."""

    name: Literal["backprop"]
    schedule: Literal["single", "naive", "gpipe", "1f1b", "ddp"] | None = Field(
        None,
        description="ray runtime: single worker, naive model parallel, GPipe, 1F1B, or data parallel; "
        "default: naive for several stages, single for one",
    )
    microbatches: PositiveInt = Field(4, description="micro-batches per batch for gpipe and 1f1b")


class DGLMethod(_MethodBase):
    """Greedy local learning: each stage but the last learns through its own auxiliary head."""

    name: Literal["dgl"]
    aux_hidden: PositiveInt = Field(128, description="width of the auxiliary head")
    replay_buffer: NonNegativeInt = Field(
        0, description="ray runtime: stages draw inputs from the last N upstream outputs (0: off)"
    )
    replay_max_reuse: PositiveInt = Field(4, description="times one buffered input may be used")


class DNIMethod(_MethodBase):
    """Synthetic gradients at every stage boundary (``conditioned``: cDNI, the label enters the predictor)."""

    name: Literal["dni"]
    conditioned: bool = False
    predictor_hidden: PositiveInt | None = Field(
        None, description="hidden width (MLP) or channels (conv) of a predictor; default: that of the features"
    )
    predictor_layers: PositiveInt = Field(2, description="hidden layers of a predictor")
    predictor_kernel_size: PositiveInt = Field(3, description="conv predictors' kernel size")
    predictor_lr: PositiveFloat = 1e-3
    predictor_optimizer: Literal["adam", "sgd"] = "adam"
    predictor_training: Literal["coordinator", "local"] = Field(
        "coordinator",
        description="ray runtime: the coordinator trains the predictors from sampled (h, y, gradient) triples and "
        "pushes weights; local: each stage trains its own from gradients sent back (single-process DNI)",
    )
    predictor_sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="fraction of steps sent to the coordinator")
    predictor_push_every: PositiveInt = Field(1, description="steps between a stage's requests for fresh weights")
    predictor_max_outstanding: PositiveInt = Field(
        8, description="samples a stage may have queued at the coordinator; more are dropped, never waited for"
    )


class FAMethod(_MethodBase):
    """Feedback alignment: fixed random feedback matrices in place of W^T."""

    name: Literal["fa"]


class SignSymmetricMethod(_MethodBase):
    """Sign-concordant feedback: fixed random magnitudes with the signs of the current weights."""

    name: Literal["sign_symmetric"]


class DFAMethod(_MethodBase):
    """Direct feedback alignment: the output error projected to every stage by a fixed random matrix."""

    name: Literal["dfa"]


MethodConfig = Annotated[
    Union[BackpropMethod, DGLMethod, DNIMethod, FAMethod, SignSymmetricMethod, DFAMethod],
    Field(discriminator="name"),
]

# ----------------------------------------------------------------------- training


class SplitConfig(_Strict):
    stages: PositiveInt = Field(1, description="K: number of pipeline stages")
    balance: Literal["params", "time", "even"] = "params"
    boundaries: list[PositiveInt] | None = Field(
        None, description="explicit split: index of the first block of stages 1..K-1 (overrides balance)"
    )


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    schedule: Literal["constant", "cosine"] = "cosine"


class TrainConfig(_Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 512
    max_steps: PositiveInt | None = Field(None, description="stop after this many steps (throughput runs)")
    warmup_steps: NonNegativeInt = Field(5, description="first steps left out of samples/s (one-off start-up costs)")
    threads: PositiveInt | None = Field(None, description="torch.set_num_threads; default: torch's choice")
    keep_freed_memory: bool = Field(
        True, description="glibc (Linux): Ray stage workers and DNI coordinators keep the memory they free for "
        "the next step instead of returning it to the OS and faulting it in again (decoupled/malloc.py); "
        "so does the profile of `decoupled plan`")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: PositiveInt = 10
    metrics_every_s: PositiveFloat = Field(2.0, description="ray runtime: how often the driver collects stage metrics")
    stage_delay_s: dict[NonNegativeInt, NonNegativeFloat] = Field(
        default_factory=dict, description="ray runtime: extra seconds per step for the named stages (a straggler)"
    )
    progress: bool = True
    on_nonfinite: Literal["stop", "skip_batch"] = Field(
        "stop", description="a NaN/inf loss, activation or gradient: stop the run naming stage and step, "
        "or skip that batch's update (counted as skipped_batches)"
    )


class CheckpointConfig(_Strict):
    """Resumable checkpoints under ``<run_dir>/checkpoints`` (on a multi-node cluster the run
    directory must be on storage every node can write, as for Ray Train)."""

    enabled: bool = True
    every_steps: PositiveInt | None = Field(None, description="also checkpoint every this many steps (default: "
                                            "only at each epoch's end)")
    keep: PositiveInt = Field(2, description="complete checkpoints kept; older ones are deleted")


class RecoveryConfig(_Strict):
    """What the Ray runtime does when a stage worker dies (process killed, out of memory, node lost)."""

    max_restarts: NonNegativeInt = Field(3, description="restarts allowed per stage; one more failure stops "
                                         "the run, naming the stage, step and cause")


class ClusterConfig(_Strict):
    """Where the Ray runtime runs: an embedded local Ray (default) or an existing cluster."""

    address: str | None = Field(None, description="existing cluster ('auto', 'host:port', 'ray://...'); "
                                "default: RAY_ADDRESS, else an embedded Ray on this machine")
    cpus_per_worker: PositiveFloat = Field(1.0, description="Ray CPUs reserved per stage worker")
    gpus_per_worker: NonNegativeInt | None = Field(None, description="default: 1 where the cluster has GPUs, else 0")
    strategy: Literal["PACK", "SPREAD"] = "PACK"
    host: str = Field("127.0.0.1", description="address an embedded Ray listens on")
    start_timeout_s: PositiveFloat = Field(120.0, description="longest wait for the placement group, the workers "
                                           "and their stages to start (a new node may first pull an image)")
    dashboard: bool = False


class LinksConfig(_Strict):
    """Point-to-point links between stage workers."""

    max_in_flight: PositiveInt = Field(2, description="messages queued per link end: how far a fast stage runs ahead")
    timeout_s: PositiveFloat = Field(120.0, description="longest wait on a peer before the run stops, naming it")


class OutputConfig(_Strict):
    dir: Path = Path("runs")
    tensorboard: bool = True


class CompareConfig(_Strict):
    methods: list[MethodConfig] = Field(min_length=1)
    repeats: PositiveInt = Field(1, description="rounds of every method, interleaved; figures are medians and "
                                 "ratios are medians of same-round ratios")

    @model_validator(mode="after")
    def _unique_labels(self) -> "CompareConfig":
        names = [m.display_name() for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"methods: run names must be unique; give a 'label' to: {', '.join(dupes)}")
        return self


class Config(_Strict):
    name: str = Field("run", pattern=NAME_PATTERN)
    seed: int = 0
    data: DataConfig
    model: ModelConfig
    split: SplitConfig = Field(default_factory=SplitConfig)
    method: MethodConfig = Field(default_factory=lambda: BackpropMethod(name="backprop"))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: Literal["auto", "inprocess", "ray"] = Field(
        "auto", description="auto: ray when there is more than one worker (split.stages > 1), else inprocess"
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    links: LinksConfig = Field(default_factory=LinksConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    compare: CompareConfig | None = None

    @model_validator(mode="after")
    def _stages_fit_model(self) -> "Config":
        n = self.model.num_blocks()
        if self.split.stages > n:
            raise ValueError(
                f"split.stages: {self.split.stages} stages requested but model '{self.model.name}' has only {n} blocks"
            )
        b = self.split.boundaries
        if b is not None:
            if len(b) != self.split.stages - 1:
                raise ValueError(f"split.boundaries: needs {self.split.stages - 1} entries for {self.split.stages} stages")
            if b != sorted(set(b)) or (b and b[-1] >= n):
                raise ValueError(f"split.boundaries: must be strictly increasing block indices below {n}")
        for i, method in enumerate([self.method] + (self.compare.methods if self.compare else [])):
            self._check_method(method, "method" if i == 0 else f"compare.methods[{i - 1}]")
        return self

    def _check_method(self, method: Any, where: str) -> None:
        runtime = self.resolved_runtime()
        if isinstance(method, BackpropMethod) and method.schedule is not None:
            if runtime == "inprocess":
                raise ValueError(f"{where}.schedule: '{method.schedule}' needs runtime ray (runtime is inprocess)")
            if method.schedule in ("naive", "gpipe", "1f1b", "ddp") and self.split.stages < 2:
                raise ValueError(f"{where}.schedule: '{method.schedule}' needs split.stages >= 2 workers")
            if method.schedule == "1f1b" and method.microbatches < self.split.stages:
                raise ValueError(
                    f"{where}.microbatches: 1f1b needs at least one micro-batch per stage "
                    f"({method.microbatches} < {self.split.stages})"
                )
            if method.schedule in ("gpipe", "1f1b") and self.train.batch_size % method.microbatches:
                raise ValueError(
                    f"{where}.microbatches: {method.microbatches} does not divide train.batch_size "
                    f"{self.train.batch_size}"
                )
        if isinstance(method, DGLMethod) and method.replay_buffer and runtime == "inprocess":
            raise ValueError(f"{where}.replay_buffer: needs runtime ray (in one process no stage waits for another)")

    def resolved_runtime(self) -> str:
        if self.runtime != "auto":
            return self.runtime
        return "ray" if self.split.stages > 1 else "inprocess"

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "Config":
        """Load and validate a YAML config (the same as ``--config path key=value ...``)."""
        return load_config(path, overrides)

    def override(self, *overrides: str) -> "Config":
        """A validated copy with command-line style overrides, e.g. ``cfg.override("train.epochs=3")``."""
        return build_config(self.model_dump(mode="json"), list(overrides))

    def with_method(self, method: Any) -> "Config":
        """A copy of this config that runs ``method`` (used by ``compare``)."""
        data = self.model_dump(mode="json")
        data["method"] = method.model_dump(mode="json") if isinstance(method, BaseModel) else method
        data["compare"] = None
        return Config.model_validate(data)


# ------------------------------------------------------------------------ loading


def _format_errors(err: ValidationError, raw: Any) -> str:
    lines = []
    for e in err.errors():
        loc = _readable_loc(e["loc"], raw)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown {loc.rsplit('.', 1)[-1] if loc else 'value'} {e['input'].get('name')!r}" if isinstance(
                e.get("input"), dict) else msg
            msg += "; expected one of: " + e["ctx"]["expected_tags"] if "ctx" in e else ""
        elif e["type"] == "union_tag_not_found":
            msg = "missing 'name' (which kind: " + e["ctx"]["discriminator"] + ")" if "ctx" in e else msg
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # our validators name the field they check first: "path: ..." inside data -> "data.path: ..."
        named = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", msg, re.S)
        if e["type"] == "value_error" and named:
            loc, msg = ".".join(p for p in (loc, named.group(1)) if p), named.group(2)
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _readable_loc(loc: tuple, raw: Any) -> str:
    """``('method', 'dgl', 'aux_hidden')`` -> ``method.aux_hidden``: drop the union tag pydantic inserts."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(node, dict) and isinstance(item, str) and item not in node and node.get("name") == item:
            continue  # the discriminator tag of a union member, not a key
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(item)
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.epochs=3", "method.name=dgl"]`` -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is set to a value and also used as a section")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {item!r}: {key} is also used as a section")
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # a new discriminator value starts that section afresh: keys of the old kind would not fit
            if "name" in v and v["name"] != out[k].get("name"):
                out[k] = dict(v)
            else:
                out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate(model: type[ModelT], raw: dict, overrides: list[str] | None = None) -> ModelT:
    """Validate a dict (plus ``key=value`` overrides) into ``model``, or raise ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("config: top level must be a mapping")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw)) from None


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping, or ConfigError naming ``--config``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path} is not valid YAML: {err}") from None


def build_config(raw: dict, overrides: list[str] | None = None) -> Config:
    """Validate a dict (plus ``key=value`` overrides) into a Config, or raise ConfigError naming the field."""
    return validate(Config, raw, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    return build_config(read_yaml(path), overrides)
