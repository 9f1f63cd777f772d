"""Two-stage PQ ("And the Bit Goes Down"): layer by layer in network order, cluster the
subvectors weighted by the layer's input activations (stage 1,
:mod:`gppq_dist.methods.two_stage`), then finetune only the codewords (stage 2, the
trainer with mu = 0: gradients averaged per codeword, the weights stay exactly quantized).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict, starting_codes

if TYPE_CHECKING:
    from torch import nn

    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext
    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.train.schemes import Scheme


class TwoStagePQMethod(Strict):
    """"And the Bit Goes Down": layer by layer in network order, cluster the subvectors
    (weighted by the layer's input activations, to minimise the output reconstruction
    error, when ``activation_weighted``), then finetune only the codewords (``train.*``,
    gradients averaged per codeword; the weights stay exactly quantized)."""

    name: Literal["two_stage_pq"] = Field(description="\"And the Bit Goes Down\": layer by layer in network order, "
                                          "k-means, then the codewords alone finetuned (`train.*`, mu = 0).")
    activation_weighted: bool = Field(True, description="Weight each layer's k-means by its input activations, so "
                                      "that the layer's output is reconstructed; `false`: stage 1 is direct PQ.")
    calibration_batches: int = Field(4, gt=0, description="Train batches per rank whose activations weight the "
                                     "k-means.")


def make_scheme(cfg: RunConfig, model: nn.Module, plans: list[LayerPlan], context: DistContext, reducer,
                state: dict[str, Any] | None, manifest: Any) -> Scheme:
    """psi from the checkpoint; else psi and the codewords of the artifact ``model.weights``
    names (stage 1 done: its decoded weights are the model); else stage 1 (which snaps the
    weights to their codewords)."""
    from gppq_dist.models import create_model
    from gppq_dist.train.schemes import GPScheme

    def stage_1():
        from gppq_dist.methods.two_stage import layerwise_pq

        return layerwise_pq(model, plans, cfg, context, reducer, manifest)

    psi, codebooks = starting_codes(cfg, plans, state, stage_1)
    # the codewords of snapped weights: no pull (mu = 0), and the weights stay exactly quantized
    return GPScheme(model, plans, psi, 0.0, codebooks, two_stage=True, build=lambda: create_model(cfg.model.spec))


SPEC = MethodSpec(name="two_stage_pq", config=TwoStagePQMethod, layer=LayerQuant, codec="pq", scheme=make_scheme,
                  calibrates=True)
