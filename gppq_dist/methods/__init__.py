"""Compression methods: one handler per ``method:`` config type, dispatched on its type.

``run(cfg, context, resume)`` is what ``gppq train`` and ``torchrun -m gppq_dist.train``
call. Every handler writes the same run folder (``config.yaml``, ``gppq.gppq``,
``summary.json`` with the same keys, MLflow records by rank 0), so runs of different methods
compare side by side (``gppq compare``).

- G&P PQ and two-stage PQ train (:mod:`gppq_dist.train.trainer`, distributed);
- direct PQ and Gong et al.'s scalar k-means, sub-space PQ and residual PQ do not
  (:mod:`gppq_dist.methods.untrained`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # this module stays light: the command line imports it at start-up
    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext

Handler = Callable[["RunConfig", "DistContext", bool], dict[str, Any]]
HANDLERS: dict[type, Handler] = {}


def handles(*config_types: type) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of these method config types."""

    def register(handler: Handler) -> Handler:
        for config_type in config_types:
            HANDLERS[config_type] = handler
        return handler

    return register


def run(cfg: "RunConfig", context: "DistContext", resume: bool = False) -> dict[str, Any]:
    """Run the config's method; returns its summary (rank 0 also writes it)."""
    from gppq_dist.methods import trained, untrained  # noqa: F401  (they register themselves)

    return HANDLERS[type(cfg.method)](cfg, context, resume)


def result_line(summary: dict[str, Any]) -> str:
    """One line of a run's outcome, for the terminal."""
    method = summary.get("method", "gppq")
    direct = summary.get("direct_pq_top1")
    reference = (f"{method}; {summary['top1_raw']:.2f}% raw, baseline {summary['baseline_top1']:.2f}%"
                 + (f", direct PQ {direct:.2f}%" if direct is not None and method != "direct_pq" else ""))
    return (f"{summary['artifact']}: top-1 {summary['top1_quantized']:.2f}% quantized ({reference}), "
            f"{summary['size_mb']:.3f} MB, {summary['ratio']:.1f}x, Gamma {summary['gamma']:.2e}")
