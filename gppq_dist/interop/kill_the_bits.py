"""Import the compressed ResNets of "And the Bit Goes Down" (facebookresearch/kill-the-bits).

Their ``.pth`` is a dict written by ``torch.save`` (read here with ``weights_only=True`` and
``map_location="cpu"``: their published files were saved from CUDA tensors):

- a quantized layer ``name`` (every conv but the stem, and ``fc``) ->
  ``{'centroids': fp16 K x block, 'assignments': uint8 or int16 (n,), 'n_blocks': int,
  'is_conv': bool, 'k': kernel size}``. Their decoder (``src/utils/utils.py``,
  ``weight_from_centroids``) is ``cat(centroids[assignments].t().chunk(n_blocks, dim=1), dim=0)``,
  a ``(Cin*k*k) x Cout`` matrix, transposed and viewed as ``Cout x Cin x k x k`` (a Linear:
  transposed). So their index ``j * Cout + o`` codes block ``j`` (``block`` consecutive weights)
  of output row ``o``: the very subvector that is our index ``o * n_blocks + j``
  (:mod:`gppq_dist.pq.subvectors`); the import transposes the index order, nothing else;
- the unquantized stem ``conv1`` -> ``{'weight'}``; each BatchNorm ``name`` -> ``{'weight',
  'bias'}`` with its running statistics folded in (their inference model keeps a fresh
  BatchNorm's mean 0 and variance 1, and its eps of 1e-5); ``fc_bias`` -> ``{'bias'}``.

The artifact keeps their codebooks (fp16, unchanged) and indices (bit-packed to log2(K) bits),
the stem as fp32 (the file has it in fp16: the values are the same, accounted at 4 bytes
each as every unquantized tensor is) and each BatchNorm folded as ours are: scale
``weight / sqrt(1 + 1e-5)``, shift ``bias``. Its method is ``two_stage_pq`` (what made it),
its preprocessing ImageNet's (their models are ImageNet models).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppq_dist.errors import ArtifactError
from gppq_dist.models import ModelSpec, create_model
from gppq_dist.pq.plan import LayerPlan, layer_kind

ARCHS = ("resnet18", "resnet50")
QUANTIZED_KEYS = {"centroids", "assignments", "n_blocks", "is_conv", "k"}
EXPECTED = ("a kill-the-bits compressed state dict: a dict of layer name -> {centroids, assignments, n_blocks, "
            "is_conv, k} for the quantized layers, conv1 -> {weight}, each BatchNorm -> {weight, bias} and "
            "fc_bias -> {bias}")
RULE = "kill-the-bits"


def read_compressed(path: Path) -> dict[str, dict[str, Any]]:
    """The file's dict, read without running code in it; one :class:`ArtifactError` otherwise."""
    if not path.is_file():
        raise ArtifactError(f"'{path}' does not exist (expected {EXPECTED})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ArtifactError(f"'{path}' is not a tensor-only torch.save file: it is another kind of file, or it "
                            "holds Python objects, which are never loaded (nothing in a file is run); "
                            f"expected {EXPECTED}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"'{path}' cannot be read as a torch.save file: {first} (expected {EXPECTED})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ArtifactError(f"'{path}' is not {EXPECTED}")
    return data


def to_our_order(assignments: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Their index order (block-major: ``j * Cout + o``) -> ours (row-major: ``o * n_blocks + j``)."""
    return assignments.long().reshape(n_blocks, -1).t().reshape(-1)


def import_kill_the_bits(path: str | Path, arch: str) -> Any:
    """The :class:`~gppq_dist.artifact.Artifact` of their file ``path`` for torchvision ``arch``."""
    from gppq_dist.artifact import build_artifact
    from gppq_dist.config import DataConfig
    from gppq_dist.data.folder import preprocess_info

    path = Path(path)
    if arch not in ARCHS:
        raise ArtifactError(f"--arch {arch!r}: kill-the-bits published {', '.join(ARCHS)}; expected one of them")
    data = read_compressed(path)
    fc_bias = _tensor(data, "fc_bias", "bias", path)
    num_classes = fc_bias.numel()
    model = create_model(ModelSpec(num_classes=num_classes, arch=arch))
    modules = dict(model.named_modules())
    coded = [name for name, entry in data.items() if QUANTIZED_KEYS <= entry.keys()]
    expected = [name for name, module in modules.items() if layer_kind(module) is not None and name != "conv1"]
    missing, foreign = sorted(set(expected) - set(coded)), sorted(set(coded) - set(expected))
    if missing or foreign:
        detail = "; ".join(part for part in (
            f"no codes for {', '.join(missing[:4])}" if missing else "",
            f"codes for {', '.join(foreign[:4])}, which {arch} has not" if foreign else "") if part)
        raise ArtifactError(f"'{path}' does not fit {arch} with {num_classes} classes: {detail} (expected {EXPECTED}; "
                            "their resnet50_semisup leaves two more layers uncoded and is not supported)")
    plans, codebooks, assignments = [], {}, {}
    for name in expected:  # module order, as planned layers are
        plan, codebook, psi = _layer(name, data[name], modules[name], path)
        plans.append(plan)
        codebooks[name], assignments[name] = codebook, psi
    state: dict[str, torch.Tensor] = {"conv1.weight": _tensor(data, "conv1", "weight", path, modules["conv1"].weight.shape),
                                      "fc.bias": fc_bias}
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d):
            for key in ("weight", "bias"):
                state[f"{name}.{key}"] = _tensor(data, name, key, path, module.weight.shape)
            state[f"{name}.running_mean"] = torch.zeros_like(module.running_mean)
            state[f"{name}.running_var"] = torch.ones_like(module.running_var)
    model.load_state_dict(state, strict=False)  # the coded weights are not read: their codes are
    info = {
        "arch": arch,
        "num_classes": num_classes,
        "method": "two_stage_pq",
        "gamma": None,
        "preprocess": preprocess_info(DataConfig(root="data/imagenet")),
        "imported": {"format": "kill-the-bits", "file": path.name, "file_bytes": path.stat().st_size},
    }
    return build_artifact(model.eval(), plans, codebooks, assignments, info=info)


def _layer(name: str, entry: dict[str, Any], module: nn.Module, path: Path) -> tuple[LayerPlan, torch.Tensor, torch.Tensor]:
    where = f"'{path}', layer '{name}'"
    centroids, codes = entry["centroids"], entry["assignments"]
    if not (isinstance(centroids, torch.Tensor) and centroids.dim() == 2 and centroids.is_floating_point()):
        raise ArtifactError(f"{where}: centroids must be a K x block float tensor")
    if not (isinstance(codes, torch.Tensor) and codes.dim() == 1 and codes.dtype in (torch.uint8, torch.int16,
                                                                                     torch.int32, torch.int64)):
        raise ArtifactError(f"{where}: assignments must be a 1-d integer tensor (uint8 or int16)")
    k, block = centroids.shape
    shape = tuple(module.weight.shape)
    is_conv = isinstance(module, nn.Conv2d)
    kernel = shape[2] if is_conv else 1
    n_blocks = int(entry["n_blocks"])
    if bool(entry["is_conv"]) != is_conv or int(entry["k"]) != kernel or n_blocks * block != math.prod(shape[1:]) \
            or codes.numel() != n_blocks * shape[0]:
        raise ArtifactError(
            f"{where}: is_conv={entry['is_conv']}, k={entry['k']}, n_blocks={n_blocks}, {codes.numel()} assignments "
            f"of blocks of {block} do not fit its weight {list(shape)} (expected n_blocks x block = "
            f"{math.prod(shape[1:])}, n_blocks x {shape[0]} assignments)")
    if k & (k - 1):
        raise ArtifactError(f"{where}: K = {k} centroids; the artifact stores log2(K)-bit indices, so K must be a "
                            "power of two")
    psi = to_our_order(codes, n_blocks)
    if psi.min() < 0 or psi.max() >= k:  # int16 holds K up to 32,768 and reads back signed
        raise ArtifactError(f"{where}: assignments outside 0..{k - 1}")
    plan = LayerPlan(name=name, kind=layer_kind(module), shape=shape, d=block, k=k, k_requested=k, rule=RULE)
    return plan, centroids.to(torch.float16), psi


def _tensor(data: dict[str, Any], name: str, key: str, path: Path, shape: torch.Size | None = None) -> torch.Tensor:
    value = data.get(name, {}).get(key)
    if not isinstance(value, torch.Tensor):
        raise ArtifactError(f"'{path}': no tensor {name}[{key!r}] (expected {EXPECTED})")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ArtifactError(f"'{path}': {name}[{key!r}] has shape {list(value.shape)}, the model's is {list(shape)}")
    return value.float()
