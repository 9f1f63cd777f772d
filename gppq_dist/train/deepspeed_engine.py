"""The training step on DeepSpeed (ZeRO stage 0 to 3), equal to the DDP engine's step.

DeepSpeed wraps the whole model and owns every trainable parameter: one SGD with the run's
hyperparameters (``train.*``), under the ZeRO stage of the JSON config. ZeRO-1 partitions
its momentum over the ranks, ZeRO-2 its gradients as well, ZeRO-3 the parameters too. G&P
PQ needs nothing of its own here: its quantized layers are reparametrized
(:mod:`gppq_dist.pq.reparam`), so their parameters are the K x d codewords, which DeepSpeed
reduces (and at ZeRO-3 partitions and gathers) like any other parameter; the method's
scheme hooks the residual's scalar recursion onto the SGD that DeepSpeed steps. The
residuals R0 and assignments psi are not parameters (the layers' extra state): every rank
holds them whole, as every rank holds the model's buffers.

The step is the DDP engine's: the loss is all-reduced first (the verdict every rank shares);
if it is finite everywhere DeepSpeed steps, and every gradient is cleared either way. With
one micro-batch per step, ZeRO rebuilds its reduced gradient partition from scratch in every
backward, so clearing the gradients discards a skipped step completely.

The math is the DDP engine's because the JSON is held to what keeps it so
(:func:`check_deepspeed_config`): fp32 weights and fp32 gradient communication, one
micro-batch per step, no gradient clipping (DeepSpeed's default clips the gradient norm to
1.0: the engine sets 0), no optimizer or scheduler section (the trainer owns them), no
ZeRO-Offload. The batch sizes in the file are not trusted: the engine fills them from the
run, ``train_micro_batch_size_per_gpu`` being the per-rank batch (``train.batch_size`` /
world size), ``gradient_accumulation_steps`` 1 and ``train_batch_size`` the global batch.

At ZeRO-3 a rank holds only its partition of each parameter outside a forward or backward
pass; :meth:`DeepSpeedEngine.gathered` makes the whole model readable (state dicts, the
snapped copy, the artifact) on every rank for the length of a ``with`` block.

Mixed precision is ``train.precision: bf16``: torch autocast around ``forward``, as with
DDP, never DeepSpeed's fp16/bf16 sections. DeepSpeed's forward switches an enclosing CUDA
autocast off unless its own ``torch_autocast`` section is on (refused too: it would reduce
Conv/Linear gradients in bf16), so the engine hands the caller's autocast state through to
the model.

DeepSpeed needs a process group even for one process. ``distributed=False`` uses a 1-rank
group when one is up, and otherwise starts one over an in-process store, no rendezvous
(the usual backend for the model's device: ``cpu:gloo,cuda:nccl`` or gloo), which :func:`gppq_dist.distributed.shutdown` ends like any other.

``state_dict()`` holds DeepSpeed's optimizer state for this rank (its ZeRO partition, so
``sharded`` is true for stages 1 to 3), as plain containers: the loss scaler object (a
constant 1 in fp32, restored from the live engine on load) and the parameter-slice map (read
only by DeepSpeed's universal-checkpoint tooling) are left out. A ZeRO state holds this
rank's partition of the fp32 weights, so loading it does not depend on whether the model's
own state dict was loaded before or after; it must be loaded with the same world size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from gppq_dist.config import TrainConfig
from gppq_dist.distributed import ensure_process_group, group_rank_and_size
from gppq_dist.errors import ConfigError
from gppq_dist.train.engine import loss_verdict, sgd, trainable

_PRECISION_SECTIONS = ("fp16", "bf16", "bfloat16", "amp", "torch_autocast")
# Entries of a ZeRO optimizer's state dict that are not plain containers and that its
# load_state_dict does not need: the loss scaler object (taken from the live optimizer when
# absent) and the map of parameter slices (for DeepSpeed's universal-checkpoint tooling).
_ZERO_STATE_DROPPED = ("loss_scaler", "param_slice_mappings")


def check_deepspeed_config(ds_config: dict[str, Any], source: str = "DeepSpeed config") -> int:
    """Refuse what would change the G&P math or the engine's ownership; returns the ZeRO stage."""

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}: {why}")

    if not isinstance(ds_config, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(ds_config).__name__}")
    for section in _PRECISION_SECTIONS:
        value = ds_config.get(section)
        if isinstance(value, dict) and value.get("enabled", False):
            refuse(f"{section}.enabled", "DeepSpeed mixed precision is not supported: the G&P update and "
                   "the optimizers run on fp32 weights; use train.precision: bf16 (autocast) instead")
    communication = ds_config.get("communication_data_type")
    if communication not in (None, "fp32", "float32"):
        refuse("communication_data_type", "gradients are reduced in fp32; remove the key")
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            refuse(section, "the trainer owns the optimizer (SGD from train.*) and the lr schedule; "
                   "remove the section")
    if ds_config.get("gradient_accumulation_steps", 1) != 1:
        refuse("gradient_accumulation_steps", "must be 1: every step is one global batch (train.batch_size)")
    if not ds_config.get("managed_gradient_accumulation", True):
        refuse("managed_gradient_accumulation", "must be true (or absent): every step is one global batch")
    if ds_config.get("gradient_clipping", 0.0):
        refuse("gradient_clipping", "must be 0 (or absent): G&P PQ trains without gradient clipping")
    zero = ds_config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        refuse("zero_optimization", "expected an object such as {\"stage\": 1}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        refuse("zero_optimization.stage", f"{stage} is not a ZeRO stage (0, 1, 2 or 3)")
    offload = zero.get("offload_optimizer")
    if zero.get("cpu_offload") or (isinstance(offload, dict) and offload.get("device", "none") != "none"):
        refuse("zero_optimization.offload_optimizer", "ZeRO-Offload is not supported (it wants DeepSpeed's "
               "CPU Adam; G&P PQ trains with SGD)")
    if zero.get("elastic_checkpoint"):
        refuse("zero_optimization.elastic_checkpoint", "not supported: each rank saves and restores its own "
               "ZeRO partition")
    return int(stage)


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """Read and check a DeepSpeed JSON config (see :func:`check_deepspeed_config`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: '{path}' does not exist (expected a DeepSpeed JSON file)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    check_deepspeed_config(raw, source=str(path))
    return raw


class _CallerAutocast(nn.Module):
    """The model, run under the autocast state its caller passes in (DeepSpeed may reset it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, device_type: str, dtype: torch.dtype, enabled: bool) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return self.model(images)


class DeepSpeedEngine:
    """One SGD over every trainable parameter, stepped by DeepSpeed at ZeRO stage 0 to 3."""

    def __init__(
        self, model: nn.Module, hp: TrainConfig, ds_config: dict[str, Any], distributed: bool, reducer
    ) -> None:
        stage = check_deepspeed_config(ds_config)
        device = next(model.parameters()).device
        ensure_process_group(distributed, device)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set; torchrun sets it
        # DeepSpeed's accelerator follows the model's device (unless the environment names one):
        # its own detection would pick CUDA for a CPU run on a GPU machine
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed  # slow to import: only when this engine is used

        rank, world_size = group_rank_and_size()
        if hp.batch_size % world_size:
            raise ConfigError(f"train.batch_size = {hp.batch_size} must split evenly over {world_size} ranks")
        self.model = model
        self.reducer = reducer
        self.rank, self.world_size, self.stage = rank, world_size, stage
        self.sharded = stage >= 1
        params = trainable(model)
        self.optimizer = sgd(params, hp)  # what DeepSpeed steps and the lr scheduler drives

        config = copy.deepcopy(ds_config)
        config.update(
            train_batch_size=hp.batch_size,
            train_micro_batch_size_per_gpu=hp.batch_size // world_size,
            gradient_accumulation_steps=1,
            # DeepSpeed clips the gradient norm to 1.0 unless told otherwise; G&P PQ does not clip
            gradient_clipping=0.0,
            # ZeRO only vouches for Adam-like optimizers out of the box; SGD is elementwise
            # and runs on the flat fp32 partition just as well.
            zero_allow_untested_optimizer=True,
        )
        self.ds, _, _, _ = deepspeed.initialize(
            model=_CallerAutocast(model), model_parameters=params, optimizer=self.optimizer,
            config=config, dist_init_required=False,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device_type = images.device.type
        return self.ds(images, device_type, torch.get_autocast_dtype(device_type),
                       torch.is_autocast_enabled(device_type))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self, loss: torch.Tensor) -> float | None:
        mean = loss_verdict(loss, self.reducer)
        if mean is not None:
            self.ds.step()
        self.ds.optimizer.zero_grad(set_to_none=True)  # its step clears them, a skipped step must too
        return mean

    def restart(self) -> None:
        """The weights were replaced in place (a new phase): drop the momentum, and give ZeRO's
        fp32 master partition the new weights (it would write the old ones back)."""
        self.optimizer.state.clear()
        if self.sharded:
            self.ds.optimizer.refresh_fp32_params()

    def gathered(self) -> ContextManager[None]:
        """At ZeRO-3, every parameter whole on every rank inside the block (read only)."""
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def model_state(self) -> dict[str, Any]:
        """The model's state dict, whole (at ZeRO-3 gathered and copied: every rank calls)."""
        if self.stage < 3:
            return self.model.state_dict()
        with self.gathered():
            # the partitioned tensors come back whole only inside the block: copy them (G&P's
            # extra state, psi and R0, is a dict of tensors every rank holds whole)
            return {name: value.clone() if isinstance(value, torch.Tensor) else value
                    for name, value in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        ds_state = self.ds.optimizer.state_dict()
        if self.sharded:
            ds_state = {k: v for k, v in ds_state.items() if k not in _ZERO_STATE_DROPPED}
            if "zero_stage" in ds_state:
                ds_state["zero_stage"] = int(ds_state["zero_stage"])  # an IntEnum: not a plain container
        return {"deepspeed": ds_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.sharded:
            self.ds.optimizer.load_state_dict(state["deepspeed"])
            return
        # ZeRO reads the entry of this rank from a list of every rank's state; the loss scaler
        # left out of the saved state is the live one (a constant 1 in fp32; ZeRO-3 wants it)
        states = [None] * self.world_size
        states[self.rank] = {"loss_scaler": self.ds.optimizer.loss_scaler, **state["deepspeed"]}
        self.ds.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
