"""`gppq train` end to end on the digits data: one process, two (torchrun, gloo), two
torchrun agents meeting through a c10d rendezvous, restarts, resumes and a diverging run.

Digits: 1,438 train images; batch 64 in all -> 22 steps per epoch, 2 epochs, a checkpoint
every 5 steps. Resumes are checked bit for bit against an uninterrupted run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.config import load_config
from gppq_dist.data.loaders import build_loader
from gppq_dist.evaluate import evaluate
from gppq_dist.train import checkpoint
from tests.conftest import CONFIGS, gppq, gppq_here, torchrun, write_config
from tests.distributed_helpers import free_port

STEPS_PER_EPOCH = 22


def digits_config(tmp_path, digits_dir, name, **train):
    return write_config(
        tmp_path, name=name,
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3},
        train={"epochs": 2, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 5, **train},
    )


def summary_of(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def assert_same_model(one_path, two_path):
    """Codebooks, assignments, unquantized params, folded BN (and the codecs' extra tensors:
    CLIP-Q's masks, TSQ's input quantizers) all torch.equal."""
    one, two = read_artifact(one_path), read_artifact(two_path)
    for group in ("codebooks", "assignments", "params", "bn_scale", "bn_shift", "extras"):
        ours, theirs = getattr(one, group), getattr(two, group)
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), f"{group}/{name}"


def model_tensors(model_state):
    """Every tensor of a checkpoint's model state, G&P's extra state (psi, R0) included."""
    for value in model_state.values():
        yield from (value.values() if isinstance(value, dict) else [value])


def check_run(tmp_path, name):
    summary = summary_of(tmp_path, name)
    for key in ("baseline_top1", "direct_pq_top1", "top1_quantized", "top1_raw", "size_mb",
                "file_bytes", "ratio", "epochs", "wall_s", "world_size"):
        assert key in summary, key
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    # the pull toward the codewords works: Gamma shrinks every epoch (eq. 8)
    gammas = [epoch["gamma"] for epoch in summary["history"]]
    assert gammas == sorted(gammas, reverse=True) and gammas[-1] < gammas[0] * 0.5
    # the artifact is the model that was scored "with quantization" (same val loader here;
    # `gppq eval` reads with torchvision, whose resize differs by up to 1/255 per pixel)
    cfg = load_config(tmp_path / f"{name}.yaml")
    scored = evaluate(rebuild_model(read_artifact(summary["artifact"])), build_loader(cfg.data, "val"))
    assert scored["top1"] == pytest.approx(summary["top1_quantized"], abs=100 / 359 + 1e-9)
    assert summary["file_bytes"] <= summary["size_mb"] * 2**20 * 1.01 + 64 * 1024
    saved = load_config(tmp_path / "runs" / name / "config.yaml")  # the resolved config, loadable
    assert saved.train == cfg.train
    return summary


def resume_mid_epoch_and_compare(tmp_path, config, name, *extra):
    """Drop the run's epoch-end checkpoint and outputs, resume from the mid-epoch one
    before it (epoch 2, batch 18: step 40), and compare with the finished run."""
    run = tmp_path / "runs" / name
    finished = tmp_path / f"{name}-finished.gppq"
    (run / "gppq.gppq").rename(finished)
    history = summary_of(tmp_path, name)["history"]
    newest, before = checkpoint.saved(run)
    assert (newest.name, before.name) == ("step_00000044.pt", "step_00000040.pt")
    newest.unlink()
    (run / "summary.json").unlink()
    (gppq if "--nproc" in extra else gppq_here)("train", "--config", config, "--resume", "auto", *extra, check=True)
    summary = summary_of(tmp_path, name)
    assert summary["resumed_from"].endswith("step_00000040.pt")
    assert summary["history"] == history
    assert_same_model(finished, run / "gppq.gppq")


@pytest.fixture(scope="module")
def one_reference(tmp_path_factory, digits_dir):
    """An uninterrupted 1-process run of 2 epochs: (its folder, the train command's output).
    Its mid-epoch checkpoints change nothing, so it is also the straight run that the
    resumed ones below must equal."""
    folder = tmp_path_factory.mktemp("one_reference")
    result = gppq_here("train", "--config", digits_config(folder, digits_dir, "one"), check=True)
    return folder, result


def test_train_one_process_and_resume_mid_epoch(one_reference, tmp_path, digits_dir):
    folder, result = one_reference
    summary = check_run(folder, "one")
    assert summary["world_size"] == 1 and summary["epochs"] == 2
    assert "top-1" in result.stdout
    state = torch.load(checkpoint.saved(folder / "runs" / "one")[1], weights_only=True)
    assert (state["epoch"], state["batch"], state["epoch_done"]) == (2, 18, False)
    shutil.copytree(folder / "runs", tmp_path / "runs")  # a copy to cut back and resume
    resume_mid_epoch_and_compare(tmp_path, digits_config(tmp_path, digits_dir, "one"), "one")


def test_resume_after_an_epoch_with_more_epochs(one_reference, tmp_path, digits_dir):
    straight, _ = one_reference
    split = digits_config(tmp_path, digits_dir, "split", checkpoint_every=0)
    gppq_here("train", "--config", split, "--set", "train.epochs=1", check=True)  # "interrupted" after epoch 1
    assert [p.name for p in checkpoint.saved(tmp_path / "runs" / "split")] == ["step_00000022.pt"]
    resumed = gppq_here("train", "--config", split, "--resume", "auto", check=True)
    assert "resuming from" in resumed.stderr
    assert_same_model(straight / "runs" / "one" / "gppq.gppq", tmp_path / "runs" / "split" / "gppq.gppq")
    assert summary_of(straight, "one")["history"] == summary_of(tmp_path, "split")["history"]

    # a damaged newest checkpoint: the one before is used
    folder = checkpoint.checkpoint_dir(tmp_path / "runs" / "split")
    newest = folder / "step_00000044.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    state = checkpoint.latest(tmp_path / "runs" / "split")
    assert state["global_step"] == 22 and set(state["scheme"]["psi"]) and isinstance(state["history"], list)

    # a fresh start over existing checkpoints is refused; so is resuming with other settings
    fresh = gppq_here("train", "--config", split)
    assert fresh.returncode == 2 and "--resume auto" in fresh.stderr and "Traceback" not in fresh.stderr
    other = gppq_here("train", "--config", split, "--resume", "auto", "--set", "train.lr=0.1")
    assert other.returncode == 2 and "train.lr (0.01 -> 0.1)" in other.stderr


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, digits_dir):
    config = digits_config(tmp_path, digits_dir, "nan", lr=1e6, checkpoint_every=2)
    result = gppq_here("train", "--config", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "the training loss is not finite" in message, result.stderr
    step = int(message.split(" at step ")[1].split()[0])
    kept = checkpoint.saved(tmp_path / "runs" / "nan")
    assert kept, "a checkpoint was written before the loss diverged"
    assert kept[0].name in message
    state = torch.load(kept[0], weights_only=True)
    assert state["global_step"] < step
    assert all(torch.isfinite(t).all() for t in model_tensors(state["model"]) if t.is_floating_point())
    assert not (tmp_path / "runs" / "nan" / "summary.json").exists()


def test_bf16_autocast_trains_with_fp32_weights(tmp_path, digits_dir):
    # bf16 on a CPU without bf16 instructions is emulated (seconds a step): a few steps
    config = digits_config(tmp_path, digits_dir, "bf16", epochs=1, precision="bf16", checkpoint_every=0,
                           batch_size=16, max_steps=8)
    gppq_here("train", "--config", config, check=True)
    summary = summary_of(tmp_path, "bf16")
    assert summary["precision"] == "bf16" and summary["steps"] == 8
    state = torch.load(checkpoint.saved(tmp_path / "runs" / "bf16")[0], weights_only=True)
    assert all(t.dtype == torch.float32 for t in model_tensors(state["model"]) if t.is_floating_point())
    # the bf16 gradients reached the optimizer: BatchNorm's scales (not quantized, moved only
    # by their gradients and a 1e-8 weight decay) moved from their initial 1.0
    from gppq_dist.models import load_model

    start = load_model(load_config(config)).state_dict()
    moved = (state["model"]["layer1.0.bn1.weight"] - start["layer1.0.bn1.weight"]).abs().max()
    assert moved > 1e-4 and torch.isfinite(moved)


# --- two ranks ------------------------------------------------------------------------


@pytest.fixture
def reference(local_reference):
    """The uninterrupted 2-rank run (``local_reference`` in tests/conftest.py: digits_config's
    settings, started through submitit's local executor): its folder; the run is "reference"."""
    assert local_reference.returncode == 0, local_reference.stderr
    return local_reference.directory


@pytest.mark.distributed
@pytest.mark.timeout(1500)  # a whole 2-rank run (or two) on 2 busy cores
def test_train_two_processes_and_resume_mid_epoch(reference, tmp_path, digits_dir):
    folder = reference
    summary = check_run(folder, "reference")
    assert summary["world_size"] == 2
    # resuming restores each rank's DALI position: a copy of the run, cut back to step 40
    shutil.copytree(folder / "runs", tmp_path / "runs")
    config = digits_config(tmp_path, digits_dir, "reference")
    state = torch.load(checkpoint.saved(tmp_path / "runs" / "reference")[1], weights_only=True)
    assert len(state["loader"]) == 2 and all(state["loader"])  # one DALI checkpoint per rank
    resume_mid_epoch_and_compare(tmp_path, config, "reference", "--nproc", "2")


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling interval, not a stand-in for synchronisation


@pytest.mark.distributed
@pytest.mark.timeout(1500)  # a whole 2-rank run (or two) on 2 busy cores
def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_finishes_identically(reference, tmp_path, digits_dir):
    config = digits_config(tmp_path, digits_dir, "two")  # same settings as the reference
    run = tmp_path / "runs" / "two"
    script = os.path.join(os.path.dirname(sys.executable), "gppq")
    launcher = subprocess.Popen([script, "train", "--config", str(config), "--nproc", "2", "--max-restarts", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: checkpoint.saved(run) or launcher.poll() is not None, 600, "the first checkpoint")
        assert launcher.poll() is None, "the run ended before a rank could be killed"

        def rank_one():
            for child in psutil.Process(launcher.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1" and "gppq_dist.train" in " ".join(child.cmdline()):
                        return child
                except psutil.Error:
                    continue
            return None

        victim = rank_one()
        assert victim is not None
        killed_at = len(checkpoint.saved(run))
        victim.send_signal(signal.SIGKILL)
        out, err = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err
    assert killed_at >= 1 and "torchrun restart 1: resuming" in err and "resuming from" in err
    assert summary_of(tmp_path, "two")["resumed_from"] is not None
    assert_same_model(reference / "runs" / "reference" / "gppq.gppq", run / "gppq.gppq")


@pytest.mark.distributed
@pytest.mark.timeout(1500)  # a whole 2-rank run (or two) on 2 busy cores
def test_two_torchrun_agents_meet_through_a_c10d_rendezvous(reference, tmp_path, digits_dir):
    config = digits_config(tmp_path, digits_dir, "two")
    endpoint = f"127.0.0.1:{free_port()}"
    command = [torchrun(), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint={endpoint}", "--rdzv_id=gppq-test", "--local_addr=127.0.0.1",
               "-m", "gppq_dist.train", "--config", str(config)]
    # torchrun sets OMP_NUM_THREADS=1 itself only for several processes per node; the
    # reference ran so, and the thread count changes fp32 rounding
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    try:
        results = [agent.communicate(timeout=900) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, (_, err) in zip(agents, results):
        assert agent.returncode == 0, err
    summary = summary_of(tmp_path, "two")
    assert summary["world_size"] == 2
    assert_same_model(reference / "runs" / "reference" / "gppq.gppq", tmp_path / "runs" / "two" / "gppq.gppq")


@pytest.mark.distributed
@pytest.mark.timeout(1500)  # a whole 2-rank run (or two) on 2 busy cores
def test_deepspeed_zero3_trains_as_ddp_does_and_resumes_bit_identically(reference, tmp_path, digits_dir):
    """ZeRO-3 partitions every parameter, the codewords included (stages 0-2: test_deepspeed.py)."""
    config = digits_config(tmp_path, digits_dir, "two", engine="deepspeed",
                           deepspeed_config=str(CONFIGS / "deepspeed" / "zero3.json"))
    gppq("train", "--config", config, "--nproc", "2", check=True)
    summary = summary_of(tmp_path, "two")
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 2
    ddp = summary_of(reference, "reference")
    # the same update: on 2 ranks every reduction is a sum of two fp32 numbers (order-free),
    # so DeepSpeed's reduce-scatter ends where DDP's all-reduce does, bit for bit
    assert_same_model(reference / "runs" / "reference" / "gppq.gppq", tmp_path / "runs" / "two" / "gppq.gppq")
    assert summary["history"] == ddp["history"]
    state = torch.load(checkpoint.saved(tmp_path / "runs" / "two")[1], weights_only=True)
    assert isinstance(state["engine"], list) and len(state["engine"]) == 2  # one ZeRO partition per rank
    resume_mid_epoch_and_compare(tmp_path, config, "two", "--nproc", "2")
