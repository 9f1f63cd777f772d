"""Building torchvision models and loading their weights without unpickling."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gppq_dist.errors import UserError
from gppq_dist.io import atomic_path


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int, device: str | torch.device = "cpu") -> nn.Module:
    """An unmodified torchvision model with fresh (seeded by the caller) weights.

    ``device="meta"`` builds shapes only, with no memory and no initialisation cost.
    """
    archs = available_archs()
    if arch not in archs:
        near = [a for a in archs if a.startswith(arch[:6])] or archs[:12]
        raise UserError(
            f"model.arch: unknown architecture {arch!r}; expected a torchvision classification "
            f"model such as {', '.join(near[:12])}"
        )
    with torch.device(device):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def load_state_dict(path: str | Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt``/``.pth`` tensor-only checkpoint.

    ``.pt`` files are read with ``weights_only=True``, so no code in them can run. A
    checkpoint that nests the weights under ``state_dict`` or ``model`` is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: file '{path}' does not exist (expected a .safetensors or .pt state dict)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot read '{path}' as a state dict: {exc}") from None
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key}: '{path}' does not hold a mapping of parameter names to tensors")
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def load_weights(model: nn.Module, path: str | Path, key: str = "model.weights") -> None:
    state = load_state_dict(path, key)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).splitlines()[1:3]
        raise UserError(f"{key}: '{path}' does not fit the model: {' '.join(detail).strip()}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:5])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:5])}")
    if problems:
        raise UserError(f"{key}: '{path}' does not fit the model ({'; '.join(problems)})")


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as safetensors, atomically (temp file, fsync, rename)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
