"""gppq_dist: Global & Progressive Product Quantization of CNNs, distributed.

In your own training loop: ``gppq_dist.prepare(model, config)`` returns a :class:`Handle`
(:mod:`gppq_dist.api`). The math lives in :mod:`gppq_dist.pq` (no distributed code there);
the artifact format in :mod:`gppq_dist.artifact`; the command line in :mod:`gppq_dist.cli`.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Handle", "prepare"]


def __getattr__(name: str) -> Any:
    """``prepare`` and ``Handle`` from :mod:`gppq_dist.api`, imported when first asked for
    (so that ``import gppq_dist`` stays cheap for the command line)."""
    if name in __all__:
        from gppq_dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'gppq_dist' has no attribute {name!r}")
