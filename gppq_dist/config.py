"""Run configuration: one YAML file describes a run.

The schema is strict: an unknown key, a value of the wrong type, or a layer rule that
cannot apply to the model is a :class:`~gppq_dist.errors.ConfigError` whose one message
names the file, the key and what was expected.

Layer rules come in three tiers, resolved per layer as name, then type, then default
(the shape of the paper's Table 1)::

    quantization:
      skip_first_conv: true          # the stem is never quantized (DESIGN §2)
      default: null                  # layers matched by no rule below are left alone
      types:                         # per layer kind: conv{kh}x{kw} or linear
        conv3x3: {d: 9, k: 256}
        conv1x1: {d: 4, k: 256}
        linear:  {d: 4, k: 2048}
      names:                         # regex on the module name (full match), first wins;
        "layer4\\.1\\.conv2": {d: 18, k: 256}   # null leaves that layer alone
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gppq_dist.errors import ConfigError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_KIND = re.compile(r"conv\d+(x\d+)*|linear")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LayerQuant(_Strict):
    """Product quantization of one layer: subvectors of length ``d``, ``k`` codewords."""

    d: int = Field(gt=0, description="subvector length")
    k: int = Field(gt=0, description="codewords in the layer's joint codebook (a power of two)")

    @field_validator("k")
    @classmethod
    def _power_of_two(cls, k: int) -> int:
        if k & (k - 1):
            raise ValueError(f"must be a power of two so indices pack to log2(k) bits, got {k}")
        return k


class QuantizationConfig(_Strict):
    skip_first_conv: bool = True
    on_indivisible: Literal["error", "skip"] = Field(
        "error",
        description="a planned layer whose row length (Cin/groups*kh*kw, in_features) its rule's d does not divide, "
        "e.g. a depthwise 3x3 conv (rows of 9) under d: 4: error (one error naming the layer and the divisors), or "
        "skip (the layer stays fp32, and one INFO line lists every layer so left)",
    )
    default: LayerQuant | None = None
    types: dict[str, LayerQuant | None] = Field(default_factory=dict)
    names: dict[str, LayerQuant | None] = Field(default_factory=dict)

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


class ModelConfig(_Strict):
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
        None, description="a torchvision classification model name, e.g. resnet18 (or set factory instead)")
    factory: str | None = Field(
        None, description="'package.module:function' that returns an nn.Module, called with kwargs, e.g. "
        "timm:create_model or torchvision.models:mobilenet_v2 (instead of arch)")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of factory; num_classes is not added to them")
    num_classes: int = Field(1000, gt=0, description="outputs of the model (a factory's kwargs must give as many)")
    weights: str = Field(
        "random",
        description="'random' (seeded init), torchvision weights of the arch by name (IMAGENET1K_V1, "
        "DEFAULT, ResNet50_Weights.IMAGENET1K_V2, read from torchvision's cache; arch only), or a state "
        "dict file (.safetensors, .pt, .pth)",
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


class KMeansConfig(_Strict):
    iterations: int = Field(20, gt=0, description="Lloyd iterations (stops early at a fixed point)")
    seed: int = 0
    init_sample: int = Field(
        32, gt=0, description="k-means++ seeds from at most init_sample * k subvectors"
    )
    kernel: Literal["auto", "faiss", "torch"] = "auto"
    chunk_mb: int = Field(64, gt=0, description="memory budget of one distance block (torch kernel)")


class DataConfig(_Strict):
    root: str = "data/imagenet"
    image_size: int = Field(224, gt=0, description="train crop and val center crop")
    resize_size: int = Field(256, gt=0, description="val: shorter side resized to this first")
    crop_scale: tuple[float, float] = (0.08, 1.0)
    horizontal_flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = Field(256, gt=0, description="evaluation batch size")
    workers: int = Field(2, ge=0, description="torchvision loader processes / DALI CPU threads")
    loader: Literal["dali", "torchvision"] = "dali"
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where DALI decodes: gpu ('mixed'), cpu, or gpu when one is visible"
    )
    on_bad_file: Literal["error", "skip"] = "error"
    train_list: str | None = Field(None, description="file list ('path label' per line) for train")
    val_list: str | None = Field(None, description="file list ('path label' per line) for val")


class PretrainConfig(_Strict):
    """Training of the uncompressed baseline (the demo's starting point)."""

    epochs: int = Field(15, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class TrainConfig(_Strict):
    """G&P PQ training (paper §4.1 defaults): SGD, ReduceLROnPlateau on the val loss."""

    epochs: int = Field(30, gt=0)
    batch_size: int = Field(256, gt=0, description="global batch, split evenly over the ranks")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-8, ge=0)
    mu: float = Field(1e-3, ge=0, description="strength of the pull toward the codewords (eq. 6)")
    plateau_patience: int = Field(2, ge=0, description="epochs without val-loss gain before lr / 10")
    checkpoint_every: int = Field(1000, ge=0, description="steps between mid-epoch checkpoints (0: epoch ends only)")
    max_steps: int | None = Field(
        None, gt=0, description="stop after this many training steps, the last epoch ending there (smoke "
        "tests, start-up benchmarks); null: train.epochs whole epochs")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward/backward under bf16 autocast; weights, G&P update and optimizer stay fp32")
    engine: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp", description="ddp (torch DDP), deepspeed (ZeRO 0-3, train.deepspeed_config) or fsdp (torch "
        "FSDP2, fully_shard: every child module holding parameters, then the model)")
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON (ZeRO stage 0/1/2/3) for engine: deepspeed, e.g. configs/deepspeed/zero1.json")

    @model_validator(mode="after")
    def _deepspeed_needs_a_config(self) -> "TrainConfig":
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ValueError("train.engine is deepspeed: set train.deepspeed_config to a DeepSpeed JSON "
                             "file, e.g. configs/deepspeed/zero1.json")
        return self


class TrackingConfig(_Strict):
    """MLflow tracking (rank 0 only)."""

    enabled: bool = True
    uri: str | None = Field(
        None, description="tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")
    experiment: str = Field("gppq", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name; default: the config's name")
    parent_run_id: str | None = Field(None, description="nest this run under another (set by gppq sweep)")
    log_every: int = Field(10, gt=0, description="steps between per-step metric records")


class LaunchConfig(_Strict):
    """Defaults for `gppq submit` / `gppq sweep` (each can be overridden on the command line)."""

    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0, description="one process per GPU; 0: CPU jobs")
    cpu_tasks_per_node: int = Field(1, gt=0, description="processes per node for CPU jobs (gpus_per_node: 0)")
    cpus_per_task: int = Field(1, gt=0)
    mem_gb: int | None = Field(None, gt=0)
    partition: str | None = None
    timeout_min: int = Field(60, gt=0)
    folder: str = Field("runs/slurm", description="submitit's logs and pickles")


class GPPQMethod(_Strict):
    """G&P PQ (the paper): k-means once, then the progressive update (``train.*``)."""

    name: Literal["gppq"] = "gppq"


class DirectPQMethod(_Strict):
    """k-means per layer (joint codebook), snap, no training."""

    name: Literal["direct_pq"]


class KMeansScalarMethod(_Strict):
    """Gong et al. 2014: scalar k-means of all weights of a layer (every rule's d must be 1,
    K levels), no training."""

    name: Literal["kmeans_scalar"]


class PQSubspaceMethod(_Strict):
    """Gong et al. 2014: PQ with a codebook of its own per sub-space, no training."""

    name: Literal["pq_subspace"]


class ResidualPQMethod(_Strict):
    """Gong et al. 2014: residual quantization in ``stages`` stages, no training."""

    name: Literal["residual_pq"]
    stages: int = Field(2, ge=1, le=8, description="codebooks per layer, each coding the residual of the ones before")


class TwoStagePQMethod(_Strict):
    """"And the Bit Goes Down": layer by layer in network order, cluster the subvectors
    (weighted by the layer's input activations, to minimise the output reconstruction
    error, when ``activation_weighted``), then finetune only the codewords (``train.*``,
    gradients averaged per codeword; the weights stay exactly quantized)."""

    name: Literal["two_stage_pq"]
    activation_weighted: bool = True
    calibration_batches: int = Field(4, gt=0, description="train batches whose activations weight the k-means")


class ClipQLayer(_Strict):
    prune: float = Field(ge=0.0, lt=1.0, description="fraction of the layer's weights pruned (smallest magnitude)")
    bits: int = Field(ge=1, le=8, description="the kept weights take 2^bits levels")


class ClipQMethod(_Strict):
    """CLIP-Q: per layer a pruning fraction and a bit width; every step the full-precision
    weights (which keep training, ``train.*``) are pruned and quantized for the forward
    pass. The layers are those the ``quantization`` rules pick (their d and k are not used);
    ``layers`` sets (prune, bits) by layer name (regex, full match, first wins). The paper's
    Bayesian-optimisation search for per-layer settings is not part of this method: set them."""

    name: Literal["clipq"]
    prune: float = Field(0.8, ge=0.0, lt=1.0, description="fraction of every layer's weights pruned")
    bits: int = Field(2, ge=1, le=8, description="the kept weights of every layer take 2^bits levels")
    layers: dict[str, ClipQLayer] = Field(default_factory=dict, description="per-layer (prune, bits) by name regex")

    @field_validator("layers")
    @classmethod
    def _patterns_compile(cls, layers: dict[str, ClipQLayer]) -> dict[str, ClipQLayer]:
        return _regex_keys(layers)

    def setting(self, layer: str) -> tuple[float, int]:
        """``(prune, bits)`` of the named layer."""
        for pattern, rule in self.layers.items():
            if re.fullmatch(pattern, layer):
                return rule.prune, rule.bits
        return self.prune, self.bits


class TSQMethod(_Strict):
    """Two-Step Quantization: step 1 trains the network with sparse-quantized inputs to the
    coded layers (``code_epochs`` epochs, full-precision weights), step 2 makes every coded
    layer ternary ({-alpha, 0, +alpha} per output row) by iterative least squares against
    its response to the codes, layer by layer in network order; then ``train.epochs`` of
    finetuning (straight-through). The inputs stay quantized at inference. Layers: those
    the ``quantization`` rules pick (d and k not used); the ternary weights cost 2 bits."""

    name: Literal["tsq"]
    activation_bits: int = Field(2, ge=1, le=8, description="inputs take 0 or one of 2^bits - 1 levels")
    activation_sparsity: float = Field(0.5, ge=0.0, lt=1.0,
                                       description="fraction of a layer's calibration inputs set to 0")
    code_epochs: int = Field(1, ge=0, description="epochs of step 1 (quantized inputs, full-precision weights)")
    calibration_batches: int = Field(4, gt=0, description="train batches per rank for the quantizers and step 2")
    ls_iterations: int = Field(3, gt=0, description="alternations of alpha and the ternary codes in step 2")
    ridge: float = Field(0.01, ge=0.0, description="step 2: this fraction of the mean input energy on the diagonal")


MethodConfig = Annotated[
    GPPQMethod | DirectPQMethod | KMeansScalarMethod | PQSubspaceMethod | ResidualPQMethod | TwoStagePQMethod
    | ClipQMethod | TSQMethod,
    Field(discriminator="name"),
]
METHODS: dict[str, type[BaseModel]] = {
    typing.get_args(cls.model_fields["name"].annotation)[0]: cls
    for cls in (GPPQMethod, DirectPQMethod, KMeansScalarMethod, PQSubspaceMethod, ResidualPQMethod, TwoStagePQMethod,
                ClipQMethod, TSQMethod)
}


class RunConfig(_Strict):
    name: str
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    quantization: QuantizationConfig
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    method: MethodConfig = Field(default_factory=GPPQMethod)

    @model_validator(mode="before")
    @classmethod
    def _method_by_name(cls, raw: Any) -> Any:
        """``method: residual_pq`` is short for ``method: {name: residual_pq}``."""
        if isinstance(raw, dict) and isinstance(raw.get("method"), str):
            raw = {**raw, "method": {"name": raw["method"]}}
        return raw

    @model_validator(mode="after")
    def _scalar_rules_have_d_1(self) -> "RunConfig":
        if self.method.name == "kmeans_scalar":
            q = self.quantization
            rules = [("quantization.default", q.default)]
            rules += [(f"quantization.types.{kind}", rule) for kind, rule in q.types.items()]
            rules += [(f"quantization.names[{pattern!r}]", rule) for pattern, rule in q.names.items()]
            for key, rule in rules:
                if rule is not None and rule.d != 1:
                    raise ValueError(f"{key}.d = {rule.d}: method kmeans_scalar quantizes single weights, "
                                     "so d must be 1 (k is the number of levels)")
        return self

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
    key = ".".join(str(p) for p in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key '{key}'{suggestion}; expected one of: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    if err["type"] == "union_tag_invalid":
        return f"{key}.name: unknown method {err['ctx']['tag']!r}; expected one of: {', '.join(METHODS)}"
    message = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: the message names its keys
        return message
    return f"{key}: {message} (got {_lookup(raw, loc)!r})"


def _allowed_keys(loc: tuple[Any, ...], raw: Any = None) -> list[str]:
    """Field names of the sub-model at ``loc`` (dict keys in ``loc`` are stepped over)."""
    model: Any = RunConfig
    if loc and loc[0] == "method":
        method = raw.get("method") if isinstance(raw, dict) else None
        method = method.get("name", "gppq") if isinstance(method, dict) else method
        if method in METHODS:
            return list(METHODS[method].model_fields)
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
