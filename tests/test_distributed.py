"""The process group under torchrun restarts (real torchrun agents, gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("restart_worker.py")


def torchrun_with_a_killed_rank(mode: str) -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "--max-restarts=1", str(WORKER), mode],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )


@pytest.mark.distributed
def test_a_restarted_attempt_never_reads_the_killed_attempts_addresses():
    result = torchrun_with_a_killed_rank("ours")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("attempt")) == [
        "attempt 1 rank 0 sum 2", "attempt 1 rank 1 sum 2"]
