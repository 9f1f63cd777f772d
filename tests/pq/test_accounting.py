from pathlib import Path

import pytest

from gppq_dist.config import load_config
from gppq_dist.models import build_model
from gppq_dist.pq.accounting import account
from gppq_dist.pq.plan import plan_layers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Published in the paper (Tables 2 and 3): model size in MB and the size ratio.
PAPER = {
    "resnet18_small_blocks": (1.54, 29, 44.6),
    "resnet18_large_blocks": (1.03, 43, 44.6),
    "resnet50_small_blocks": (5.09, 19, 97.5),
    "resnet50_large_blocks": (3.19, 31, 97.5),
}


@pytest.mark.parametrize("regime", sorted(PAPER))
def test_accounting_matches_the_paper(regime):
    size_mb, ratio, fp32_mb = PAPER[regime]
    cfg = load_config(CONFIGS / f"{regime}.yaml")
    model = build_model(cfg.model.arch, cfg.model.num_classes, device="meta")
    report = account(model, plan_layers(model, cfg.quantization))
    assert report.size_mb == pytest.approx(size_mb, rel=0.005)
    assert round(report.ratio) == ratio
    assert report.fp32_mb == pytest.approx(fp32_mb, abs=0.05)


def test_counts_follow_the_convention():
    cfg = load_config(CONFIGS / "resnet18_small_blocks.yaml")
    model = build_model("resnet18", 1000, device="meta")
    report = account(model, plan_layers(model, cfg.quantization))
    fc = next(layer for layer in report.layers if layer.plan.name == "fc")
    assert fc.index_bytes == 128_000 * 11 / 8  # log2(2048) bits per index
    assert fc.codebook_bytes == 2048 * 4 * 2  # fp16
    # stem conv + BN weight and bias + fc bias at fp32; running statistics not counted
    stem, bn, fc_bias = 64 * 3 * 7 * 7, 2 * 4800, 1000
    assert report.unquantized_params == stem + bn + fc_bias
    assert "bn1.running_mean" not in report.unquantized_names
