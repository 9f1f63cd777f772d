"""`gppq submit` without SLURM: submitit's LocalExecutor (2 processes) and in-process debug."""

import re

import pytest
import yaml

from tests.conftest import gppq_here
from tests.launch.conftest import STEPS_PER_EPOCH, launch_config, summary_of


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.distributed
def test_local_two_tasks_train_one_run(local_reference):
    assert local_reference.returncode == 0, local_reference.stderr
    out = local_reference.stdout
    job_id = re.search(r"as local job (\d+): 1 node\(s\) x 2 CPU task\(s\)", out).group(1)
    assert "MLflow: experiment 'launch-tests' at sqlite:///" in out
    assert re.search(r"gppq\.gppq: top-1 [\d.]+% quantized", out)
    summary = local_reference.summary
    assert summary["world_size"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["resumed_from"] is None
    # one process per task, each with its own log and result; rank 0 alone logs progress
    logs = local_reference.directory / "submitit" / job_id
    for rank in (0, 1):
        assert (logs / f"{job_id}_{rank}_result.pkl").is_file()
    assert "joined process group: rank 0 of 2 (gloo)" in (logs / f"{job_id}_0_log.err").read_text()
    assert "epoch 2/2" not in (logs / f"{job_id}_1_log.err").read_text()
    # the resolved config the run kept has the tracking URI pinned at submission
    assert f"sqlite:///{local_reference.directory / 'mlflow.db'}" in (
        local_reference.directory / "runs" / "reference" / "config.yaml").read_text()


def test_local_job_failure_is_one_error_line(tmp_path):
    config = launch_config(tmp_path, tmp_path / "missing", "broken")
    result = gppq_here("submit", "--config", config, "--cluster", "local", "--wait", cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: job \d+ failed: DataError: data folder '{tmp_path / 'missing'}' does not "
                        r"exist \(log: .*_0_log\.err\)", lines[0])


def test_debug_runs_in_process(tmp_path, digits_dir):
    config = launch_config(tmp_path, digits_dir, "inproc", epochs=1, checkpoint_every=0)
    result = gppq_here("submit", "--config", config, "--cluster", "debug", "--cpu-tasks-per-node", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "running 'inproc' in this process (--cluster debug)" in result.stdout
    assert "1 task instead of 2" in result.stderr
    summary = summary_of(tmp_path, "inproc")
    assert summary["world_size"] == 1 and summary["steps"] == STEPS_PER_EPOCH
    assert str(tmp_path / "runs" / "inproc" / "gppq.gppq") in result.stdout
    # a mistake in the run: the run's own message, once, no traceback (no pdb either)
    broken = launch_config(tmp_path, tmp_path / "missing", "broken")
    result = gppq_here("submit", "--config", broken, "--cluster", "debug", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [f"error: data folder '{tmp_path / 'missing'}' does not exist"]


def test_sweep_with_failing_points_ends_its_parent_run_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    base = launch_config(tmp_path, tmp_path / "missing", "base", tracked=True)
    sweep = tmp_path / "roots.yaml"
    sweep.write_text(yaml.safe_dump({"base": base.name, "grid": {"data.root": [str(tmp_path / "gone")]},
                                     "set": {"train.mu": 0.25}}))
    result = gppq_here("sweep", "--config", sweep, "--cluster", "debug", cwd=tmp_path)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0] == f"error: 1 of 1 runs failed; the first: data folder '{tmp_path / 'gone'}' does not exist"
    parent_id = re.search(r"parent run (\w+)", result.stdout).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "roots" and parent.info.status == "FAILED"
    assert parent.data.tags["gppq.state"] == "0 of 1 runs done"
    (child,) = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert child.info.status == "FAILED" and child.data.params["train.mu"] == "0.25"
