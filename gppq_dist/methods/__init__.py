"""Compression methods: one module per method, registered in :mod:`gppq_dist.methods.registry`.

``run(cfg, context, resume)`` is what ``gppq train`` and ``torchrun -m gppq_dist.train``
call. Every method writes the same run folder (``config.yaml``, ``gppq.gppq``,
``summary.json`` with the same keys, MLflow records by rank 0), so runs of different methods
compare side by side (``gppq compare``).

- the methods that train (G&P PQ, two-stage PQ, CLIP-Q, TSQ) run the trainer
  (:mod:`gppq_dist.train.trainer`, distributed) with their scheme;
- direct PQ and Gong et al.'s scalar k-means, sub-space PQ and residual PQ code the weights
  once (:mod:`gppq_dist.methods.untrained`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this module stays light: the command line imports it at start-up
    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext


def run(cfg: "RunConfig", context: "DistContext", resume: bool = False) -> dict[str, Any]:
    """Run the config's method (its own handler, else the one of its kind); returns its
    summary (rank 0 also writes it)."""
    from gppq_dist.methods.registry import method_spec

    spec = method_spec(cfg.method.name)
    if spec.run is not None:
        return spec.run(cfg, context, resume)
    if spec.trains:
        from gppq_dist.train.trainer import train

        return train(cfg, context, resume=resume)
    from gppq_dist.methods.untrained import code_once

    return code_once(cfg, context, resume)


def result_line(summary: dict[str, Any]) -> str:
    """One line of a run's outcome, for the terminal."""
    method = summary.get("method", "gppq")
    direct = summary.get("direct_pq_top1")
    reference = (f"{method}; {summary['top1_raw']:.2f}% raw, baseline {summary['baseline_top1']:.2f}%"
                 + (f", direct PQ {direct:.2f}%" if direct is not None and method != "direct_pq" else ""))
    return (f"{summary['artifact']}: top-1 {summary['top1_quantized']:.2f}% quantized ({reference}), "
            f"{summary['size_mb']:.3f} MB, {summary['ratio']:.1f}x, Gamma {summary['gamma']:.2e}")
