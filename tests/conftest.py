"""Shared fixtures: small real models, configs and artifacts (CPU, seeded)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


def every_kind(setting: dict | None) -> dict:
    """A ``quantization`` section coding every 3x3 conv, 1x1 conv and Linear with one layer
    setting (CLIP-Q's ``{prune, bits}``, TSQ's ``{}``), the stem left alone."""
    return {"types": {kind: setting for kind in ("conv3x3", "conv1x1", "linear")}}


CLIPQ_RULES = every_kind({"prune": 0.8, "bits": 2})
TSQ_RULES = every_kind({})


def write_config(directory: Path, name: str = "tiny", **sections) -> Path:
    """A small ResNet-18 config (10 classes) with the small-block rules, overridable per section.

    MLflow tracking is off unless the test passes a ``tracking`` section: the tracker costs a
    run about 5 s here (importing MLflow, opening the store, the end-of-run plot), and the
    tracking tests (tests/tracking, the sweeps, the local reference run) check it themselves.
    """
    raw = {
        "name": name,
        "output_dir": str(directory / "runs"),
        "model": {"arch": "resnet18", "num_classes": 10, "weights": "random"},
        "data": {"root": str(directory / "data"), "image_size": 32, "resize_size": 32, "workers": 0},
        "quantization": {"types": {"conv3x3": {"d": 9, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                                   "linear": {"d": 4, "k": 2048}}},
        "kmeans": {"iterations": 4},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        if key == "tracking":  # a test's own section replaces the default (tracking on unless it says)
            raw[key] = value
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
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
    return _checked(result, check)


def _checked(result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, result.args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def gppq_here(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = False):
    """``gppq ARGS`` in this process: the real command line from argument parsing to the
    ``error:`` line and exit status, for commands that start no processes of their own (a
    fresh interpreter costs 10-15 s of imports on these machines). Same arguments and result
    type as :func:`gppq`; the working directory, the environment and the logging set-up
    the command makes are put back after it."""
    from gppq_dist.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved_env = {key: os.environ.get(key) for key in env or {}}
    saved_cwd = os.getcwd()
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        os.environ.update({key: str(value) for key, value in (env or {}).items()})
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(arg) for arg in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return _checked(subprocess.CompletedProcess(["gppq", *map(str, args)], code, out.getvalue(), err.getvalue()),
                    check)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from gppq_dist.data.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, size=32)
    return out


def torchrun() -> str:
    path = Path(sys.executable).parent / "torchrun"
    return str(path) if path.exists() else shutil.which("torchrun")


# One uninterrupted 2-rank run, shared by the launch and training tests: SLURM runs
# (interrupted or not), torchrun restarts, a c10d rendezvous, resumes and DeepSpeed must
# reproduce it bit for bit. Digits: 1,438 train images, batch 64 -> 22 steps per epoch;
# 2 epochs, a checkpoint every 5 steps, k-means of 3 iterations.
STEPS_PER_EPOCH = 22
TIMEOUT_MIN = "20"  # >= 15: submitit reads a signal within min(0.8 T, T - 10 min) as a preemption


def launch_config(directory: Path, digits_dir: Path, name: str, tracked: bool = False, **train) -> Path:
    """A tiny digits run with its outputs, submitit logs and MLflow store in ``directory``
    (tracking there only when ``tracked``)."""
    return write_config(
        directory, name=name,
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3},
        train={"epochs": 2, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 5, **train},
        tracking={"enabled": tracked, "uri": f"sqlite:///{directory / 'mlflow.db'}", "experiment": "launch-tests"},
        launch={"folder": str(directory / "submitit"), "timeout_min": int(TIMEOUT_MIN)},
    )


def summary_of(directory: Path, name: str) -> dict:
    return json.loads((directory / "runs" / name / "summary.json").read_text())


@dataclass
class Reference:
    directory: Path
    stdout: str
    stderr: str
    returncode: int

    @property
    def artifact(self) -> Path:
        return self.directory / "runs" / "reference" / "gppq.gppq"

    @property
    def summary(self) -> dict:
        return summary_of(self.directory, "reference")


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory, digits_dir) -> Reference:
    """The 2-task run through submitit's LocalExecutor (`gppq submit --cluster local`)."""
    directory = tmp_path_factory.mktemp("local")
    config = launch_config(directory, digits_dir, "reference", tracked=True)
    result = gppq_here("submit", "--config", config, "--cluster", "local", "--cpu-tasks-per-node", "2",
                       "--timeout-min", TIMEOUT_MIN, "--wait", cwd=directory)
    return Reference(directory, result.stdout, result.stderr, result.returncode)
