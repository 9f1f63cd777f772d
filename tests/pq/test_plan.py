import logging
import math

import pytest
from torch import nn

from gppq_dist.config import QuantizationConfig
from gppq_dist.errors import ConfigError
from gppq_dist.models import ModelSpec, build_model, create_model
from gppq_dist.pq.accounting import account
from gppq_dist.pq.codecs import clamp_k
from gppq_dist.pq.plan import plan_layers


@pytest.mark.parametrize(
    "k, n, expected",
    [(256, 2048, 256), (256, 2049, 256), (256, 1024, 128), (256, 1025, 256), (256, 100_000, 256),
     (2048, 1280, 256), (8, 9, 2), (8, 8, 1), (8, 3, 1)],
)
def test_clamp_to_largest_power_of_two_strictly_below_a_quarter(k, n, expected):
    assert clamp_k(k, n) == expected
    assert clamp_k(k, n) < n / 4 or clamp_k(k, n) == 1


def resnet18_rules(**extra):
    return QuantizationConfig.model_validate(
        {"types": {"conv3x3": {"d": 9, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                   "linear": {"d": 4, "k": 2048}}, **extra}
    )


def test_resnet18_plan_skips_stem_and_batchnorm():
    model = build_model("resnet18", 1000, device="meta")
    plans = plan_layers(model, resnet18_rules())
    names = [p.name for p in plans]
    assert "conv1" not in names and all("bn" not in n for n in names)
    assert len(plans) == 20  # 16 3x3 convs, 3 downsample 1x1 convs, fc
    by_name = {p.name: p for p in plans}
    assert (by_name["layer1.0.conv1"].d, by_name["layer1.0.conv1"].k) == (9, 256)
    assert (by_name["layer2.0.downsample.0"].d, by_name["layer2.0.downsample.0"].k) == (4, 256)
    assert by_name["fc"].k == 2048 and by_name["fc"].index_bits == 11


def test_resnet50_small_pointwise_layer_is_clamped():
    model = build_model("resnet50", 1000, device="meta")
    plans = {p.name: p for p in plan_layers(model, resnet18_rules())}
    # 64x64x1x1 with d=4: 1024 subvectors, so K < 256 -> 128
    assert plans["layer1.0.conv1"].k == 128 and plans["layer1.0.conv1"].k_requested == 256


def test_name_rules_come_first_and_null_leaves_a_layer_alone():
    model = build_model("resnet18", 1000, device="meta")
    rules = resnet18_rules(names={r"layer4\.1\.conv2": {"d": 18, "k": 256}, "fc": None})
    plans = {p.name: p for p in plan_layers(model, rules)}
    assert "fc" not in plans
    assert plans["layer4.1.conv2"].d == 18 and plans["layer4.1.conv2"].rule.startswith("quantization.names")


def test_stem_can_be_quantized_when_asked():
    model = build_model("resnet18", 10, device="meta")
    rules = QuantizationConfig.model_validate(
        {"skip_first_conv": False, "types": {"conv7x7": {"d": 49, "k": 64}}}
    )
    plans = {p.name: p for p in plan_layers(model, rules)}
    assert plans["conv1"].d == 49


def test_d_that_does_not_divide_names_the_key_and_layer():
    model = build_model("resnet18", 1000, device="meta")
    rules = QuantizationConfig.model_validate({"types": {"conv3x3": {"d": 7, "k": 256}}})
    with pytest.raises(ConfigError, match=r"quantization.types.conv3x3.d = 7 does not divide .* 'layer1.0.conv1'"):
        plan_layers(model, rules)


def test_grouped_conv_uses_stored_weight_shape():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, groups=4))
    rules = QuantizationConfig.model_validate({"types": {"conv3x3": {"d": 9, "k": 256}}})
    (plan,) = plan_layers(model, rules)
    assert plan.shape == (16, 2, 3, 3) and plan.n_subvectors == 32 and plan.k == 4


def small_mobilenet():
    """MobileNetV2 at width 0.25 (10 classes) on meta, built through its factory: 3x3
    depthwise convs of 8 and 48..480 channels, rows of 9 weights."""
    spec = ModelSpec(num_classes=10, factory="torchvision.models:mobilenet_v2",
                     kwargs={"num_classes": 10, "width_mult": 0.25})
    return create_model(spec, device="meta")


def mobilenet_rules(conv3x3_d: int, **extra):
    return QuantizationConfig.model_validate(
        {"types": {"conv3x3": {"d": conv3x3_d, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                   "linear": {"d": 4, "k": 256}}, **extra}
    )


def test_depthwise_convs_are_cut_by_their_rows_of_nine_and_clamped():
    model = small_mobilenet()
    plans = {p.name: p for p in plan_layers(model, mobilenet_rules(9))}
    depthwise = {n: p for n, p in plans.items() if p.kind == "conv3x3"}
    assert len(depthwise) == 17 and "features.0.0" not in plans  # the stem stays fp32
    first, wider = depthwise["features.1.conv.0.0"], depthwise["features.2.conv.1.0"]
    assert (first.shape, first.n_subvectors, first.k) == ((8, 1, 3, 3), 8, 1)  # 8 filters: one codeword
    assert (wider.shape, wider.n_subvectors, wider.k) == ((48, 1, 3, 3), 48, 8)
    for plan in plans.values():
        assert plan.k == 1 or plan.k < plan.n_subvectors / 4, plan


def test_indivisible_rows_are_an_error_by_default():
    model = small_mobilenet()
    with pytest.raises(ConfigError) as info:
        plan_layers(model, mobilenet_rules(4))
    assert str(info.value).startswith(
        "quantization.types.conv3x3.d = 4 does not divide the row length 9 of layer 'features.1.conv.0.0' "
        "(weight 8x1x3x3); expected a divisor such as 1, 3, 9, or leave the layer alone with "
        "quantization.names: {'features\\.1\\.conv\\.0\\.0': null} (every such layer: "
        "quantization.on_indivisible: skip)"
    )
    with pytest.raises(ConfigError, match="does not divide"):
        plan_layers(model, mobilenet_rules(4, on_indivisible="error"))


def test_skip_leaves_indivisible_layers_unquantized_and_says_which(caplog):
    model = small_mobilenet()
    caplog.set_level(logging.INFO, logger="gppq_dist.pq.plan")
    plans = plan_layers(model, mobilenet_rules(4, on_indivisible="skip"))
    names = {p.name for p in plans}
    assert not any(p.kind == "conv3x3" for p in plans)
    assert "features.1.conv.1" in names and "classifier.1" in names  # the 1x1 convs and fc still are
    assert len(plans) == len(plan_layers(model, mobilenet_rules(9))) - 17
    (line,) = [r.getMessage() for r in caplog.records if "on_indivisible" in r.getMessage()]
    assert line.startswith("quantization.on_indivisible: skip: 17 layer(s) left unquantized")
    assert "features.1.conv.0.0 (rows of 9, quantization.types.conv3x3.d = 4)" in line
    assert "features.17.conv.1.0" in line and "features.1.conv.1 " not in line
    # the skipped weights are counted as fp32
    report = account(model, plans)
    coded = sum(math.prod(p.shape) for p in plans)
    assert report.unquantized_params == sum(p.numel() for p in model.parameters()) - coded


def test_skip_changes_nothing_where_every_d_divides():
    model = build_model("resnet18", 10, device="meta")
    assert plan_layers(model, resnet18_rules(on_indivisible="skip")) == plan_layers(model, resnet18_rules())
