"""Which layers are quantized, and with what subvector length d and codebook size K.

Rules are resolved per layer as: name (regex, full match, first wins), then layer kind
(``conv{kh}x{kw}`` or ``linear``), then the default; a rule of ``None`` leaves the layer
alone. The first conv (the stem) is skipped when ``skip_first_conv`` is set; biases and
BatchNorm are never quantized. The effective K is clamped to the largest power of two
strictly below ``n_subvectors / 4`` (DESIGN §2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from torch import nn

from gppq_dist.errors import ConfigError
from gppq_dist.pq.subvectors import row_length


class Rule(Protocol):
    d: int
    k: int


class Rules(Protocol):
    """What :func:`plan_layers` reads; :class:`gppq_dist.config.QuantizationConfig` fits."""

    skip_first_conv: bool
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

    @property
    def n_subvectors(self) -> int:
        return math.prod(self.shape) // self.d

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


def plan_layers(model: nn.Module, rules: Rules) -> list[LayerPlan]:
    """The quantized layers of ``model`` in module order (works on meta tensors)."""
    name_rules = [(re.compile(pattern), pattern, rule) for pattern, rule in rules.names.items()]
    plans: list[LayerPlan] = []
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
        length = row_length(shape)
        if length % rule.d:
            divisors = [n for n in range(1, min(length, 64) + 1) if length % n == 0]
            raise ConfigError(
                f"{key}.d = {rule.d} does not divide the row length {length} of layer '{name}' "
                f"(weight {'x'.join(map(str, shape))}); expected a divisor such as "
                f"{', '.join(map(str, divisors))}"
            )
        n_subvectors = math.prod(shape) // rule.d
        plans.append(
            LayerPlan(
                name=name,
                kind=kind,
                shape=shape,
                d=rule.d,
                k=clamp_k(rule.k, n_subvectors),
                k_requested=rule.k,
                rule=key,
            )
        )
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
