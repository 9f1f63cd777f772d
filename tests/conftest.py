"""Shared fixtures: small real models, configs and artifacts (CPU, seeded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory):
    """Runs started by the tests track into a scratch store, not ./mlflow.db of the checkout
    (set in os.environ, so the `gppq` subprocesses inherit it; tests that need a server
    pass tracking.uri explicitly)."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def write_config(directory: Path, name: str = "tiny", **sections) -> Path:
    """A small ResNet-18 config (10 classes) with the small-block rules, overridable per section."""
    raw = {
        "name": name,
        "output_dir": str(directory / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "weights": "random"},
        "data": {"root": str(directory / "data"), "image_size": 32, "resize_size": 32, "workers": 0},
        "quantization": {"types": {"conv3x3": {"d": 9, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                                   "linear": {"d": 4, "k": 2048}}},
        "kmeans": {"iterations": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def gppq(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = False):
    """Run the real ``gppq`` console script; returns the CompletedProcess."""
    script = Path(sys.executable).parent / "gppq"
    result = subprocess.run([str(script), *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"gppq {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from gppq_dist.data.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, size=32)
    return out


def torchrun() -> str:
    path = Path(sys.executable).parent / "torchrun"
    return str(path) if path.exists() else shutil.which("torchrun")
