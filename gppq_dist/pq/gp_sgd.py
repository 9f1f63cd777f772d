"""SGD on G&P-updated weights in closed form: the eq. 6 transform and the SGD step in one.

With the eq. 6 gradient ``g'_j = gbar_k + mu (W_j - c_k)`` (k = psi(j), ``gbar_k`` the
cluster-mean gradient, ``c_k`` the cluster mean) and torch's SGD (momentum m, weight decay
wd, no dampening, no Nesterov), every weight splits into its cluster mean and a residual
``W_j = c_k + r_j`` (and the momentum likewise), and the two parts never mix:

    mean:      v_k <- m v_k + gbar_k + wd c_k        c_k <- c_k - lr v_k
    residual:  s_j <- m s_j + (mu + wd) r_j          r_j <- r_j - lr s_j

The residual's update does not depend on the gradient, and it is the same linear map for
every subvector, so ``r_j(t) = alpha_t r_j(0)`` (the momentum starts at zero) with two
scalars ``alpha`` and ``beta`` that follow the same recursion. One step therefore costs a
K x d SGD step on the codewords, the scalar recursion and one pass that writes
``W = c[psi] + alpha * R0``, instead of the N x d transform followed by an N x d optimizer
step: the full gradient is read once (for the codeword sums, which is also all that ranks
exchange) and nothing else of size N x d is read but ``R0``, which takes the place of the
momentum buffer. The result equals :func:`gppq_dist.pq.gp.apply_gp_gradient` followed by
``torch.optim.SGD`` up to fp32 rounding (tested).

The codeword sums are the caller's to compute and reduce; :meth:`GPSGD.step` takes them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gppq_dist.pq.gp import Assignment, cluster_means


class GPSGD(torch.optim.Optimizer):
    """SGD over quantized weights with the G&P update folded in (one parameter group).

    ``weights[i]`` is cut into subvectors of length ``ds[i]`` (``N_i x d_i``) with the fixed
    ``assignments[i]``. Per weight, the state holds ``codewords`` and ``momentum`` (K x d),
    ``residual`` (``R0``, N x d, taken when the optimizer is built), ``alpha``, ``beta``
    (floats) and ``step``; all plain containers, read back by ``weights_only`` loading.
    ``lr``, ``momentum`` and ``weight_decay`` live in the parameter group, so lr schedulers
    drive it as any torch optimizer.
    """

    def __init__(
        self,
        weights: Sequence[torch.nn.Parameter],
        ds: Sequence[int],
        assignments: Sequence[Assignment],
        mu: float,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        codewords: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """``codewords`` (K x d each) replace the member means as the starting codewords:
        for weights snapped to them, the residuals then start at exactly zero and the weights
        stay exactly quantized (the member mean of equal values can be off by rounding)."""
        if not len(weights) == len(ds) == len(assignments):
            raise ValueError("weights, ds and assignments must be aligned")
        super().__init__(list(weights), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.mu = mu
        self.layers = list(zip(ds, assignments))
        with torch.no_grad():
            starts = codewords if codewords is not None else [None] * len(self.layers)
            for weight, (d, assignment), start in zip(self.param_groups[0]["params"], self.layers, starts, strict=True):
                subvectors = weight.detach().reshape(-1, d)
                codewords = (start.detach().to(subvectors).clone() if start is not None
                             else cluster_means(subvectors, assignment))
                self.state[weight].update(
                    codewords=codewords, momentum=torch.zeros_like(codewords),
                    residual=subvectors - codewords[assignment.psi], alpha=1.0, beta=0.0, step=0,
                )

    @torch.no_grad()
    def step(self, grad_sums: Sequence[torch.Tensor]) -> None:  # type: ignore[override]
        """One step from each weight's codeword gradient sums (K x d, averaged over ranks)."""
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for weight, (d, assignment), sums in zip(group["params"], self.layers, grad_sums, strict=True):
            state = self.state[weight]
            codewords, velocity, first = state["codewords"], state["momentum"], state["step"] == 0
            direction = sums.view_as(codewords) / assignment.counts.clamp_min(1).unsqueeze(1)
            if weight_decay:
                direction.add_(codewords, alpha=weight_decay)
            decay = (self.mu + weight_decay) * state["alpha"]  # the residual's "gradient", per unit R0
            if momentum:
                velocity.copy_(direction) if first else velocity.mul_(momentum).add_(direction)
                direction = velocity
                decay = decay if first else momentum * state["beta"] + decay
            codewords.add_(direction, alpha=-lr)
            state["beta"] = decay
            state["alpha"] -= lr * decay
            state["step"] += 1
            if weight.is_contiguous():
                out = torch.index_select(codewords, 0, assignment.psi, out=weight.data.view(-1, d))
                out.add_(state["residual"], alpha=state["alpha"])
            else:  # e.g. channels_last: build it apart, then copy
                snapped = codewords[assignment.psi].add_(state["residual"], alpha=state["alpha"])
                weight.data.copy_(snapped.view(weight.shape))
