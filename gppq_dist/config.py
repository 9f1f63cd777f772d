"""Run configuration: one YAML file describes a run.

The schema is strict: an unknown key, a value of the wrong type, or a layer rule that
cannot apply to the model is a :class:`~gppq_dist.errors.ConfigError` whose one message
names the file, the key and what was expected.

Layer rules come in three tiers, resolved per layer as name, then type, then default
(the shape of the paper's Table 1), for every method::

    quantization:
      skip_first_conv: true          # the stem is never quantized (DESIGN §2)
      default: null                  # layers matched by no rule below are left alone
      types:                         # per layer kind: conv{kh}x{kw} or linear
        conv3x3: {d: 9, k: 256}
        conv1x1: {d: 4, k: 256}
        linear:  {d: 4, k: 2048}
      names:                         # regex on the module name (full match), first wins;
        "layer4\\.1\\.conv2": {d: 18, k: 256}   # null leaves that layer alone

A rule's value is the method's layer settings, checked as the method's layer type
(:attr:`MethodSpec.layer <gppq_dist.methods.base.MethodSpec>`): ``{d, k}`` for the PQ
methods (``d: 1`` for ``kmeans_scalar``), ``{prune, bits}`` for ``clipq``, ``{}`` for ``tsq``
(the rule picks the layer, which has no settings). ``method:`` is one of the registered
methods (:mod:`gppq_dist.methods.registry`); the schema follows the registry, so a method
registered at run time is a valid ``method.name`` from then on.

Old configs: CLIP-Q's ``method.prune``, ``method.bits`` and ``method.layers``, and ``{d, k}``
rules under ``clipq`` or ``tsq`` (which only chose the layers then) are not translated but
refused with one error naming the old key and giving the ``quantization`` section to write
instead, computed from the file (:data:`MethodSpec.legacy
<gppq_dist.methods.base.LegacyCheck>`). Translating silently would be exact for TSQ and for
CLIP-Q without ``method.layers``, but not with it (those patterns applied only to layers the
``{d, k}`` rules had picked; as names rules they pick layers on their own), and a run's
``config.yaml`` and artifact would then record settings nobody wrote. Every other config
(the PQ methods' ``{d, k}`` rules) reads as before.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import TypeVar

from gppq_dist.errors import ConfigError, UserError
from gppq_dist.methods.base import RULE_TIERS, LayerQuant, Strict
from gppq_dist.methods.gppq import GPPQMethod
from gppq_dist.methods.registry import METHODS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_KIND = re.compile(r"conv\d+(x\d+)*|linear")


Layer = TypeVar("Layer", default=LayerQuant)


class QuantizationConfig(Strict, Generic[Layer]):
    """Which layers are coded, each rule a ``Layer`` (the method's layer settings; by itself,
    the PQ methods' ``{d, k}``)."""

    skip_first_conv: bool = Field(True, description="Leave the stem (the model's first conv) at fp32.")
    on_indivisible: Literal["error", "skip"] = Field(
        "error",
        description="A planned layer whose row length (`Cin/groups*kh*kw`, `in_features`) its rule's `d` does not "
        "divide, e.g. a depthwise 3x3 conv (`Cout x 1 x 3 x 3`: rows of 9) under `d: 4`: `error` (one error naming "
        "the rule, the layer and the divisors that fit) or `skip` (the layer stays fp32; one log line lists every "
        "layer so left).",
    )
    default: Layer | None = Field(
        None, description="The layer setting of the layers no other rule matches (`null`: leave them alone); a "
        "layer setting is the method's (layer settings table below): `{d, k}` for the PQ methods, `{prune, bits}` "
        "for `clipq`, `{}` for `tsq`.")
    types: dict[str, Layer | None] = Field(
        default_factory=dict, json_schema_extra={"each_key": "kind"},
        description="A layer setting per layer kind, `conv<kh>x<kw>` (e.g. `conv3x3`, `conv1x1`) or `linear`; "
        "`null` leaves that kind alone.")
    names: dict[str, Layer | None] = Field(
        default_factory=dict, json_schema_extra={"each_key": "regex"},
        description="A layer setting or `null` for the modules whose name the regex fully matches; the first match "
        "wins, before `types`.")

    @field_validator("types")
    @classmethod
    def _known_kinds(cls, types: dict[str, Any]) -> dict[str, Any]:
        for kind in types:
            if not LAYER_KIND.fullmatch(kind):
                raise ValueError(
                    f"unknown layer kind {kind!r}: expected conv<kh>x<kw> (e.g. conv3x3) or linear"
                )
        return types

    @field_validator("names")
    @classmethod
    def _valid_regexes(cls, names: dict[str, Any]) -> dict[str, Any]:
        return _regex_keys(names)


def _regex_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    for pattern in mapping:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return mapping


class ModelConfig(Strict):
    """The model: a torchvision ``arch``, or a ``factory`` called with ``kwargs``; exactly one.

    A factory builds models beyond torchvision, e.g. (with timm installed)::

        model:
          factory: timm:create_model
          kwargs: {model_name: efficientnet_b0, num_classes: 10}
          num_classes: 10

    It is imported and called when the model is built, not when the config is read, and it
    is not passed ``num_classes``: the kwargs must give a model with that many outputs
    (checked on build when the model ends in a Linear).
    """

    arch: str | None = Field(
        None, description="A torchvision classification model, e.g. `resnet18`, `resnext50_32x4d`; exactly one of "
        "`model.arch` and `model.factory` is set.")
    factory: str | None = Field(
        None, description="Any model: `\"package.module:function\"` returning an `nn.Module`, called with "
        "`model.kwargs`, e.g. `timm:create_model` or `torchvision.models:mobilenet_v2`, instead of `model.arch`; "
        "imported when the model is built (one error naming the key, the value and what failed) and recorded in "
        "the artifact, so that `rebuild_model` rebuilds it where the package is importable.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of `model.factory`, e.g. `{model_name: "
        "efficientnet_b0, num_classes: 10}`; `num_classes` is not added to them (put it here), but checked against "
        "a final Linear.")
    num_classes: int = Field(1000, gt=0, description="Outputs of the model (a factory's kwargs must give as many).")
    weights: str = Field(
        "random",
        description="`random` (seeded init); a torchvision weights name of `model.arch` (`IMAGENET1K_V1`, "
        "`DEFAULT`, `ResNet50_Weights.IMAGENET1K_V2`, ...: checked when the config loads against the arch and "
        "`model.num_classes`, read from torchvision's cache `$TORCH_HOME/hub/checkpoints/` with "
        "`weights_only=True`); a state dict file (`.safetensors`, or `.pt`/`.pth` read with `weights_only=True`, a "
        "`state_dict`/`model` wrapper and `module.` prefixes accepted; a file named like a weights name is written "
        "`./NAME`); or a `.gppq` artifact of the same architecture. An artifact's decoded model is the start, and "
        "`gppq` and `two_stage_pq` take its codebooks and assignments instead of k-means (see Models from "
        "kill-the-bits).",
    )

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, factory: str | None) -> str | None:
        """The form only: importing is left to the build (the config is read where the
        factory's package may be absent, e.g. by a launcher)."""
        from gppq_dist.models import FACTORY

        if factory is not None and FACTORY.fullmatch(factory) is None:
            raise ValueError("expected 'package.module:function', e.g. timm:create_model or "
                             "torchvision.models:mobilenet_v2")
        return factory

    @field_validator("weights")
    @classmethod
    def _torchvision_weights_fit(cls, weights: str, info: ValidationInfo) -> str:
        """A weights name must exist for the arch and match num_classes (no file needed: the
        cache is looked at when the weights are loaded)."""
        from gppq_dist.models import available_archs, is_weights_name, torchvision_weights

        arch, num_classes = info.data.get("arch"), info.data.get("num_classes")
        if not is_weights_name(weights) or arch not in available_archs():  # an unknown arch is reported on build
            return weights
        try:
            torchvision_weights(arch, weights, num_classes, key="")
        except UserError as exc:
            raise ValueError(str(exc).removeprefix(": ")) from None
        return weights

    @model_validator(mode="after")
    def _arch_or_factory(self) -> "ModelConfig":
        from gppq_dist.models import is_weights_name

        if (self.arch is None) == (self.factory is None):
            which = "both are set" if self.arch is not None else "neither is set"
            raise ValueError(f"set exactly one of model.arch (a torchvision model name, e.g. resnet18) and "
                             f"model.factory ('package.module:function', e.g. timm:create_model); {which}")
        if self.kwargs and self.factory is None:
            raise ValueError("model.kwargs are the keyword arguments of model.factory; with model.arch "
                             "expected no model.kwargs")
        if self.factory is not None and is_weights_name(self.weights):
            raise ValueError(f"model.weights: {self.weights!r} names torchvision weights, which exist only for "
                             "model.arch; with model.factory expected 'random' or a state dict file (.safetensors, "
                             ".pt, .pth; a file of such a name is written ./NAME)")
        return self

    @property
    def spec(self) -> "ModelSpec":
        """What :func:`gppq_dist.models.create_model` builds."""
        from gppq_dist.models import ModelSpec

        return ModelSpec(num_classes=self.num_classes, arch=self.arch, factory=self.factory, kwargs=dict(self.kwargs))


class KMeansConfig(Strict):
    """The k-means that codes the layers (direct PQ, the methods' starting codes)."""

    iterations: int = Field(20, gt=0, description="Lloyd iterations (stops early at a fixed point).")
    seed: int = Field(0, description="Seed of the k-means++ initialisation (each layer's derived from it).")
    init_sample: int = Field(
        32, gt=0, description="k-means++ seeds from at most `init_sample * K` subvectors."
    )
    kernel: Literal["auto", "faiss", "torch"] = Field(
        "auto", description="Nearest-codeword kernel: `faiss` (CPU tensors, needs faiss-cpu), `torch` (blocked "
        "matmul, any device) or `auto` (faiss where it can run, else torch).")
    chunk_mb: int = Field(64, gt=0, description="Memory budget in MB of one distance block of the torch kernel.")


class DataConfig(Strict):
    """The image folder and how batches are made from it (see Data loading in the README)."""

    root: str = Field("data/imagenet", description="Image folder in ImageNet layout: `train/<class>/*`, "
                      "`val/<class>/*`.")
    image_size: int = Field(224, gt=0, description="Side of the train crop (random-resized) and of the val center "
                            "crop.")
    resize_size: int = Field(256, gt=0, description="Val: the shorter side is resized to this, then center-cropped "
                             "to `data.image_size`.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="Random-resized-crop area range (training).")
    horizontal_flip: bool = Field(True, description="Random horizontal flips (training).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Normalization mean per channel "
                                             "(ImageNet's).")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Normalization standard deviation per "
                                            "channel (ImageNet's).")
    batch_size: int = Field(256, gt=0, description="Evaluation batch size per process (training takes "
                            "`train.batch_size`, pretraining `pretrain.batch_size`).")
    workers: int = Field(2, ge=0, description="DALI CPU threads (at least 1) or torchvision `DataLoader` worker "
                         "processes; also the decoding processes of the pre-flight data check.")
    loader: Literal["dali", "torchvision"] = Field(
        "dali", description="`dali` or `torchvision` (see Data loading); `dali` falls back to torchvision, with "
        "one warning, where DALI cannot be imported.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where DALI decodes: `gpu` (nvJPEG, `mixed`, on the process's GPU), `cpu`, or `auto` "
        "(the GPU when one is visible); batches always arrive on the process's device, so `cpu` on a GPU machine "
        "means CPU decoding and a GPU model."
    )
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="`error`: stop before training with the list of bad files; `skip`: leave them out.")
    train_list: str | None = Field(
        None, description="Train file list, one `path label` per line (path relative to `data.root`; label a train "
        "class folder name or index); none: the `train/` class folders.")
    val_list: str | None = Field(
        None, description="Val file list in the same form, e.g. for a flat val folder; none: the `val/` class "
        "folders.")


class PretrainConfig(Strict):
    """Training of the uncompressed baseline (the demo's starting point)."""

    epochs: int = Field(15, gt=0, description="Epochs of baseline training (`gppq pretrain`, the demo): SGD "
                        "with Nesterov momentum under a one-cycle schedule, in one process.")
    batch_size: int = Field(64, gt=0, description="Baseline training batch size.")
    lr: float = Field(0.05, gt=0, description="Peak learning rate of the one-cycle schedule.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum (Nesterov when above 0).")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay of baseline training.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy loss.")


class TrainConfig(Strict):
    """Training of the methods that train (the paper's §4.1 defaults for G&P PQ): SGD,
    ReduceLROnPlateau on the quantized model's val loss."""

    epochs: int = Field(30, gt=0, description="Training epochs of the methods that train (G&P PQ; the finetuning "
                        "of two-stage PQ, CLIP-Q and TSQ).")
    batch_size: int = Field(256, gt=0, description="Global training batch, split evenly over the ranks.")
    lr: float = Field(0.01, gt=0, description="SGD learning rate (the paper's).")
    momentum: float = Field(0.9, ge=0, description="SGD momentum (the paper's).")
    weight_decay: float = Field(1e-8, ge=0, description="SGD weight decay (the paper's).")
    mu: float = Field(1e-3, ge=0, description="G&P PQ: strength of the pull toward the codewords (eq. 6); scale it "
                      "up for short runs.")
    plateau_patience: int = Field(2, ge=0, description="ReduceLROnPlateau on the quantized model's val loss: lr / 10 "
                                  "after this many epochs without gain.")
    checkpoint_every: int = Field(1000, ge=0, description="Steps between mid-epoch checkpoints (`0`: only at epoch "
                                  "ends, which always get one).")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many training steps, the epoch ending there (evaluation, checkpoint, "
        "artifact as at any epoch end), for smoke tests and start-up benchmarks; may change on resume; none: "
        "`train.epochs` whole epochs.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="`bf16`: forward and backward under `torch.autocast(bfloat16)` (meant for GPUs; works, "
        "slowly, on CPUs); weights, the G&P update and the optimizer stay fp32.")
    engine: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp", description="`ddp` (torch DDP), `deepspeed` (DeepSpeed engine, ZeRO stage 0/1/2/3, "
        "`train.deepspeed_config`) or `fsdp` (torch FSDP2, `fully_shard`: every child module holding parameters, "
        "then the model); see Training.")
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON for `engine: deepspeed` (required then), e.g. "
        "`configs/deepspeed/zero1.json`.")

    @model_validator(mode="after")
    def _deepspeed_needs_a_config(self) -> "TrainConfig":
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ValueError("train.engine is deepspeed: set train.deepspeed_config to a DeepSpeed JSON "
                             "file, e.g. configs/deepspeed/zero1.json")
        return self


class TrackingConfig(Strict):
    """MLflow tracking (rank 0 only)."""

    enabled: bool = Field(True, description="MLflow tracking by rank 0 (see Tracking).")
    uri: str | None = Field(
        None, description="Tracking URI; none: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working "
        "directory.")
    experiment: str = Field("gppq", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; none: the config's `name`.")
    parent_run_id: str | None = Field(None, description="Nest the run under another (set by `gppq sweep`).")
    log_every: int = Field(10, gt=0, description="Steps between per-step records (`loss`, `step_lr`, "
                           "`images_per_s`).")


# sbatch options a job's resources or its requeueing depend on: where each comes from instead
MANAGED_SBATCH = {
    **{name: f"use launch.{key}" for name, key in (
        ("nodes", "nodes"), ("partition", "partition"), ("account", "account"), ("qos", "qos"),
        ("constraint", "constraint"), ("cpus-per-task", "cpus_per_task"), ("mem", "mem_gb"),
        ("time", "timeout_min"), ("gpus-per-node", "gpus_per_node"), ("ntasks-per-node", "cpu_tasks_per_node"))},
    **{name: "submitit sets it (the job's logs, name, array and requeue signal)" for name in (
        "job-name", "output", "error", "signal", "open-mode", "array", "wckey", "requeue")},
}


class LaunchConfig(Strict):
    """Defaults for `gppq submit` / `gppq sweep` (each can be overridden on the command line)."""

    nodes: int = Field(1, gt=0, description="Nodes of a job (`gppq submit --nodes`).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one process each; `0`: a CPU job "
                               "(`gppq submit --gpus-per-node`).")
    cpu_tasks_per_node: int = Field(1, gt=0, description="Processes per node of a CPU job, "
                                    "`gpus_per_node: 0` (`gppq submit --cpu-tasks-per-node`).")
    cpus_per_task: int = Field(1, gt=0, description="CPUs per process (sbatch `--cpus-per-task`).")
    mem_gb: int | None = Field(None, gt=0, description="Memory per node in GB (sbatch `--mem`); none: the "
                               "cluster's default.")
    partition: str | None = Field(None, description="SLURM partition (`gppq submit --partition`); none: "
                                  "the cluster's default.")
    account: str | None = Field(None, description="SLURM account charged, sbatch `--account` (`gppq submit "
                                "--account`).")
    qos: str | None = Field(None, description="SLURM quality of service, sbatch `--qos` (`gppq submit --qos`).")
    constraint: str | None = Field(None, description="SLURM node features required, e.g. `a100&ib`, "
                                   "sbatch `--constraint` (`gppq submit --constraint`).")
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="Any other sbatch option by its long name, e.g. `{exclude: \"node[01-02]\", mail-type: END, "
        "exclusive: true}` (`true`: a flag without value), passed through submitit's "
        "`slurm_additional_parameters`; an option gppq sets itself (`time`, `nodes`, `job-name`, `output`, "
        "`signal`, `requeue`, ...) is refused naming the key to use.")
    timeout_min: int = Field(60, gt=0, description="Time limit of one slot in minutes, after which the job "
                             "requeues itself and resumes (`gppq submit --timeout-min`).")
    folder: str = Field("runs/slurm", description="submitit's folder of logs and pickles, one subfolder per job.")

    @field_validator("sbatch")
    @classmethod
    def _not_managed(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Options gppq sets itself have their own keys (or are what makes a job resumable)."""
        for option in options:
            name = option.removeprefix("--").replace("_", "-")
            if name in MANAGED_SBATCH:
                raise ValueError(f"{option!r} is set by gppq: {MANAGED_SBATCH[name]}")
            if options[option] is False:
                raise ValueError(f"{option!r}: false is no sbatch value; leave the option out (true: a flag "
                                 "without value)")
        return {option.removeprefix("--").replace("_", "-"): value for option, value in options.items()}


@functools.lru_cache(maxsize=8)
def _method_union(config_types: tuple[type[BaseModel], ...]) -> TypeAdapter:
    """The ``method:`` schema: the registered methods' config types, told apart by ``name``."""
    return TypeAdapter(Annotated[Union[config_types], Field(discriminator="name")])


class RunConfig(Strict):
    """One run, as its YAML file describes it (the sections below)."""

    name: str = Field(description="Run name; the run folder is `output_dir/name`.")
    output_dir: str = Field("runs", description="Where run folders go.")
    seed: int = Field(0, description="Seeds the weight init (`model.weights: random`), the data order and "
                      "augmentation, pretraining and training.")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    # before quantization: the rules are checked as the method's layer settings
    method: Any = Field(
        default_factory=GPPQMethod,
        description="The compression method, by name (`method: residual_pq`) or as a section (`method: {name: "
        "residual_pq, stages: 3}`): one of the registered methods, whose keys are in the methods table below "
        "(see Methods).")
    quantization: SerializeAsAny[QuantizationConfig]
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @model_validator(mode="before")
    @classmethod
    def _method_by_name(cls, raw: Any) -> Any:
        """``method: residual_pq`` is short for ``method: {name: residual_pq}``; settings of a
        method in an old form are one error saying what to write instead."""
        if isinstance(raw, dict) and isinstance(raw.get("method"), str):
            raw = {**raw, "method": {"name": raw["method"]}}
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict):
            spec = METHODS.get(raw["method"].get("name", "gppq"))
            quantization = raw.get("quantization") if isinstance(raw.get("quantization"), dict) else {}
            message = spec.legacy(raw["method"], quantization) if spec and spec.legacy else None
            if message:
                raise ValueError(message)
        return raw

    @field_validator("method", mode="before")
    @classmethod
    def _registered_method(cls, method: Any) -> BaseModel:
        """One of the registered methods' config types, by ``name``."""
        return _method_union(tuple(spec.config for spec in METHODS.values())).validate_python(method)

    @field_validator("quantization", mode="before")
    @classmethod
    def _rules_of_the_method(cls, quantization: Any, info: ValidationInfo) -> Any:
        """The rules checked as the method's layer settings (unchecked when the method is not
        valid: that error is the one to report)."""
        method = info.data.get("method")
        layer = METHODS[method.name].layer if method is not None else Any
        if isinstance(quantization, QuantizationConfig):
            quantization = quantization.model_dump()
        return QuantizationConfig[layer].model_validate(quantization)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (expected a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        if dotted.startswith("method.") and isinstance(raw.get("method"), str):
            raw["method"] = {"name": raw["method"]}  # the short form, so that its keys can be set
        _set_dotted(raw, dotted, value)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, raw) for err in exc.errors()]
        if len(problems) == 1:
            raise ConfigError(f"{source}: {problems[0]}") from None
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problems:\n{listing}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["kmeans.iterations=5", ...]`` -> ``{"kmeans.iterations": 5}`` (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. kmeans.iterations=10")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHODS:  # pydantic puts the union's tag in
        loc = ("method", *loc[2:])
    if len(loc) >= 2 and loc[0] == "quantization" and str(loc[1]).startswith("QuantizationConfig["):
        loc = ("quantization", *loc[2:])  # and the generic rules' class name, where it shows
    key = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        expected = f"expected one of: {', '.join(allowed)}" if allowed else "expected no keys"
        return f"unknown key '{key}'{suggestion}; {expected}"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    if err["type"] == "union_tag_invalid":
        return f"{key}.name: unknown method {err['ctx']['tag']!r}; expected one of: {', '.join(METHODS)}"
    message = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: the message names its keys
        return message
    return f"{key}: {message} (got {_lookup(raw, loc)!r})"


def _allowed_keys(loc: tuple[Any, ...], raw: Any = None) -> list[str]:
    """Field names of the sub-model at ``loc`` (dict keys in ``loc`` are stepped over); the
    method section and the layer rules are the config's method's."""
    model: Any = RunConfig
    method = raw.get("method") if isinstance(raw, dict) else None
    method = method.get("name", "gppq") if isinstance(method, dict) else (method or "gppq")
    spec = METHODS.get(method)
    if spec is not None and loc[:1] == ("method",):
        return list(spec.config.model_fields)
    is_rule = len(loc) >= 2 and loc[0] == "quantization" and loc[1] in RULE_TIERS
    is_rule = is_rule and len(loc) == (2 if loc[1] == "default" else 3)
    if spec is not None and is_rule:
        return list(spec.layer.model_fields)
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            break
        field = model.model_fields.get(str(part))
        if field is None:
            continue
        model = _unwrap(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X, ``dict[str, X | None]`` -> X."""
    for arg in typing.get_args(annotation) or ():
        inner = _unwrap(arg) if typing.get_args(arg) else arg
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node
