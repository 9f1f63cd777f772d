"""The compression methods: one :class:`~gppq_dist.methods.base.MethodSpec` per method.

The config schema (``method:`` and the layer rules' values), planning, coding, the trainer
and the artifact read a method's parts from here, by ``method.name``; nothing else lists
the methods. Adding one: a module under ``gppq_dist/methods/`` with its config type, its
layer settings, its scheme factory (it trains) or coding function (it does not) and its
``SPEC``, plus one line in :data:`BUILT_IN` below; a storage layout of its own is a codec
(:mod:`gppq_dist.pq.codecs`). Tests add one at run time with :func:`register` and take it
away with :func:`unregister`.

Import-light: the method modules import torch-heavy code inside their functions.
"""

from __future__ import annotations

from gppq_dist.methods import clipq, direct_pq, gppq, kmeans_scalar, pq_subspace, residual_pq, tsq, two_stage_pq
from gppq_dist.methods.base import MethodSpec

BUILT_IN = (
    gppq.SPEC,
    two_stage_pq.SPEC,
    direct_pq.SPEC,
    kmeans_scalar.SPEC,
    pq_subspace.SPEC,
    residual_pq.SPEC,
    clipq.SPEC,
    tsq.SPEC,
)
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in BUILT_IN}


def method_spec(name: str) -> MethodSpec:
    """The method called ``name`` (a config's ``method.name``)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}") from None


def register(spec: MethodSpec) -> None:
    """Add a method (its codec must be known to :func:`gppq_dist.pq.codecs.codec_for`)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec


def unregister(name: str) -> None:
    """Take away a method added by :func:`register`."""
    if any(spec.name == name for spec in BUILT_IN):
        raise ValueError(f"method {name!r} is built in")
    del METHODS[name]
