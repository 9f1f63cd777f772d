"""gppq_dist: Global & Progressive Product Quantization of CNNs, distributed.

The math lives in :mod:`gppq_dist.pq` (no distributed code there); the artifact format in
:mod:`gppq_dist.artifact`; the command line in :mod:`gppq_dist.cli`.
"""

__version__ = "0.1.0"
