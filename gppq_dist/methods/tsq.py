"""Two-Step Quantization (Wang et al., CVPR 2018): codes first, then ternary weights.

Input quantizers fitted layer by layer; step 1 trains with quantized inputs and
full-precision weights (``method.code_epochs`` epochs); step 2 makes every coded layer
ternary ({-alpha, 0, +alpha} per output row) by iterative least squares against its
response to the codes; then ``train.epochs`` of straight-through finetuning
(:class:`~gppq_dist.methods.tsq_scheme.TSQScheme`). The artifact stores each layer's
ternary codes at 2 bits, its alphas in fp16 and its input quantizer (codec ``ternary``);
the rebuilt model quantizes the inputs as trained.

The layers are those the ``quantization`` rules pick; a rule has no settings (``{}``)::

    quantization:
      types: {conv3x3: {}, conv1x1: {}, linear: {}}
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


class TSQMethod(Strict):
    """Two-Step Quantization: step 1 trains the network with sparse-quantized inputs to the
    coded layers (``code_epochs`` epochs, full-precision weights), step 2 makes every coded
    layer ternary ({-alpha, 0, +alpha} per output row) by iterative least squares against
    its response to the codes, layer by layer in network order; then ``train.epochs`` of
    finetuning (straight-through). The inputs stay quantized at inference. Layers: those
    the ``quantization`` rules pick (``{}``); the ternary weights cost 2 bits."""

    name: Literal["tsq"] = Field(description="Two-Step Quantization (Wang et al. 2018): quantized inputs (step 1), "
                                 "then ternary weights (step 2), then `train.epochs` of straight-through finetuning; "
                                 "its layer setting is `{}`.")
    activation_bits: int = Field(2, ge=1, le=8, description="Every coded layer's input becomes 0 or one of "
                                 "2^bits - 1 levels.")
    activation_sparsity: float = Field(0.5, ge=0.0, lt=1.0,
                                       description="Quantile of a layer's calibration inputs (ReLU's zeros included) "
                                       "at and below which its inputs become 0.")
    code_epochs: int = Field(1, ge=0, description="Epochs of step 1 (quantized inputs, full-precision weights) before "
                             "step 2.")
    calibration_batches: int = Field(4, gt=0, description="Train batches per rank for fitting the input quantizers "
                                     "and for step 2.")
    ls_iterations: int = Field(3, gt=0, description="Alternations of alpha and the ternary codes in step 2.")
    ridge: float = Field(0.01, ge=0.0, description="Step 2's ridge, as a fraction of the mean input energy.")


class TSQLayer(Strict):
    """``{}``: the layer is coded (ternary weights, quantized input); no settings of its own."""


def make_scheme(cfg: RunConfig, model: nn.Module, plans: list[LayerPlan], context: DistContext, reducer,
                state: dict[str, Any] | None, manifest: Any) -> Scheme:
    from gppq_dist.methods.tsq_scheme import TSQScheme

    return TSQScheme(model, plans, cfg, context, reducer, state, manifest)


def legacy(method: dict[str, Any], quantization: dict[str, Any]) -> str | None:
    """``{d, k}`` rules that only chose the layers: the same rules as ``{}``."""
    named = rule_keys(quantization, ("d", "k"))
    if not named:
        return None
    return (f"{named[0]}: method tsq codes every layer its rules pick as ternary, so a rule takes no d or k "
            f"(write {{}}); write quantization: {one_line_yaml(rewritten_rules(quantization, lambda rule: {}))}")


SPEC = MethodSpec(name="tsq", config=TSQMethod, layer=TSQLayer, codec="ternary", scheme=make_scheme,
                  calibrates=True, swaps_weights=True, legacy=legacy)
