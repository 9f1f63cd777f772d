"""MLflow off the step path: the tracker's sender thread, against the session's real
``mlflow server`` behind a proxy (tests/tracking/proxy.py) that can hold every request.

What is asserted is structural: calls return while the proxy holds the sender's request
(the gate is the test's), and afterwards the store holds exactly what the journal holds.
"""

from __future__ import annotations

import logging
import threading

import pytest

from gppq_dist.tracking import Tracker
from gppq_dist.tracking.sync import push
from gppq_dist.tracking.tracker import JOURNAL, MAX_BATCH_METRICS, Outbox, coalesce, read_journal
from tests.tracking.conftest import wait_until
from tests.tracking.helpers import epoch_record, finish_run, tiny_config
from tests.tracking.proxy import DelayingProxy

HOLD_TIMEOUT_S = 60  # generous: how long a send may take to reach the proxy on a loaded machine


def journal_metrics(run_dir):
    return sorted((r["key"], r["step"], r["timestamp"], r["value"])
                  for r in read_journal(run_dir / JOURNAL) if r["kind"] == "metric")


def store_metrics(client, run_id):
    keys = client.get_run(run_id).data.metrics
    return sorted((m.key, m.step, m.timestamp, m.value) for key in keys for m in client.get_metric_history(run_id, key))


def sender_of(tracker):
    threads = [t for t in threading.enumerate() if t.name == f"gppq-tracking-{tracker.run_id}"]
    assert len(threads) == 1, threads
    return threads[0]


def returns_while_held(proxy, calls):
    """Run ``calls`` on a thread of its own while the proxy's gate is closed; fail if they do
    not return (they wait for the server) within HOLD_TIMEOUT_S."""
    errors = []

    def run():
        try:
            calls()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(exc)

    caller = threading.Thread(target=run, name="caller", daemon=True)
    caller.start()
    caller.join(HOLD_TIMEOUT_S)
    if caller.is_alive():
        proxy.gate.set()  # let the stuck call finish before failing
        caller.join(HOLD_TIMEOUT_S)
        pytest.fail("the calls waited for the server: they did not return while it held a request")
    if errors:
        raise errors[0]


def hold_first_send(proxy, tracker, step=1):
    """Close the gate, log one step and return once the sender's request waits at the proxy."""
    proxy.held.clear()
    proxy.gate.clear()
    returns_while_held(proxy, lambda: tracker.log_step(step, 1.0, 0.01, 100.0))
    assert proxy.held.wait(HOLD_TIMEOUT_S), "the sender's request never reached the proxy"


def log_steps(tracker, steps):
    for step in steps:
        tracker.log_step(step, 2.0 / step, 0.01, 100.0 + step)


def warnings_in(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_step_calls_return_while_the_server_holds_the_request(mlflow_server, tmp_path):
    with DelayingProxy(mlflow_server.port) as proxy:
        cfg = tiny_config(tmp_path, "held", uri=proxy.url, experiment="held")
        tracker = Tracker(cfg, gather_s=0)  # one request per send, to hold the first one
        sender = sender_of(tracker)
        assert sender.daemon
        batches_before = proxy.requests_to("/runs/log-batch")
        hold_first_send(proxy, tracker)
        sent_while_held = len(proxy.requests)

        # the server has not answered the first send; every call below still returns
        returns_while_held(proxy, lambda: (log_steps(tracker, range(2, 101)), tracker.log_epoch(epoch_record(1))))
        assert not proxy.gate.is_set() and len(proxy.requests) == sent_while_held
        store = mlflow_server.client()  # straight to the server, past the proxy
        assert store.get_run(tracker.run_id).data.metrics == {}
        assert len(journal_metrics(cfg.run_dir)) == 100 * 3 + 6  # the journal has every record already

        proxy.gate.set()
        tracker.end()
        assert not sender.is_alive()
    assert store.get_run(tracker.run_id).info.status == "FINISHED"
    assert store_metrics(store, tracker.run_id) == journal_metrics(cfg.run_dir)
    # the held send, then the 99 steps and the epoch queued behind it as one request
    assert proxy.requests_to("/runs/log-batch") == batches_before + 2
    assert tracker.dropped == 0


def test_a_resumed_run_behind_a_slow_server_ends_with_the_store_holding_the_journal(mlflow_server, tmp_path):
    store = mlflow_server.client()
    with DelayingProxy(mlflow_server.port, delay_s=0.05) as proxy:
        cfg = tiny_config(tmp_path, "slow", uri=proxy.url, experiment="slow")
        with pytest.raises(RuntimeError):
            with Tracker(cfg) as tracker:
                for step in range(1, 31):
                    tracker.log_step(step, 2.0 / step, 0.01, 100.0 + step)
                tracker.log_epoch(epoch_record(1))
                raise RuntimeError("the run fails")
        run_id = tracker.run_id
        assert store.get_run(run_id).info.status == "FAILED"
        assert store_metrics(store, run_id) == journal_metrics(cfg.run_dir)

        with Tracker(cfg, resumed=True) as again:
            assert again.run_id == run_id
            for step in range(25, 61):  # 25..30 again, as a resume recomputes them: not sent twice
                again.log_step(step, 2.0 / step, 0.01, 100.0 + step)
            history = [epoch_record(1), epoch_record(2)]
            for record in history:
                again.log_epoch(record)
            finish_run(again, cfg, history, steps=60)
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED"
    journaled = journal_metrics(cfg.run_dir)
    assert store_metrics(store, run_id) == journaled
    assert [step for key, step, _, _ in journaled if key == "loss"] == list(range(1, 61))
    assert {f.path for f in store.list_artifacts(run_id)} == {"config.yaml", "summary.json", "dynamics.png"}
    assert again.dropped == 0


def test_a_full_queue_drops_sends_and_the_end_uploads_them_from_the_journal(mlflow_server, tmp_path):
    with DelayingProxy(mlflow_server.port) as proxy:
        cfg = tiny_config(tmp_path, "full", uri=proxy.url, experiment="full")
        tracker = Tracker(cfg, queue_limit=5, gather_s=0)
        hold_first_send(proxy, tracker)
        returns_while_held(proxy, lambda: log_steps(tracker, range(2, 22)))  # 5 wait in the queue, 15 find it full
        assert tracker.dropped == 15 * 3
        assert len(journal_metrics(cfg.run_dir)) == 21 * 3
        assert tracker.online
        proxy.gate.set()
        tracker.end()
    store = mlflow_server.client()
    assert store_metrics(store, tracker.run_id) == journal_metrics(cfg.run_dir)
    assert store.get_run(tracker.run_id).info.status == "FINISHED"
    again = push(store, cfg.run_dir, read_journal(cfg.run_dir / JOURNAL))
    assert not again.uploaded_anything, again.describe()


def test_end_waits_a_bounded_time_and_sync_uploads_what_the_server_did_not_take(mlflow_server, tmp_path, caplog):
    with DelayingProxy(mlflow_server.port) as proxy:
        cfg = tiny_config(tmp_path, "bounded", uri=proxy.url, experiment="bounded")
        tracker = Tracker(cfg, drain_timeout_s=0.5, gather_s=0)
        sender = sender_of(tracker)
        hold_first_send(proxy, tracker)
        returns_while_held(proxy, lambda: log_steps(tracker, range(2, 11)))
        held = len(proxy.requests)
        with caplog.at_level(logging.WARNING):
            returns_while_held(proxy, tracker.end)  # although the server still holds the first send
        assert not proxy.gate.is_set() and sender.is_alive() and not tracker.online
        warnings = warnings_in(caplog)
        assert len(warnings) == 1 and "within 0.5 s" in warnings[0], warnings
        assert f"gppq mlflow sync {cfg.run_dir}" in warnings[0]

        proxy.gate.set()
        sender.join(HOLD_TIMEOUT_S)
        assert not sender.is_alive()
        assert len(proxy.requests) == held  # the held send completed; nothing was sent after it
    store = mlflow_server.client()
    assert [m.step for m in store.get_metric_history(tracker.run_id, "loss")] == [1]
    assert store.get_run(tracker.run_id).info.status == "RUNNING"
    pushed = push(store, cfg.run_dir, read_journal(cfg.run_dir / JOURNAL))
    assert pushed.metrics == 9 * 3 and pushed.status == "FINISHED"
    assert store_metrics(store, tracker.run_id) == journal_metrics(cfg.run_dir)


def test_a_server_lost_mid_run_costs_one_warning_and_the_journal_goes_on(mlflow_server, tmp_path, caplog):
    proxy = DelayingProxy(mlflow_server.port)
    cfg = tiny_config(tmp_path, "lost", uri=proxy.url, experiment="lost")
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(cfg, gather_s=0)
        sender = sender_of(tracker)
        tracker.log_step(1, 1.0, 0.01, 100.0)
        proxy.close()  # the server is gone: connections cut, new ones refused
        tracker.log_step(2, 0.5, 0.01, 100.0)
        wait_until(lambda: not tracker.online, HOLD_TIMEOUT_S, "the tracker to go offline")
        for step in range(3, 11):
            tracker.log_step(step, 1.0 / step, 0.01, 100.0)
        tracker.end()
    assert not sender.is_alive()
    warnings = warnings_in(caplog)
    assert len(warnings) == 1 and "training goes on" in warnings[0], warnings
    assert len(journal_metrics(cfg.run_dir)) == 10 * 3
    assert read_journal(cfg.run_dir / JOURNAL)[-1]["kind"] == "end"


def test_coalesce_joins_consecutive_metrics_up_to_the_batch_limit_and_keeps_the_order():
    first = [("m", float(i), 0, i) for i in range(MAX_BATCH_METRICS + 500)]
    items = [("metrics", first[:700]), ("metrics", first[700:]), ("artifact", "a.png"),
             ("metrics", [("m", 0.0, 0, 0)]), ("end", "FINISHED", 0)]
    sends = coalesce(items)
    assert [(kind, len(body) if kind == "metrics" else body) for kind, body, *_ in sends] == \
        [("metrics", MAX_BATCH_METRICS), ("metrics", 500), ("artifact", "a.png"), ("metrics", 1), ("end", "FINISHED")]
    assert sends[0][1] + sends[1][1] == first
    assert items[0][1] == first[:700]  # the queued sends are left as they were


def test_the_outbox_drops_when_full_and_always_takes_the_end():
    outbox = Outbox(limit=2)
    assert outbox.put(("metrics", [1, 2, 3]), 3) and outbox.put(("artifact", "a"), 1)
    assert not outbox.put(("metrics", [4, 5]), 2)
    assert outbox.dropped == 2
    outbox.close(("end", "FINISHED", 0))
    assert not outbox.put(("metrics", [6]), 1)  # nothing after the end
    assert outbox.take() == [("metrics", [1, 2, 3]), ("artifact", "a"), ("end", "FINISHED", 0)]


def test_the_outbox_gathers_sends_for_one_request_and_the_end_cuts_the_wait_short():
    outbox = Outbox(limit=10)
    outbox.put(("metrics", [1]), 1)
    taken: list = []
    taker = threading.Thread(target=lambda: taken.extend(outbox.take(gather_s=60)))
    taker.start()
    outbox.put(("metrics", [2]), 1)  # within the gather window: the same request
    outbox.close(("end", "FINISHED", 0))  # the run's end: no waiting out the 60 s
    taker.join(timeout=20)
    assert not taker.is_alive()
    assert taken == [("metrics", [1]), ("metrics", [2]), ("end", "FINISHED", 0)]
