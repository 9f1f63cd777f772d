"""CLIP-Q (Tung & Mori, CVPR 2018): pruning and quantization in parallel with finetuning.

Every step, each coded layer's full-precision weights are pruned (fraction ``prune`` of
the smallest magnitudes) and their survivors quantized to 2^``bits`` levels
(:mod:`gppq_dist.pq.clipq`); the forward and backward passes see that weight, and the
full-precision copy takes the step (straight-through,
:class:`~gppq_dist.methods.clipq_scheme.ClipQScheme`). The shipped model is the final
full-precision weights pruned and quantized once more; its artifact stores the sparsity
pattern, the level indices of the kept weights and the fp16 levels (codec ``clipq``).

(prune, bits) are per-layer settings, the values of the ``quantization`` rules::

    quantization:
      types:
        conv3x3: {prune: 0.8, bits: 2}
        conv1x1: {prune: 0.8, bits: 2}
        linear: {prune: 0.8, bits: 2}
      names:
        "layer4\\..*": {prune: 0.9, bits: 1}

The paper chooses them with Bayesian optimisation against a target size, which is left to
the user (``gppq size`` tells the size of a setting before any training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from gppq_dist.methods.base import MethodSpec, Strict, one_line_yaml, rewritten_rules, rule_keys

if TYPE_CHECKING:
    from torch import nn

    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext
    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.train.schemes import Scheme

OLD_KEYS = ("prune", "bits", "layers")  # method.* keys before (prune, bits) became layer rules
OLD_DEFAULT = {"prune": 0.8, "bits": 2}  # their defaults


class ClipQMethod(Strict):
    """CLIP-Q: per layer a pruning fraction and a bit width (the ``quantization`` rules'
    ``{prune, bits}``); every step the full-precision weights (which keep training,
    ``train.*``) are pruned and quantized for the forward pass. The paper's Bayesian-
    optimisation search for per-layer settings is not part of this method: set them."""

    name: Literal["clipq"] = Field(
        description="CLIP-Q (Tung & Mori 2018): every step the full-precision weights are pruned and quantized (each "
        "layer's `{prune, bits}`) for the forward and backward pass, straight-through. The former `method.prune`, "
        "`method.bits` and `method.layers` are one `error:` line giving the `quantization` section to write instead.")


class ClipQLayer(Strict):
    """One layer's CLIP-Q setting."""

    prune: float = Field(ge=0.0, lt=1.0, description="Fraction of the layer's weights pruned (smallest magnitude, "
                         "`floor(p N)` exactly).")
    bits: int = Field(ge=1, le=8, description="Bit width of the kept weights: they take 2^bits levels.")


def make_scheme(cfg: RunConfig, model: nn.Module, plans: list[LayerPlan], context: DistContext, reducer,
                state: dict[str, Any] | None, manifest: Any) -> Scheme:
    """Nothing to restore: every step recomputes the coding from the weights."""
    from gppq_dist.methods.clipq_scheme import ClipQScheme

    return ClipQScheme(model, plans, reducer)


def legacy(method: dict[str, Any], quantization: dict[str, Any]) -> str | None:
    """``method.prune/bits/layers`` and ``{d, k}`` rules that only chose the layers: the
    rules to write instead (``method.layers`` patterns become names rules, after the
    ``null`` names rules that left layers alone)."""
    old = [f"method.{key}" for key in OLD_KEYS if key in method]
    named = old or rule_keys(quantization, ("d", "k"))
    if not named:
        return None
    setting = {key: method.get(key, default) for key, default in OLD_DEFAULT.items()}
    rules = rewritten_rules(quantization, lambda rule: {key: rule.get(key, value) for key, value in setting.items()})
    layers = method.get("layers") if isinstance(method.get("layers"), dict) else {}
    if layers:
        names = rules.get("names", {})
        rules["names"] = {**{p: None for p, rule in names.items() if rule is None}, **layers,
                          **{p: rule for p, rule in names.items() if rule is not None and p not in layers}}
    return (f"{', '.join(named)}: method clipq takes its (prune, bits) per layer from the quantization rules now, "
            f"in place of {{d, k}} (no method.prune, method.bits, method.layers); write quantization: "
            f"{one_line_yaml(rules)}")


SPEC = MethodSpec(name="clipq", config=ClipQMethod, layer=ClipQLayer, codec="clipq", scheme=make_scheme,
                  swaps_weights=True, legacy=legacy)
