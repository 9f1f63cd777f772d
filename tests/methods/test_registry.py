"""A method added from outside the package: its config and layer types, its codec and its
coding function registered at run time, then planned, sized and compressed into an artifact
that reads back and rebuilds; and taken away again."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.compress import compress, plan_for
from gppq_dist.config import load_config
from gppq_dist.distributed import DistContext
from gppq_dist.errors import ConfigError
from gppq_dist.methods.base import MethodSpec, Strict
from gppq_dist.methods.registry import METHODS, register, unregister
from gppq_dist.models import create_model, load_model
from gppq_dist.pq.accounting import account
from gppq_dist.pq.codecs import CODECS, register_codec, unregister_codec
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.pq.variants import Coded
from tests.conftest import write_config

LOCAL = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class UniformMethod(Strict):
    """Uniform scalar levels: every weight of a layer snapped to the nearest of 2^bits evenly
    spaced levels between its smallest and largest weight; no training."""

    name: Literal["uniform"]


class UniformLayer(Strict):
    bits: int = Field(ge=1, le=8)


class UniformLevels:
    """Codec ``uniform``: the 2^bits levels of a layer (codebook ``K x 1``), one index per
    weight; nothing beside them."""

    name = "uniform"
    extra = None

    def plan(self, layer: LayerPlan, rule: UniformLayer, stages: int) -> LayerPlan:
        return replace(layer, d=1, k=1 << rule.bits, k_requested=1 << rule.bits)

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        return (plan.k, 1)

    def n_indices(self, plan: LayerPlan) -> int:
        return plan.n_subvectors

    def decode(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        return codebook[indices, 0].view(plan.shape)


def nearest_level(weight: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return (weight.reshape(-1, 1) - levels).abs().argmin(1)


def code(weights: list[torch.Tensor], plans: list[LayerPlan], **kmeans: Any) -> list[Coded]:
    coded = []
    for weight, plan in zip(weights, plans):
        flat = weight.detach().reshape(-1)
        levels = torch.linspace(float(flat.min()), float(flat.max()), plan.k).half().float()  # as stored
        indices = nearest_level(flat, levels)
        coded.append(Coded(levels.unsqueeze(1), indices, float(((levels[indices] - flat) ** 2).mean())))
    return coded


SPEC = MethodSpec(name="uniform", config=UniformMethod, layer=UniformLayer, codec="uniform", code=code)
RULES = {"types": {"conv3x3": {"bits": 2}, "conv1x1": {"bits": 4}, "linear": {"bits": 3}},
         "names": {"layer4\\.1\\.conv2": {"bits": 1}, "fc": None}}


@pytest.fixture
def uniform():
    register_codec(UniformLevels())
    register(SPEC)
    yield SPEC
    unregister(SPEC.name)
    unregister_codec("uniform")


def test_a_registered_method_plans_sizes_and_ships_an_artifact_that_rebuilds(tmp_path, uniform):
    cfg = load_config(write_config(tmp_path, method="uniform", quantization=RULES))
    assert isinstance(cfg.method, UniformMethod) and cfg.quantization.types["conv1x1"].bits == 4
    meta = create_model(cfg.model.spec, device="meta")
    plans = plan_for(meta, cfg)
    by_name = {plan.name: plan for plan in plans}
    assert "fc" not in by_name and "conv1" not in by_name and len(plans) == 19
    assert by_name["layer4.1.conv2"].index_bits == 1 and by_name["layer1.0.conv1"].rule == "quantization.types.conv3x3"
    assert by_name["layer2.0.downsample.0"].k == 16 and {plan.codec for plan in plans} == {"uniform"}
    report = account(meta, plans)  # log2(K) bits per weight, K fp16 levels per layer
    assert report.quantized_bytes == sum(math.prod(p.shape) * p.index_bits / 8 + p.k * 2 for p in plans)

    summary = compress(cfg, tmp_path / "uniform.gppq", LOCAL)
    assert summary["accounted_mb"] * 2**20 == pytest.approx(report.total_bytes)
    assert report.total_bytes <= summary["file_bytes"] <= report.total_bytes * 1.01 + 64 * 1024
    artifact = read_artifact(tmp_path / "uniform.gppq")
    assert artifact.info["method"] == "uniform" and artifact.layers == plans
    original, rebuilt = dict(load_model(cfg).named_modules()), dict(rebuild_model(artifact).named_modules())
    for plan in plans:
        levels = artifact.codebooks[plan.name].float()[:, 0]
        weight = rebuilt[plan.name].weight.detach()
        expected = levels[nearest_level(original[plan.name].weight.detach(), levels)].view(plan.shape)
        assert torch.equal(weight, expected) and torch.unique(weight).numel() <= plan.k


def test_the_config_schema_follows_the_registry(tmp_path, uniform):
    path = write_config(tmp_path, method="uniform", quantization=RULES)
    with pytest.raises(ConfigError, match=r"unknown key 'quantization.types.linear.d'; expected one of: bits"):
        load_config(path, {"quantization.types.linear": {"d": 4, "k": 16}})
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; expected one of: .*, tsq, uniform"):
        load_config(path, {"method": "nope"})
    unregister(SPEC.name)  # as the fixture does at the end
    try:
        with pytest.raises(ConfigError, match=r"unknown method 'uniform'"):
            load_config(path)
    finally:
        register(SPEC)


def test_built_in_methods_and_codecs_stay_and_every_method_names_a_known_codec():
    with pytest.raises(ValueError, match="built in"):
        unregister("gppq")
    with pytest.raises(ValueError, match="built in"):
        unregister_codec("pq")
    with pytest.raises(ValueError, match="already registered"):
        register(METHODS["gppq"])
    with pytest.raises(ValueError, match="exactly one of scheme"):
        MethodSpec(name="neither", config=UniformMethod, layer=UniformLayer, codec="uniform")
    assert all(spec.codec in CODECS for spec in METHODS.values())
    assert {spec.name for spec in METHODS.values() if spec.swaps_weights} == {"clipq", "tsq"}
