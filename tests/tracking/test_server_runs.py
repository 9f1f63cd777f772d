"""Training runs and ``gppq compare`` against a real ``mlflow server``.

Digits, batch 64 in all: 22 steps per epoch, 2 epochs, a per-step record every 5 steps.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gppq_dist.tracking import Tracker
from gppq_dist.tracking.tracker import JOURNAL, RUN_ID_FILE, read_journal
from tests.conftest import ROOT, gppq, gppq_here, write_config
from tests.tracking.conftest import start_server, wait_until
from tests.tracking.helpers import PNG_MAGIC, epoch_record, finish_run, history_of, tiny_config

STEPS = 44
LOGGED_STEPS = list(range(5, STEPS + 1, 5))
ARTIFACTS = {"config.yaml", "gppq.gppq", "summary.json", "dynamics.png"}


def train_config(tmp_path, digits_dir, name, uri, experiment):
    return write_config(
        tmp_path, name=name,
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3},
        train={"epochs": 2, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 0},
        tracking={"uri": uri, "experiment": experiment, "log_every": 5},
    )


def check_logged_run(client, run_id, run_dir):
    """The MLflow run holds what the run folder says, each value once."""
    summary = json.loads((run_dir / "summary.json").read_text())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("top1_quantized", "top1_raw", "gamma", "train_loss", "val_loss_quantized", "lr"):
        assert history_of(client, run_id, key) == [(h["epoch"], h[key]) for h in summary["history"]], key
    for key in ("loss", "step_lr", "images_per_s"):
        assert [step for step, _ in history_of(client, run_id, key)] == LOGGED_STEPS, key
    for key in ("size_mb", "ratio", "file_bytes", "baseline_top1", "direct_pq_top1"):
        assert history_of(client, run_id, key) == [(STEPS, float(summary[key]))], key
    held = {f.path: f.file_size for f in client.list_artifacts(run_id)}
    assert held == {name: (run_dir / name).stat().st_size for name in ARTIFACTS}
    assert (Path(client.download_artifacts(run_id, "summary.json", str(run_dir.parent / "download"))).read_bytes()
            == (run_dir / "summary.json").read_bytes())
    return run, summary


@pytest.mark.distributed
def test_a_two_process_run_is_one_mlflow_run_logged_by_rank_0(mlflow_server, tmp_path, digits_dir):
    config = train_config(tmp_path, digits_dir, "two", mlflow_server.url, "two-ranks")
    gppq("train", "--config", config, "--nproc", "2", check=True)
    run_dir = tmp_path / "runs" / "two"
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("two-ranks")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    run, summary = check_logged_run(client, run_id, run_dir)
    assert run.info.run_name == "two"
    tags = run.data.tags
    assert (tags["world_size"], tags["engine"], tags["method"], tags["precision"]) == ("2", "ddp", "gppq", "fp32")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert tags["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert tags["host"] and tags["run_dir"] == str(run_dir.resolve())
    params = run.data.params
    assert (params["train.lr"], params["train.mu"], params["train.batch_size"]) == ("0.01", "0.5", "64")
    assert params["quantization.types.conv3x3.k"] == "256" and params["name"] == "two"
    assert summary["world_size"] == 2
    # one journal, one session: rank 1 recorded nothing
    assert [r["kind"] for r in read_journal(run_dir / JOURNAL)].count("start") == 1


def test_a_server_lost_mid_run_costs_one_warning_and_sync_uploads_the_rest(tmp_path, digits_dir):
    store = tmp_path / "store"
    server = start_server(store)
    run_dir = tmp_path / "runs" / "lost"
    journal = run_dir / JOURNAL
    config = train_config(tmp_path, digits_dir, "lost", server.url, "lost-server")
    out, err = open(tmp_path / "train.out", "w"), open(tmp_path / "train.err", "w")
    training = subprocess.Popen([str(Path(sys.executable).parent / "gppq"), "train", "--config", str(config)],
                                cwd=ROOT, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def first_epoch_logged():
            return any(r["kind"] == "metric" and r["key"] == "top1_quantized" for r in read_journal(journal))

        wait_until(lambda: first_epoch_logged() or training.poll() is not None, 600, "epoch 1's metrics")
        assert training.poll() is None, "the run ended before the server could be killed"
        server.stop(signal.SIGKILL)  # gone, as in a crash
        assert training.wait(timeout=600) == 0, (tmp_path / "train.err").read_text()
    finally:
        if training.poll() is None:
            training.kill()
        out.close()
        err.close()
        server.stop()
    stderr = (tmp_path / "train.err").read_text()
    assert " ".join(stderr.split()).count("training goes on") == 1, stderr
    assert "Retrying" not in stderr  # urllib3's retry warnings stay quiet
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_journal(journal)
    assert [r["value"] for r in records if r["kind"] == "metric" and r["key"] == "top1_quantized"] == \
        [h["top1_quantized"] for h in summary["history"]]
    assert {r["path"] for r in records if r["kind"] == "artifact"} == ARTIFACTS
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "FINISHED"

    restarted = start_server(store)  # the same store, back up (on another port)
    try:
        run_id = (run_dir / RUN_ID_FILE).read_text().strip()
        client = restarted.client()
        assert client.get_run(run_id).info.status == "RUNNING"  # as the crash left it
        first = gppq_here("mlflow", "sync", run_dir, "--uri", restarted.url, check=True)
        assert f"run {run_id}" in first.stdout and "created" not in first.stdout, first.stdout
        assert "uploaded" in first.stdout and "4 artifacts" in first.stdout and "status FINISHED" in first.stdout
        check_logged_run(client, run_id, run_dir)
        second = gppq_here("mlflow", "sync", run_dir, "--uri", restarted.url, check=True)
        assert "nothing to upload" in second.stdout, second.stdout
        assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    finally:
        restarted.stop()


def test_compare_tables_an_experiments_finished_runs_and_draws_the_pareto_front(mlflow_server, tmp_path):
    experiment = "compare-test"
    logged = {}
    for name, method, k, mu, size_mb, top1 in (("small", "gppq", 256, 0.5, 0.8, 61.0),
                                               ("large", "gppq", 256, 0.001, 2.5, 70.5),
                                               ("kmeans", "direct_pq", 128, 0.0, 1.1, 48.25)):
        cfg = tiny_config(tmp_path, name, train={"mu": mu}, k=k, uri=mlflow_server.url, experiment=experiment)
        with Tracker(cfg, method=method) as tracker:
            history = [epoch_record(1), epoch_record(2, top1_quantized=top1)]
            for record in history:
                tracker.log_epoch(record)
            finish_run(tracker, cfg, history, steps=10, size_mb=size_mb, ratio=42.0 / size_mb)
        logged[name] = {"method": method, "k": k, "mu": mu, "size_mb": size_mb, "ratio": 42.0 / size_mb,
                        "top1": top1, "run_id": tracker.run_id}
    unfinished = Tracker(tiny_config(tmp_path, "unfinished", uri=mlflow_server.url, experiment=experiment))
    unfinished.log_metrics({"size_mb": 0.1, "top1_quantized": 99.0}, step=1)  # still RUNNING: not a row

    out = tmp_path / "compare"
    result = gppq_here("compare", "--experiment", experiment, "--out", out, "--uri", mlflow_server.url, check=True)
    assert "3 finished runs" in result.stdout
    with open(out / "compare.csv", newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(logged)
    for name, want in logged.items():
        row = rows[name]
        assert (row["method"], row["regime"], int(row["k_conv3x3"])) == (want["method"], name, want["k"])
        assert (float(row["mu"]), float(row["size_mb"]), float(row["ratio"]), float(row["top1_quantized"])) == \
            (want["mu"], want["size_mb"], want["ratio"], want["top1"])
        assert row["run_id"] == want["run_id"]
    # 0.8 MB / 61 and 2.5 MB / 70.5 are the front; 1.1 MB / 48.25 is beaten by the smaller 0.8 MB run
    assert {name for name, row in rows.items() if row["pareto"] == "True"} == {"small", "large"}
    markdown = (out / "compare.md").read_text().splitlines()
    assert markdown[0].startswith("| run | method | regime | K (3x3) | mu | size MB |") and len(markdown) == 2 + 3
    assert any(line.startswith("| small | gppq | small | 256 | 0.5 | 0.800 | 52.5 | 61.00 | yes |")
               for line in markdown), markdown
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC

    client = mlflow_server.client()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    compares = [r for r in client.search_runs([exp_id]) if r.info.run_name == "compare"]
    assert len(compares) == 1 and compares[0].data.tags["gppq_role"] == "compare"
    assert {f.path for f in client.list_artifacts(compares[0].info.run_id)} == \
        {"compare.csv", "compare.md", "pareto.png"}
    again = gppq_here("compare", "--experiment", experiment, "--out", out, "--uri", mlflow_server.url, check=True)
    assert "3 finished runs" in again.stdout  # the compare run is no row, and is reused
    assert len([r for r in client.search_runs([exp_id]) if r.info.run_name == "compare"]) == 1
    unfinished.end()

    unknown = gppq_here("compare", "--experiment", "no-such-experiment", "--uri", mlflow_server.url)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.startswith("error:") and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "no-such-experiment" in unknown.stderr and experiment in unknown.stderr
