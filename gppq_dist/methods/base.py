"""What every method module builds on: the strict config base, the PQ layer settings and
:class:`MethodSpec`, the one record the registry (:mod:`gppq_dist.methods.registry`) keeps
per method.

Import-light on purpose (pydantic only): the command line reads configs at start-up, and
the config schema is built from the method modules. A method module imports torch-heavy
code inside its functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext
    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.pq.variants import Coded
    from gppq_dist.train.schemes import Scheme

# (cfg, model, plans, context, reducer, checkpoint state or None, data manifest or None) -> the
# method's trainer scheme, from the checkpoint's state or fresh (its initial coding)
SchemeFactory = Callable[["RunConfig", "nn.Module", "list[LayerPlan]", "DistContext", Any, "dict[str, Any] | None", Any],
                         "Scheme"]
# (weights, plans, **k-means options) -> every planned layer coded, in lockstep over the ranks
CodeFunction = Callable[..., "list[Coded]"]
Handler = Callable[["RunConfig", "DistContext", bool], "dict[str, Any]"]
# (the raw method section, the raw quantization section) -> one line saying what to write
# instead when they are in an old form of the method's settings, else None
LegacyCheck = Callable[[dict[str, Any], dict[str, Any]], "str | None"]


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LayerQuant(Strict):
    """Product quantization of one layer: subvectors of length ``d``, ``k`` codewords."""

    d: int = Field(gt=0, description="Subvector length; it must divide the layer's row length "
                   "(`quantization.on_indivisible`).")
    k: int = Field(gt=0, description="Codewords per codebook, a power of two (clamped per layer to the largest "
                   "below a quarter of the subvectors the codebook is fitted on).")

    @field_validator("k")
    @classmethod
    def _power_of_two(cls, k: int) -> int:
        if k & (k - 1):
            raise ValueError(f"must be a power of two so indices pack to log2(k) bits, got {k}")
        return k


@dataclass(frozen=True)
class MethodSpec:
    """One compression method, as the rest of the package sees it.

    ``name``: the ``method.name`` of its configs; ``config``: the type of its ``method:``
    section (a :class:`Strict` model whose ``name`` is ``Literal[name]``); ``layer``: the type
    of one layer's settings, the values of ``quantization.default/types/names``; ``codec``:
    the name of its layers' codec (:mod:`gppq_dist.pq.codecs`).

    Exactly one of ``scheme`` (the method trains through the trainer; the factory builds its
    scheme, :class:`gppq_dist.train.schemes.Scheme`) and ``code`` (it codes the weights once,
    :mod:`gppq_dist.methods.untrained`). ``calibrates``: it reads training batches at its
    start. ``swaps_weights``: it trains straight-through, swapping every coded weight for its
    quantized value around each step, so the weights must not be sharded (no FSDP, no ZeRO-3).
    ``run``: the run handler, when not the standard one of its kind. ``legacy``: recognises
    the method's settings written in an old form (:data:`LegacyCheck`).
    """

    name: str
    config: type[Strict]
    layer: type[BaseModel]
    codec: str
    scheme: SchemeFactory | None = None
    code: CodeFunction | None = None
    calibrates: bool = False
    swaps_weights: bool = False
    run: Handler | None = None
    legacy: LegacyCheck | None = None

    def __post_init__(self) -> None:
        if (self.scheme is None) == (self.code is None):
            raise ValueError(f"method {self.name!r}: give exactly one of scheme (it trains) and code (it does not)")

    @property
    def trains(self) -> bool:
        return self.scheme is not None


def joint_pq(weights: Sequence["torch.Tensor"], plans: Sequence["LayerPlan"], **kmeans: Any) -> "list[Coded]":
    """Direct PQ's coding (one joint K x d codebook per layer), imported when called."""
    from gppq_dist.pq.variants import joint_pq as code

    return code(weights, plans, **kmeans)


def artifact_start(cfg: "RunConfig", plans: Sequence["LayerPlan"]) -> "tuple[dict, dict] | None":
    """``(psi, codebooks)`` of the ``.gppq`` artifact that ``model.weights`` names (codebooks
    as stored, fp16 values in fp32), for a PQ method that continues it instead of clustering;
    None when ``model.weights`` is no artifact. Its coded layers must be this run's plans:
    same names, codec ``pq``, same d and K (else one ConfigError naming the first that differs)."""
    if not str(cfg.model.weights).endswith(".gppq"):
        return None
    from gppq_dist.artifact import read_artifact
    from gppq_dist.errors import ConfigError

    artifact = read_artifact(cfg.model.weights)
    theirs = {plan.name: plan for plan in artifact.layers}
    where = f"model.weights: artifact '{cfg.model.weights}'"
    ours = {plan.name for plan in plans}
    if theirs.keys() != ours:
        extra, missing = sorted(theirs.keys() - ours), sorted(ours - theirs.keys())
        raise ConfigError(f"{where} codes {len(theirs)} layers, this run's quantization plans {len(ours)}"
                          + (f"; only the artifact codes {', '.join(extra[:4])}" if extra else "")
                          + (f"; only the run plans {', '.join(missing[:4])}" if missing else "")
                          + " (expected the same layers, to continue its codes)")
    for plan in plans:
        found = theirs[plan.name]
        if (found.codec, found.d, found.k) != ("pq", plan.d, plan.k):
            raise ConfigError(f"{where} codes layer '{plan.name}' as {found.codec} d={found.d} K={found.k}, this "
                              f"run's quantization plans pq d={plan.d} K={plan.k} (expected the same, to continue "
                              "its codes; its rules are in `gppq inspect`)")
    return ({name: artifact.assignments[name] for name in ours},
            {name: artifact.codebooks[name].float() for name in ours})


def starting_codes(cfg: "RunConfig", plans: Sequence["LayerPlan"], state: "dict[str, Any] | None",
                   fresh: Callable[[], "tuple[dict, dict | None]"]) -> "tuple[dict, dict | None]":
    """``(psi, codebooks or None)`` a PQ scheme starts from: the checkpoint's psi (its model
    state holds the rest); else the artifact's codes (:func:`artifact_start`); else ``fresh()``,
    the method's own coding."""
    if state is not None:
        return state["psi"], None
    start = artifact_start(cfg, plans)
    return start if start is not None else fresh()


# The raw (not yet validated) layer rules, as a method's LegacyCheck reads them.
RULE_TIERS = ("default", "types", "names")


def rule_keys(quantization: Any, fields: Sequence[str]) -> list[str]:
    """Dotted keys of the layer rules in a raw ``quantization`` section that set any of
    ``fields``, e.g. ``quantization.types.conv3x3.d``."""
    if not isinstance(quantization, dict):
        return []
    keys = []
    for where, rule in _rules(quantization):
        keys += [f"{where}.{field}" for field in fields if isinstance(rule, dict) and field in rule]
    return keys


def rewritten_rules(quantization: Any, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The rule tiers of a raw ``quantization`` section with every rule that is not null
    replaced by ``rewrite(rule)`` (the nulls kept)."""
    quantization = quantization if isinstance(quantization, dict) else {}

    def rewritten(rule: Any) -> Any:
        return None if rule is None else rewrite(rule if isinstance(rule, dict) else {})

    tiers: dict[str, Any] = {}
    if quantization.get("default") is not None:
        tiers["default"] = rewritten(quantization["default"])
    for tier in ("types", "names"):
        if isinstance(quantization.get(tier), dict):
            tiers[tier] = {key: rewritten(rule) for key, rule in quantization[tier].items()}
    return tiers


def one_line_yaml(data: Any) -> str:
    """``data`` as YAML in flow style, on one line (for an error message)."""
    import yaml

    return yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def _rules(quantization: dict[str, Any]) -> list[tuple[str, Any]]:
    rules = [("quantization.default", quantization.get("default"))]
    for tier in ("types", "names"):
        if isinstance(quantization.get(tier), dict):
            rules += [(f"quantization.{tier}.{key}" if tier == "types" else f"quantization.names[{key!r}]", rule)
                      for key, rule in quantization[tier].items()]
    return rules
