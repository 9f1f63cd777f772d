"""Fixtures of the launch tests: a real SLURM cluster on this machine.

``slurm`` (session): Debian's slurmctld/slurmd with a private munged, installed with apt-get
when missing (needs root). Not root, or apt cannot install it: the SLURM tests skip with
the reason, unless ``GPPQ_REQUIRE_SLURM=1`` turns that into a failure (for CI).

``local_reference``, ``launch_config`` and the run constants live in ``tests/conftest.py``:
the training tests compare with the same 2-rank run.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import (  # noqa: F401  (re-exported for the launch tests)
    STEPS_PER_EPOCH, TIMEOUT_MIN, Reference, launch_config, summary_of,
)
from tests.launch.slurm_cluster import LocalSlurm, Unavailable, ensure_installed, make_root


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
