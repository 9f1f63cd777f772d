"""The compressed artifact (``.gppq``): a safetensors file whose bytes are the reported size.

Contents (tensor names):

- ``indices/<layer>``: uint8, the codeword indices bit-packed to log2(K) bits each;
- ``codebook/<layer>``: fp16, ``K x d`` (codec ``pq``), or ``m x K x d`` (``pq_subspace``:
  one per sub-space) or ``S x K x d`` (``residual``: one per stage), see
  :mod:`gppq_dist.pq.plan`;
- ``param/<name>``: fp32, every parameter that is not quantized and not BatchNorm
  (the stem conv, biases);
- ``bn_scale/<bn>``, ``bn_shift/<bn>``: fp32, each BatchNorm folded to two vectors,
  ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``;
- ``buffer/<name>``: any other buffer (none in torchvision ResNets);
- ``<extra>/<layer>``: the extra tensor of a layer whose codec keeps one
  (:class:`~gppq_dist.pq.codecs.ExtraTensor`), its JSON metadata under the payload's
  ``<extra>s``: ``pattern/<layer>``, a ``clipq`` layer's sparsity pattern, relative indices
  of ``r`` bits bit-packed (:mod:`gppq_dist.pq.clipq`; ``r`` and the count in ``patterns``;
  its ``indices`` are those of the kept weights, its codebook the 2^b levels);
  ``activation/<layer>``, fp32 ``[eps, step, levels]`` of a ``ternary`` (TSQ) layer's input
  quantizer, applied at inference too (:func:`rebuild_model` installs it as a pre-hook; a
  ``ternary`` layer's indices are 2-bit sign codes, its codebook one alpha per output row).

Metadata (the safetensors header, strings only): ``format`` = ``gppq``, ``format_version``,
``payload`` (JSON: architecture, per-layer layout, accounted size, config, preprocessing;
a model built by ``model.factory`` has ``factory`` and ``factory_kwargs`` beside ``arch``,
which then holds the factory's name, and :func:`rebuild_model` calls the factory again)
and ``checksum``: SHA-256 over the payload and every tensor's name, dtype, shape and bytes.
Reading never unpickles; a truncated, bit-flipped or foreign file is an
:class:`~gppq_dist.errors.ArtifactError`, never a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gppq_dist.data.folder import preprocess_info
from gppq_dist.errors import ArtifactError, ConfigError
from gppq_dist.io import atomic_path
from gppq_dist.methods.registry import method_spec
from gppq_dist.models import ModelSpec, create_model, has_transient_buffers
from gppq_dist.pq.accounting import account
from gppq_dist.pq.codec import pack_indices, unpack_indices
from gppq_dist.pq.codecs import codec_for, decode_layer
from gppq_dist.pq.plan import LayerPlan

if TYPE_CHECKING:
    from gppq_dist.config import RunConfig

FORMAT = "gppq"
# 2: per-layer codecs (version 1 files are all "pq" and read the same); 3: the clipq and
# ternary codecs (sparsity patterns, input quantizers)
FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")


@dataclass
class Artifact:
    """A compressed model in memory; ``assignments`` are unpacked int64 indices."""

    arch: str
    num_classes: int
    layers: list[LayerPlan]
    codebooks: dict[str, torch.Tensor]
    assignments: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    bn_scale: dict[str, torch.Tensor]
    bn_shift: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # per layer whose codec keeps one, its extra tensor: a clipq layer's kept weights (flat
    # bool), a ternary layer's input quantizer
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from, for messages

    @property
    def model_spec(self) -> ModelSpec:
        """How its model is built: the recorded factory and kwargs, else the torchvision arch
        (every artifact written before factories)."""
        factory = self.info.get("factory")
        if factory:
            return ModelSpec(num_classes=self.num_classes, factory=str(factory),
                             kwargs=dict(self.info.get("factory_kwargs") or {}))
        return ModelSpec(num_classes=self.num_classes, arch=self.arch)

    @property
    def accounted_bytes(self) -> float:
        return float(self.info["accounted_bytes"])

    def decoded_weight(self, name: str) -> torch.Tensor:
        plan = next(p for p in self.layers if p.name == name)
        return decode_layer(plan, self.codebooks[name].float(), self.assignments[name], self.extras.get(name))


def build_artifact(
    model: nn.Module,
    plans: list[LayerPlan],
    codebooks: dict[str, torch.Tensor],
    assignments: dict[str, torch.Tensor],
    info: dict[str, Any] | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> Artifact:
    """Package ``model`` (uncompressed params and BN stats) with the layers' codes.

    ``codebooks`` are stored in fp16; the model's quantized weights themselves are not read.
    ``extras``: the extra tensor of every layer whose codec keeps one (a ``clipq`` layer's
    kept weights, a ``ternary`` layer's ``InputQuantizer.to_tensor()``).
    """
    kept = {}
    for plan in plans:
        extra = codec_for(plan.codec).extra
        if extra is not None:
            if plan.name not in (extras or {}):
                raise ValueError(f"layer {plan.name!r} ({plan.codec}) needs its {extra.name} tensor in extras")
            kept[plan.name] = extra.check(plan, extras[plan.name])
    arch, num_classes = _identity(model, info)
    quantized = {_weight_name(plan.name) for plan in plans}
    params, buffers, bn_scale, bn_shift = {}, {}, {}, {}
    batchnorms = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }
    bn_owned = set()
    for name, module in batchnorms.items():
        scale, shift = fold_batchnorm(module)
        bn_scale[name], bn_shift[name] = scale, shift
        prefix = f"{name}." if name else ""
        bn_owned.update(prefix + key for key in module.state_dict())
    parameter_names = {name for name, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        if name in quantized or name in bn_owned:
            continue
        target = params if name in parameter_names else buffers
        target[name] = tensor.detach().float().cpu().contiguous()
    report = account(model, plans, kept)
    payload = {
        "arch": arch,
        "num_classes": num_classes,
        "accounted_bytes": report.total_bytes,
        "fp32_bytes": report.fp32_bytes,
        **(info or {}),
    }
    return Artifact(
        arch=arch,
        num_classes=num_classes,
        layers=list(plans),
        codebooks={n: c.detach().to(torch.float16).cpu().contiguous() for n, c in codebooks.items()},
        assignments={n: a.detach().cpu().long() for n, a in assignments.items()},
        params=params,
        bn_scale=bn_scale,
        bn_shift=bn_shift,
        buffers=buffers,
        info=payload,
        extras=kept,
    )


def fold_batchnorm(module: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode (fp32)."""
    var = module.running_var.detach().double()
    mean = module.running_mean.detach().double()
    gamma = module.weight.detach().double() if module.affine else torch.ones_like(var)
    beta = module.bias.detach().double() if module.affine else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + module.eps)
    shift = beta - mean * scale
    return scale.float().contiguous(), shift.float().contiguous()


@dataclass(frozen=True)
class StoredLayer:
    """One coded layer as the file holds it: ``indices`` uint8 (log2(K) bits each, packed),
    ``codebook`` fp16, and the codec's extra tensor as stored (``None``: the codec keeps
    none) with its JSON metadata (a ``clipq`` pattern's ``[r, count]``)."""

    indices: torch.Tensor
    codebook: torch.Tensor
    extra: torch.Tensor | None = None
    extra_meta: Any = None


def stored_layer(artifact: Artifact, plan: LayerPlan) -> StoredLayer:
    """The tensors :func:`write_artifact` stores for ``plan``'s layer."""
    packed = torch.from_numpy(pack_indices(artifact.assignments[plan.name], plan.index_bits))
    extra = codec_for(plan.codec).extra
    if extra is None:
        return StoredLayer(packed, artifact.codebooks[plan.name])
    stored, meta = extra.pack(plan, artifact.extras[plan.name])
    return StoredLayer(packed, artifact.codebooks[plan.name], stored, meta)


def write_artifact(artifact: Artifact, path: str | Path) -> int:
    """Write atomically; returns the file's size in bytes."""
    tensors: dict[str, torch.Tensor] = {}
    metadata_of_extras: dict[str, dict[str, Any]] = {}  # payload key -> layer -> metadata
    for plan in artifact.layers:
        layer = stored_layer(artifact, plan)
        tensors[f"indices/{plan.name}"] = layer.indices
        tensors[f"codebook/{plan.name}"] = layer.codebook
        extra = codec_for(plan.codec).extra
        if extra is not None:
            tensors[f"{extra.name}/{plan.name}"] = layer.extra
            if layer.extra_meta is not None:
                metadata_of_extras.setdefault(f"{extra.name}s", {})[plan.name] = layer.extra_meta
    tensors.update({f"param/{n}": t for n, t in artifact.params.items()})
    tensors.update({f"buffer/{n}": t for n, t in artifact.buffers.items()})
    tensors.update({f"bn_scale/{n}": t for n, t in artifact.bn_scale.items()})
    tensors.update({f"bn_shift/{n}": t for n, t in artifact.bn_shift.items()})
    payload = json.dumps(
        {**artifact.info, "layers": [plan.to_dict() for plan in artifact.layers], **metadata_of_extras},
        sort_keys=True,
        separators=(",", ":"),
    )
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "payload": payload,
        "checksum": _checksum(payload, tensors),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path.stat().st_size


def read_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises several types (incl. Rust panics) on bad bytes
        raise ArtifactError(
            f"'{path}' is not a readable .gppq artifact (truncated or corrupt?): {exc}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"'{path}' is a safetensors file but not a .gppq artifact")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"'{path}' has format version {metadata.get('format_version')!r}; this gppq_dist "
            f"reads versions {', '.join(READABLE_VERSIONS)}"
        )
    payload_text = metadata.get("payload", "")
    if metadata.get("checksum") != _checksum(payload_text, tensors):
        raise ArtifactError(f"'{path}' is corrupt: checksum mismatch (the file was altered or damaged)")
    payload = json.loads(payload_text)
    layers = [LayerPlan.from_dict(entry) for entry in payload.pop("layers")]
    try:
        coders = {plan.name: codec_for(plan.codec) for plan in layers}
        extra_names = {coder.extra.name for coder in coders.values() if coder.extra is not None}
        metadata_of_extras = {name: payload.pop(f"{name}s", {}) for name in sorted(extra_names)}
        assignments = {
            plan.name: unpack_indices(tensors[f"indices/{plan.name}"].numpy(), plan.index_bits, plan.n_indices)
            for plan in layers
        }
        extras = {}
        for plan in layers:
            extra = coders[plan.name].extra
            if extra is not None:
                stored = tensors[f"{extra.name}/{plan.name}"]
                meta = metadata_of_extras[extra.name].get(plan.name)
                extras[plan.name] = extra.check(plan, extra.unpack(plan, stored, meta))
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"'{path}': inconsistent layer data: {exc}") from None
    for plan in layers:
        if tuple(tensors[f"codebook/{plan.name}"].shape) != plan.codebook_shape:
            raise ArtifactError(f"'{path}': codebook of layer '{plan.name}' has shape "
                                f"{list(tensors[f'codebook/{plan.name}'].shape)}, its layout says {list(plan.codebook_shape)}")

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}

    return Artifact(
        arch=payload["arch"],
        num_classes=int(payload["num_classes"]),
        layers=layers,
        codebooks={plan.name: tensors[f"codebook/{plan.name}"] for plan in layers},
        assignments=assignments,
        params=group("param/"),
        bn_scale=group("bn_scale/"),
        bn_shift=group("bn_shift/"),
        buffers=group("buffer/"),
        info=payload,
        extras=extras,
        path=path,
    )


def rebuild_model(artifact: Artifact) -> nn.Module:
    """A plain ``nn.Module`` (eval mode) computing what the artifact encodes: the torchvision
    arch, or the recorded factory called again with its kwargs (its package must be
    importable here).

    Each BatchNorm keeps its class but holds the folded vectors: ``weight = scale``,
    ``bias = shift``, ``running_mean = 0``, ``running_var = 1``, ``eps = 0``. A layer with an
    extra tensor gets what its codec installs (TSQ's input quantizer: a forward pre-hook).
    """
    spec = artifact.model_spec
    where = f"artifact '{artifact.path}'" if artifact.path else "artifact"
    try:
        model = create_model(spec, device="meta", key=f"{where} was built by model.factory")
        # buffers computed at construction and kept out of the state dict need a real build
        model = create_model(spec) if has_transient_buffers(model) else model.to_empty(device="cpu")
    except ConfigError as exc:
        raise ArtifactError(str(exc)) from None
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 0.0
    try:
        model.load_state_dict(dense_state(artifact, model), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ArtifactError(f"{where} does not fit a {spec.label}: {exc}") from None
    modules = dict(model.named_modules())
    for plan in artifact.layers:
        extra = codec_for(plan.codec).extra
        if extra is not None:
            extra.install(modules[plan.name], artifact.extras[plan.name])
    return model.eval()


def dense_state(artifact: Artifact, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under which ``model`` (the artifact's architecture) computes in eval
    mode what the artifact encodes: decoded weights, the unquantized tensors, and each
    BatchNorm's folded vectors as ``weight = scale * sqrt(1 + eps)`` (the module's own eps),
    ``bias = shift``, ``running_mean = 0``, ``running_var = 1``. A codec's other state (TSQ's
    input quantizers) is not part of a state dict: :func:`rebuild_model` installs it.

    This is also how a run starts from an artifact (``model.weights: FILE.gppq``): in train
    mode each BatchNorm normalises by its batch statistics again, starting from the folded
    affine, and re-estimates its running statistics."""
    state = {_weight_name(p.name): artifact.decoded_weight(p.name) for p in artifact.layers}
    state.update(artifact.params)
    state.update(artifact.buffers)
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        prefix = f"{name}." if name else ""
        scale = artifact.bn_scale[name]
        state[prefix + "weight"] = (scale.double() * (1.0 + module.eps) ** 0.5).float()
        state[prefix + "bias"] = artifact.bn_shift[name]
        state[prefix + "running_mean"] = torch.zeros_like(scale)
        state[prefix + "running_var"] = torch.ones_like(scale)
        state[prefix + "num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return state


def snap_model_(model: nn.Module, plans: list[LayerPlan], codebooks: dict[str, torch.Tensor],
                assignments: dict[str, torch.Tensor]) -> nn.Module:
    """Replace each quantized weight by its codewords, in place (the codebook as stored, fp16)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for plan in plans:
            weight = modules[plan.name].weight
            codebook = codebooks[plan.name].to(torch.float16).to(weight.dtype)
            weight.copy_(decode_layer(plan, codebook, assignments[plan.name].to(weight.device)))
    return model


def artifact_info(cfg: RunConfig, gamma: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact's payload: what rebuilds the model (``arch``, or ``factory`` with its
    ``factory_kwargs``; ``arch`` is then the factory's name), how it was made (``method``: a
    method that trains is ``direct_pq`` here, its starting point, unless ``extra`` says
    otherwise), the config."""
    model = cfg.model.model_dump(mode="json")
    recipe = {"factory": model["factory"], "factory_kwargs": model["kwargs"]} if cfg.model.factory else {}
    return {
        "arch": cfg.model.spec.label,
        **recipe,
        "num_classes": cfg.model.num_classes,
        "method": "direct_pq" if method_spec(cfg.method.name).trains else cfg.method.name,
        "gamma": gamma,
        "preprocess": preprocess_info(cfg.data),
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }


def _identity(model: nn.Module, info: dict[str, Any] | None) -> tuple[str, int]:
    if not info or "arch" not in info:
        raise ValueError("info must name the model's 'arch'")
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)]
    num_classes = int(info.get("num_classes") or fc[-1].out_features)
    return str(info["arch"]), num_classes


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _checksum(payload: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(payload.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
