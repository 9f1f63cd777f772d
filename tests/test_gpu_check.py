"""`make gpu-check` on a machine without a GPU, and the parts of benchmarks/gpu_check.py that
need none: one line and exit 0 before torch is imported, the row list, the time limit of a
command, the error line of a failed command, and a failing row reported by the real row
process. The GPU rows themselves run only where there is a GPU."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_prints_one_line_and_exits_0_before_importing_torch():
    completed = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT)], cwd=ROOT, env=NO_GPU,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0]
    imported = [line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines()
                if line.startswith("import time:")]
    assert "json" in imported  # -X importtime did report the imports
    assert "torch" not in imported


def test_the_row_list_names_every_check():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--list"], cwd=ROOT, env=NO_GPU,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    rows = dict(line.split(": ", 1) for line in completed.stdout.splitlines())
    assert list(rows) == ["pytest", "baseline", "ddp", "zero1", "bf16", "dali", "kmeans", "step_resnet18",
                          "step_resnet50", "ranks2"]
    assert "pytest -m gpu" in rows["pytest"]
    assert "1 GPU" in rows["ddp"] and "DDP" in rows["ddp"] and "NCCL" in rows["ddp"]
    assert "DeepSpeed ZeRO-1" in rows["zero1"]
    assert "bf16" in rows["bf16"]
    assert "DALI `mixed`" in rows["dali"] and "torchvision DataLoader" in rows["dali"]
    assert "k-means" in rows["kmeans"] and "GPU" in rows["kmeans"] and "faiss on the CPU" in rows["kmeans"]
    assert "ResNet-18, batch 256, 224x224" in rows["step_resnet18"]
    assert "ResNet-50, batch 256, 224x224" in rows["step_resnet50"]
    assert "2 GPUs" in rows["ranks2"] and "--nproc_per_node=2" in rows["ranks2"]


def test_a_command_past_its_time_limit_is_stopped(tmp_path):
    gpu_check = load_script()
    started = time.monotonic()
    status, output, seconds = gpu_check.run_command(
        [sys.executable, "-c", "import threading; print('waiting', flush=True); threading.Event().wait()"],
        timeout=1, log_path=tmp_path / "log")
    assert status is None  # stopped, not finished
    assert "waiting" in output
    assert 1 <= seconds < gpu_check.STOP_GRACE_S
    assert time.monotonic() - started < gpu_check.STOP_GRACE_S  # SIGTERM ended it, no SIGKILL wait
    status, output, _ = gpu_check.run_command([sys.executable, "-c", "print('done')"], timeout=60,
                                              log_path=tmp_path / "log")
    assert status == 0 and output.strip().endswith("done")


def test_the_error_line_is_the_root_cause_of_a_traceback(tmp_path):
    gpu_check = load_script()
    code = ("try:\n    raise ValueError('no such file: a.JPEG\\nsecond line')\n"
            "except ValueError as exc:\n    raise RuntimeError('the loader failed') from exc\n")
    status, output, _ = gpu_check.run_command([sys.executable, "-c", code], timeout=60, log_path=tmp_path / "log")
    assert status == 1
    assert gpu_check.error_line(output) == "ValueError: no such file: a.JPEG"
    assert gpu_check.error_line("INFO starting\nerror: data.root: 'x' has no train folder\n") == \
        "error: data.root: 'x' has no train folder"


def test_a_failing_row_is_reported_with_its_error_and_the_table_stays_a_table(tmp_path, monkeypatch):
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "WORK", tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the row's process sees no GPU, wherever this runs
    args = argparse.Namespace(gp_epochs=None)
    outcome = gpu_check.run_row(gpu_check.BY_KEY["step_resnet18"], 300, args)
    assert outcome["result"].startswith("FAIL: RuntimeError: "), outcome
    assert outcome["wall_s"] > 0
    assert "Traceback" in (tmp_path / "logs" / "step_resnet18.log").read_text()
    skipped = {"result": "skipped: needs 2 GPUs, 1 visible"}
    table = gpu_check.render("header", [(gpu_check.BY_KEY["step_resnet18"], outcome),
                                        (gpu_check.BY_KEY["ranks2"], skipped)]).splitlines()
    assert table[0] == "header" and table[2].startswith("| # |")
    cells = table[2].count("|")
    assert [line.replace("\\|", "").count("|") for line in table[4:]] == [cells, cells]
    assert table[5].endswith("| skipped: needs 2 GPUs, 1 visible | - | - |")
