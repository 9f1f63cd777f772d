"""Top-1 / top-5 accuracy of a model on a labelled folder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gppq_dist.progress import progress_bar

if TYPE_CHECKING:
    from gppq_dist.distributed import Reducer


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device | str = "cpu",
    label: str = "eval",
    reducer: Reducer | None = None,
) -> dict[str, Any]:
    """``{"top1", "top5", "loss", "images"}``; accuracies in percent.

    With a ``reducer`` each rank scores its own shard and the counts are summed across
    ranks, so every rank returns the metrics of the whole set. The counts accumulate on
    ``device``: the only host sync is reading the totals once at the end.
    """
    device = torch.device(device)
    model.eval().to(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    with progress_bar(label, total=len(loader)) as advance:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels.unsqueeze(1)
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(1).sum()
            totals[2] += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            totals[3] += labels.numel()
            advance(1)
    if reducer is not None:
        reducer.all_reduce_sum(totals)
    correct1, correct5, loss_sum, seen = totals.tolist()
    if seen == 0:
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "images": 0}
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "loss": loss_sum / seen,
        "images": int(seen),
    }
