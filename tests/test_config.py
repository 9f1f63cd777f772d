"""Every config error is one clear message naming the file, key and what was expected."""

from pathlib import Path

import pytest
import yaml

from gppq_dist.config import RunConfig, load_config, parse_overrides, validate_config
from gppq_dist.errors import ConfigError
from tests.conftest import CLIPQ_RULES, CONFIGS, TSQ_RULES, gppq, gppq_here, write_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_round_trip(path):
    cfg = load_config(path)
    again = validate_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg


def error_of(tmp_path, text: str, name="bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = write_config(tmp_path, kmeans={"iteratons": 3})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "unknown key 'kmeans.iteratons'" in message
    assert "did you mean 'iterations'" in message


def test_unknown_key_inside_a_layer_rule(tmp_path):
    path = write_config(tmp_path, quantization={"types": {"conv3x3": {"d": 9, "k": 256, "bits": 8}}})
    with pytest.raises(ConfigError, match=r"unknown key 'quantization.types.conv3x3.bits'; expected one of: d, k"):
        load_config(path)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write_config(tmp_path, quantization={"types": {"conv3x3": {"d": "nine", "k": 256}}})
    with pytest.raises(ConfigError, match=r"quantization.types.conv3x3.d: .*integer.*\(got 'nine'\)"):
        load_config(path)


def test_k_must_be_a_power_of_two(tmp_path):
    path = write_config(tmp_path, quantization={"types": {"linear": {"d": 4, "k": 1000}}})
    with pytest.raises(ConfigError, match=r"quantization.types.linear.k: must be a power of two.*got 1000"):
        load_config(path)


def test_unknown_layer_kind(tmp_path):
    path = write_config(tmp_path, quantization={"types": {"conv_3x3": {"d": 9, "k": 256}}})
    with pytest.raises(ConfigError, match=r"unknown layer kind 'conv_3x3'"):
        load_config(path)


def test_missing_required_key(tmp_path):
    message = error_of(tmp_path, "name: x\nquantization: {}\n")
    assert "missing required key 'model'" in message


def test_invalid_yaml_gives_line(tmp_path):
    message = error_of(tmp_path, "name: x\nmodel: {arch: resnet18\n")
    assert "not valid YAML at line" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_validated_too(tmp_path):
    path = write_config(tmp_path)
    cfg = load_config(path, parse_overrides(["kmeans.iterations=7", "model.arch=resnet50"]))
    assert cfg.kmeans.iterations == 7 and cfg.model.arch == "resnet50"
    with pytest.raises(ConfigError, match="kmeans.iterations"):
        load_config(path, parse_overrides(["kmeans.iterations=-1"]))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["kmeans.iterations"])


def assert_one_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("error:")
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_cli_reports_config_errors_without_traceback(tmp_path):
    bad_d = write_config(tmp_path, name="bad_d", quantization={"types": {"conv3x3": {"d": 7, "k": 256}}})
    # one through the installed script (a fresh interpreter: no traceback, exit status 2), the
    # rest through the same command line in this process
    assert_one_clean_error(gppq("size", "--config", bad_d), "quantization.types.conv3x3.d = 7", "layer1.0.conv1")
    unknown = write_config(tmp_path, name="unknown", modle={"arch": "resnet18"})
    assert_one_clean_error(gppq_here("size", "--config", unknown), "unknown key 'modle'", "did you mean 'model'")
    assert_one_clean_error(gppq_here("size", "--config", tmp_path / "missing.yaml"), "missing.yaml", "does not exist")
    assert_one_clean_error(gppq_here("size", "--config", bad_d, "--arch", "resnet_18"),
                           "unknown architecture 'resnet_18'")


def test_cli_reports_missing_weights_file(tmp_path):
    path = write_config(tmp_path, model={"weights": str(tmp_path / "absent.safetensors")})
    assert_one_clean_error(gppq_here("compress", "--config", path, "--out", tmp_path / "x.gppq"),
                           "model.weights", "absent.safetensors", "does not exist")
    assert_one_clean_error(gppq_here("compress", "--config", path, "--weights", tmp_path / "w.pt", "--out",
                                     tmp_path / "x.gppq"), "--weights", "w.pt")
    assert not (tmp_path / "x.gppq").exists()


def test_cli_reports_bad_data_folder(tmp_path):
    assert_one_clean_error(gppq_here("eval", tmp_path / "nothing.gppq", "--data", tmp_path), "nothing.gppq",
                           "does not exist")


def test_run_config_has_a_run_dir(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert isinstance(cfg, RunConfig) and cfg.run_dir == Path(tmp_path / "runs" / "tiny")


def test_layer_rules_are_checked_as_the_methods_layer_settings(tmp_path):
    rules = {**CLIPQ_RULES, "names": {"layer4\\..*": {"prune": 0.9, "bits": 1}, "fc": None}}
    path = write_config(tmp_path, method="clipq", quantization=rules)
    cfg = load_config(path)
    assert (cfg.quantization.names["layer4\\..*"].prune, cfg.quantization.types["linear"].bits) == (0.9, 2)
    with pytest.raises(ConfigError, match=r"quantization.types.linear.prune: .*less than 1.*\(got 1.0\)"):
        load_config(path, {"quantization.types.linear.prune": 1.0})
    with pytest.raises(ConfigError, match=r"unknown key 'quantization.names.fc.bitz' \(did you mean 'bits'\?\); "
                                          r"expected one of: prune, bits"):
        load_config(path, {"quantization.names.fc": {"prune": 0.5, "bitz": 2}})
    tsq = write_config(tmp_path, name="tsq", method="tsq", quantization=TSQ_RULES)
    assert load_config(tsq).quantization.types["conv3x3"] is not None
    with pytest.raises(ConfigError, match=r"unknown key 'quantization.types.linear.bits'; expected no keys"):
        load_config(tsq, {"quantization.types.linear": {"bits": 2}})
    with pytest.raises(ConfigError, match=r"unknown key 'method.stages'; expected one of: .*code_epochs"):
        load_config(tsq, {"method.stages": 2})
    # the same rules under a PQ method are {d, k}
    with pytest.raises(ConfigError, match=r"unknown key 'quantization.types.conv3x3.prune'; expected one of: d, k"):
        load_config(path, {"method": "gppq"})


def test_old_clipq_and_tsq_settings_are_one_error_with_what_to_write(tmp_path):
    old = write_config(tmp_path, name="old", method={"name": "clipq", "prune": 0.9,
                                                     "layers": {"layer4\\..*": {"prune": 0.95, "bits": 1}}},
                       quantization={"names": {"fc": None}})
    message = error_of_path(old)
    assert "\n" not in message and message.startswith(f"{old}: method.prune, method.layers: ")
    written = yaml.safe_load(message.split("write quantization: ")[1])
    setting = {"prune": 0.9, "bits": 2}  # method.bits as it defaulted
    assert written == {"types": {"conv3x3": setting, "conv1x1": setting, "linear": setting},
                       "names": {"fc": None, "layer4\\..*": {"prune": 0.95, "bits": 1}}}
    cfg = load_config(old, {"method": "clipq", "quantization": written})  # what it says loads
    assert cfg.quantization.names["layer4\\..*"].bits == 1
    tsq = write_config(tmp_path, name="tsq", method="tsq")  # {d, k} rules that only picked the layers
    message = error_of_path(tsq)
    assert message.startswith(f"{tsq}: quantization.types.conv3x3.d: method tsq ")
    assert yaml.safe_load(message.split("write quantization: ")[1]) == TSQ_RULES
    assert_one_clean_error(gppq_here("size", "--config", old), "method.prune, method.layers", "write quantization: ")


def error_of_path(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)
