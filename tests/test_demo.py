"""The README's main command, end to end, in a scratch folder."""

import json

import pytest

from tests.conftest import CONFIGS, gppq


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    result = gppq("demo", "--config", CONFIGS / "demo_digits.yaml", cwd=tmp_path, check=True)
    summary = json.loads((tmp_path / "runs" / "demo_digits" / "summary.json").read_text())
    assert summary["baseline_top1"] >= 95.0
    assert summary["file_bytes"] <= summary["size_mb"] * 2**20 * 1.01 + 64 * 1024
    assert summary["ratio"] > 25
    assert "direct PQ" in result.stdout and "baseline" in result.stdout
    # a second run reuses the cached baseline instead of training again
    again = gppq("demo", "--config", CONFIGS / "demo_digits.yaml", cwd=tmp_path, check=True)
    assert "reusing" in again.stderr
