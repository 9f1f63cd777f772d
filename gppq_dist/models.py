"""Building models (torchvision's or a factory's) and loading their weights without unpickling.

Every model of a run or an artifact is built by :func:`create_model` from a
:class:`ModelSpec`: either ``model.arch``, a torchvision classification model built with
``num_classes`` outputs, or ``model.factory``, ``"package.module:function"`` imported and
called with ``model.kwargs`` as keyword arguments, e.g. ``timm:create_model`` with
``{model_name: efficientnet_b0, num_classes: 10}`` when timm is installed. A factory is not
given ``num_classes``: its kwargs must produce that many outputs, which is checked after the
build when the model's last module with parameters is a Linear (else not checked). A factory
that cannot be imported or called, or that returns something other than an ``nn.Module``,
is one :class:`~gppq_dist.errors.ConfigError` naming ``model.factory``, its value and why.

``model.weights`` is one of four things:

- ``random``: the architecture's own (seeded) initialisation;
- a torchvision weights name for ``model.arch`` (a factory's model has none):
  ``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``DEFAULT``, ..., or the qualified
  ``ResNet50_Weights.IMAGENET1K_V2``. The file is read
  from torchvision's cache (``torch.hub.get_dir()/checkpoints/<file name of the weights'
  URL>``, i.e. under ``$TORCH_HOME``) with ``weights_only=True``. Runs never download: with
  8 ranks per node a download in the run would race, and on a cluster without network it
  would hang until a timeout, so a missing file is one error naming the path and the URL.
  ``gppq fetch-weights ARCH NAME`` fetches it once beforehand (torch.hub's
  download, checked against the hash in the file name, nothing loaded);
- a ``.gppq`` artifact of the same architecture: its decoded model
  (:func:`gppq_dist.artifact.dense_state`); G&P PQ and two-stage PQ also take its
  codebooks and assignments as their start instead of k-means
  (:func:`gppq_dist.methods.base.artifact_start`);
- anything else: a state dict file (``.safetensors``, or ``.pt``/``.pth`` read with
  ``weights_only=True``).

A value that looks like a weights name (upper-case letters, digits and ``_``, optionally
prefixed by ``<Enum>_Weights.``) is one; a file of such a name is written ``./NAME``.
"""

from __future__ import annotations

import importlib
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlparse

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from gppq_dist.errors import ConfigError, UserError
from gppq_dist.io import atomic_path

if TYPE_CHECKING:
    from gppq_dist.config import RunConfig

WEIGHTS_NAME = re.compile(r"(?:(?P<enum>[A-Za-z0-9]+_Weights)\.)?(?P<member>[A-Z][A-Z0-9_]*)")
# "package.module:function", the attribute optionally dotted ("module:Class.create")
FACTORY = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")

# googlenet and inception_v3 are built as torchvision builds them for its ImageNet weights
# (inputs re-normalised from ImageNet's mean/std to [-1, 1] inside the model), with or
# without weights, so that a run's model and the one its artifact rebuilds agree; their
# random init is torchvision's current default (truncated normal), asked for by name.
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "init_weights": True},
    "inception_v3": {"transform_input": True, "init_weights": True},
}

# Builders that size the model from the weights' input size (position embeddings): such
# weights fit only when they were trained at the size the model is built for here.
INPUT_SIZED = {"vit_": 224, "maxvit_": 224}

# torchvision's densenet checkpoints predate its module names ("norm.1" -> "norm1")
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


# what build_model built each live model as, so that load_weights can resolve a weights name
_BUILT: "weakref.WeakKeyDictionary[nn.Module, tuple[str, int]]" = weakref.WeakKeyDictionary()


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


# Constructors that derive values (``torch.arange(depth) * w_a``: RegNet computes its stage
# widths this way and reads them back with ``.tolist()``) stay on the CPU when building on
# meta; the ones that allocate parameters and buffers by size go to meta.
_SIZED_CONSTRUCTORS = frozenset({
    torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
    torch.randint, torch.eye,
})


class _MetaAllocations(TorchFunctionMode):
    """Like ``with torch.device("meta")``, but only for allocations by size."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZED_CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _device_context(device: str | torch.device) -> Any:
    return _MetaAllocations() if torch.device(device).type == "meta" else torch.device(device)


def build_model(arch: str, num_classes: int, device: str | torch.device = "cpu") -> nn.Module:
    """A torchvision model with fresh (seeded by the caller) weights.

    ``device="meta"`` builds shapes only, with no memory and no initialisation cost.
    """
    archs = available_archs()
    if arch not in archs:
        near = [a for a in archs if a.startswith(arch[:6])] or archs[:12]
        raise UserError(
            f"model.arch: unknown architecture {arch!r}; expected a torchvision classification "
            f"model such as {', '.join(near[:12])}"
        )
    with _device_context(device):
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **BUILD_KWARGS.get(arch, {}))
    _BUILT[model] = (arch, num_classes)
    return model


@dataclass(frozen=True)
class ModelSpec:
    """How a model is built: torchvision ``arch``, or ``factory(**kwargs)``; exactly one.

    ``num_classes`` is what the model must output; a factory is not passed it.
    """

    num_classes: int
    arch: str | None = None
    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The arch, or the factory's ``package.module:function`` (for titles and artifacts)."""
        return self.factory if self.factory is not None else str(self.arch)


def create_model(spec: ModelSpec, device: str | torch.device = "cpu", key: str = "model.factory") -> nn.Module:
    """The model of ``spec`` with fresh (seeded by the caller) weights: every command and
    every artifact rebuild builds its model here, so a factory is imported, called and
    checked the same way everywhere.

    ``device="meta"`` builds shapes only. ``key`` names the factory in errors (a rebuild
    names its artifact there). Errors: :func:`import_factory`'s; the factory raising (its
    message and the kwargs); a result that is not an ``nn.Module``; a last Linear whose
    outputs are not ``spec.num_classes``.
    """
    if spec.factory is None:
        if spec.arch is None:
            raise ConfigError("model: set model.arch (a torchvision model name) or model.factory "
                              "('package.module:function')")
        return build_model(spec.arch, spec.num_classes, device)
    factory = import_factory(spec.factory, key)
    kwargs = dict(spec.kwargs)
    try:
        with _device_context(device):
            model = factory(**kwargs)
    except Exception as exc:  # anything the user's code raises is the user's to fix
        raise ConfigError(f"{key}: {spec.factory!r} raised {type(exc).__name__}: {_one_line(exc)} when called "
                          f"with kwargs {kwargs!r}; expected kwargs that it accepts") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}: {spec.factory!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                          "expected a function that builds the model")
    _check_outputs(model, spec, key)
    return model


def import_factory(value: str, key: str = "model.factory") -> Any:
    """The callable named by ``"package.module:function"`` (imported, not called)."""
    match = FACTORY.fullmatch(value)
    if match is None:
        raise ConfigError(f"{key}: {value!r} is not of the form 'package.module:function'; expected e.g. "
                          "timm:create_model or torchvision.models:mobilenet_v2")
    module_name = match["module"]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ConfigError(f"{key}: {value!r}: cannot import module '{module_name}' ({exc}); install the package "
                          f"that provides '{missing}', or put the folder holding it on PYTHONPATH") from None
    except Exception as exc:  # the module's own code failed while importing
        raise ConfigError(f"{key}: {value!r}: importing module '{module_name}' raised "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None
    target: Any = module
    where = module_name
    for part in match["attr"].split("."):
        if not hasattr(target, part):
            origin = getattr(module, "__file__", None)
            raise ConfigError(f"{key}: {value!r}: '{where}'{f' ({origin})' if origin else ''} has no attribute "
                              f"'{part}'; expected package.module:function naming a function of the module")
        target, where = getattr(target, part), f"{where}.{part}"
    if not callable(target):
        raise ConfigError(f"{key}: {value!r} is a {type(target).__name__}, not callable; expected a function "
                          "(or class) that returns an nn.Module")
    return target


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (the CLI prints a user error as one line)."""
    return " ".join(str(exc).split())


def _check_outputs(model: nn.Module, spec: ModelSpec, key: str) -> None:
    """``spec.num_classes`` against the model's classifier, when the last module holding
    parameters is a Linear: most classifiers end so, while a model that ends otherwise (a
    conv classifier, a norm after an identity head) gives no reliable count and is trusted."""
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = (name, module)
    if last is None or not isinstance(last[1], nn.Linear) or last[1].out_features == spec.num_classes:
        return
    name, linear = last
    raise ConfigError(
        f"{key}: {spec.factory!r} with kwargs {dict(spec.kwargs)!r} builds a model whose last Linear '{name}' has "
        f"{linear.out_features} outputs, but model.num_classes is {spec.num_classes}; expected kwargs that give "
        f"{spec.num_classes} outputs (a factory is not passed num_classes)"
    )


def has_transient_buffers(model: nn.Module) -> bool:
    """Whether some buffer is not in the state dict (``persistent=False``): such a buffer is
    computed at construction, so a model built on meta cannot get it from a state dict."""
    stored = set(model.state_dict())
    return any(name not in stored for name, _ in model.named_buffers())


def is_weights_name(value: str) -> bool:
    """Whether ``model.weights`` names torchvision weights (else it is ``random`` or a file)."""
    return value != "random" and WEIGHTS_NAME.fullmatch(value) is not None


def torchvision_weights(arch: str, name: str, num_classes: int | None = None,
                        key: str = "model.weights") -> torchvision.models.WeightsEnum:
    """The torchvision weights ``name`` of ``arch``, checked against the model built here.

    Needs no file. Errors (one line each): a name ``arch`` does not have (the valid ones are
    listed), weights of another architecture, weights without a classifier or with another
    number of classes than ``num_classes``, weights trained for another input size where the
    model is sized by it.
    """
    enum = torchvision.models.get_model_weights(arch)
    match = WEIGHTS_NAME.fullmatch(name)
    valid = ", ".join(enum.__members__)
    if match is None or (match["enum"] and match["enum"] != enum.__name__):
        raise UserError(
            f"{key}: {name!r} are not weights of {arch}; expected one of {valid} "
            f"(or {enum.__name__}.<name>), 'random', or a state dict file"
        )
    if match["member"] not in enum.__members__:
        raise UserError(f"{key}: {arch} has no weights {match['member']!r}; expected one of {valid}, "
                        "'random', or a state dict file")
    weights = enum[match["member"]]
    classes = weights.meta.get("categories")
    if classes is None:
        classifying = ", ".join(n for n, w in enum.__members__.items() if w.meta.get("categories"))
        raise UserError(f"{key}: {weights} of {arch} are a feature extractor without a trained classifier; "
                        f"expected weights with classes, one of {classifying}")
    if num_classes is not None and len(classes) != num_classes:
        raise UserError(
            f"{key}: {weights} of {arch} classify {len(classes)} classes but model.num_classes is "
            f"{num_classes}; expected model.num_classes: {len(classes)} (for another number of classes "
            "start from a state dict file with a classifier of that size)"
        )
    for prefix, size in INPUT_SIZED.items():
        trained = weights.meta.get("min_size", (size, size))[0]
        if arch.startswith(prefix) and trained != size:
            fitting = [n for n, w in enum.__members__.items() if w.meta.get("min_size", (size,))[0] == size]
            raise UserError(
                f"{key}: {weights} of {arch} were trained on {trained}x{trained} inputs and need a model "
                f"built for them, but {arch} is built for {size}x{size} here; expected one of "
                f"{', '.join(fitting) or '(none)'}"
            )
    return weights


def weights_cache_path(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision's own loader keeps ``weights``: ``<hub dir>/checkpoints/<URL file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_torchvision_weights(arch: str, name: str, num_classes: int | None = None,
                             key: str = "model.weights") -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights ``name`` of ``arch``, from the cache only."""
    weights = torchvision_weights(arch, name, num_classes, key)
    path = weights_cache_path(weights)
    if not path.is_file():
        raise UserError(
            f"{key}: {weights} of {arch} are not in torchvision's cache and runs do not download: "
            f"place {weights.url} at {path} (e.g. `gppq fetch-weights {arch} {weights._name_}` "
            "on a machine with network; the cache is $TORCH_HOME/hub/checkpoints)"
        )
    state = _read_state_dict(path, key)
    renamed = {}
    for name_, tensor in state.items():
        hit = _DENSENET_KEY.match(name_)
        renamed[hit.group(1) + hit.group(2) if hit else name_] = tensor
    return renamed


def fetch_weights(arch: str, name: str) -> Path:
    """Download torchvision weights into its cache (once, before any run) and return the path.

    torch.hub's download writes a temporary file and renames it, and checks the SHA-256
    prefix that torchvision puts in the file name; nothing is loaded.
    """
    weights = torchvision_weights(arch, name, key="weights")
    path = weights_cache_path(weights)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = re.search(r"-([a-f0-9]*)\.", path.name)
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=digest.group(1) if digest else None)
    return path


def _read_state_dict(path: Path, key: str) -> dict[str, Any]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot read '{path}' as a state dict: {exc}") from None


def load_state_dict(path: str | Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt``/``.pth`` tensor-only checkpoint.

    ``.pt`` files are read with ``weights_only=True``, so no code in them can run. A
    checkpoint that nests the weights under ``state_dict`` or ``model`` is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: file '{path}' does not exist (expected a .safetensors or .pt state dict, "
                        "'random', or a torchvision weights name such as IMAGENET1K_V1)")
    state = _read_state_dict(path, key)
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key}: '{path}' does not hold a mapping of parameter names to tensors")
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def load_weights(model: nn.Module, source: str | Path, key: str = "model.weights") -> None:
    """Load ``source`` into ``model`` (built by :func:`build_model`): a state dict file, or
    torchvision weights of the model's architecture by name (from the cache)."""
    if is_weights_name(str(source)):
        if model not in _BUILT:
            raise UserError(f"{key}: {source!r} names torchvision weights, which exist only for model.arch (a "
                            "torchvision model); expected a state dict file (.safetensors, .pt, .pth) or 'random'")
        arch, num_classes = _BUILT[model]
        state = load_torchvision_weights(arch, str(source), num_classes, key)
        where = f"{source} ({weights_cache_path(torchvision_weights(arch, str(source), key=key))})"
    elif str(source).endswith(".gppq"):
        from gppq_dist.artifact import dense_state, read_artifact

        state = dense_state(read_artifact(source), model)
        where = f"artifact '{source}'"
    else:
        state = load_state_dict(source, key)
        where = f"'{source}'"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).splitlines()[1:3]
        raise UserError(f"{key}: {where} does not fit the model: {' '.join(detail).strip()}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}")
    if problems:
        raise UserError(f"{key}: {where} does not fit the model ({'; '.join(problems)})")


def load_model(cfg: RunConfig, weights: str | None = None) -> nn.Module:
    """The config's model (``model.arch`` or ``model.factory``) with ``weights`` (or
    ``model.weights``): a file, torchvision weights of the arch by name, or ``random``
    (initialised under ``cfg.seed``); in eval mode."""
    source = weights or cfg.model.weights
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.spec)
    if source != "random":
        load_weights(model, source, key="--weights" if weights else "model.weights")
    return model.eval()


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors, atomically (temp file, fsync, rename)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
