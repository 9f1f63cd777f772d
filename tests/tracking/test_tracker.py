"""The tracker on its own: params, resume, other ranks, a dead or hung server, sync, plots.

Stores are real: a sqlite file in the test's folder, or the session's ``mlflow server``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time

import pytest
import torch

from gppq_dist.distributed import DistContext
from gppq_dist.tracking import NullTracker, Tracker, open_tracker
from gppq_dist.tracking.plots import dynamics_figure, dynamics_png, pareto_front
from gppq_dist.tracking.tracker import (HTTP_LIMITS, JOURNAL, RUN_ID_FILE, flat_params, git_commit, mlflow_calls,
                                        read_journal)
from tests.conftest import ROOT, gppq_here
from tests.distributed_helpers import free_port
from tests.tracking.helpers import PNG_MAGIC, epoch_record, finish_run, history_of, tiny_config

def test_the_config_becomes_flat_params_mlflow_accepts():
    params = flat_params({
        "train": {"lr": 0.01, "epochs": 3, "bf16": False},
        "data": {"crop_scale": [0.6, 1.0], "train_list": None},
        "quantization": {"names": {"layer4\\.1\\.conv2": {"d": 18, "k": 256}}, "types": {}},
        "note": "x" * 7000,
        ("k" * 300): 1,
    })
    assert params["train.lr"] == "0.01" and params["train.epochs"] == "3" and params["train.bf16"] == "False"
    assert params["data.crop_scale"] == "[0.6, 1.0]" and params["data.train_list"] == "None"
    # regexes are no MLflow names: that mapping stays one param, as JSON
    assert json.loads(params["quantization.names"]) == {"layer4\\.1\\.conv2": {"d": 18, "k": 256}}
    assert params["quantization.types"] == "{}"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    assert not any(len(key) > 250 for key in params)


def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the repository has no commit to compare with")
    assert git_commit(ROOT) == head.stdout.strip()


def test_a_resumed_run_continues_its_mlflow_run_and_a_fresh_start_begins_a_new_one(tmp_path):
    from mlflow import MlflowClient

    cfg = tiny_config(tmp_path, "resume", experiment="resume")
    client = MlflowClient(cfg.tracking.uri)
    with pytest.raises(RuntimeError):
        with Tracker(cfg) as tracker:
            tracker.log_step(5, 2.0, 0.01, 100.0)
            tracker.log_step(10, 1.5, 0.01, 110.0)
            tracker.log_epoch(epoch_record(1))
            raise RuntimeError("the run fails")
    run_id = tracker.run_id
    assert (cfg.run_dir / RUN_ID_FILE).read_text().strip() == run_id
    first = client.get_run(run_id)
    assert first.info.status == "FAILED" and first.info.run_name == "resume"
    assert first.data.params["train.epochs"] == "2" and first.data.params["train.mu"] == "0.5"
    assert first.data.tags["method"] == "gppq" and first.data.tags["world_size"] == "1"
    # artifacts of a new sqlite experiment live beside the database
    assert first.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())

    longer = tiny_config(tmp_path, "resume", train={"epochs": 3}, experiment="resume")
    with Tracker(longer, resumed=True) as again:
        assert again.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"
        again.log_step(10, 1.5, 0.01, 110.0)  # recomputed after the resume: not logged twice
        again.log_step(15, 1.2, 0.01, 120.0)
        again.log_epoch(epoch_record(1))
        again.log_epoch(epoch_record(2))
        finish_run(again, longer, [epoch_record(1), epoch_record(2)], steps=15)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [step for step, _ in history_of(client, run_id, "loss")] == [5, 10, 15]
    assert history_of(client, run_id, "top1_quantized") == [(1, 31.0), (2, 32.0)]
    # params cannot change in MLflow: the resumed setting is a tag
    assert run.data.params["train.epochs"] == "2" and run.data.tags["resumed.train.epochs"] == "3"
    assert {f.path for f in client.list_artifacts(run_id)} == {"config.yaml", "summary.json", "dynamics.png"}
    assert [r["kind"] for r in read_journal(cfg.run_dir / JOURNAL)].count("start") == 2

    with Tracker(cfg) as fresh:  # not resumed: a new run and a new journal
        assert fresh.run_id not in (None, run_id)
    assert [r["kind"] for r in read_journal(cfg.run_dir / JOURNAL)].count("start") == 1
    assert client.get_run(fresh.run_id).info.status == "FINISHED"


def test_a_run_with_a_parent_is_its_child_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with Tracker(tiny_config(tmp_path, "sweep")) as parent:
        pass
    cfg = tiny_config(tmp_path, "member", parent_run_id=parent.run_id, run_name="member-1")
    with Tracker(cfg) as child:
        pass
    assert client.get_parent_run(child.run_id).info.run_id == parent.run_id
    assert client.get_run(child.run_id).info.run_name == "member-1"


def test_only_rank_0_of_an_enabled_run_tracks(tmp_path):
    cfg = tiny_config(tmp_path)
    other = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    main = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    assert type(open_tracker(cfg, other, resumed=False)) is NullTracker
    off = tiny_config(tmp_path, enabled=False)
    with open_tracker(off, main, resumed=False) as tracker:
        assert type(tracker) is NullTracker
        tracker.log_step(10, 1.0, 0.1, 1.0)
    assert not cfg.run_dir.exists() and not (tmp_path / "mlflow.db").exists()


def test_mlflow_calls_are_short_and_keep_what_the_environment_sets(monkeypatch):
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with mlflow_calls():
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == int(HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"


def test_a_server_that_never_answers_stalls_the_run_once_and_briefly(tmp_path, monkeypatch, caplog):
    hung = socket.socket()  # the kernel completes connections into the backlog; nothing ever answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
        cfg = tiny_config(tmp_path, "hung", uri=f"http://127.0.0.1:{hung.getsockname()[1]}")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            tracker = Tracker(cfg)
            connect_s = time.monotonic() - started
            started = time.monotonic()
            for step in range(10, 110, 10):
                tracker.log_step(step, 1.0, 0.01, 100.0)
            tracker.end()
            after_s = time.monotonic() - started
    finally:
        hung.close()
    assert not tracker.online and tracker.run_id is None
    assert connect_s < 8, f"{connect_s:.1f} s against a 1 s timeout, 1 retry"
    assert after_s < 1, "no further calls once the server failed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "training goes on" in warnings[0], warnings
    assert len([r for r in read_journal(cfg.run_dir / JOURNAL) if r["kind"] == "metric"]) == 30


def test_a_dead_server_costs_one_warning_and_sync_creates_the_run_later(mlflow_server, tmp_path, caplog):
    cfg = tiny_config(tmp_path, "offline", uri=f"http://127.0.0.1:{free_port()}", experiment="offline")
    run_dir = cfg.run_dir
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        with Tracker(cfg) as tracker:
            for step in (5, 10, 15, 20):
                tracker.log_step(step, 2.0 / step, 0.01, 100.0 + step)
            history = [epoch_record(1), epoch_record(2)]
            for record in history:
                tracker.log_epoch(record)
            summary = finish_run(tracker, cfg, history, steps=20)
    assert time.monotonic() - started < 15
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "training goes on" in warnings[0] and f"gppq mlflow sync {run_dir}" in warnings[0]
    assert not (run_dir / RUN_ID_FILE).exists()
    journal = read_journal(run_dir / JOURNAL)
    assert [r["kind"] for r in journal][-1] == "end"

    # without --uri: the store the run used, still down -> one error line
    down = gppq_here("mlflow", "sync", run_dir)
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert down.stderr.startswith("error:") and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert "connection refused" in down.stderr

    first = gppq_here("mlflow", "sync", run_dir, "--uri", mlflow_server.url, check=True)
    assert "created run" in first.stdout and "uploaded" in first.stdout, first.stdout
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    client = mlflow_server.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "offline"
    assert client.get_experiment(run.info.experiment_id).name == "offline"
    journaled = {k: v for r in journal if r["kind"] == "params" for k, v in r["params"].items()}
    assert run.data.params == journaled
    tags = next(r["tags"] for r in journal if r["kind"] == "tags")
    assert {k: run.data.tags.get(k) for k in tags} == tags
    for key in ("loss", "images_per_s", "top1_quantized", "gamma", "size_mb"):
        expected = [(r["step"], r["value"]) for r in journal if r["kind"] == "metric" and r["key"] == key]
        assert history_of(client, run_id, key) == expected, key
    assert [v for _, v in history_of(client, run_id, "top1_quantized")] == [h["top1_quantized"] for h in history]
    assert run.data.metrics["size_mb"] == summary["size_mb"]
    assert {f.path for f in client.list_artifacts(run_id)} == {"config.yaml", "summary.json", "dynamics.png"}

    second = gppq_here("mlflow", "sync", run_dir, "--uri", mlflow_server.url, "--json", check=True)
    report = json.loads(second.stdout)
    assert report["run_id"] == run_id and not report["created"]
    assert (report["params"], report["tags"], report["metrics"], report["artifacts"], report["status"]) == \
        (0, 0, 0, [], None)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sync_of_a_folder_without_a_journal_is_one_error_line(tmp_path):
    result = gppq_here("mlflow", "sync", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "tracking.jsonl" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_dynamics_plot_has_top1_and_gamma_on_a_log_axis(tmp_path):
    history = [epoch_record(1), epoch_record(2), epoch_record(3)]
    figure = dynamics_figure(history, baseline_top1=50.0, direct_pq_top1=20.0)
    accuracy, gamma = figure.axes
    assert list(accuracy.lines[0].get_ydata()) == [20.0, 31.0, 32.0, 33.0]  # with quantization, from direct PQ
    assert list(accuracy.lines[1].get_ydata()) == [50.0, 41.0, 42.0, 43.0]  # raw, from the baseline
    assert gamma.get_yscale() == "log" and list(gamma.lines[0].get_ydata()) == [1e-2, 1e-4, 1e-6]
    path = dynamics_png(history, 50.0, 20.0, tmp_path / "dynamics.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_the_pareto_front():
    points = [(1.0, 50.0), (2.0, 60.0), (2.0, 55.0), (3.0, 58.0), (0.5, 40.0), (4.0, 70.0), (1.0, 45.0)]
    assert pareto_front(points) == [4, 0, 1, 5]
