"""Training, data parallel: G&P PQ (k-means once, then the eq. 6 update every step) and
the other methods that train.

One process, or under torchrun (``torchrun --nproc_per_node=N -m gppq_dist.train --config
CFG``): the initial k-means is sharded over the ranks; each quantized weight is then
reparametrized by its K x d codewords (:mod:`gppq_dist.pq.reparam`), so DDP or DeepSpeed
(:mod:`gppq_dist.train.engine`) reduce the per-codeword gradients with every other
gradient, and one SGD steps them all. Every epoch
scores the val set with quantization (each subvector snapped to its codeword, fp16
codebook as stored) and without, and logs Gamma. The final model is the snapped one; rank
0 writes it as ``<run dir>/gppq.gppq`` with ``summary.json`` and the resolved
``config.yaml`` beside it.

Two-stage PQ (``method: two_stage_pq``) trains here too: its stage 1
(:mod:`gppq_dist.methods.two_stage`) replaces the initial k-means and snaps the weights,
and its codeword finetune is this loop with mu = 0 (``train.mu`` is not used). CLIP-Q and
TSQ train here straight-through (:mod:`gppq_dist.train.schemes`): what the loop quantizes,
scores and ships is the run's scheme's business, the loop, checkpoints and reports are
shared.

Checkpoints (rank 0, atomic) every ``train.checkpoint_every`` steps and after every epoch
hold everything a bit-identical continuation needs, down to each rank's position in the
epoch. ``resume=True`` continues from the newest readable one; a torchrun restart
(``--max-restarts``) always does. A non-finite loss stops the run before it touches the
weights, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
import yaml
from torch import nn

from gppq_dist.artifact import write_artifact
from gppq_dist.api import prepare
from gppq_dist.compress import load_model
from gppq_dist.config import RunConfig
from gppq_dist.data.check import tree_walks
from gppq_dist.data.loaders import run_loader
from gppq_dist.data.manifest import Manifest, load_manifest, prepare_manifest
from gppq_dist.distributed import DistContext, collective_phase, gather_to_main, reducer_for, restart_count
from gppq_dist.errors import ConfigError, DataError, UserError
from gppq_dist.evaluate import evaluate
from gppq_dist.io import write_text_atomic
from gppq_dist.progress import progress_bar
from gppq_dist.tracking import NullTracker, open_tracker
from gppq_dist.train import checkpoint
from gppq_dist.train.engine import DDPEngine, Engine
from gppq_dist.train.schemes import GPScheme

log = logging.getLogger(__name__)

# settings that may change between a checkpoint and the run that resumes it (a key, or a
# whole section ending in ".")
RESUMABLE_CHANGES = ("name", "output_dir", "train.epochs", "train.checkpoint_every", "train.max_steps", "data.workers",
                     "tracking.", "launch.")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops before the step is applied."""


def broadcast_buffers_(model: nn.Module, reducer) -> None:
    """Give every rank rank 0's floating-point buffers (BN running statistics), in one call."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if reducer.world_size == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    reducer.broadcast(flat, src=0)
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))


def preflight(cfg: RunConfig, context: DistContext, reducer) -> Manifest:
    """The run's data, listed once: rank 0 checks the data (cached) and writes the manifest
    into the run folder (or keeps the one there, on a resume of an unchanged tree), then the
    other ranks read it and never list the tree themselves.

    A failure reaches every rank, so none is left waiting in a collective. Multi-node runs
    read the manifest from the run folder, which (like the checkpoints) must be on a file
    system every node sees.
    """
    ok, error, manifest = torch.ones(1, device=context.device), None, None
    if context.is_main:
        try:
            manifest = prepare_manifest(cfg.data, cfg.run_dir)
        except DataError as exc:
            ok.zero_()
            error = exc
    if context.distributed:
        reducer.broadcast(ok, src=0)
    if error is not None:
        raise error
    if not bool(ok):
        raise DataError(f"data check of '{cfg.data.root}' failed on rank 0 (its message says why)")
    return manifest if manifest is not None else load_manifest(cfg.data, cfg.run_dir)


def make_engine(cfg: RunConfig, model: nn.Module, context: DistContext, reducer) -> Engine:
    hp = cfg.train
    if hp.engine == "ddp":
        return DDPEngine(model, hp, context.distributed, reducer)
    if hp.engine == "fsdp":
        if cfg.method.name in ("clipq", "tsq"):
            raise ConfigError(f"train.engine: fsdp shards the weights that method {cfg.method.name} swaps for "
                              "their quantized values around every step; use ddp or deepspeed")
        from gppq_dist.train.fsdp_engine import FSDPEngine

        return FSDPEngine(model, hp, context.distributed, reducer)
    from gppq_dist.train.deepspeed_engine import DeepSpeedEngine, check_deepspeed_config, load_deepspeed_config

    ds_config = load_deepspeed_config(hp.deepspeed_config)
    if check_deepspeed_config(ds_config) == 3 and cfg.method.name in ("clipq", "tsq"):
        raise ConfigError(
            f"train.deepspeed_config: {hp.deepspeed_config} is ZeRO stage 3, which partitions the weights that "
            f"method {cfg.method.name} swaps for their quantized values around every step; use stage 0, 1 or 2"
        )
    return DeepSpeedEngine(model, hp, ds_config, context.distributed, reducer)


def load_model_state(model: nn.Module, state: dict[str, Any], path: str) -> None:
    """A checkpoint's model state into the (reparametrized) model, or one clear error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(
            f"checkpoint {path} does not fit this run's model ({first}); it was written by another "
            "model or an earlier version of gppq_dist (whose G&P checkpoints held dense weights): start "
            "a new run under another name"
        ) from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def check_same_config(saved: dict[str, Any], cfg: RunConfig, path: str) -> None:
    """Refuse to continue a checkpoint under different settings (a few may change). The saved
    settings are read with today's defaults first, so a key added since they were written
    counts as unchanged when the run leaves it at its default."""
    try:
        saved = RunConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:  # keys since renamed or removed: compared as written
        pass
    old, new = _flat(saved), _flat(cfg.model_dump(mode="json"))
    changed = [f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ConfigError(
            f"checkpoint {path} was written with other settings: {', '.join(changed)}; resume with "
            f"the same config (only {', '.join(RESUMABLE_CHANGES)} may change) or start a new run "
            "under another name"
        )


def load_resume_state(cfg: RunConfig, context: DistContext, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None for a fresh start (which must not clobber one)."""
    if restart_count() > 0 and not resume:
        log.info("torchrun restart %d: resuming from the newest checkpoint", restart_count())
        resume = True
    if resume:
        state = checkpoint.latest(cfg.run_dir)
        if state is None:
            log.info("no checkpoint in %s: starting fresh", checkpoint.checkpoint_dir(cfg.run_dir))
            return None
        check_same_config(state["config"], cfg, state["path"])
        return state
    existing = checkpoint.saved(cfg.run_dir)
    if existing:
        raise UserError(
            f"{checkpoint.checkpoint_dir(cfg.run_dir)} holds checkpoints of an earlier run (newest "
            f"{existing[0].name}): continue it with --resume auto, or start over under another name "
            "(or after removing that folder)"
        )
    return None


def train(cfg: RunConfig, context: DistContext, resume: bool = False) -> dict[str, Any]:
    """Run G&P PQ as configured; returns the summary (also written by rank 0).

    Rank 0 tracks the run (:mod:`gppq_dist.tracking`); a run that raises ends there as FAILED.
    """
    hp = cfg.train
    if hp.batch_size % context.world_size:
        raise ConfigError(
            f"train.batch_size = {hp.batch_size} must split evenly over {context.world_size} ranks"
        )
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    reducer = reducer_for(context)
    resumed = load_resume_state(cfg, context, resume)
    if context.is_main:
        write_text_atomic(cfg.run_dir / "config.yaml",
                          yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with open_tracker(cfg, context, resumed=resumed is not None) as tracker:
        return _train(cfg, context, reducer, resumed, tracker, start)


def _train(cfg: RunConfig, context: DistContext, reducer, resumed: dict[str, Any] | None,
           tracker: NullTracker, start: float) -> dict[str, Any]:
    hp = cfg.train
    manifest = preflight(cfg, context, reducer)
    train_loader = run_loader(cfg.data, "train", manifest, context, cfg.seed,
                              batch_size=hp.batch_size // context.world_size)
    val_loader = run_loader(cfg.data, "val", manifest, context, cfg.seed)
    device = context.device
    model = load_model(cfg).to(device)
    timing: dict[str, float] = {"coding_s": 0.0, "baseline_eval_s": 0.0}
    if resumed is not None:
        baseline, direct = resumed["baseline"], resumed["direct"]
        # the scheme first: G&P's reparametrization is part of the model state
        scheme = prepare(model, cfg, reducer, context=context, manifest=manifest, state=resumed["scheme"])
        load_model_state(model, resumed["model"], resumed["path"])
    else:
        began = time.perf_counter()
        baseline = evaluate(model, val_loader, device, "baseline val", reducer)
        timing["baseline_eval_s"] = time.perf_counter() - began
        scheme = prepare(model, cfg, reducer, context=context, manifest=manifest)
        direct = evaluate(scheme.quantized_copy(), val_loader, device, f"{scheme.start_label} val", reducer)
        timing["coding_s"] = time.perf_counter() - began - timing["baseline_eval_s"]
        log.info("baseline top-1 %.2f%%, %s top-1 %.2f%%, Gamma %.3e", baseline["top1"],
                 scheme.start_label, direct["top1"], scheme.gamma())
    epochs = hp.epochs + scheme.extra_epochs

    engine = make_engine(cfg, model, context, reducer)
    scheme.attach(engine.optimizer)
    def plateau_schedule() -> torch.optim.lr_scheduler.ReduceLROnPlateau:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(engine.optimizer, factor=0.1,
                                                          patience=hp.plateau_patience)

    scheduler = plateau_schedule()
    steps = len(train_loader)
    history: list[dict[str, Any]] = []
    epoch, batch, loss_sum, positions = 1, 0, 0.0, None
    if resumed is not None:
        engine_state = resumed["engine"]
        if engine.sharded:
            if resumed["world_size"] != context.world_size:
                raise UserError(
                    f"checkpoint {resumed['path']} holds ZeRO optimizer partitions of "
                    f"{resumed['world_size']} ranks; resume it with {resumed['world_size']} ranks"
                )
            engine_state = engine_state[context.rank]
        engine.load_state_dict(engine_state)
        scheduler.load_state_dict(resumed["scheduler"])
        torch.set_rng_state(resumed["rng"])
        history, epoch, batch = resumed["history"], resumed["epoch"], resumed["batch"]
        loss_sum = resumed["loss_sum"]
        if resumed["epoch_done"]:
            epoch, batch, loss_sum = epoch + 1, 0, 0.0
        elif resumed["world_size"] == context.world_size:
            positions = resumed["loader"]
        else:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: epoch %d goes on at "
                        "batch %d in this world size's order", resumed["path"], resumed["world_size"],
                        context.world_size, epoch, batch)
    global_step = (epoch - 1) * steps + batch
    last_saved = resumed["path"] if resumed is not None else None

    def save(epoch_done: bool) -> None:
        nonlocal last_saved
        loader_positions = gather_to_main(train_loader.position(), context)
        engine_state = gather_to_main(engine.state_dict(), context) if engine.sharded else engine.state_dict()
        model_state = engine.model_state()  # every rank: ZeRO-3 and FSDP gather the weights
        if context.is_main:
            last_saved = str(checkpoint.save(cfg.run_dir, global_step, {
                "model": model_state, "engine": engine_state, "scheduler": scheduler.state_dict(),
                "scheme": scheme.state_dict(), "rng": torch.get_rng_state(),
                "history": history, "baseline": baseline, "direct": direct, "config": cfg.model_dump(mode="json"),
                "epoch": epoch, "batch": batch, "epoch_done": epoch_done, "loss_sum": loss_sum,
                "world_size": context.world_size, "loader": loader_positions,
            }))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.precision == "bf16")
    images_per_step = hp.batch_size
    with progress_bar(scheme.label, total=(epochs - epoch + 1) * steps - batch) as bar:
        gamma, shown = scheme.gamma(), time.perf_counter()
        while epoch <= epochs:
            if scheme.begin_epoch(epoch):  # a new phase: the momentum, lr and its schedule start over
                engine.restart()
                for group in engine.optimizer.param_groups:
                    group["lr"] = hp.lr
                scheduler = plateau_schedule()
                gamma = scheme.gamma()
            state = positions[context.rank] if positions else ""
            train_loader.set_epoch(epoch - 1, start_step=batch, state=state)
            positions = None
            engine.model.train()
            epoch_start, done_here = time.perf_counter(), 0
            for images, labels in train_loader:
                step_began = time.perf_counter()
                with collective_phase("step"):
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    scheme.before_forward()
                    with autocast:
                        loss = nn.functional.cross_entropy(engine.forward(images), labels)
                    engine.backward(loss)
                    scheme.after_backward()
                    mean = engine.step(loss)  # its float is the step's one host sync
                batch += 1
                global_step += 1
                if mean is None:
                    kept = (f"the last good checkpoint, {last_saved}, is kept: continue from it with "
                            "--resume auto" if last_saved else "no checkpoint had been written yet")
                    raise TrainingDiverged(
                        f"the training loss is not finite ({loss.item()} on rank {context.rank}) at step "
                        f"{global_step} (epoch {epoch}, batch {batch}/{steps}); the run stopped before "
                        f"applying that step and {kept}. Lower train.lr (now {engine.optimizer.param_groups[0]['lr']:g})"
                        + (f" or train.mu (now {hp.mu:g})" if cfg.method.name == "gppq" else "") + " if it recurs"
                    )
                loss_sum += mean
                done_here += 1
                now = time.perf_counter()
                if "first_step_unix" not in timing:
                    timing["first_step_unix"] = time.time()
                if bar.active and now - shown > 1.0:  # Gamma for the bar, at most once a second
                    gamma, shown = scheme.gamma(), now
                rate = done_here * images_per_step / max(now - epoch_start, 1e-9)
                bar(1, status=f"epoch {epoch}/{epochs} loss {mean:.3f} Gamma {gamma:.2e} {rate:.0f} img/s")
                if global_step % cfg.tracking.log_every == 0:
                    tracker.log_step(global_step, mean, engine.optimizer.param_groups[0]["lr"], rate)
                # the step as the ranks wait for it: tracking included, checkpoints not
                timing["train_loop_s"] = timing.get("train_loop_s", 0.0) + time.perf_counter() - step_began
                if hp.checkpoint_every and global_step % hp.checkpoint_every == 0 and batch < steps:
                    save(epoch_done=False)
                if hp.max_steps and global_step >= hp.max_steps:
                    break
            # DDP syncs BN statistics at the start of a forward pass, so after the last step
            # each rank still holds its own: take rank 0's, which the artifact will hold.
            broadcast_buffers_(model, reducer)
            raw = evaluate(model, val_loader, device, "val (raw)", reducer)
            with engine.gathered():
                snapped = scheme.quantized_copy()
            quantized = evaluate(snapped, val_loader, device, "val (quantized)", reducer)
            scheduler.step(quantized["loss"])
            record = {
                "epoch": epoch,
                "train_loss": loss_sum / max(1, batch),
                "top1_raw": raw["top1"],
                "top1_quantized": quantized["top1"],
                "val_loss_quantized": quantized["loss"],
                "gamma": scheme.gamma(),
                "lr": engine.optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            tracker.log_epoch(record)
            save(epoch_done=True)
            log.info("epoch %d/%d: train loss %.4f, top-1 quantized %.2f%% / raw %.2f%%, Gamma %.3e, lr %.1e",
                     epoch, epochs, record["train_loss"], record["top1_quantized"], record["top1_raw"],
                     record["gamma"], record["lr"])
            epoch, batch, loss_sum = epoch + 1, 0, 0.0
            if hp.max_steps and global_step >= hp.max_steps:
                log.info("train.max_steps = %d reached: the run ends after epoch %d", hp.max_steps, epoch - 1)
                break

    with engine.gathered():
        artifact = scheme.artifact()
    last = history[-1] if history else {"top1_quantized": direct["top1"], "top1_raw": baseline["top1"],
                                        "gamma": scheme.gamma()}
    summary = {
        "method": cfg.method.name,
        "baseline_top1": baseline["top1"],
        # the model the training starts from, as scored (direct PQ for G&P PQ)
        "direct_pq_top1": direct["top1"] if isinstance(scheme.scheme, GPScheme) else None,
        "start_top1": direct["top1"],
        "top1_quantized": last["top1_quantized"],
        "top1_raw": last["top1_raw"],
        "gamma": last["gamma"],
        "size_mb": artifact.accounted_bytes / 2**20,
        "ratio": artifact.info["fp32_bytes"] / artifact.accounted_bytes,
        "epochs": epochs,
        "steps": global_step,
        "world_size": context.world_size,
        "engine": hp.engine,
        "precision": hp.precision,
        "resumed_from": resumed["path"] if resumed is not None else None,
        "device": str(device),
        "timing": timing,
        "tree_walks": gather_to_main(tree_walks(), context),
        "history": history,
    }
    if context.is_main:
        write_outputs(cfg, artifact, summary, tracker, start)
    return summary


def write_outputs(cfg: RunConfig, artifact, summary: dict[str, Any], tracker: NullTracker, start: float) -> None:
    """Rank 0's end of any run: ``gppq.gppq`` and ``summary.json`` (with ``file_bytes``,
    ``artifact`` and ``wall_s`` added to ``summary``), then the tracker's final records."""
    path = cfg.run_dir / "gppq.gppq"
    summary["file_bytes"] = write_artifact(artifact, path)
    summary["artifact"] = str(path)
    summary["wall_s"] = time.perf_counter() - start
    write_text_atomic(cfg.run_dir / "summary.json", json.dumps(summary, indent=2))
    tracker.finish(summary)


def main(argv: list[str] | None = None) -> None:
    """``python -m gppq_dist.train`` (torchrun entry point): same flags as ``gppq train``."""
    import sys

    from gppq_dist.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
