"""The ``gppq`` commands, run as a user runs them (real console script, real files)."""

import json
from pathlib import Path

import pytest
import torch
from torchvision import datasets
from typer.testing import CliRunner

from gppq_dist.artifact import read_artifact
from gppq_dist.cli import app
from tests.conftest import CONFIGS, ROOT, gppq_here, torchrun, write_config


@pytest.mark.parametrize(
    "arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
             "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"],
)
def test_size_json_for_every_resnet_family_member(arch):
    # the real command in this process (typer's runner): ten fresh interpreters importing
    # torchvision would cost 40 s; test_size_table_lists_layers_and_total runs the script
    result = CliRunner().invoke(app, ["size", "--config", str(CONFIGS / "resnet50_small_blocks.yaml"), "--arch",
                                      arch, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["arch"] == arch
    assert {"size_mb", "ratio", "layers"} <= set(report)
    assert report["ratio"] > 10 and report["size_mb"] * report["ratio"] == pytest.approx(report["fp32_mb"])
    assert all(layer["k"] <= 1024 and layer["d"] in (4, 9) for layer in report["layers"])


def test_size_table_lists_layers_and_total():
    result = gppq_here("size", "--config", CONFIGS / "resnet18_small_blocks.yaml", check=True)
    assert "layer4.1.conv2" in result.stdout and "1.541 MB" in result.stdout and "28.9x" in result.stdout


def test_data_digits_writes_an_imagenet_layout(digits_dir):
    train = datasets.ImageFolder(str(digits_dir / "train"))
    val = datasets.ImageFolder(str(digits_dir / "val"))
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797 and len(val) == 359
    image, label = val[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    names = {Path(p).name for p, _ in train.samples} & {Path(p).name for p, _ in val.samples}
    assert not names  # disjoint split
    before = (digits_dir / "val" / "0").stat().st_mtime_ns
    result = gppq_here("data", "digits", "--out", digits_dir, check=True)  # same settings: kept as is
    assert "1438 train and 359 val" in result.stdout
    assert (digits_dir / "val" / "0").stat().st_mtime_ns == before


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    config = write_config(directory)
    out = directory / "one.gppq"
    # One thread, as each torchrun rank has, so the 2-rank comparison differs only in sharding.
    result = gppq_here("compress", "--config", config, "--weights", "random", "--out", out, "--json",
                  env={"OMP_NUM_THREADS": "1"}, check=True)
    return {"config": config, "out": out, "summary": json.loads(result.stdout), "dir": directory}


def test_compress_and_inspect_agree(tiny_artifact):
    summary = tiny_artifact["summary"]
    report = json.loads(gppq_here("inspect", tiny_artifact["out"], "--json", check=True).stdout)
    assert {"accounted_mb", "file_bytes", "layers"} <= set(report)
    assert report["file_bytes"] == summary["file_bytes"] == tiny_artifact["out"].stat().st_size
    assert report["accounted_mb"] == pytest.approx(summary["accounted_mb"])
    assert report["file_bytes"] <= report["accounted_bytes"] * 1.01 + 64 * 1024
    assert len(report["layers"]) == 20


def test_eval_reports_top1_and_top5(tiny_artifact, digits_dir):
    result = gppq_here("eval", tiny_artifact["out"], "--data", digits_dir, "--workers", "0", "--json", check=True)
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 359
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100


@pytest.mark.distributed
def test_two_rank_compress_equals_one_rank(tiny_artifact):
    out = tiny_artifact["dir"] / "two.gppq"
    import subprocess

    command = [torchrun(), "--standalone", "--nproc_per_node=2", "-m", "gppq_dist.compress",
               "--config", str(tiny_artifact["config"]), "--weights", "random", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    one, two = read_artifact(tiny_artifact["out"]), read_artifact(out)
    assert [p.name for p in one.layers] == [p.name for p in two.layers]
    for plan in one.layers:
        assert torch.equal(one.assignments[plan.name], two.assignments[plan.name])
        torch.testing.assert_close(one.codebooks[plan.name].float(), two.codebooks[plan.name].float(),
                                   rtol=2e-3, atol=1e-5)
    for name in one.params:
        assert torch.equal(one.params[name], two.params[name])
