"""Host syncs on the GPU paths, counted by torch's sync debug mode.

``torch.cuda.set_sync_debug_mode`` flags every operation that goes through c10's
``memcpy_and_sync`` or ``stream_synchronize``: ``.item()``, ``float(tensor)``, ``.cpu()`` /
``.tolist()`` of a CUDA tensor, a blocking host-to-device copy, ``nonzero`` and boolean-mask
indexing. ``"error"`` raises ``RuntimeError("called a synchronizing CUDA operation")``,
``"warn"`` issues a ``UserWarning`` with that text (recorded here with
``warnings.catch_warnings(record=True)``). ``torch.cuda.synchronize()`` itself is not
flagged.

- Evaluation: the batch loop runs with no host sync at all (the loader below switches the
  mode to ``"error"`` for exactly the loop's batches), and a whole evaluation has at most
  one, reading the totals, however many batches it scores.
- CLIP-Q's pruning threshold is found on the GPU: the CUDA mask equals the CPU one, with at
  most one sync.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gppq_dist.evaluate import evaluate
from gppq_dist.models import build_model
from gppq_dist.pq.clipq import keep_mask, n_kept

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SYNC = "called a synchronizing CUDA operation"
CUDA = torch.device("cuda", 0)


class CudaBatches:
    """A loader of ready CUDA batches (``__iter__`` and ``__len__``, as ``evaluate`` needs).

    With ``mode``, the sync debug mode is ``mode`` from the first batch handed out until the
    loop asks for the next batch after the last one: everything the consumer does per
    batch runs under it, and nothing before or after its loop does.
    """

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], mode: str | None = None) -> None:
        self.batches, self.mode = batches, mode

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.mode is None:
            yield from self.batches
            return
        torch.cuda.set_sync_debug_mode(self.mode)
        yield from self.batches
        # reached only when the loop asks past the last batch; a loop that raised leaves the
        # mode to the test's own `finally` (a `finally` here would run whenever the abandoned
        # generator is collected, possibly inside a later test)
        torch.cuda.set_sync_debug_mode("default")


def cuda_batches(count: int, batch: int = 16, classes: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=generator).to(CUDA),
             torch.randint(classes, (batch,), generator=generator).to(CUDA)) for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model("resnet18", 10).to(CUDA).eval()
    evaluate(net, CudaBatches(cuda_batches(1)), CUDA)  # cuDNN / cuBLAS start-up outside the counts
    torch.cuda.synchronize()
    return net


def syncs_during(function) -> tuple[object, int]:
    """``function()``'s result and the host syncs it made (sync debug mode ``"warn"``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            value = function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return value, sum(SYNC in str(warning.message) for warning in caught)


def test_the_batch_loop_harness_catches_a_per_batch_item():
    # the check below is only worth something if a per-batch .item() does trip it
    def scores_with_item(loader):
        return sum((images.sum() > 0).item() for images, _ in loader)

    try:
        with pytest.raises(RuntimeError, match=SYNC):
            scores_with_item(CudaBatches(cuda_batches(2), mode="error"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loader = CudaBatches(cuda_batches(3))  # made outside the count: a blocking copy to the GPU is a sync too
    _, counted = syncs_during(lambda: scores_with_item(loader))
    assert counted == 3


def test_evaluation_batch_loop_makes_no_host_sync(model):
    batches = cuda_batches(4)
    try:
        metrics = evaluate(model, CudaBatches(batches, mode="error"), CUDA, reducer=None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # and the totals it accumulated on the GPU are the right ones
    with torch.no_grad():
        hits = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in batches)
    assert metrics["images"] == 4 * 16
    assert metrics["top1"] == pytest.approx(100.0 * hits / (4 * 16))


def test_evaluation_syncs_once_however_many_batches(model):
    # the batches are made outside the counts: a blocking copy to the GPU is a sync too
    two_batches, six_batches = CudaBatches(cuda_batches(2)), CudaBatches(cuda_batches(6, seed=1))
    _, two = syncs_during(lambda: evaluate(model, two_batches, CUDA, reducer=None))
    metrics, six = syncs_during(lambda: evaluate(model, six_batches, CUDA, reducer=None))
    assert metrics["images"] == 6 * 16
    assert six == two, f"{two} host syncs for 2 batches, {six} for 6: a sync per batch"
    assert six <= 1, f"{six} host syncs in one evaluation; reading the totals needs one"


def test_clipq_keep_mask_on_the_gpu_equals_the_cpu_mask_with_one_sync_at_most():
    weight = torch.randn(256, 128, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = keep_mask(weight, 0.8)
    assert int(expected.sum()) == n_kept(weight.numel(), 0.8)
    on_gpu = weight.to(CUDA)
    keep_mask(on_gpu, 0.8)  # start-up outside the count
    mask, counted = syncs_during(lambda: keep_mask(on_gpu, 0.8))
    assert mask.device.type == "cuda" and mask.dtype == torch.bool
    assert torch.equal(mask.cpu(), expected)
    assert counted <= 1, f"keep_mask made {counted} host syncs on the GPU"


def test_clipq_keep_mask_on_the_gpu_breaks_ties_to_exactly_n_kept():
    # magnitudes from 8 values only: the threshold falls inside a run of equal ones
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randint(1, 9, (64, 32, 3, 3), generator=generator).float()
              * (torch.randint(0, 2, (64, 32, 3, 3), generator=generator) * 2 - 1))
    mask = keep_mask(weight.to(CUDA), 0.8).cpu()
    magnitude = weight.reshape(-1).abs()
    assert int(mask.sum()) == n_kept(weight.numel(), 0.8)
    assert magnitude[mask].min() >= magnitude[~mask].max()
