"""The process group under torchrun restarts (real torchrun agents, gloo)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("restart_worker.py")


def torchrun_with_a_killed_rank() -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "--max-restarts=1", str(WORKER)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )


@pytest.mark.distributed
def test_a_restarted_attempt_never_reads_the_killed_attempts_addresses():
    result = torchrun_with_a_killed_rank()
    assert result.returncode == 0, result.stderr[-3000:]
    # both ranks print to torchrun's stdout, where their lines can run together
    assert sorted(re.findall(r"attempt (\d+) rank (\d+) sum (\d+)", result.stdout)) == [
        ("1", "0", "2"), ("1", "1", "2")]
