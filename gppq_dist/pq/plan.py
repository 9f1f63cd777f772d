"""Which layers are quantized, and with what subvector length d and codebook size K.

Rules are resolved per layer as: name (regex, full match, first wins), then layer kind
(``conv{kh}x{kw}`` or ``linear``), then the default; a rule of ``None`` leaves the layer
alone. The first conv (the stem) is skipped when ``skip_first_conv`` is set; biases and
BatchNorm are never quantized. Grouped and depthwise convs are cut by their stored weight
shape (``Cout x Cin/groups x kh x kw``, rows of ``Cin/groups*kh*kw``); attention blocks
are planned through their Linear layers (``linear``), while parameters that belong to no
conv or Linear (``nn.MultiheadAttention.in_proj_weight``, position embeddings, class
tokens) stay fp32 like the rest of the unquantized parameters. Planning reads shapes only,
so it works on models built on the meta device. The effective K is clamped to the largest power of two
strictly below ``n_subvectors / 4`` (DESIGN §2), at least 1.

A rule's d must divide the layer's row length (``Cin/groups*kh*kw``, or ``in_features``).
Where it does not, ``on_indivisible`` decides: ``error`` (the default) is one ConfigError
naming the rule's key, the layer and divisors that would fit; ``skip`` leaves every such
layer unquantized (fp32, counted as such) and logs one INFO line with how many and which.
Depthwise convs (``groups == in_channels``, e.g. MobileNet's 3x3 depthwise convs,
``Cout x 1 x 3 x 3``) have rows of only ``kh*kw`` = 9 weights: d = 9 (or 3, 1) codes each
filter whole, a d such as 4 meets ``on_indivisible``. Their subvectors number ``Cout*9/d``,
so the clamp is against that count: a depthwise conv of 48 channels under d = 9 gets
K <= 8, one of 8 channels K = 1 (a single codeword; leave such a layer alone with a names
rule of ``null`` when that is too coarse).

``codec`` says how a layer's subvectors are coded (:mod:`gppq_dist.pq.variants`):

- ``pq``: one joint codebook of K codewords for all subvectors (G&P PQ, direct PQ,
  two-stage PQ; scalar k-means is ``pq`` with d = 1);
- ``pq_subspace``: product quantization with a codebook of its own for every sub-space
  (column block j of the rows), each fitted on the layer's ``Cout`` rows, so K is clamped
  against ``Cout`` (Gong et al. 2014);
- ``residual``: ``stages`` joint codebooks, each coding what the stages before it left
  (residual quantization, Gong et al. 2014); one index per subvector and stage;
- ``clipq``: single weights (d = 1), the smallest-magnitude fraction ``prune`` pruned and
  the rest coded with K = 2^b levels (:mod:`gppq_dist.pq.clipq`); one index per kept weight,
  the sparsity pattern stored beside them;
- ``ternary``: single weights in {-alpha, 0, +alpha}, a 2-bit code each (K = 4, three used)
  and one fp16 alpha per output row (:mod:`gppq_dist.pq.ternary`).

For ``clipq`` and ``ternary`` the rules only choose the layers: their d and k are not used
(the method's settings give the bits).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from torch import nn

from gppq_dist.errors import ConfigError
from gppq_dist.pq.clipq import n_kept
from gppq_dist.pq.subvectors import row_length

log = logging.getLogger(__name__)


class Rule(Protocol):
    d: int
    k: int


class Rules(Protocol):
    """What :func:`plan_layers` reads; :class:`gppq_dist.config.QuantizationConfig` fits."""

    skip_first_conv: bool
    on_indivisible: str  # "error" or "skip": a d that does not divide a layer's rows
    default: Rule | None
    types: Mapping[str, Rule | None]
    names: Mapping[str, Rule | None]


@dataclass(frozen=True)
class LayerPlan:
    """One quantized layer: its weight of ``shape`` is cut into ``n_subvectors x d``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    d: int
    k: int
    k_requested: int
    rule: str
    codec: str = "pq"
    stages: int = 1
    prune: float = 0.0  # clipq: fraction of the weights pruned

    @property
    def n_subvectors(self) -> int:
        return math.prod(self.shape) // self.d

    @property
    def n_codebooks(self) -> int:
        """Codebooks of K x d: one, one per sub-space, or one per residual stage."""
        if self.codec == "pq_subspace":
            return row_length(self.shape) // self.d
        return self.stages if self.codec == "residual" else 1

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        if self.codec == "ternary":
            return (self.shape[0], 1)  # alpha per output row
        if self.codec in ("pq", "clipq"):
            return (self.k, self.d)
        return (self.n_codebooks, self.k, self.d)

    @property
    def n_indices(self) -> int:
        """Stored indices: one per subvector (and per stage for ``residual``; per kept
        weight for ``clipq``)."""
        if self.codec == "clipq":
            return n_kept(self.n_subvectors, self.prune)
        return self.n_subvectors * (self.stages if self.codec == "residual" else 1)

    @property
    def index_bits(self) -> int:
        """Bits of one codeword index: log2(K) (K is a power of two)."""
        return self.k.bit_length() - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "d": self.d,
            "k": self.k,
            "k_requested": self.k_requested,
            "rule": self.rule,
            "codec": self.codec,
            "stages": self.stages,
            "prune": self.prune,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPlan":
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            shape=tuple(int(s) for s in data["shape"]),
            d=int(data["d"]),
            k=int(data["k"]),
            k_requested=int(data["k_requested"]),
            rule=str(data["rule"]),
            codec=str(data.get("codec", "pq")),
            stages=int(data.get("stages", 1)),
            prune=float(data.get("prune", 0.0)),
        )


def layer_kind(module: nn.Module) -> str | None:
    """``conv3x3``, ``conv1x1``, ``conv7x7``, ... for convs, ``linear`` for Linear, else None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv" + "x".join(str(k) for k in module.kernel_size)
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def clamp_k(k: int, n_subvectors: int) -> int:
    """``min(k, largest power of two p with 4p < n_subvectors)``, at least 1."""
    if n_subvectors <= 4:
        return 1
    return min(k, 1 << ((n_subvectors - 1).bit_length() - 3))


CODECS = ("pq", "pq_subspace", "residual", "clipq", "ternary")
ELEMENTWISE = ("clipq", "ternary")  # single weights: the rules' d and k are not used


def plan_layers(model: nn.Module, rules: Rules, codec: str = "pq", stages: int = 1) -> list[LayerPlan]:
    """The quantized layers of ``model`` in module order (works on meta tensors)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    name_rules = [(re.compile(pattern), pattern, rule) for pattern, rule in rules.names.items()]
    plans: list[LayerPlan] = []
    indivisible: list[str] = []  # on_indivisible: skip: each layer left alone, with its row length and d
    first_conv_seen = False
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        is_first_conv = kind.startswith("conv") and not first_conv_seen
        first_conv_seen = first_conv_seen or kind.startswith("conv")
        if is_first_conv and rules.skip_first_conv:
            continue
        rule, key = _resolve(name, kind, name_rules, rules)
        if rule is None:
            continue
        shape = tuple(module.weight.shape)
        if codec in ELEMENTWISE:
            plans.append(LayerPlan(name=name, kind=kind, shape=shape, d=1, k=4 if codec == "ternary" else rule.k,
                                   k_requested=rule.k, rule=key, codec=codec))
            continue
        length = row_length(shape)
        if length % rule.d and rules.on_indivisible == "skip":
            indivisible.append(f"{name} (rows of {length}, {key}.d = {rule.d})")
            continue
        if length % rule.d:
            divisors = [n for n in range(1, min(length, 64) + 1) if length % n == 0]
            pattern = name.replace(".", "\\.")  # a names rule that matches this layer alone
            raise ConfigError(
                f"{key}.d = {rule.d} does not divide the row length {length} of layer '{name}' "
                f"(weight {'x'.join(map(str, shape))}); expected a divisor such as "
                f"{', '.join(map(str, divisors))}, or leave the layer alone with "
                f"quantization.names: {{'{pattern}': null}} (every such layer: quantization.on_indivisible: skip)"
            )
        # a sub-space codebook is fitted on one subvector per row
        fitted_on = shape[0] if codec == "pq_subspace" else math.prod(shape) // rule.d
        plans.append(
            LayerPlan(
                name=name,
                kind=kind,
                shape=shape,
                d=rule.d,
                k=clamp_k(rule.k, fitted_on),
                k_requested=rule.k,
                rule=key,
                codec=codec,
                stages=stages if codec == "residual" else 1,
            )
        )
    if indivisible:
        log.info("quantization.on_indivisible: skip: %d layer(s) left unquantized, d does not divide their rows: %s",
                 len(indivisible), ", ".join(indivisible))
    return plans


def _resolve(
    name: str,
    kind: str,
    name_rules: list[tuple[re.Pattern[str], str, Rule | None]],
    rules: Rules,
) -> tuple[Rule | None, str]:
    for regex, pattern, rule in name_rules:
        if regex.fullmatch(name):
            return rule, f"quantization.names[{pattern!r}]"
    if kind in rules.types:
        return rules.types[kind], f"quantization.types.{kind}"
    return rules.default, "quantization.default"
