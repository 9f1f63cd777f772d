"""Sweep files and `gppq submit`/`gppq sweep` refusals that need no cluster (dry runs, errors)."""

import os
import sys
from pathlib import Path

import pytest
import yaml

from gppq_dist.launch.sweep import format_value, load_sweep, safe_name, short_labels
from tests.conftest import CONFIGS, gppq_here, write_config

SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


def one_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def write_sweep(directory: Path, **raw) -> Path:
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_expand_to_valid_runs(path):
    sweep = load_sweep(path)
    points = sweep.points()
    assert len(points) == len({p.name for p in points}) > 1
    for point in points:
        for key, value in point.values.items():
            node = point.cfg.model_dump()
            for part in key.split("."):
                node = node[part]
            assert node == value


def test_resnet18_sweep_dry_run_lists_the_issue_grid():
    result = gppq_here("sweep", "--config", CONFIGS / "sweeps" / "resnet18_k.yaml", "--dry-run", check=True)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert names == [f"resnet18_small_blocks_k{k}_mu{mu}" for k in (256, 512, 1024, 2048) for mu in ("0.001", "0.01")]
    assert "dry run: nothing submitted (1 node(s) x 8 GPU(s), 8 CPU(s) per task, 240 min per run)" in result.stdout


def test_demo_sweep_dry_run():
    result = gppq_here("sweep", "--config", "configs/sweeps/demo_k.yaml", "--dry-run", "--cluster", "local",
                  "--set", "train.epochs=3", check=True)
    assert "sweep demo_k: 3 runs of configs/demo_digits.yaml" in result.stdout
    assert [line.strip() for line in result.stdout.splitlines()[1:4]] == [
        "demo_digits_k64", "demo_digits_k128", "demo_digits_k256"]


def test_unknown_grid_key_gets_the_config_loaders_message(tmp_path):
    base = write_config(tmp_path)
    sweep = write_sweep(tmp_path, base=base.name, grid={"quantization.types.conv3x3.kk": [64, 128]})
    message = one_error(gppq_here("sweep", "--config", sweep, "--dry-run"))
    assert message.startswith(f"error: {sweep}, point kk64: {base}: unknown key 'quantization.types.conv3x3.kk' "
                              "(did you mean 'k'?)")


def test_invalid_grid_value_names_the_point(tmp_path):
    base = write_config(tmp_path)
    sweep = write_sweep(tmp_path, base=base.name, grid={"quantization.types.conv3x3.k": [64, 100]})
    message = one_error(gppq_here("sweep", "--config", sweep, "--dry-run"))
    assert message.startswith(f"error: {sweep}, point k100: {base}: quantization.types.conv3x3.k: must be a power "
                              "of two")


@pytest.mark.parametrize("raw, expected", [
    ({"base": "tiny.yaml", "gird": {"train.mu": [1]}}, "unknown key 'gird' (did you mean 'grid'?)"),
    ({"base": "tiny.yaml"}, "missing required key 'grid'"),
    ({"grid": {"train.mu": [1]}}, "missing required key 'base'"),
    ({"base": "tiny.yaml", "grid": {"train.mu": 0.1}}, "grid: train.mu: expected a non-empty list of values"),
    ({"base": "tiny.yaml", "grid": {"launch.nodes": [1, 2]}}, "grid: launch.nodes cannot vary within a sweep"),
    ({"base": "tiny.yaml", "grid": {"train.mu": [1]}, "set": {"train.mu": 2}}, "train.mu is both in set: and"),
    ({"base": "tiny.yaml", "grid": {"train.mu": [1]}, "parallelism": 0}, "parallelism: expected a positive"),
    ({"base": "nothere.yaml", "grid": {"train.mu": [1]}}, "nothere.yaml' does not exist"),
    ({"base": "tiny.yaml", "grid": {"train.mu": [1.0e-3, 0.001]}}, "get the same run name 'tiny_mu0.001'"),
])
def test_bad_sweep_files_are_one_error_line(tmp_path, raw, expected):
    write_config(tmp_path)
    message = one_error(gppq_here("sweep", "--config", write_sweep(tmp_path, **raw), "--dry-run"))
    assert expected in message


def test_set_cannot_override_a_swept_key(tmp_path):
    base = write_config(tmp_path)
    sweep = write_sweep(tmp_path, base=base.name, grid={"train.mu": [0.1, 0.2]})
    message = one_error(gppq_here("sweep", "--config", sweep, "--dry-run", "--set", "train.mu=0.3"))
    assert message == f"error: --set train.mu: {sweep} sweeps that key in its grid"


def test_submit_refusals(tmp_path):
    config = write_config(tmp_path, train={"batch_size": 64})
    # in this process: the real command line, from argument parsing to the error line
    assert one_error(gppq_here("submit", "--config", config, "--cluster", "kubernetes")) == (
        "error: --cluster: expected one of slurm, local, debug, got 'kubernetes'")
    assert "launch.nodes = 2, but --cluster local runs on this machine only" in one_error(
        gppq_here("submit", "--config", config, "--cluster", "local", "--nodes", "2"))
    assert one_error(gppq_here("submit", "--config", config, "--cluster", "local", "--cpu-tasks-per-node", "3")) == (
        "error: train.batch_size = 64 must split evenly over the job's 3 tasks (1 node(s) x 3)")
    # a machine without SLURM's commands
    no_slurm = {"PATH": str(Path(sys.executable).parent)}
    assert "--cluster slurm: no sbatch/srun on PATH" in one_error(
        gppq_here("submit", "--config", config, env=no_slurm))
    assert not (tmp_path / "runs").exists()


def test_labels_and_names():
    assert short_labels(["quantization.types.conv3x3.k", "train.mu"]) == {
        "quantization.types.conv3x3.k": "k", "train.mu": "mu"}
    assert short_labels(["quantization.types.conv3x3.k", "quantization.types.conv1x1.k"]) == {
        "quantization.types.conv3x3.k": "conv3x3.k", "quantization.types.conv1x1.k": "conv1x1.k"}
    assert [format_value(v) for v in (1e-3, 2048, True, None, {"d": 9, "k": 256}, [0.6, 1.0])] == [
        "0.001", "2048", "true", "none", "d9-k256", "0.6-1"]
    assert safe_name("demo/x k:1 ") == "demo-x-k-1"
    assert os.sep not in safe_name("a/b")
