import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gppq_dist.artifact import artifact_info, read_artifact, rebuild_model, snap_model_, write_artifact
from gppq_dist.compress import cluster
from gppq_dist.config import load_config
from gppq_dist.distributed import DistContext
from gppq_dist.errors import ArtifactError
from gppq_dist.models import load_model
from tests.conftest import write_config

LOCAL = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("artifact")
    cfg = load_config(write_config(directory))
    model = load_model(cfg)
    # non-trivial BN statistics, so folding is really exercised
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    result = cluster(model, cfg, LOCAL)
    from gppq_dist.artifact import build_artifact

    artifact = build_artifact(model, result.plans, result.codebooks, result.assignments,
                              artifact_info(cfg, result.gamma))
    path = directory / "model.gppq"
    file_bytes = write_artifact(artifact, path)
    return {"cfg": cfg, "model": model, "result": result, "artifact": artifact, "path": path,
            "file_bytes": file_bytes}


def test_decoded_weights_equal_snapped_weights_exactly(compressed):
    loaded = read_artifact(compressed["path"])
    result = compressed["result"]
    snapped = snap_model_(load_model(compressed["cfg"]), result.plans, result.codebooks, result.assignments)
    modules = dict(snapped.named_modules())
    for plan in result.plans:
        assert torch.equal(loaded.decoded_weight(plan.name), modules[plan.name].weight)
        assert torch.equal(loaded.assignments[plan.name], result.assignments[plan.name])


def test_rebuilt_module_computes_the_snapped_model(compressed):
    result = compressed["result"]
    snapped = snap_model_(compressed["model"], result.plans, result.codebooks, result.assignments).eval()
    rebuilt = rebuild_model(read_artifact(compressed["path"]))
    assert type(rebuilt).__name__ == "ResNet"
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), snapped(images), rtol=1e-4, atol=1e-4)


def test_file_is_as_small_as_accounted(compressed):
    accounted = compressed["artifact"].accounted_bytes
    assert compressed["file_bytes"] <= accounted * 1.01 + 64 * 1024
    assert compressed["file_bytes"] >= accounted  # nothing is missing either


def test_truncated_file_is_refused(compressed, tmp_path):
    data = compressed["path"].read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 12, 3):
        broken = tmp_path / f"cut{cut}.gppq"
        broken.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="not a readable .gppq artifact|corrupt"):
            read_artifact(broken)


def test_bit_flips_anywhere_are_refused(compressed, tmp_path):
    data = bytearray(compressed["path"].read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(0)
    positions = [8 + header_length + 5, len(data) - 3]  # tensor bytes
    positions += list(rng.integers(8 + header_length, len(data), 20))
    positions += list(rng.integers(9, 8 + header_length, 20))  # header / metadata bytes
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path = tmp_path / "flipped.gppq"
        path.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError):
            read_artifact(path)


def test_foreign_and_missing_files_are_refused(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ArtifactError, match="not a .gppq artifact"):
        read_artifact(other)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(tmp_path / "nothing.gppq")


def test_metadata_describes_the_layers(compressed):
    loaded = read_artifact(compressed["path"])
    assert loaded.arch == "resnet18" and loaded.num_classes == 10
    assert [p.name for p in loaded.layers] == [p.name for p in compressed["result"].plans]
    assert loaded.info["config"]["name"] == "tiny"
    assert set(loaded.bn_scale) == {n for n, m in compressed["model"].named_modules()
                                    if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(loaded.params) == {"conv1.weight", "fc.bias"}
    json.dumps(loaded.info)  # plain JSON, no pickled objects
