"""Two-Step Quantization's two pieces (Wang et al., CVPR 2018), single layer.

Step 1, the codes: a layer's input activations are *sparse-quantized*: values at or below
a threshold ``eps`` become 0, the rest fall into ``levels`` = 2^bits - 1 intervals of width
``step`` above it and take each interval's midpoint (the last interval is open). ``eps``
is the ``sparsity`` quantile of the calibration activations (ReLU's zeros included), and
``step`` the one of a grid that minimises the squared error of the values above ``eps``.
In training the gradient passes straight through inside the quantizer's range and is zero
outside it.

Step 2, the transformation: each output row ``w`` of the layer becomes ``alpha * t`` with
``t`` in {-1, 0, +1}^n, fitted by iterative least squares against the layer's response to
the codes: minimise ``(w - alpha t)^T H (w - alpha t)`` with ``H = E[x x^T]`` over the
unfolded input codes ``x`` (so the error is that of the layer's output on the codes), plus
``ridge`` times the mean diagonal on the diagonal (calibration data is small next to a deep
layer's fan-in). Alternate: ``alpha`` in closed form given ``t``, then ``t`` by exact
coordinate descent given ``alpha``, in blocks of coordinates whose effect on the others is
applied as one matrix product. The start is the ternary-weight-network rule (threshold
0.7 mean |w|). Linear least squares replaces the paper's non-linear target (the next
layer's codes): in a ResNet, BatchNorm and the residual sum stand between a conv and the
next quantizer.
"""

from __future__ import annotations

import torch


def sparse_quantize(x: torch.Tensor, eps: float, step: float, levels: int) -> torch.Tensor:
    """Sparse quantization of ``x`` (straight-through gradient inside the range)."""
    index = torch.ceil((x - eps) / step).clamp_(0, levels)
    quantized = torch.where(index > 0, eps + (index - 0.5) * step, torch.zeros_like(x))
    if not x.requires_grad:
        return quantized
    inside = ((x > eps) & (x <= eps + levels * step)).to(x.dtype)
    return quantized.detach() + (x - x.detach()) * inside


def fit_sparse_quantizer(samples: torch.Tensor, bits: int, sparsity: float,
                         grid: int = 64) -> tuple[float, float]:
    """``(eps, step)`` for ``samples`` (1-d, a subsample of a layer's inputs)."""
    levels = (1 << bits) - 1
    samples = samples.float().reshape(-1)
    eps = float(torch.quantile(samples, sparsity)) if samples.numel() else 0.0
    eps = max(eps, 0.0)
    above = samples[samples > eps]
    if above.numel() == 0:
        return eps, 1.0
    span = float(above.max()) - eps
    if span <= 0:
        return eps, 1.0
    best = None
    for fraction in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        step = span * fraction / levels
        error = float(((sparse_quantize(above, eps, step, levels) - above) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, step)
    return eps, best[1]


def ternary_codes(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``round(w / alpha)`` clipped to {-1, 0, 1} per row (the finetune's quantizer)."""
    rows = weight.reshape(weight.shape[0], -1)
    return torch.round(rows / alpha.clamp_min(1e-12).unsqueeze(1)).clamp_(-1, 1)


TERNARY = (0.0, 1.0, -1.0, 0.0)  # stored 2-bit code -> sign (code 3 is not used)


def ternary_indices(signs: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} -> the 2-bit codes of :data:`TERNARY` (flat int64)."""
    signs = signs.reshape(-1)
    return (signs > 0).long() + 2 * (signs < 0).long()


def twn(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weight networks' rule per row: threshold 0.7 mean |w|, alpha the mean |w|
    above it. Returns ``(t, alpha)``, ``t`` rows x fan-in in {-1, 0, 1}."""
    rows = weight.reshape(weight.shape[0], -1).float()
    threshold = 0.7 * rows.abs().mean(dim=1, keepdim=True)
    t = torch.sign(rows) * (rows.abs() > threshold)
    nonzero = t.abs().sum(1).clamp_min(1)
    return t, (rows.abs() * t.abs()).sum(1) / nonzero


def _alpha(rows: torch.Tensor, t: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    tm = t @ moment
    num, den = (tm * rows).sum(1), (tm * t).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).clamp_min(0)


@torch.no_grad()
def ternary_least_squares(weight: torch.Tensor, moment: torch.Tensor, iterations: int = 3, ridge: float = 1e-2,
                          block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, alpha)`` minimising ``sum_rows (w - alpha t)^T H (w - alpha t)`` (module
    docstring); ``moment`` is ``sum x x^T`` over the input codes, fan-in x fan-in."""
    rows = weight.reshape(weight.shape[0], -1).float()
    n = rows.shape[1]
    h = moment.float()
    scale = float(torch.diagonal(h).mean())
    h = h / scale if scale > 0 else torch.eye(n)
    h = h + ridge * torch.eye(n)
    diagonal = torch.diagonal(h).clone()
    t, alpha = twn(rows)
    alpha = _alpha(rows, t, h)
    for _ in range(iterations):
        safe = alpha.clamp_min(1e-12).unsqueeze(1)
        target = (rows @ h) / safe  # minimise t^T H t - 2 t^T target, per row
        current = t @ h
        for start in range(0, n, block):
            stop = min(start + block, n)
            local = current[:, start:stop].clone()
            before = t[:, start:stop].clone()
            sub = h[start:stop, start:stop]
            for j in range(stop - start):
                col = start + j
                r = (target[:, col] - local[:, j] + t[:, col] * diagonal[col]) / diagonal[col]
                new = torch.sign(r) * (r.abs() > 0.5)
                delta = new - t[:, col]
                if delta.any():
                    local += delta.unsqueeze(1) * sub[j].unsqueeze(0)
                    t[:, col] = new
            change = t[:, start:stop] - before
            if change.any():
                current += change @ h[start:stop]
        alpha = _alpha(rows, t, h)
    return t, alpha


def reconstruction_error(weight: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, moment: torch.Tensor) -> float:
    """``sum_rows (w - alpha t)^T H (w - alpha t)`` (for tests and logs)."""
    diff = weight.reshape(weight.shape[0], -1).double() - alpha.double().unsqueeze(1) * t.double()
    return float(((diff @ moment.double()) * diff).sum())


class InputQuantizer:
    """A forward pre-hook that sparse-quantizes a layer's input (``register_forward_pre_hook``);
    a plain object, so models holding it deep-copy. ``eps`` and ``step`` are kept at fp32,
    as stored."""

    def __init__(self, eps: float, step: float, levels: int) -> None:
        eps, step = torch.tensor([eps, step], dtype=torch.float32).tolist()
        self.eps, self.step, self.levels = eps, step, int(levels)

    def __call__(self, _module, args):
        return (sparse_quantize(args[0], self.eps, self.step, self.levels), *args[1:])

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.eps, self.step, float(self.levels)], dtype=torch.float32)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "InputQuantizer":
        eps, step, levels = (float(v) for v in values.reshape(-1)[:3])
        return cls(eps, step, int(round(levels)))
