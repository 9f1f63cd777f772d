"""What MLflow tracking costs a G&P training step when the tracking server is slow.

Starts a real ``mlflow server`` on 127.0.0.1 (sqlite store and artifacts in a temporary
folder) and, in front of it, a TCP proxy that holds every request 200 ms before passing it
on: a distant or busy server. Then trains with the real trainer (``gppq train``, one process,
the CPU) on the demo digits data, alternately with tracking through the proxy
(``tracking.log_every: 1``: a per-step record every step) and with tracking off, the order
of the pair swapped every repeat so the machine's noise hits both. Each run is a fresh
process: ResNet-18 (10 classes, random init), 32x32 images, the small-block regime of the
tests, ``train.max_steps`` steps of batch 64 (default 22: one epoch).

Step time is ``timing.train_loop_s / steps`` of the run's ``summary.json`` (seconds in
training steps, evaluation and set-up excluded). Reported: the median per kind of run and
the ratio of the medians (goal: <= 1.02x), with the median of the per-pair ratios. After
each tracked run, the store (read from the server, past the proxy) is checked to hold
exactly the metric values the run's journal holds. The run's whole wall time (``wall_s``:
set-up, k-means, evaluations, and the tracker's final drain) is shown beside it. Prints a
Markdown table and writes it to ``benchmarks/results/tracking_overhead.md``. About 5 minutes on 2 idle cores (each run is a
fresh process: start-up, k-means and evaluations take most of it).

    .venv/bin/python benchmarks/tracking_overhead.py [--repeats 3] [--steps 22] [--delay-ms 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from gppq_dist.data.digits import write_digits
from gppq_dist.tracking.tracker import JOURNAL, RUN_ID_FILE, read_journal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tracking.conftest import QUIET, start_server  # noqa: E402  (the tests' real server and proxy)
from tests.tracking.proxy import DelayingProxy  # noqa: E402
BIN = Path(sys.executable).parent
GOAL = 1.02
STEPS_PER_EPOCH = 22


def write_config(folder: Path, name: str, data: Path, steps: int, tracking: dict) -> Path:
    raw = {
        "name": name, "output_dir": str(folder / "runs"), "seed": 0,
        "model": {"arch": "resnet18", "num_classes": 10, "weights": "random"},
        "data": {"root": str(data), "image_size": 32, "resize_size": 32, "workers": 0,
                 "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        "quantization": {"types": {"conv3x3": {"d": 9, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                                   "linear": {"d": 4, "k": 2048}}},
        "kmeans": {"iterations": 3},
        # 22 steps of 64 make an epoch of the digits' 1,437 train images; max_steps ends the last one
        "train": {"epochs": -(-steps // STEPS_PER_EPOCH), "max_steps": steps, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 0},
        "tracking": tracking,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(config: Path, log: Path) -> dict:
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": "sqlite:///" + str(config.parent / "unused.db")}
    with open(log, "w") as out:
        result = subprocess.run([str(BIN / "gppq"), "train", "--config", str(config)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"gppq train failed (status {result.returncode}); see {log}")
    summary = json.loads((config.parent / "runs" / config.stem / "summary.json").read_text())
    return summary


def step_s(summary: dict) -> float:
    return summary["timing"]["train_loop_s"] / summary["steps"]


def store_matches_journal(server_url: str, run_dir: Path) -> tuple[bool, int, int]:
    """Whether the run in the store holds exactly the journal's metric values (key, step,
    timestamp, value); and both counts."""
    from mlflow import MlflowClient

    client = MlflowClient(server_url)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    journaled = sorted((r["key"], r["step"], r["timestamp"], r["value"])
                       for r in read_journal(run_dir / JOURNAL) if r["kind"] == "metric")
    held = sorted((m.key, m.step, m.timestamp, m.value) for key in client.get_run(run_id).data.metrics
                  for m in client.get_metric_history(run_id, key))
    return held == journaled and client.get_run(run_id).info.status == "FINISHED", len(held), len(journaled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (tracked, off), interleaved")
    parser.add_argument("--steps", type=int, default=STEPS_PER_EPOCH, help="training steps per run (train.max_steps)")
    parser.add_argument("--delay-ms", type=float, default=200.0, help="what the proxy adds to every request")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tracking_overhead.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gppq_tracking_bench_") as tmp:
        folder = Path(tmp)
        data = folder / "digits"
        write_digits(data, size=32)
        (folder / "store").mkdir()
        server = start_server(folder / "store")
        proxy = DelayingProxy(server.port, args.delay_ms / 1000)
        try:
            times: dict[str, list[float]] = {"tracked": [], "off": []}
            walls: dict[str, list[float]] = {"tracked": [], "off": []}
            pair_ratios, checks, requests = [], [], []
            load_before = os.getloadavg()[0]
            for repeat in range(args.repeats):
                order = ("tracked", "off") if repeat % 2 == 0 else ("off", "tracked")
                got = {}
                for kind in order:
                    name = f"{kind}{repeat}"
                    tracking = ({"uri": proxy.url, "experiment": "overhead", "log_every": 1} if kind == "tracked"
                                else {"enabled": False})
                    config = write_config(folder, name, data, args.steps, tracking)
                    before = len(proxy.requests)
                    summary = train(config, folder / f"{name}.log")
                    got[kind] = step_s(summary)
                    times[kind].append(got[kind])
                    walls[kind].append(summary["wall_s"])
                    if kind == "tracked":
                        requests.append(len(proxy.requests) - before)
                        checks.append(store_matches_journal(server.url, folder / "runs" / name))
                    print(f"repeat {repeat + 1}/{args.repeats} {kind}: {got[kind] * 1e3:.1f} ms/step "
                          f"({summary['steps']} steps)", flush=True)
                pair_ratios.append(got["tracked"] / got["off"])
        finally:
            proxy.close()
            server.stop()

    off, tracked = statistics.median(times["off"]), statistics.median(times["tracked"])
    ratio = tracked / off
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    all_held = all(ok for ok, _, _ in checks)
    lines = [
        f"`gppq train`, ResNet-18 (10 classes) on the digits, 32x32, batch 64, {args.steps} steps per run, 1 process "
        f"on the CPU; tracking through a proxy that answers every request {args.delay_ms:.0f} ms late, "
        f"`tracking.log_every: 1`; {args.repeats} runs of each kind, interleaved; "
        f"goal: tracked / off <= {GOAL:.2f}x ({'met' if ratio <= GOAL else 'NOT met'})",
        "",
        "| tracking | runs | ms/step (median) | range ms | vs off | run wall s (median) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| off | {len(times['off'])} | {off * 1e3:.1f} | {min(times['off']) * 1e3:.1f}-{max(times['off']) * 1e3:.1f} "
        f"| 1.000x | {statistics.median(walls['off']):.1f} |",
        f"| MLflow server {args.delay_ms:.0f} ms away | {len(times['tracked'])} | {tracked * 1e3:.1f} | "
        f"{min(times['tracked']) * 1e3:.1f}-{max(times['tracked']) * 1e3:.1f} | {ratio:.3f}x | "
        f"{statistics.median(walls['tracked']):.1f} |",
        "",
        f"per-pair ratios: median {statistics.median(pair_ratios):.3f}x (range {min(pair_ratios):.3f}-"
        f"{max(pair_ratios):.3f}); requests per tracked run through the proxy: {', '.join(map(str, requests))} "
        f"(for {args.steps} per-step records of 3 metrics each, plus start, epoch, end and files)",
        f"store after each tracked run: {'holds exactly the journal' if all_held else 'DIFFERS from the journal'} "
        "(metric values held / journaled: " + ", ".join(f"{held}/{journaled}" for _, held, journaled in checks) + ")",
        f"Python {platform.python_version()}, {platform.machine()}, {cores} cores available; 1-min load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")
    if not all_held:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
