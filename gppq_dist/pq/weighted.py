"""Activation-weighted k-means ("And the Bit Goes Down", Stock et al. 2019), single layer.

Two-stage PQ clusters a layer's subvectors to minimise the error of the layer's output
rather than of its weights: for input activations x, ``||x (W - W_hat)||^2``. As in the
paper's implementation, the input of a layer is cut into d-dimensional slices that line up
with the subvectors (for a conv, the unfolded patches in (Cin, kh, kw) order, the order of
a weight row), and the slices of all blocks and positions share one d x d second-moment
matrix ``H = E[x x^T]``. The objective per subvector is then ``(w - c)^T H (w - c)``: plain
k-means of ``w L`` with ``H = L L^T`` (Cholesky), whose codewords mapped back are again the
means of their members, so they stay exact member means (eq. 5) in weight space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gppq_dist.pq.gp import Assignment, cluster_means
from gppq_dist.pq.kmeans import KMeansResult, kmeans_many

if TYPE_CHECKING:
    from gppq_dist.distributed import Reducer


def input_slices(module: nn.Module, inputs: torch.Tensor, d: int) -> torch.Tensor:
    """The module's input cut into the d-dim slices its weight's subvectors multiply:
    conv ``B x Cin x H x W -> (B * positions * rows/d) x d``; linear ``B x Cin -> (B*Cin/d) x d``."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, d)
    if isinstance(module, nn.modules.conv._ConvNd) and inputs.dim() == 4:
        patches = nn.functional.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, d)  # per position: (Cin, kh, kw) order
    raise ValueError(f"activation weighting supports Linear and 2-d convs, not {type(module).__name__}")


def second_moment(slices: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum x x^T, count)`` of the slices, in fp64 (sums of batches and ranks add up)."""
    slices = slices.detach().double()
    return slices.T @ slices, slices.shape[0]


def weighted_kmeans(subvectors: torch.Tensor, moment: torch.Tensor, k: int, reducer: Reducer | None = None,
                    damping: float = 1e-4, **options: Any) -> KMeansResult:
    """k-means of ``N x d`` subvectors under the metric ``moment`` (``d x d``, ``sum x x^T``).

    ``damping`` adds that fraction of the mean eigenvalue to the diagonal, so that input
    directions the calibration data never excites (dead channels) still count a little.
    The result's codebook is in weight space (the member means), its inertia the weighted one.
    """
    d = moment.shape[0]
    moment = moment / max(float(torch.trace(moment)) / d, 1e-30)  # scale-free
    factor = torch.linalg.cholesky(moment + damping * torch.eye(d, dtype=moment.dtype, device=moment.device))
    whitened = (subvectors.double() @ factor).float()
    (result,) = kmeans_many([whitened], [k], reducer=reducer, **options)
    assignment = Assignment.from_psi(result.assignments, k)
    codebook = cluster_means(subvectors.float(), assignment)
    return KMeansResult(codebook=codebook, assignments=result.assignments, inertia=result.inertia,
                        iterations=result.iterations, reseeded=result.reseeded, init_s=result.init_s)
