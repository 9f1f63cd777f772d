"""One plain training epoch (the baseline pretraining)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    advance: Callable[..., None],
    status: str,
    after_step: Callable[[], None] | None = None,
) -> float:
    """Forward, backward, optimizer step, ``after_step`` (e.g. a per-step lr schedule) for
    every batch; returns the mean loss."""
    model.train()
    loss_sum, seen = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.item() * labels.numel()
        seen += labels.numel()
        advance(1, status=f"{status} loss {loss.item():.3f}")
    return loss_sum / max(1, seen)
