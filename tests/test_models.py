"""Building models and loading weights: files, and torchvision's pretrained weights by name
from its cache (real files in a temporary TORCH_HOME, written with torch.save)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from gppq_dist.config import load_config
from gppq_dist.errors import ConfigError, UserError
from gppq_dist.models import build_model, fetch_weights, is_weights_name, load_model, load_weights
from tests.conftest import CONFIGS, gppq_here, write_config


def cached_file(torch_home: Path, weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision's loader looks: $TORCH_HOME/hub/checkpoints/<last part of the URL>."""
    return torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def saved_resnet18(torch_home: Path) -> dict[str, torch.Tensor]:
    """A seeded resnet18 written where IMAGENET1K_V1 is cached (torchvision's format: torch.save)."""
    torch.manual_seed(123)
    state = {k: v.clone() for k, v in torchvision.models.resnet18(num_classes=1000).state_dict().items()}
    path = cached_file(torch_home, torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_weights_by_name_load_from_torchvision_cache(tmp_path, torch_home, name):
    state = saved_resnet18(torch_home)
    cfg = load_config(write_config(tmp_path, model={"num_classes": 1000, "weights": name}))
    model = load_model(cfg)  # seeded with cfg.seed = 0, so every tensor differs unless loaded
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


def test_paper_configs_start_from_imagenet_weights():
    for regime in ("resnet18_small_blocks", "resnet18_large_blocks", "resnet50_small_blocks",
                   "resnet50_large_blocks"):
        cfg = load_config(CONFIGS / f"{regime}.yaml")
        assert cfg.model.weights == "IMAGENET1K_V1" and cfg.model.num_classes == 1000


def test_missing_cache_file_is_one_error_with_path_and_url(tmp_path):
    home = tmp_path / "empty_home"
    config = write_config(tmp_path, model={"num_classes": 1000, "weights": "IMAGENET1K_V1"})
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    expected = cached_file(home, weights)
    result = gppq_here("compress", "--config", config, "--out", tmp_path / "out.gppq", env={"TORCH_HOME": str(home)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.weights:"), result.stderr
    assert str(expected) in lines[0] and weights.url in lines[0]
    assert "Traceback" not in result.stderr and not expected.exists()
    # `gppq size` reads shapes only: it needs no weights file
    sized = gppq_here("size", "--config", config, "--json", env={"TORCH_HOME": str(home)})
    assert sized.returncode == 0, sized.stderr
    assert not expected.exists()


def test_paper_config_sizes_without_the_weights_file(tmp_path):
    home = tmp_path / "empty_home"
    sized = gppq_here("size", "--config", CONFIGS / "resnet50_small_blocks.yaml", env={"TORCH_HOME": str(home)})
    assert sized.returncode == 0 and "5.091 MB" in sized.stdout, sized.stderr


def test_weights_given_on_the_command_line_by_name(tmp_path, torch_home):
    state = saved_resnet18(torch_home)
    model = build_model("resnet18", 1000)
    load_weights(model, "IMAGENET1K_V1", key="--weights")
    assert torch.equal(model.fc.weight, state["fc.weight"])
    with pytest.raises(UserError, match=r"--weights: resnet18 has no weights 'IMAGENET1K_V2'; "
                                        r"expected one of IMAGENET1K_V1, DEFAULT"):
        load_weights(build_model("resnet18", 1000), "IMAGENET1K_V2", key="--weights")


def test_densenet_checkpoint_keys_are_renamed_as_torchvision_does(tmp_path, torch_home):
    torch.manual_seed(5)
    state = torchvision.models.densenet121(num_classes=1000).state_dict()
    # torchvision's densenet files use the old module names: "norm.1" for today's "norm1"
    # (and predate BatchNorm's num_batches_tracked, which loading fills in with 0)
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.")
           if "denselayer" in k else k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert old.keys() != state.keys()
    path = cached_file(torch_home, torchvision.models.DenseNet121_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(old, path)
    model = build_model("densenet121", 1000)
    load_weights(model, "IMAGENET1K_V1")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    "model, message",
    [
        ({"weights": "IMAGENET1K_V3", "num_classes": 1000},
         r"model.weights: resnet18 has no weights 'IMAGENET1K_V3'; expected one of IMAGENET1K_V1, DEFAULT"),
        ({"weights": "ResNet50_Weights.IMAGENET1K_V2", "num_classes": 1000},
         r"model.weights: 'ResNet50_Weights.IMAGENET1K_V2' are not weights of resnet18; expected one of "
         r"IMAGENET1K_V1, DEFAULT \(or ResNet18_Weights.<name>\)"),
        ({"weights": "IMAGENET1K_V1", "num_classes": 10},
         r"model.weights: ResNet18_Weights.IMAGENET1K_V1 of resnet18 classify 1000 classes but "
         r"model.num_classes is 10; expected model.num_classes: 1000"),
        ({"arch": "vgg16", "weights": "IMAGENET1K_FEATURES", "num_classes": 1000},
         r"feature extractor without a trained classifier; expected weights with classes, one of "
         r"IMAGENET1K_V1, DEFAULT \(got"),
        ({"arch": "vit_b_16", "weights": "IMAGENET1K_SWAG_E2E_V1", "num_classes": 1000},
         r"trained on 384x384 inputs .* built for 224x224 here; expected one of IMAGENET1K_V1, "
         r"IMAGENET1K_SWAG_LINEAR_V1, DEFAULT"),
    ],
    ids=["unknown-name", "other-arch", "num-classes", "features-only", "input-size"],
)
def test_bad_weights_names_are_config_errors(tmp_path, model, message):
    path = write_config(tmp_path, model=model)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_weights_name_or_file():
    assert is_weights_name("IMAGENET1K_V1") and is_weights_name("DEFAULT")
    assert is_weights_name("ResNet50_Weights.IMAGENET1K_V2") and is_weights_name("IMAGENET1K_SWAG_E2E_V1")
    for value in ("random", "weights/resnet18.safetensors", "./IMAGENET1K_V1", "baseline.pt", "imagenet1k_v1"):
        assert not is_weights_name(value), value


def test_fetch_uses_the_cache_file_when_present(torch_home):
    saved_resnet18(torch_home)
    path = cached_file(torch_home, torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    before = path.stat().st_mtime_ns
    assert fetch_weights("resnet18", "IMAGENET1K_V1") == path  # no network here: nothing is downloaded
    assert path.stat().st_mtime_ns == before
    # the command line prints the path; an unknown name is one error line
    from gppq_dist.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fetch-weights", "resnet18", "IMAGENET1K_V1"])
    assert done.value.code in (0, None)
    result = gppq_here("fetch-weights", "resnet18", "IMAGENET1K_V9", env={"TORCH_HOME": str(torch_home)})
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "IMAGENET1K_V1" in result.stderr
    assert "Traceback" not in result.stderr


def test_regnet_builds_on_meta_with_the_cpu_shapes():
    meta = build_model("regnet_y_400mf", 1000, device="meta")
    torch.manual_seed(0)
    cpu = build_model("regnet_y_400mf", 1000)
    meta_shapes = {k: tuple(p.shape) for k, p in meta.named_parameters()}
    assert meta_shapes == {k: tuple(p.shape) for k, p in cpu.named_parameters()}
    assert all(p.is_meta for p in meta.parameters())


def test_googlenet_and_inception_are_built_for_their_imagenet_weights():
    assert build_model("googlenet", 1000, device="meta").transform_input is True
    assert build_model("inception_v3", 10, device="meta").transform_input is True


def test_file_weights_still_load(tmp_path):
    torch.manual_seed(7)
    model = build_model("resnet18", 10)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    other = build_model("resnet18", 10)
    load_weights(other, str(path))
    assert torch.equal(other.fc.weight, model.fc.weight)
