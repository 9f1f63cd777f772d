"""Fixtures of the launch tests: a real SLURM cluster on this machine, and one reference run.

``slurm`` (session): Debian's slurmctld/slurmd with a private munged, installed with apt-get
when missing (needs root). Not root, or apt cannot install it: the SLURM tests skip with
the reason, unless ``GPPQ_REQUIRE_SLURM=1`` turns that into a failure (for CI).

``local_reference`` (session): a 2-task training run through submitit's LocalExecutor that
the SLURM runs (interrupted or not) must reproduce bit for bit.

Digits: 1,438 train images, batch 64 -> 22 steps per epoch; 2 epochs, a checkpoint every 5
steps, k-means of 3 iterations.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import gppq, write_config
from tests.launch.slurm_cluster import LocalSlurm, Unavailable, ensure_installed, make_root

STEPS_PER_EPOCH = 22
TIMEOUT_MIN = "20"  # >= 15: submitit reads a signal within min(0.8 T, T - 10 min) as a preemption


def launch_config(directory: Path, digits_dir: Path, name: str, **train) -> Path:
    """A tiny digits run with its outputs, submitit logs and MLflow store in ``directory``."""
    return write_config(
        directory, name=name,
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3},
        train={"epochs": 2, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 5, **train},
        tracking={"uri": f"sqlite:///{directory / 'mlflow.db'}", "experiment": "launch-tests"},
        launch={"folder": str(directory / "submitit"), "timeout_min": int(TIMEOUT_MIN)},
    )


def summary_of(directory: Path, name: str) -> dict:
    return json.loads((directory / "runs" / name / "summary.json").read_text())


@pytest.fixture(scope="session")
def slurm():
    if os.geteuid() != 0:
        reason = "the local SLURM cluster runs slurmctld/slurmd and munged as root; not root here"
        if os.environ.get("GPPQ_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        ensure_installed()
    except Unavailable as exc:
        if os.environ.get("GPPQ_REQUIRE_SLURM"):
            pytest.fail(f"no SLURM: {exc}")
        pytest.skip(f"no SLURM: {exc}")
    cluster = LocalSlurm(make_root())
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture
def slurm_env(slurm, monkeypatch):
    """This test's environment (and its subprocesses', and their jobs') points at ``slurm``."""
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    return slurm


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
    directory = tmp_path_factory.mktemp("local")
    config = launch_config(directory, digits_dir, "reference")
    result = gppq("submit", "--config", config, "--cluster", "local", "--cpu-tasks-per-node", "2",
                  "--timeout-min", TIMEOUT_MIN, "--wait", cwd=directory)
    return Reference(directory, result.stdout, result.stderr, result.returncode)
