"""Which layers are quantized, and how: one resolver of layer rules for every method.

Rules are resolved per layer as: name (regex, full match, first wins), then layer kind
(``conv{kh}x{kw}`` or ``linear``), then the default; a rule of ``None`` leaves the layer
alone. The first conv (the stem) is skipped when ``skip_first_conv`` is set; biases and
BatchNorm are never quantized. Grouped and depthwise convs are cut by their stored weight
shape (``Cout x Cin/groups x kh x kw``, rows of ``Cin/groups*kh*kw``); attention blocks
are planned through their Linear layers (``linear``), while parameters that belong to no
conv or Linear (``nn.MultiheadAttention.in_proj_weight``, position embeddings, class
tokens) stay fp32 like the rest of the unquantized parameters. Planning reads shapes only,
so it works on models built on the meta device. The effective K is clamped to the largest power of two
strictly below ``n_subvectors / 4`` (DESIGN §2), at least 1 (:func:`~gppq_dist.pq.codecs.clamp_k`).

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

A rule's value is the method's layer settings (a PQ method's ``{d, k}``, CLIP-Q's
``{prune, bits}``, TSQ's ``{}``); ``codec`` (:mod:`gppq_dist.pq.codecs`) turns it into the
layer's plan, and says how the plan's subvectors are stored, decoded and counted.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from torch import nn

from gppq_dist.errors import ConfigError
from gppq_dist.pq.codecs import codec_for
from gppq_dist.pq.subvectors import row_length

log = logging.getLogger(__name__)


class Rules(Protocol):
    """What :func:`plan_layers` reads; :class:`gppq_dist.config.QuantizationConfig` fits.
    A rule is whatever the codec's :meth:`~gppq_dist.pq.codecs.Codec.plan` reads."""

    skip_first_conv: bool
    on_indivisible: str  # "error" or "skip": a d that does not divide a layer's rows
    default: Any
    types: Mapping[str, Any]
    names: Mapping[str, Any]


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
        shape = self.codebook_shape
        return shape[0] if len(shape) == 3 else 1

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        return codec_for(self.codec).codebook_shape(self)

    @property
    def n_indices(self) -> int:
        """Stored indices: one per subvector (and per stage for ``residual``; per kept
        weight for ``clipq``)."""
        return codec_for(self.codec).n_indices(self)

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


def plan_layers(model: nn.Module, rules: Rules, codec: str = "pq", stages: int = 1) -> list[LayerPlan]:
    """The quantized layers of ``model`` in module order (works on meta tensors), each rule
    made a plan by ``codec`` (``stages``: codebooks per layer where the codec stacks them)."""
    coder = codec_for(codec)
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
        rule, key = resolve(name, kind, name_rules, rules)
        if rule is None:
            continue
        shape = tuple(module.weight.shape)
        plan = coder.plan(LayerPlan(name=name, kind=kind, shape=shape, d=1, k=1, k_requested=1, rule=key,
                                     codec=codec), rule, stages)
        length = row_length(shape)
        if length % plan.d and rules.on_indivisible == "skip":
            indivisible.append(f"{name} (rows of {length}, {key}.d = {plan.d})")
            continue
        if length % plan.d:
            divisors = [n for n in range(1, min(length, 64) + 1) if length % n == 0]
            pattern = name.replace(".", "\\.")  # a names rule that matches this layer alone
            raise ConfigError(
                f"{key}.d = {plan.d} does not divide the row length {length} of layer '{name}' "
                f"(weight {'x'.join(map(str, shape))}); expected a divisor such as "
                f"{', '.join(map(str, divisors))}, or leave the layer alone with "
                f"quantization.names: {{'{pattern}': null}} (every such layer: quantization.on_indivisible: skip)"
            )
        plans.append(plan)
    if indivisible:
        log.info("quantization.on_indivisible: skip: %d layer(s) left unquantized, d does not divide their rows: %s",
                 len(indivisible), ", ".join(indivisible))
    return plans


def resolve(name: str, kind: str, name_rules: list[tuple[re.Pattern[str], str, Any]], rules: Rules) -> tuple[Any, str]:
    """The rule of one layer and its key: the first names regex that fully matches, else its
    kind's, else the default (``None``: the layer is left alone)."""
    for regex, pattern, rule in name_rules:
        if regex.fullmatch(name):
            return rule, f"quantization.names[{pattern!r}]"
    if kind in rules.types:
        return rules.types[kind], f"quantization.types.{kind}"
    return rules.default, "quantization.default"
