"""What only a GPU can show, in one table: ``make gpu-check`` (one GPU, under 8 minutes).

Rows (``--list`` prints them), each run in a process of its own with its own time limit,
so that one failing, hanging or crashing row leaves the others alone:

- ``pytest``: the GPU-only tests, ``pytest -m gpu`` (passed / failed / skipped counts);
- ``baseline``: the demo's baseline (``gppq pretrain``, the demo's 15 epochs) on the GPU,
  cached in the check's run folder; the G&P rows start from it (from ``model.weights:
  random`` if it failed);
- ``ddp``, ``zero1``, ``bf16``: the demo's G&P stage on one GPU under torchrun (``torchrun
  --standalone --nproc_per_node=1 -m gppq_dist.train``, a ``cpu:gloo,cuda:nccl`` group at
  world size 1) with DDP, with DeepSpeed ZeRO-1 (``configs/deepspeed/zero1.json``) and
  with bf16 autocast: wall time, train-loop images/s (``summary.json``'s steps x batch /
  ``timing.train_loop_s``), top-1 of the quantized model;
- ``dali``: train-loader images/s, DALI ``mixed`` (nvJPEG, ``data.device: gpu``) against
  torchvision's ``DataLoader`` on synthetic 500x375 JPEGs cropped to 224 (the folder and
  the epoch timing of ``benchmarks/data_loading.py``), both counted once the batch is on
  the GPU;
- ``kmeans``: the initial k-means of ResNet-50's small-block layers (random weights, 20
  Lloyd iterations), the torch kernel on the GPU against faiss on the CPU;
- ``step_resnet18``, ``step_resnet50``: a G&P training step against a plain one at batch
  256 of 224x224 (``benchmarks/step_time.py``'s ``measure`` on the GPU);
- ``ranks2``: the demo's G&P stage on two GPUs (``--nproc_per_node=2``), where two are
  visible.

The table goes to stdout and to ``benchmarks/results/gpu_check.md``; every row's output
to ``benchmarks/results/gpu_check/logs/<row>.log``. A failed row shows the first line of
its error; the exit status is 1 when a row failed, 0 otherwise. Rows run in the order
above until ``--budget`` seconds are spent; a row never gets more than what is left.

Without a CUDA device the script prints one line and exits 0, before importing torch.

    .venv/bin/python benchmarks/gpu_check.py [--list] [--only ROW ...] [--budget 450] [--gp-epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "gpu_check"  # data, runs and logs of the check (an ignored folder)
TABLE = RESULTS / "gpu_check.md"
DEMO = ROOT / "configs" / "demo_digits.yaml"
BUDGET_S = 450  # of the 8 minutes `make gpu-check` may take: the rest is start-up and margin
MIN_ROW_S = 20  # a row is not started with less time than this left
STOP_GRACE_S = 15  # after SIGTERM (torchrun passes it on to its workers), then SIGKILL
# a row's own commands stop this much before the row's limit, so the row reports them itself
ROW_MARGIN_S = 2 * STOP_GRACE_S + 5
# the loader comparison: data_loading.py's folder (shared with `make bench`), bigger batches
SYNTHETIC_CLASSES, SYNTHETIC_PER_CLASS = 100, 20
NO_CUDA = ("gpu-check: no CUDA device is visible to this process ({why}); nothing to check here: "
           "run `make gpu-check` on a machine with an NVIDIA GPU")


@dataclass(frozen=True)
class Row:
    key: str
    name: str
    timeout_s: int  # the most this row may take (it also gets no more than the budget left)
    gpus: int = 1


ROWS = (
    Row("pytest", "GPU-only tests: `pytest -m gpu`", 240),
    Row("baseline", "demo baseline: `gppq pretrain` on 1 GPU (the G&P rows start from it)", 100),
    Row("ddp", "demo G&P stage, 1 GPU, torchrun + DDP (NCCL group at world size 1)", 120),
    Row("zero1", "demo G&P stage, 1 GPU, torchrun + DeepSpeed ZeRO-1", 150),
    Row("bf16", "demo G&P stage, 1 GPU, torchrun + DDP, bf16 autocast", 120),
    Row("dali", "train loader: DALI `mixed` (nvJPEG) vs torchvision DataLoader, 500x375 JPEGs -> 224", 120),
    Row("kmeans", "k-means of ResNet-50 small-block layers: torch kernel on the GPU vs faiss on the CPU", 120),
    Row("step_resnet18", "step time ResNet-18, batch 256, 224x224: G&P vs plain", 100),
    Row("step_resnet50", "step time ResNet-50, batch 256, 224x224: G&P vs plain", 140),
    Row("ranks2", "demo G&P stage, 2 GPUs: torchrun --nproc_per_node=2 (DDP, NCCL)", 150, gpus=2),
)
BY_KEY = {row.key: row for row in ROWS}


# --- finding a GPU without importing torch ---------------------------------------------


def cuda_devices_visible() -> tuple[int, str]:
    """(devices the CUDA driver shows this process, why none) without importing torch:
    ``cuInit`` and ``cuDeviceGetCount`` of libcuda, which honour ``CUDA_VISIBLE_DEVICES``."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0, "no NVIDIA driver: libcuda.so.1 cannot be loaded"
    status = driver.cuInit(0)
    if status != 0:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        return 0, f"cuInit returned CUDA error {status}" + (
            f", CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None else "")
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the driver lists no device"
    return count.value, ""


# --- running commands with a time limit -------------------------------------------------


def stop(process: subprocess.Popen) -> None:
    """End a command started by :func:`run_command` and everything in its process group:
    SIGTERM first (torchrun then stops its workers, which run in sessions of their own),
    SIGKILL if it is still running after ``STOP_GRACE_S``."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def run_command(command: list[str], timeout: float, log_path: Path, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> tuple[int | None, str, float]:
    """Run ``command`` with its output appended to ``log_path``: (exit status, or None when
    it ran past ``timeout`` seconds and was stopped; its output; seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(map(str, command))}\n")
        log.flush()
        offset = log.tell()
        started = time.monotonic()
        process = subprocess.Popen([str(part) for part in command], cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            status: int | None = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop(process)
            status = None
        except BaseException:  # Ctrl-C: leave nothing running
            stop(process)
            raise
        seconds = time.monotonic() - started
    with open(log_path, errors="replace") as log:
        log.seek(offset)
        return status, log.read(), seconds


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)(?::|$)")


def error_line(output: str) -> str:
    """The first line of the error in a command's output: its first ``error:`` line (our
    CLI's one-line errors), else its first exception line (the root cause of a chained
    traceback; torchrun's own ChildFailedError report is passed over), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return shorten(line)
    for line in lines:
        if _EXCEPTION.match(line) and "ChildFailedError" not in line.split(":")[0]:
            return shorten(line)
    return shorten(lines[-1]) if lines else "no output"


def shorten(text: str, width: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def python() -> str:
    return sys.executable


def venv_script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def child_env() -> dict[str, str]:
    # rich wraps log lines at 80 columns when not on a terminal: wide enough to keep each line whole
    return {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


# --- the rows (each runs in `gpu_check.py --row KEY`, its own process) -----------------


def result(ok: bool, numbers: str, note: str = "") -> dict[str, Any]:
    return {"ok": ok, "numbers": numbers, "note": note}


def row_pytest(args: argparse.Namespace, timeout: float, log: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ElementTree

    report = WORK / "pytest_gpu.xml"
    report.unlink(missing_ok=True)
    status, output, _ = run_command(
        [python(), "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        timeout, log, env=child_env())
    if status is None:
        return result(False, "", f"timed out after {timeout:.0f} s")
    if not report.is_file():
        return result(False, "", error_line(output))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    first_failure = ""
    for suite in ElementTree.parse(report).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            problem = case.find("failure")
            problem = problem if problem is not None else case.find("error")
            if problem is not None and not first_failure:
                message = (problem.get("message") or problem.text or "").strip().splitlines()
                first_failure = f"{case.get('name')}: {message[0] if message else 'failed'}"
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    numbers = f"{passed} passed, {failed} failed, {counts['skipped']} skipped"
    if failed or status != 0:
        return result(False, numbers, first_failure or error_line(output))
    if passed == 0:
        return result(False, numbers, "no GPU test ran: does pytest see the GPU?")
    return result(True, numbers)


def demo_sets(name: str, weights: str | None = None, **more: Any) -> list[str]:
    """``--set`` arguments: the demo config, run in the check's own folders, untracked."""
    sets = {"name": name, "output_dir": str(WORK / "runs"), "data.root": str(WORK / "digits"),
            "tracking.enabled": "false", **more}
    if weights is not None:
        sets["model.weights"] = weights
    out: list[str] = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    return out


def baseline_summary() -> dict[str, Any] | None:
    """The check's cached baseline if one was trained with the demo's settings, else None."""
    from gppq_dist.config import load_config
    from gppq_dist.pretrain import cached_baseline

    cfg = load_config(DEMO, {"name": "gpu_baseline", "output_dir": str(WORK / "runs"),
                             "data.root": str(WORK / "digits")})
    return cached_baseline(cfg)


def ensure_digits() -> None:
    from gppq_dist.data.digits import write_digits

    write_digits(WORK / "digits", size=32)  # kept when a complete folder is there


def row_baseline(args: argparse.Namespace, timeout: float, log: Path) -> dict[str, Any]:
    ensure_digits()
    status, output, seconds = run_command([venv_script("gppq"), "pretrain", "--config", DEMO,
                                           *demo_sets("gpu_baseline")], timeout, log, env=child_env())
    if status != 0:
        return result(False, "", f"timed out after {timeout:.0f} s" if status is None else error_line(output))
    summary = baseline_summary()
    if summary is None:
        return result(False, "", "gppq pretrain exited 0 but left no baseline")
    cached = "cached by an earlier check, " if "(cached)" in output else ""
    return result(True, f"{cached}{summary['epochs']} epochs, top-1 {summary['top1']:.2f}%, "
                        f"training {summary['wall_s']:.1f} s (command {seconds:.0f} s)")


def gp_row(name: str, nproc: int, more: dict[str, Any], args: argparse.Namespace, timeout: float,
           log: Path) -> dict[str, Any]:
    """The demo's G&P stage under torchrun on ``nproc`` GPUs, ``more`` settings on top."""
    ensure_digits()
    baseline = baseline_summary()
    weights = baseline["weights"] if baseline is not None else "random"
    if args.gp_epochs is not None:
        more = {**more, "train.epochs": args.gp_epochs}
    run_dir = WORK / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: checkpoints of an earlier check would resume
    command = [venv_script("torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "gppq_dist.train",
               "--config", DEMO, *demo_sets(name, weights, **more)]
    status, output, seconds = run_command(command, timeout, log, env=child_env())
    if status != 0:
        return result(False, "", f"timed out after {timeout:.0f} s" if status is None else error_line(output))
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return result(False, "", f"torchrun exited 0 but {summary_path} is missing")
    summary = json.loads(summary_path.read_text())
    from gppq_dist.config import load_config

    batch = load_config(DEMO, more).train.batch_size  # global, split over the ranks
    loop_s = (summary.get("timing") or {}).get("train_loop_s")
    rate = (f"{summary['steps'] * batch / loop_s:,.0f} img/s in the train loop ({loop_s:.1f} s)"
            if loop_s else "img/s n/a (no timing.train_loop_s in summary.json)")
    start = "baseline" if baseline is not None else "random init"
    epochs = f"{summary['epochs']} epoch" + ("s" if summary["epochs"] != 1 else "")
    numbers = (f"torchrun {seconds:.0f} s; {epochs}, {summary['steps']} steps x {batch}: {rate}; "
               f"top-1 quantized {summary['top1_quantized']:.2f}% ({start} {summary['baseline_top1']:.2f}%, "
               f"direct PQ {summary['direct_pq_top1']:.2f}%), {summary['ratio']:.1f}x smaller")
    problems = []
    if summary.get("world_size") != nproc:
        problems.append(f"world_size {summary.get('world_size')}, expected {nproc}")
    for key in ("engine", "precision"):
        wanted = more.get(f"train.{key}")
        if wanted is not None and summary.get(key) != wanted:
            problems.append(f"{key} {summary.get(key)}, expected {wanted}")
    if "cpu:gloo,cuda:nccl" not in output:
        problems.append("the log does not name the process group cpu:gloo,cuda:nccl")
    if "cuda:0" not in output:
        problems.append("the log does not name the device cuda:0")
    # from the baseline, G&P must keep its accuracy (the CPU demo ends 0.56 points under);
    # from a random init it must at least have learned
    floor = summary["baseline_top1"] - 3.0 if baseline is not None else summary["baseline_top1"]
    if not summary["top1_quantized"] > floor:
        problems.append(f"top-1 quantized {summary['top1_quantized']:.2f}% is not above {floor:.2f}%")
    return result(not problems, numbers, "; ".join(problems))


def row_ddp(args, timeout, log):
    return gp_row("gpu_ddp", 1, {}, args, timeout, log)


def row_zero1(args, timeout, log):
    return gp_row("gpu_zero1", 1, {"train.engine": "deepspeed",
                                   "train.deepspeed_config": str(ROOT / "configs" / "deepspeed" / "zero1.json")},
                  args, timeout, log)


def row_bf16(args, timeout, log):
    return gp_row("gpu_bf16", 1, {"train.precision": "bf16"}, args, timeout, log)


def row_ranks2(args, timeout, log):
    return gp_row("gpu_ranks2", 2, {}, args, timeout, log)


class OnDevice:
    """A loader's batches as the trainer gets them, on ``device``; the epoch ends when the
    GPU holds every batch (a ``torch.cuda.synchronize`` after the last one), so the time of
    ``data_loading.timed_epoch`` covers work DALI queued asynchronously."""

    def __init__(self, loader, device) -> None:
        self.loader, self.device = loader, device

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        import torch

        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        torch.cuda.synchronize(self.device)


def synthetic_folder() -> Path:
    return RESULTS / "synthetic_imagenet"  # benchmarks/data_loading.py's default folder


def prepare_synthetic() -> None:
    import data_loading

    data_loading.ensure_folder(synthetic_folder(), SYNTHETIC_CLASSES, SYNTHETIC_PER_CLASS)


def row_dali(args: argparse.Namespace, timeout: float, log: Path) -> dict[str, Any]:
    import data_loading
    import torch

    from gppq_dist.config import DataConfig
    from gppq_dist.data.dali import DaliLoader
    from gppq_dist.data.folder import LoaderSpec, TorchvisionLoader
    from gppq_dist.data.layout import index_split

    prepare_synthetic()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers, batch, epochs = min(8, cores), 128, 3
    device = torch.device("cuda", 0)
    settings = dict(root=str(synthetic_folder()), image_size=224, workers=workers)
    gpu, cpu = DataConfig(**settings, device="gpu"), DataConfig(**settings, device="cpu")
    samples = index_split(gpu, "train").samples
    loaders = {
        "DALI mixed": OnDevice(DaliLoader(LoaderSpec(samples, gpu, train=True, batch_size=batch), device_id=0), device),
        "torchvision": OnDevice(TorchvisionLoader(LoaderSpec(samples, cpu, train=True, batch_size=batch)), device),
    }
    totals = {name: [0, 0.0] for name in loaders}
    for epoch in range(epochs):
        for name, loader in loaders.items():  # interleaved, as data_loading.py does
            images, seconds = data_loading.timed_epoch(loader, epoch, skip_first=epoch == 0)
            totals[name][0] += images
            totals[name][1] += seconds
    rates = {name: images / seconds for name, (images, seconds) in totals.items() if seconds > 0}
    if len(rates) != 2 or not all(rates.values()):
        return result(False, "", f"a loader delivered nothing: {totals}")
    ratio = rates["DALI mixed"] / rates["torchvision"]
    return result(True, f"DALI mixed {rates['DALI mixed']:,.0f} img/s vs torchvision {rates['torchvision']:,.0f} "
                        f"img/s ({ratio:.2f}x); {len(samples):,} JPEGs, batch {batch}, {workers} DALI threads / "
                        f"DataLoader workers, {epochs} epochs each, interleaved, first batch not timed")


def row_kmeans(args: argparse.Namespace, timeout: float, log: Path) -> dict[str, Any]:
    import torch  # before faiss (kmeans_vs_faiss imports it): one OpenMP runtime
    from kmeans_vs_faiss import cpu_model

    from gppq_dist.compress import cluster
    from gppq_dist.config import load_config
    from gppq_dist.distributed import DistContext
    from gppq_dist.models import load_model

    config = ROOT / "configs" / "resnet50_small_blocks.yaml"
    iterations = 20
    # seeded random weights, as benchmarks/kmeans_whole_model.py (no download on a GPU node)
    settings = {"kmeans.iterations": iterations, "model.weights": "random"}
    on_cpu = load_config(config, {**settings, "kmeans.kernel": "faiss"})
    on_gpu = load_config(config, {**settings, "kmeans.kernel": "torch"})
    model = load_model(on_cpu)
    cuda = torch.device("cuda", 0)
    warm = torch.ones(64, 64, device=cuda)
    (warm @ warm).sum().item()  # CUDA context and cuBLAS start-up, not timed
    started = time.perf_counter()
    faiss_run = cluster(model, on_cpu, DistContext(0, 1, 0, torch.device("cpu")))
    faiss_s = time.perf_counter() - started
    torch.cuda.synchronize(cuda)
    started = time.perf_counter()
    torch_run = cluster(model, on_gpu, DistContext(0, 1, 0, cuda))
    torch.cuda.synchronize(cuda)
    torch_s = time.perf_counter() - started
    gap = abs(torch_run.gamma - faiss_run.gamma) / max(faiss_run.gamma, 1e-30)
    subvectors = sum(plan.n_subvectors for plan in torch_run.plans)
    numbers = (f"torch on GPU {torch_s:.2f} s vs faiss on CPU {faiss_s:.2f} s ({faiss_s / torch_s:.1f}x); "
               f"Gamma {torch_run.gamma:.4e} vs {faiss_run.gamma:.4e}; {len(torch_run.plans)} layers, "
               f"{subvectors:,} subvectors, {iterations} iterations; faiss on {torch.get_num_threads()} threads "
               f"({cpu_model()})")
    # the same seeding and Lloyd iterations, only the nearest-codeword kernel differs
    return result(gap <= 0.02, numbers, "" if gap <= 0.02 else f"Gamma differs by {gap:.1%} (more than 2%)")


def step_row(arch: str) -> Callable[[argparse.Namespace, float, Path], dict[str, Any]]:
    def row(args: argparse.Namespace, timeout: float, log: Path) -> dict[str, Any]:
        import step_time

        batch, size, steps, repeats = 256, 224, 3, 5
        measured = step_time.measure(ROOT / "configs" / f"{arch}_small_blocks.yaml", "cuda:0", batch=batch,
                                     size=size, steps=steps, repeats=repeats, warmup=2)
        ms, ratio = measured["ms"], measured["ratio"]
        goal = "met" if ratio <= step_time.GOAL else "NOT met"
        return result(True, f"plain {ms['plain']:.1f} ms ({batch / ms['plain'] * 1e3:,.0f} img/s), G&P "
                            f"{ms['G&P']:.1f} ms ({ratio:.3f}x, goal <= {step_time.GOAL:.2f}x {goal}), G&P generic "
                            f"{ms['G&P generic']:.1f} ms ({ms['G&P generic'] / ms['plain']:.3f}x); median of "
                            f"{repeats} x {steps} steps each, fp32")

    return row


RUNNERS: dict[str, Callable[[argparse.Namespace, float, Path], dict[str, Any]]] = {
    "pytest": row_pytest,
    "baseline": row_baseline,
    "ddp": row_ddp,
    "zero1": row_zero1,
    "bf16": row_bf16,
    "dali": row_dali,
    "kmeans": row_kmeans,
    "step_resnet18": step_row("resnet18"),
    "step_resnet50": step_row("resnet50"),
    "ranks2": row_ranks2,
}


def child(args: argparse.Namespace) -> int:
    """``--row KEY``: run one row here, write its result as JSON to ``--result``."""
    log = WORK / "logs" / f"{args.row}.log"
    # stopped by the check (SIGTERM): unwind, so that run_command stops the row's own command
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        outcome = RUNNERS[args.row](args, args.timeout - ROW_MARGIN_S, log)
    except Exception as exc:  # the row fails, the check goes on
        traceback.print_exc()
        message = str(exc).strip().splitlines()
        outcome = result(False, "", shorten(f"{type(exc).__name__}: {message[0] if message else ''}"))
    Path(args.result).write_text(json.dumps(outcome))
    return 0


# --- the check ---------------------------------------------------------------------------


def render(header: str, rows: list[tuple[Row, dict[str, Any]]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [header, "", "| # | check | result | wall s | numbers |", "|---:|---|---|---:|---|"]
    for index, (row, outcome) in enumerate(rows, 1):
        wall = f"{outcome['wall_s']:.0f}" if outcome.get("wall_s") is not None else "-"
        lines.append(f"| {index} | {cell(row.name)} | {cell(outcome['result'])} | {wall} | "
                     f"{cell(outcome.get('numbers') or '-')} |")
    return "\n".join(lines)


def run_row(row: Row, timeout: float, args: argparse.Namespace) -> dict[str, Any]:
    log = WORK / "logs" / f"{row.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    outcome_path = WORK / "logs" / f"{row.key}.json"
    outcome_path.unlink(missing_ok=True)
    command = [python(), Path(__file__).resolve(), "--row", row.key, "--result", outcome_path,
               "--timeout", f"{timeout:.0f}"]
    if args.gp_epochs is not None:
        command += ["--gp-epochs", str(args.gp_epochs)]
    status, output, seconds = run_command(command, timeout, log, env=child_env())
    if outcome_path.is_file():
        outcome = json.loads(outcome_path.read_text())
        verdict = "pass" if outcome["ok"] else f"FAIL: {outcome['note'] or 'see the log'}"
        if outcome["ok"] and outcome["note"]:
            verdict += f" ({outcome['note']})"
        return {"result": verdict, "numbers": outcome["numbers"], "wall_s": seconds}
    why = f"timed out after {timeout:.0f} s" if status is None else error_line(output)
    return {"result": f"FAIL: {why}", "numbers": "", "wall_s": seconds}


def check(args: argparse.Namespace) -> int:
    visible, why = cuda_devices_visible()
    if visible == 0:
        print(NO_CUDA.format(why=why))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA.format(why=f"the driver lists {visible} device(s), but torch {torch.__version__} "
                                 "cannot use them"))
        return 0
    gpus = torch.cuda.device_count()
    header = (f"gpu-check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} "
              f"(CUDA {torch.version.cuda}), Python {sys.version.split()[0]}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}; logs in {WORK.relative_to(ROOT)}/logs/")
    selected = [BY_KEY[key] for key in args.only] if args.only else list(ROWS)
    WORK.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    prepare = None
    if any(row.key == "dali" for row in selected):  # write the JPEGs on a CPU core while the GPU rows run
        (WORK / "logs").mkdir(exist_ok=True)
        with open(WORK / "logs" / "prepare.log", "w") as prepare_log:
            prepare = subprocess.Popen([python(), str(Path(__file__).resolve()), "--prepare"], cwd=ROOT,
                                       stdout=prepare_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env=child_env())
    rows: list[tuple[Row, dict[str, Any]]] = []
    try:
        for index, row in enumerate(selected, 1):
            left = deadline - time.monotonic()
            if row.gpus > gpus:
                rows.append((row, {"result": f"skipped: needs {row.gpus} GPUs, {gpus} visible"}))
                continue
            if left < MIN_ROW_S:
                rows.append((row, {"result": f"skipped: the {args.budget:.0f} s budget was spent"}))
                continue
            timeout = min(row.timeout_s, left)
            if row.key == "dali" and prepare is not None:
                try:
                    prepare.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    stop(prepare)
                    rows.append((row, {"result": "FAIL: writing the synthetic JPEGs took the row's whole time"}))
                    continue
                timeout = min(row.timeout_s, deadline - time.monotonic())
                if timeout < MIN_ROW_S:
                    rows.append((row, {"result": f"skipped: the {args.budget:.0f} s budget was spent"}))
                    continue
            print(f"gpu-check [{index}/{len(selected)}] {row.name} (at most {timeout:.0f} s)", file=sys.stderr,
                  flush=True)
            outcome = run_row(row, timeout, args)
            print(f"gpu-check [{index}/{len(selected)}] {outcome['result']} in {outcome['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
            rows.append((row, outcome))
    finally:
        if prepare is not None and prepare.poll() is None:
            stop(prepare)
    table = render(header, rows)
    print(table)
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(table + "\n")
    print(f"\nwritten to {TABLE.relative_to(ROOT)}", file=sys.stderr)
    return 1 if any(outcome["result"].startswith("FAIL") for _, outcome in rows) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the rows (key and name) and exit")
    parser.add_argument("--only", nargs="+", choices=list(BY_KEY), metavar="ROW", help="run only these rows")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all rows together")
    parser.add_argument("--gp-epochs", type=int, default=None,
                        help="G&P epochs of the torchrun rows (default: the demo's 12; after fewer than about 3 "
                             "the quantized model has not caught up with the raw one and the rows fail)")
    parser.add_argument("--row", choices=list(BY_KEY), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for row in ROWS:
            print(f"{row.key}: {row.name}" + (f" (needs {row.gpus} GPUs)" if row.gpus > 1 else ""))
        return 0
    if args.prepare:
        prepare_synthetic()
        return 0
    if args.row:
        return child(args)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
