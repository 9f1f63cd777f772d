"""``gppq import kill-the-bits``: their compressed ResNet in, our artifact out, the same model.

Their format (facebookresearch/kill-the-bits, ``src/inference.py``, ``src/utils/utils.py``) is
built here by the test from its formulas: no third-party file is in the repository. The
reference decoder below is theirs, transcribed: ``cat(centroids[assignments].t().chunk(n_blocks,
dim=1), dim=0)``, transposed to ``Cout x Cin x k x k``, and their inference model's BatchNorms
keep mean 0, variance 1 and eps 1e-5 under the stored weight and bias.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from torch import nn

from gppq_dist.artifact import read_artifact, rebuild_model
from tests.conftest import gppq_here, write_config
from tests.train.test_trainer import assert_same_model, summary_of

K = 256  # the tests' config plans K = 256 for every layer of a 10-class ResNet-18


def their_file(path, seed=0):
    """A 10-class ResNet-18 compressed in their format (random codes; fc's assignments int16,
    the dtype their fc's K = 2048 needs, the convs' uint8)."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for name, module in torchvision.models.resnet18(num_classes=10).named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name != "conv1":
            is_conv = isinstance(module, nn.Conv2d)
            kernel = module.kernel_size[0] if is_conv else 1
            block = 9 if kernel == 3 else 4
            n_blocks = module.weight[0].numel() // block
            codes = torch.randint(0, K, (n_blocks * module.weight.shape[0],), generator=g)
            data[name] = {"centroids": (0.05 * torch.randn(K, block, generator=g)).half(),
                          "assignments": codes.to(torch.uint8 if is_conv else torch.int16),
                          "n_blocks": n_blocks, "is_conv": is_conv, "k": kernel}
        elif isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            data[name] = {"weight": (1 + 0.2 * torch.randn(size, generator=g)).half(),
                          "bias": (0.1 * torch.randn(size, generator=g)).half()}
    data["conv1"] = {"weight": (0.05 * torch.randn(64, 3, 7, 7, generator=g)).half()}
    data["fc_bias"] = {"bias": 0.01 * torch.randn(10, generator=g)}
    torch.save(data, path)
    return data


def their_model(data):
    """The model their inference code builds from ``data``."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    for name, module in model.named_modules():
        entry = data.get(name)
        if entry is None:
            continue
        if "centroids" in entry:
            centroids, codes = entry["centroids"].float(), entry["assignments"].long()
            matrix = torch.cat(centroids[codes].t().chunk(entry["n_blocks"], dim=1), dim=0)
            module.weight.data = (matrix.t().reshape(matrix.shape[1], -1, entry["k"], entry["k"])
                                  if entry["is_conv"] else matrix.t())
        else:
            for key, value in entry.items():
                getattr(module, key).data = value.float()
    model.fc.bias.data = data["fc_bias"]["bias"].float()
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ktb")
    data = their_file(folder / "theirs.pth")
    result = gppq_here("import", "kill-the-bits", folder / "theirs.pth", "--arch", "resnet18",
                       "--out", folder / "ours.gppq", check=True)
    return folder, data, result


def test_the_imported_model_is_the_model_their_code_decodes(imported):
    folder, data, result = imported
    source_bytes = (folder / "theirs.pth").stat().st_size
    assert f"{source_bytes:,} B" in result.stdout and "accounted" in result.stdout
    artifact = read_artifact(folder / "ours.gppq")
    assert artifact.arch == "resnet18" and artifact.num_classes == 10 and len(artifact.layers) == 20
    for plan in artifact.layers:  # their codebooks, unchanged
        assert torch.equal(artifact.codebooks[plan.name], data[plan.name]["centroids"]), plan.name
        assert plan.k == K and plan.index_bits == 8
    ours, theirs = rebuild_model(artifact), their_model(data)
    for name, weight in theirs.named_parameters():
        if name.endswith("weight") and name.removesuffix(".weight") in data and "centroids" in data[
                name.removesuffix(".weight")] or name == "conv1.weight":
            assert torch.equal(ours.get_parameter(name), weight), name
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(images), ours(images)
    assert (expected - got).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(expected.argmax(1), got.argmax(1))


def test_a_file_not_in_their_format_is_one_error_line(tmp_path):
    data = their_file(tmp_path / "good.pth")
    cases = {
        "noise.pth": lambda p: p.write_bytes(b"\x80\x02 not a torch file" * 10),
        "pickled_object.pth": lambda p: torch.save({"layer": argparse.Namespace(a=1)}, p),
        "plain_state_dict.pth": lambda p: torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), p),
        "wrong_blocks.pth": lambda p: torch.save({**data, "layer2.0.conv1": {**data["layer2.0.conv1"], "n_blocks": 32}}, p),
        "no_fc.pth": lambda p: torch.save({k: v for k, v in data.items() if k != "fc"}, p),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        result = gppq_here("import", "kill-the-bits", tmp_path / name, "--arch", "resnet18",
                           "--out", tmp_path / f"{name}.gppq")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, result.stderr)
        assert name in lines[0] and "Traceback" not in result.stderr
        assert not (tmp_path / f"{name}.gppq").exists()
    assert "layer2.0.conv1" in gppq_here("import", "kill-the-bits", tmp_path / "wrong_blocks.pth", "--arch",
                                         "resnet18", "--out", tmp_path / "x.gppq").stderr
    assert "fc" in gppq_here("import", "kill-the-bits", tmp_path / "no_fc.pth", "--arch", "resnet18",
                             "--out", tmp_path / "x.gppq").stderr


def test_gppq_continues_from_the_imported_codes(imported, digits_dir, tmp_path):
    """G&P PQ from the artifact: no k-means, the start is the imported model itself (Gamma 0,
    the same top-1 as the model it was loaded as), psi kept, the codewords trained; two-stage
    PQ from it trains the same model; other rules are refused."""
    folder, _, _ = imported
    start = read_artifact(folder / "ours.gppq")
    path = write_config(tmp_path, name="continued", model={"weights": str(folder / "ours.gppq")},
                        data={"root": str(digits_dir)},
                        train={"epochs": 1, "max_steps": 3, "batch_size": 32, "lr": 0.01, "mu": 0.5})
    result = gppq_here("train", "--config", path, check=True)
    assert "Gamma 0.000e+00" in result.stderr
    summary = summary_of(tmp_path, "continued")
    assert summary["start_top1"] == summary["baseline_top1"]
    trained = read_artifact(summary["artifact"])
    assert all(torch.equal(trained.assignments[p.name], start.assignments[p.name]) for p in start.layers)
    assert any(not torch.equal(trained.codebooks[p.name], start.codebooks[p.name]) for p in start.layers)
    # from snapped weights G&P's residual is 0 and stays 0: two-stage PQ's finetune, the same steps
    two_stage = write_config(tmp_path, name="two_stage", model={"weights": str(folder / "ours.gppq")},
                             data={"root": str(digits_dir)}, method={"name": "two_stage_pq"},
                             train={"epochs": 1, "max_steps": 3, "batch_size": 32, "lr": 0.01})
    gppq_here("train", "--config", two_stage, check=True)
    assert_same_model(summary["artifact"], summary_of(tmp_path, "two_stage")["artifact"])

    mismatched = write_config(tmp_path, name="other_rules", model={"weights": str(folder / "ours.gppq")},
                              data={"root": str(digits_dir)}, train={"epochs": 1, "max_steps": 1, "batch_size": 32},
                              quantization={"types": {"conv3x3": {"d": 3, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                                                      "linear": {"d": 4, "k": 2048}}})
    refused = gppq_here("train", "--config", mismatched)
    assert refused.returncode == 2 and "layer1.0.conv1" in refused.stderr and "d=9" in refused.stderr
