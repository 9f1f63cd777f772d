"""Models beyond torchvision: ``model.factory`` ("package.module:function") with
``model.kwargs``, from the config through ``gppq compress`` to the artifact's rebuild, and
the one-line errors of a factory that cannot be used."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torchvision

from gppq_dist import cli
from gppq_dist.artifact import Artifact, artifact_info, read_artifact, rebuild_model, snap_model_
from gppq_dist.config import load_config
from gppq_dist.errors import ArtifactError, ConfigError
from gppq_dist.models import ModelSpec, create_model, load_model
from tests.conftest import gppq, write_config

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MOBILENET = {"arch": None, "factory": "torchvision.models:mobilenet_v2",
             "kwargs": {"num_classes": 10, "width_mult": 0.25}, "num_classes": 10}
# 3x3 rules of d = 9 fit MobileNet's depthwise convs (rows of 9)
MOBILENET_RULES = {"types": {"conv3x3": {"d": 9, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                             "linear": {"d": 4, "k": 256}}}

# A user's own model: a depthwise conv, and a buffer computed at construction that is not in
# the state dict (persistent=False), which a rebuild must compute again.
TINYNETS = '''
import torch
from torch import nn

NOT_CALLABLE = 3


class Shift(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, channels).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return x + self.offset


def make(width=8, classes=3):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), Shift(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


def broken(**kwargs):
    raise ValueError("no such width")


def not_a_module():
    return {"conv": None}
'''


@pytest.fixture
def tinynets(tmp_path, monkeypatch) -> str:
    """A module of factories in ``tmp_path`` (a fresh name per test, so no cached import is
    reused), importable in this process for the test's duration; returns its name."""
    name = f"tinynets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TINYNETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def factory_config(directory: Path, model: dict, **sections) -> Path:
    return write_config(directory, name="factory", model=model, quantization=MOBILENET_RULES, **sections)


def test_factory_builds_the_model_its_kwargs_ask_for(tmp_path):
    cfg = load_config(factory_config(tmp_path, MOBILENET))
    assert (cfg.model.arch, cfg.model.factory) == (None, "torchvision.models:mobilenet_v2")
    model = load_model(cfg)  # seeded with cfg.seed = 0
    torch.manual_seed(0)
    direct = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
    assert type(model) is type(direct) and model.classifier[1].out_features == 10
    expected = direct.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in model.state_dict().items())
    meta = create_model(cfg.model.spec, device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_compress_of_a_factory_model_rebuilds_to_the_snapped_model(tmp_path):
    config = factory_config(tmp_path, MOBILENET)
    out = tmp_path / "mobilenet.gppq"
    # one thread: k-means of 52 small layers is ~1 s, where two OpenMP threads on a busy machine
    # spin for tens of seconds
    summary = json.loads(gppq("compress", "--config", config, "--out", out, "--json", env=ONE_THREAD,
                              check=True).stdout)
    assert summary["layers"] == 52  # 17 depthwise, 34 pointwise convs, the classifier
    artifact = read_artifact(out)
    assert artifact.arch == "torchvision.models:mobilenet_v2"
    assert artifact.info["factory"] == "torchvision.models:mobilenet_v2"
    assert artifact.info["factory_kwargs"] == {"num_classes": 10, "width_mult": 0.25}
    rebuilt = rebuild_model(artifact)
    assert type(rebuilt) is torchvision.models.MobileNetV2
    snapped = snap_model_(load_model(load_config(config)), artifact.layers, artifact.codebooks,
                          artifact.assignments).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), snapped(images), rtol=1e-4, atol=1e-4)


def test_factory_from_a_module_on_pythonpath_rebuilds_only_where_importable(tmp_path, tinynets):
    model = {"arch": None, "factory": f"{tinynets}:make", "kwargs": {"width": 16, "classes": 3}, "num_classes": 3}
    config = factory_config(tmp_path, model)
    out = tmp_path / "tiny.gppq"
    gppq("compress", "--config", config, "--out", out, "--json", env={"PYTHONPATH": str(tmp_path), **ONE_THREAD},
         check=True)
    artifact = read_artifact(out)
    assert [p.name for p in artifact.layers] == ["3", "7", "11"]  # depthwise, pointwise, fc
    rebuilt = rebuild_model(artifact)
    assert torch.equal(rebuilt[5].offset, torch.linspace(-1.0, 1.0, 16).view(1, -1, 1, 1))
    snapped = snap_model_(load_model(load_config(config)), artifact.layers, artifact.codebooks,
                          artifact.assignments).eval()
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), snapped(images), rtol=1e-4, atol=1e-4)
    # where the module is not importable, the rebuild names the artifact and what to do
    sys.modules.pop(tinynets)
    sys.path.remove(str(tmp_path))
    with pytest.raises(ArtifactError) as info:
        rebuild_model(read_artifact(out))
    assert str(info.value) == (
        f"artifact '{out}' was built by model.factory: '{tinynets}:make': cannot import module '{tinynets}' "
        f"(No module named '{tinynets}'); install the package that provides '{tinynets}', or put the folder "
        "holding it on PYTHONPATH"
    )


def test_arch_artifacts_record_no_factory_and_rebuild_from_the_arch(tmp_path):
    cfg = load_config(write_config(tmp_path))
    info = artifact_info(cfg, 0.0)
    assert info["arch"] == "resnet18" and "factory" not in info and "factory_kwargs" not in info
    spec = ModelSpec(num_classes=10, arch="resnet18")
    assert cfg.model.spec == spec and type(create_model(spec, device="meta")) is torchvision.models.ResNet
    # what every artifact written before factories holds
    old = Artifact(arch="resnet18", num_classes=10, layers=[], codebooks={}, assignments={}, params={},
                   bn_scale={}, bn_shift={}, info={"arch": "resnet18", "num_classes": 10})
    assert old.model_spec == spec


def build_error(tmp_path: Path, factory: str, kwargs: dict | None = None, num_classes: int = 3) -> str:
    cfg = load_config(factory_config(tmp_path, {"arch": None, "factory": factory, "kwargs": kwargs or {},
                                                "num_classes": num_classes}))
    with pytest.raises(ConfigError) as info:
        load_model(cfg)
    return str(info.value)


def test_a_factory_that_cannot_be_used_is_one_error_naming_it(tmp_path, tinynets):
    module_file = tmp_path / f"{tinynets}.py"
    assert build_error(tmp_path, "nosuch_gppq_pkg.nets:make") == (
        "model.factory: 'nosuch_gppq_pkg.nets:make': cannot import module 'nosuch_gppq_pkg.nets' (No module named "
        "'nosuch_gppq_pkg'); install the package that provides 'nosuch_gppq_pkg', or put the folder holding it on "
        "PYTHONPATH"
    )
    assert build_error(tmp_path, f"{tinynets}:nothere") == (
        f"model.factory: '{tinynets}:nothere': '{tinynets}' ({module_file}) has no attribute 'nothere'; "
        "expected package.module:function naming a function of the module"
    )
    assert build_error(tmp_path, f"{tinynets}:NOT_CALLABLE") == (
        f"model.factory: '{tinynets}:NOT_CALLABLE' is a int, not callable; expected a function (or class) "
        "that returns an nn.Module"
    )
    assert build_error(tmp_path, f"{tinynets}:broken", {"width": 3}) == (
        f"model.factory: '{tinynets}:broken' raised ValueError: no such width when called with kwargs "
        "{'width': 3}; expected kwargs that it accepts"
    )
    assert build_error(tmp_path, f"{tinynets}:make", {"depth": 3}).startswith(
        f"model.factory: '{tinynets}:make' raised TypeError: make() got an unexpected keyword argument 'depth'"
    )
    assert build_error(tmp_path, f"{tinynets}:not_a_module") == (
        f"model.factory: '{tinynets}:not_a_module' returned a dict, not a torch.nn.Module; expected a function "
        "that builds the model"
    )
    assert build_error(tmp_path, f"{tinynets}:make", {"classes": 5}, num_classes=3) == (
        f"model.factory: '{tinynets}:make' with kwargs {{'classes': 5}} builds a model whose last Linear '11' "
        "has 5 outputs, but model.num_classes is 3; expected kwargs that give 3 outputs (a factory is not "
        "passed num_classes)"
    )


@pytest.mark.parametrize(
    "model, message",
    [
        ({"factory": "torchvision.models:mobilenet_v2"},
         "model: set exactly one of model.arch (a torchvision model name, e.g. resnet18) and model.factory "
         "('package.module:function', e.g. timm:create_model); both are set"),
        ({"arch": None},
         "model: set exactly one of model.arch (a torchvision model name, e.g. resnet18) and model.factory "
         "('package.module:function', e.g. timm:create_model); neither is set"),
        ({"arch": None, "factory": "timm.create_model"},
         "model.factory: expected 'package.module:function', e.g. timm:create_model or "
         "torchvision.models:mobilenet_v2 (got 'timm.create_model')"),
        ({"kwargs": {"width_mult": 0.5}},
         "model: model.kwargs are the keyword arguments of model.factory; with model.arch expected no model.kwargs"),
        ({"arch": None, "factory": "torchvision.models:mobilenet_v2", "weights": "IMAGENET1K_V1"},
         "model: model.weights: 'IMAGENET1K_V1' names torchvision weights, which exist only for model.arch; "
         "with model.factory expected 'random' or a state dict file"),
    ],
    ids=["both", "neither", "malformed", "kwargs-with-arch", "weights-name"],
)
def test_arch_and_factory_config_errors(tmp_path, model, message):
    path = write_config(tmp_path, model=model)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    assert "\n" not in str(info.value)


def test_cli_prints_a_factory_error_as_one_line(tmp_path, capsys):
    config = factory_config(tmp_path, {"arch": None, "factory": "nosuch_gppq_pkg:make", "num_classes": 10})
    with pytest.raises(SystemExit) as done:
        cli.main(["compress", "--config", str(config), "--out", str(tmp_path / "x.gppq")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert done.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: model.factory: 'nosuch_gppq_pkg:make': cannot import module")
    assert "PYTHONPATH" in lines[0]
    assert not (tmp_path / "x.gppq").exists()
