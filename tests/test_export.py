"""`gppq export --format onnx`: the graph holds the artifact's codebooks and packed indices,
decodes every codec's weights exactly as rebuild_model holds them, and ONNX Runtime computes
the PyTorch model's logits; the file is about the accounted size, the dense one far larger."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from safetensors import safe_open

from gppq_dist.artifact import artifact_info, build_artifact, read_artifact, rebuild_model, write_artifact
from gppq_dist.compress import plan_for
from gppq_dist.config import load_config
from gppq_dist.export.onnx import export_onnx
from gppq_dist.export.onnx_decode import DOMAIN, Body, Decoders, unpack
from gppq_dist.models import create_model
from gppq_dist.pq.clipq import best_gap_bits, gap_codes
from gppq_dist.pq.codec import pack_indices, unpack_indices
from tests.conftest import CLIPQ_RULES, ROOT, TSQ_RULES, gppq_here, write_config


def benchmark_script():
    """benchmarks/export.py, whose random codes in each codec's layout the tests share."""
    spec = importlib.util.spec_from_file_location("export_benchmark", ROOT / "benchmarks" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules(conv3x3: tuple[int, int], conv1x1: tuple[int, int], linear: tuple[int, int]) -> dict:
    return {"types": {kind: {"d": d, "k": k} for kind, (d, k) in
                      (("conv3x3", conv3x3), ("conv1x1", conv1x1), ("linear", linear))}}


# case -> config sections: index widths of 1 to 5 and 8 to 11 bits (byte boundaries crossed or met)
CASES = {
    "pq": {"method": "direct_pq", "quantization": rules((9, 2048), (4, 256), (2, 8))},
    "scalar": {"method": "kmeans_scalar", "quantization": rules((1, 2), (1, 4), (1, 2))},
    "pq_subspace": {"method": "pq_subspace", "quantization": rules((18, 16), (4, 8), (4, 16))},
    "residual": {"method": {"name": "residual_pq", "stages": 3}, "quantization": rules((9, 16), (4, 32), (4, 8))},
    # a sparse layer4 (long gaps: escape codes) beside denser layers (short codes, a bitmap)
    "clipq": {"method": "clipq", "quantization": {**CLIPQ_RULES, "names": {
        "layer4\\..*": {"prune": 0.95, "bits": 1}, "layer1\\..*": {"prune": 0.3, "bits": 3}}}},
    "ternary": {"method": "tsq", "quantization": TSQ_RULES},
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A 10-class ResNet-18 (32x32) per case, random codes, its BatchNorms calibrated on random
    images (so that the logits are of the usual size: a tolerance of 1e-4 means something);
    as read back from its file."""
    random_codes = benchmark_script().random_codes
    made = {}
    for case, sections in CASES.items():
        directory = tmp_path_factory.mktemp(case)
        cfg = load_config(write_config(directory, name=case, **sections))
        torch.manual_seed(0)
        model = create_model(cfg.model.spec)
        plans = plan_for(model, cfg)
        codes = random_codes(plans)
        coded = rebuild_model(build_artifact(model, plans, *codes[:2], artifact_info(cfg, 0.0), codes[2]))
        for module in coded.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.eps, module.momentum = 1e-5, None
        with torch.no_grad():
            coded.train()(torch.randn(32, 3, 32, 32))
        artifact = build_artifact(coded.eval(), plans, *codes[:2], artifact_info(cfg, 0.0), codes[2])
        write_artifact(artifact, directory / "model.gppq")
        made[case] = read_artifact(directory / "model.gppq")
    return made


def with_weights_as_outputs(proto: onnx.ModelProto, names: list[str]) -> bytes:
    """The model with the given values added to its outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names)
    return copy.SerializeToString()


def test_the_graph_unpacks_indices_of_every_width_as_the_artifact_does():
    """0 to 30 bits (uint32 words up to 25, uint64 past), counts around a group of 8; one
    function per width, whatever the count."""
    decoders = Decoders(opset=18)
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for bits in range(31):
        for count in (1, 8, 13, 1001):
            indices = torch.randint(1 << bits, (count,), generator=generator)
            packed = pack_indices(indices, bits)
            body = Body()
            result = unpack(body, body.input("packed", torch.from_numpy(packed)), bits, count)
            decoders.call(body, result, f"unpack_{bits}bit", [f"packed_{bits}_{count}"], f"indices_{bits}_{count}")
            expected[f"indices_{bits}_{count}"] = unpack_indices(packed, bits, count).numpy()
    assert len(decoders.functions) == 31
    outputs = [onnx.helper.make_tensor_value_info(name, TensorProto.INT64, [len(want)]) for name, want in expected.items()]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(decoders.nodes, "unpack", [], outputs, decoders.initializers), functions=decoders.functions,
        opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(list(expected), {}), expected.values()):
        assert got.dtype == np.int64 and np.array_equal(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_runtime_decodes_the_weights_exactly_and_computes_the_logits(artifacts, case, tmp_path):
    artifact = artifacts[case]
    opset = 20 if case == "clipq" else 18  # the highest opset too, on one case
    written = export_onnx(artifact, tmp_path / "model.onnx", opset=opset)
    assert written.decoded_layers == len(artifact.layers) == 20 and not written.dense
    proto = onnx.load(str(written.path))  # export_onnx ran onnx.checker.check_model(full_check=True) on it
    assert [entry.version for entry in proto.opset_import if entry.domain == ""] == [opset]

    # the initializers: the artifact's own tensors, byte for byte, and no coded weight
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    with safe_open(str(artifact.path), framework="np") as stored:
        for plan in artifact.layers:
            for kind in ("indices", "codebook", "pattern"):
                name = f"{kind}/{plan.name}"
                if name in stored.keys():
                    assert np.array_equal(onnx.numpy_helper.to_array(initializers[name]), stored.get_tensor(name))
            assert initializers[f"codebook/{plan.name}"].data_type == TensorProto.FLOAT16
            assert initializers[f"indices/{plan.name}"].data_type == TensorProto.UINT8
            assert f"{plan.name}.weight" not in initializers
    assert not any(t.data_type == TensorProto.FLOAT and math.prod(t.dims) >= 64 * 64 * 9 for t in initializers.values())
    if case == "clipq":  # the sparse layers' patterns have escape codes
        mask = artifact.extras["layer4.1.conv2"].numpy()
        bits, _ = best_gap_bits(mask)
        assert (gap_codes(mask, bits) == (1 << bits) - 1).any()

    weights = [f"{plan.name}.weight" for plan in artifact.layers]
    session = ort.InferenceSession(with_weights_as_outputs(proto, weights), providers=["CPUExecutionProvider"])
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, *decoded = session.run(None, {"images": images.numpy()})
    model = rebuild_model(artifact)
    modules = dict(model.named_modules())
    for plan, weight in zip(artifact.layers, decoded):
        assert np.array_equal(weight, modules[plan.name].weight.detach().numpy()), plan.name
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(logits - expected).max() <= 1e-4
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    if case == "ternary":  # the input quantizers are in the graph: without them the logits differ
        for module in model.modules():
            module._forward_pre_hooks.clear()
        with torch.no_grad():
            assert np.abs(logits - model(images).numpy()).max() > 1e-2


def test_a_weight_the_exporter_changed_is_an_error_not_a_dense_file(artifacts, tmp_path, monkeypatch):
    from gppq_dist.errors import ExportError
    from gppq_dist.export import onnx as onnx_export

    traced = onnx_export.trace

    def folding(*args, **kwargs):  # as an exporter that folded BatchNorm into one conv would
        proto = traced(*args, **kwargs)
        weight = next(t for t in proto.graph.initializer if t.name == "layer2.0.conv1.weight")
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 0.5, weight.name))
        return proto

    monkeypatch.setattr(onnx_export, "trace", folding)
    with pytest.raises(ExportError, match="layer 'layer2.0.conv1'"):
        export_onnx(artifacts["pq"], tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_the_small_block_resnet18_file_is_about_its_accounted_size_and_the_dense_one_over_25x(tmp_path):
    artifact, _ = benchmark_script().build("resnet18_small_blocks", "direct_pq", codes="random", iterations=1)
    write_artifact(artifact, tmp_path / "r18.gppq")
    accounted = artifact.accounted_bytes
    result = gppq_here("export", tmp_path / "r18.gppq", "--format", "onnx", "--out", tmp_path / "r18.onnx", check=True)
    assert "20 coded weights decoded in the graph" in result.stdout
    compressed = (tmp_path / "r18.onnx").stat().st_size
    assert accounted <= compressed <= 1.05 * accounted
    gppq_here("export", tmp_path / "r18.gppq", "--out", tmp_path / "dense.onnx", "--dense", check=True)
    dense = onnx.load(str(tmp_path / "dense.onnx"))
    assert (tmp_path / "dense.onnx").stat().st_size > 25 * compressed
    assert "layer4.1.conv2.weight" in {tensor.name for tensor in dense.graph.initializer}


def test_mistakes_are_one_error_line(artifacts, tmp_path, monkeypatch):
    artifact = tmp_path / "model.gppq"
    write_artifact(artifacts["pq"], artifact)
    (tmp_path / "noise.gppq").write_bytes(b"not an artifact" * 10)
    cases = {
        "not a readable .gppq artifact": ("export", tmp_path / "noise.gppq", "--out", tmp_path / "noise.onnx"),
        "--format: expected onnx": ("export", artifact, "--format", "tflite", "--out", tmp_path / "m.tflite"),
        "--opset: expected 18 to 20, got 17": ("export", artifact, "--opset", "17", "--out", tmp_path / "m.onnx"),
    }
    for message, args in cases.items():
        result = gppq_here(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert message in lines[0]
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails, as where it is not installed
    result = gppq_here("export", artifact, "--out", tmp_path / "m.onnx")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "'onnx' package" in lines[0] and "pip install '.[export]'" in lines[0]
    assert not list(tmp_path.glob("*.onnx"))
