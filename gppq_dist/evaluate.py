"""Top-1 / top-5 accuracy of a model on a labelled folder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gppq_dist.progress import progress_bar


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", label: str = "eval") -> dict[str, Any]:
    """``{"top1", "top5", "loss", "images"}``; accuracies in percent."""
    model.eval().to(device)
    correct1 = correct5 = 0
    loss_sum = 0.0
    seen = 0
    with progress_bar(label, total=len(loader)) as advance:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels.unsqueeze(1)
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(1).sum())
            seen += labels.numel()
            advance(1)
    if seen == 0:
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "images": 0}
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "loss": loss_sum / seen,
        "images": seen,
    }
