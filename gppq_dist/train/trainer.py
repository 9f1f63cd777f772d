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

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gppq_dist.api import Handle, prepare
from gppq_dist.config import RunConfig
from gppq_dist.data.check import tree_walks
from gppq_dist.data.loaders import run_loader
from gppq_dist.distributed import DistContext, Reducer, collective_phase, gather_to_main, reducer_for, restart_count
from gppq_dist.errors import ConfigError, UserError
from gppq_dist.evaluate import evaluate
from gppq_dist.models import load_model
from gppq_dist.methods.registry import method_spec
from gppq_dist.progress import progress_bar
from gppq_dist.runs import finish_run, preflight, write_config
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


def make_engine(cfg: RunConfig, model: nn.Module, context: DistContext, reducer) -> Engine:
    hp = cfg.train
    if hp.engine == "ddp":
        return DDPEngine(model, hp, context.distributed, reducer)
    if hp.engine == "fsdp":
        if method_spec(cfg.method.name).swaps_weights:
            raise ConfigError(f"train.engine: fsdp shards the weights that method {cfg.method.name} swaps for "
                              "their quantized values around every step; use ddp or deepspeed")
        from gppq_dist.train.fsdp_engine import FSDPEngine

        return FSDPEngine(model, hp, context.distributed, reducer)
    from gppq_dist.train.deepspeed_engine import DeepSpeedEngine, check_deepspeed_config, load_deepspeed_config

    ds_config = load_deepspeed_config(hp.deepspeed_config)
    if check_deepspeed_config(ds_config) == 3 and method_spec(cfg.method.name).swaps_weights:
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


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint holds besides the model, engine, scheduler and
    method state. ``positions``: each rank's place in the epoch, for a mid-epoch resume on
    the same number of ranks; ``last_saved``: the newest checkpoint (named when a run stops)."""

    baseline: dict[str, Any]
    direct: dict[str, Any]
    epoch: int = 1
    batch: int = 0
    loss_sum: float = 0.0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    positions: list[str] | None = None
    last_saved: str | None = None


@dataclass
class Training:
    """A trained run's parts, built by :func:`start_training`; ``handle`` is the method
    (:func:`gppq_dist.api.prepare`), ``epochs`` the run's epochs (TSQ adds its own)."""

    cfg: RunConfig
    context: DistContext
    reducer: Reducer
    tracker: NullTracker
    model: nn.Module
    handle: Handle
    engine: Engine
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    train_loader: Any
    val_loader: Any
    state: TrainState
    timing: dict[str, float]
    epochs: int
    resumed_from: str | None

    @property
    def steps(self) -> int:
        """Steps of one epoch."""
        return len(self.train_loader)

    def restart_schedule(self) -> None:
        """A fresh ReduceLROnPlateau on the engine's optimizer (a run's start, a new phase)."""
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.engine.optimizer, factor=0.1, patience=self.cfg.train.plateau_patience)


def train(cfg: RunConfig, context: DistContext, resume: bool = False) -> dict[str, Any]:
    """Run the config's trained method; returns the summary (also written by rank 0).

    Rank 0 tracks the run (:mod:`gppq_dist.tracking`); a run that raises ends there as FAILED.
    """
    if cfg.train.batch_size % context.world_size:
        raise ConfigError(
            f"train.batch_size = {cfg.train.batch_size} must split evenly over {context.world_size} ranks"
        )
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    reducer = reducer_for(context)
    resumed = load_resume_state(cfg, context, resume)
    write_config(cfg, context)
    with open_tracker(cfg, context, resumed=resumed is not None) as tracker:
        run = start_training(cfg, context, reducer, resumed, tracker)
        with progress_bar(run.handle.label, total=(run.epochs - run.state.epoch + 1) * run.steps
                          - run.state.batch) as bar:
            while run.state.epoch <= run.epochs:
                stopped = train_one_epoch(run, bar)
                evaluate_epoch(run)
                if stopped:
                    log.info("train.max_steps = %d reached: the run ends after epoch %d", cfg.train.max_steps,
                             run.state.epoch - 1)
                    break
        return finish(run, start)


def start_training(cfg: RunConfig, context: DistContext, reducer: Reducer, resumed: dict[str, Any] | None,
                   tracker: NullTracker) -> Training:
    """Data, model and method, engine and schedule: fresh (baseline scored, the method's
    start coded and scored) or as a checkpoint left them."""
    hp = cfg.train
    manifest = preflight(cfg, context, reducer)
    train_loader = run_loader(cfg.data, "train", manifest, context, cfg.seed,
                              batch_size=hp.batch_size // context.world_size)
    val_loader = run_loader(cfg.data, "val", manifest, context, cfg.seed)
    device = context.device
    model = load_model(cfg).to(device)
    timing: dict[str, float] = {"coding_s": 0.0, "baseline_eval_s": 0.0}
    if resumed is not None:
        # the method first: G&P's reparametrization is part of the model state
        handle = prepare(model, cfg, reducer, context=context, manifest=manifest, state=resumed["scheme"])
        load_model_state(model, resumed["model"], resumed["path"])
        state = TrainState(resumed["baseline"], resumed["direct"])
    else:
        began = time.perf_counter()
        baseline = evaluate(model, val_loader, device, "baseline val", reducer)
        timing["baseline_eval_s"] = time.perf_counter() - began
        handle = prepare(model, cfg, reducer, context=context, manifest=manifest)
        direct = evaluate(handle.quantized_copy(), val_loader, device, f"{handle.start_label} val", reducer)
        timing["coding_s"] = time.perf_counter() - began - timing["baseline_eval_s"]
        log.info("baseline top-1 %.2f%%, %s top-1 %.2f%%, Gamma %.3e", baseline["top1"],
                 handle.start_label, direct["top1"], handle.gamma())
        state = TrainState(baseline, direct)
    engine = make_engine(cfg, model, context, reducer)
    handle.attach(engine.optimizer)
    run = Training(cfg, context, reducer, tracker, model, handle, engine, None, train_loader, val_loader, state,
                   timing, hp.epochs + handle.extra_epochs, resumed["path"] if resumed is not None else None)
    run.restart_schedule()
    if resumed is not None:
        restore(run, resumed)
    state.global_step = (state.epoch - 1) * run.steps + state.batch
    return run


def restore(run: Training, resumed: dict[str, Any]) -> None:
    """The engine, schedule, RNG and progress of a checkpoint."""
    state, context = run.state, run.context
    engine_state = resumed["engine"]
    if run.engine.sharded:
        if resumed["world_size"] != context.world_size:
            raise UserError(
                f"checkpoint {resumed['path']} holds ZeRO optimizer partitions of "
                f"{resumed['world_size']} ranks; resume it with {resumed['world_size']} ranks"
            )
        engine_state = engine_state[context.rank]
    run.engine.load_state_dict(engine_state)
    run.scheduler.load_state_dict(resumed["scheduler"])
    torch.set_rng_state(resumed["rng"])
    state.history, state.epoch, state.batch = resumed["history"], resumed["epoch"], resumed["batch"]
    state.loss_sum, state.last_saved = resumed["loss_sum"], resumed["path"]
    if resumed["epoch_done"]:
        state.epoch, state.batch, state.loss_sum = state.epoch + 1, 0, 0.0
    elif resumed["world_size"] == context.world_size:
        state.positions = resumed["loader"]
    else:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: epoch %d goes on at "
                    "batch %d in this world size's order", resumed["path"], resumed["world_size"],
                    context.world_size, state.epoch, state.batch)


def save_checkpoint(run: Training, epoch_done: bool) -> None:
    """Every rank takes part (loader positions, sharded state); rank 0 writes."""
    state, context, engine = run.state, run.context, run.engine
    loader_positions = gather_to_main(run.train_loader.position(), context)
    engine_state = gather_to_main(engine.state_dict(), context) if engine.sharded else engine.state_dict()
    model_state = engine.model_state()  # every rank: ZeRO-3 and FSDP gather the weights
    if context.is_main:
        state.last_saved = str(checkpoint.save(run.cfg.run_dir, state.global_step, {
            "model": model_state, "engine": engine_state, "scheduler": run.scheduler.state_dict(),
            "scheme": run.handle.state_dict(), "rng": torch.get_rng_state(),
            "history": state.history, "baseline": state.baseline, "direct": state.direct,
            "config": run.cfg.model_dump(mode="json"), "epoch": state.epoch, "batch": state.batch,
            "epoch_done": epoch_done, "loss_sum": state.loss_sum, "world_size": context.world_size,
            "loader": loader_positions,
        }))


def train_one_epoch(run: Training, bar) -> bool:
    """The steps of ``run.state.epoch`` from ``run.state.batch`` on, mid-epoch checkpoints
    included; True when ``train.max_steps`` stopped it."""
    cfg, hp, state, engine, handle = run.cfg, run.cfg.train, run.state, run.engine, run.handle
    context, device, timing = run.context, run.context.device, run.timing
    if handle.begin_epoch(state.epoch):  # a new phase: the momentum, lr and its schedule start over
        engine.restart()
        for group in engine.optimizer.param_groups:
            group["lr"] = hp.lr
        run.restart_schedule()
    run.train_loader.set_epoch(state.epoch - 1, start_step=state.batch,
                               state=state.positions[context.rank] if state.positions else "")
    state.positions = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=hp.precision == "bf16")
    engine.model.train()
    epoch_start, done_here, shown = time.perf_counter(), 0, 0.0
    gamma = handle.gamma()
    for images, labels in run.train_loader:
        step_began = time.perf_counter()
        with collective_phase("step"):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            handle.before_forward()
            with autocast:
                loss = nn.functional.cross_entropy(engine.forward(images), labels)
            engine.backward(loss)
            handle.after_backward()
            mean = engine.step(loss)  # its float is the step's one host sync
        state.batch += 1
        state.global_step += 1
        if mean is None:
            raise diverged(run, loss)
        state.loss_sum += mean
        done_here += 1
        now = time.perf_counter()
        timing.setdefault("first_step_unix", time.time())
        if bar.active and now - shown > 1.0:  # Gamma for the bar, at most once a second
            gamma, shown = handle.gamma(), now
        rate = done_here * hp.batch_size / max(now - epoch_start, 1e-9)
        bar(1, status=f"epoch {state.epoch}/{run.epochs} loss {mean:.3f} Gamma {gamma:.2e} {rate:.0f} img/s")
        if state.global_step % cfg.tracking.log_every == 0:
            run.tracker.log_step(state.global_step, mean, engine.optimizer.param_groups[0]["lr"], rate)
        # the step as the ranks wait for it: tracking included, checkpoints not
        timing["train_loop_s"] = timing.get("train_loop_s", 0.0) + time.perf_counter() - step_began
        if hp.checkpoint_every and state.global_step % hp.checkpoint_every == 0 and state.batch < run.steps:
            save_checkpoint(run, epoch_done=False)
        if hp.max_steps and state.global_step >= hp.max_steps:
            return True
    return False


def diverged(run: Training, loss: torch.Tensor) -> TrainingDiverged:
    """The error that stops a run whose loss is not finite, naming the checkpoint kept."""
    state, hp = run.state, run.cfg.train
    kept = (f"the last good checkpoint, {state.last_saved}, is kept: continue from it with --resume auto"
            if state.last_saved else "no checkpoint had been written yet")
    return TrainingDiverged(
        f"the training loss is not finite ({loss.item()} on rank {run.context.rank}) at step "
        f"{state.global_step} (epoch {state.epoch}, batch {state.batch}/{run.steps}); the run stopped before "
        f"applying that step and {kept}. Lower train.lr (now {run.engine.optimizer.param_groups[0]['lr']:g})"
        + (f" or train.mu (now {hp.mu:g})" if run.cfg.method.name == "gppq" else "") + " if it recurs"
    )


def evaluate_epoch(run: Training) -> dict[str, Any]:
    """The end of an epoch: val top-1 raw and quantized, the lr schedule's step, the epoch's
    record (history, tracker), a checkpoint; the next epoch's start."""
    state, device, reducer = run.state, run.context.device, run.reducer
    # DDP syncs BN statistics at the start of a forward pass, so after the last step each
    # rank still holds its own: take rank 0's, which the artifact will hold.
    broadcast_buffers_(run.model, reducer)
    raw = evaluate(run.model, run.val_loader, device, "val (raw)", reducer)
    with run.engine.gathered():
        snapped = run.handle.quantized_copy()
    quantized = evaluate(snapped, run.val_loader, device, "val (quantized)", reducer)
    run.scheduler.step(quantized["loss"])
    record = {
        "epoch": state.epoch,
        "train_loss": state.loss_sum / max(1, state.batch),
        "top1_raw": raw["top1"],
        "top1_quantized": quantized["top1"],
        "val_loss_quantized": quantized["loss"],
        "gamma": run.handle.gamma(),
        "lr": run.engine.optimizer.param_groups[0]["lr"],
    }
    state.history.append(record)
    run.tracker.log_epoch(record)
    save_checkpoint(run, epoch_done=True)
    log.info("epoch %d/%d: train loss %.4f, top-1 quantized %.2f%% / raw %.2f%%, Gamma %.3e, lr %.1e",
             state.epoch, run.epochs, record["train_loss"], record["top1_quantized"], record["top1_raw"],
             record["gamma"], record["lr"])
    state.epoch, state.batch, state.loss_sum = state.epoch + 1, 0, 0.0
    return record


def finish(run: Training, start: float) -> dict[str, Any]:
    """The artifact of the trained model and the run's summary (rank 0 writes them)."""
    state, handle = run.state, run.handle
    with run.engine.gathered():
        artifact = handle.artifact()
    last = state.history[-1] if state.history else {
        "top1_quantized": state.direct["top1"], "top1_raw": state.baseline["top1"], "gamma": handle.gamma()}
    return finish_run(
        run.cfg, run.context, artifact, run.tracker, start,
        baseline_top1=state.baseline["top1"],
        # the model the training starts from, as scored (direct PQ for G&P PQ)
        direct_pq_top1=state.direct["top1"] if isinstance(handle.scheme, GPScheme) else None,
        start_top1=state.direct["top1"],
        top1_quantized=last["top1_quantized"],
        top1_raw=last["top1_raw"],
        gamma=last["gamma"],
        epochs=run.epochs,
        steps=state.global_step,
        engine=run.cfg.train.engine,
        precision=run.cfg.train.precision,
        resumed_from=run.resumed_from,
        device=str(run.context.device),
        timing=run.timing,
        tree_walks=gather_to_main(tree_walks(), run.context),
        history=state.history,
    )
