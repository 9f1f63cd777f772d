"""G&P PQ (and the other trained methods) in any training loop: ``prepare`` and its handle.

    import gppq_dist

    handle = gppq_dist.prepare(model, "configs/my_run.yaml")   # k-means (sharded over the ranks)
    model = DistributedDataParallel(model)                     # after prepare: it changes parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    handle.attach(optimizer)                                   # once, after the optimizer exists
    for epoch in range(epochs):
        handle.begin_epoch(epoch + 1)                          # True: a new phase, restart lr/momentum
        for images, labels in loader:
            handle.before_forward()
            loss = criterion(model(images), labels)
            loss.backward()
            handle.after_backward()
            optimizer.step()
            optimizer.zero_grad()
    snapped, artifact = handle.finalize("model.gppq")          # on every rank; rank 0 writes

``prepare(model, config, reducer=None)`` plans the layers (``quantization`` rules), runs
the method's start (G&P PQ: the k-means of every planned layer, in lockstep, sharded over
the ranks of the default process group when one is up, through ``reducer`` when given) and
changes ``model`` in place for training:

- G&P PQ and two-stage PQ reparametrize each quantized weight by its K x d codewords
  (:mod:`gppq_dist.pq.reparam`): ``model.parameters()`` then yields the codewords in place
  of the quantized weights, so DDP, DeepSpeed (any ZeRO stage) and FSDP reduce K x d
  gradients per layer with no code of ours, and a plain ``torch.optim.SGD`` steps them.
  The paper's update (eq. 6) needs one more thing, the residual's scalar recursion after
  every step, which :meth:`Handle.attach` hooks onto the optimizer. The optimizer must be
  torch's SGD (momentum and weight decay as you like; no Nesterov, no dampening): the
  hook checks. Wrap the model (DDP, ...) and build the optimizer *after* ``prepare``.
- CLIP-Q and TSQ train straight-through: ``before_forward`` swaps the quantized weights in,
  ``after_backward`` the full-precision ones back, and TSQ changes phase at an epoch
  (``begin_epoch`` returns True: start the lr and momentum over).

Every per-step call a method needs is a method of :class:`Handle`; for G&P PQ
``before_forward``, ``after_backward`` and ``begin_epoch`` do nothing, and calling them
keeps a loop method-agnostic. ``finalize`` returns the shipped model (every quantized
weight exactly its codewords, a plain ``nn.Module``) and the artifact
(:mod:`gppq_dist.artifact`), written to ``path`` when given (call it on every rank; only
the ranks with ``write=True``, by default rank 0, write).

``config`` is the same YAML (a path), mapping or :class:`~gppq_dist.config.RunConfig` as
``gppq train`` takes: ``method``, ``quantization``, ``kmeans``, ``train.mu`` and ``seed``
shape the compression; ``model`` says how :func:`gppq_dist.artifact.rebuild_model` rebuilds
the network from the artifact (a torchvision ``arch`` or a ``factory``); a mapping may leave
out ``name``. Two-stage PQ and TSQ calibrate on training batches: pass the run's
:class:`~gppq_dist.data.manifest.Manifest` as ``manifest`` (``gppq train`` does).
``gppq train`` itself trains through this module, so a loop written against it reproduces
``gppq train`` (``examples/own_loop.py``; its test compares the two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gppq_dist.artifact import Artifact, artifact_info, write_artifact
from gppq_dist.compress import plan_for
from gppq_dist.config import RunConfig, load_config, validate_config
from gppq_dist.distributed import DistContext, current_context
from gppq_dist.errors import ConfigError
from gppq_dist.methods.registry import method_spec
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.train.schemes import Scheme


def as_config(config: RunConfig | Mapping[str, Any] | str | Path) -> RunConfig:
    """A :class:`RunConfig` from a config object, a mapping (``name`` optional) or a YAML path."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, Mapping):
        return validate_config({"name": "prepared", **config}, source="prepare(config)")
    raise ConfigError(f"prepare: config must be a RunConfig, a mapping or a YAML path, not {type(config).__name__}")


def make_scheme(cfg: RunConfig, model: nn.Module, plans: list[LayerPlan], context: DistContext, reducer,
                state: dict[str, Any] | None, manifest: Any) -> Scheme:
    """The method's scheme (its registered factory), from a checkpoint's ``state`` or fresh
    (its initial coding); methods that calibrate on train batches read them from
    ``manifest``'s samples."""
    spec = method_spec(cfg.method.name)
    if spec.scheme is None:
        raise ConfigError(f"method {spec.name} does not train: compress with it through `gppq compress` "
                          "(it needs no training loop)")
    if spec.calibrates and state is None and manifest is None:
        raise ConfigError(f"method {spec.name} calibrates on training batches: pass the run's data manifest "
                          "(prepare(..., manifest=...)) or train it with `gppq train`")
    return spec.scheme(cfg, model, plans, context, reducer, state, manifest)


class Handle:
    """A prepared model's method: the per-step calls, the checkpoint state and the end.

    ``plans``: the quantized layers; ``config``: the resolved :class:`RunConfig`;
    ``label``: the method's name for progress bars; ``extra_epochs``: epochs the method adds
    to ``train.epochs`` (TSQ's coding phase).
    """

    def __init__(self, scheme: Scheme, config: RunConfig, context: DistContext) -> None:
        self.scheme = scheme
        self.config = config
        self.context = context
        self.plans = scheme.plans
        self.label = scheme.label
        self.start_label = scheme.start_label
        self.extra_epochs = scheme.extra_epochs

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the method onto the optimizer that steps the model (once, after building it;
        again after replacing it). G&P PQ: the residual's recursion after every step."""
        self.scheme.attach(optimizer)

    def begin_epoch(self, epoch: int) -> bool:
        """Call at the start of every epoch (1-based); True when a new phase starts there:
        set the lr back to its start, clear the momentum and restart the lr schedule."""
        return self.scheme.begin_epoch(epoch)

    def before_forward(self) -> None:
        """Call before every training forward pass (straight-through methods swap weights)."""
        self.scheme.before_forward()

    def after_backward(self) -> None:
        """Call after every backward pass, before the optimizer steps."""
        self.scheme.after_backward()

    def gamma(self) -> float:
        """The quantization loss Gamma (eq. 7): how far the weights are from their codes."""
        return self.scheme.gamma()

    def quantized_copy(self) -> nn.Module:
        """A plain copy of the model as it would ship (evaluate it to score the method)."""
        return self.scheme.quantized_copy()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model's and optimizer's state (plain tensors);
        give it back as ``prepare(..., state=...)`` before loading the model's state."""
        return self.scheme.state_dict()

    def artifact(self, extra: dict[str, Any] | None = None) -> Artifact:
        return self.scheme.artifact(artifact_info(self.config, self.gamma(), {"method": self.config.method.name,
                                                                              **(extra or {})}))

    def finalize(self, path: str | Path | None = None, write: bool | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[nn.Module, Artifact]:
        """The shipped model (quantized weights exactly their codewords) and its artifact;
        ``path``: where to write the artifact (by the ranks with ``write``, default rank 0)."""
        artifact = self.artifact(extra)
        if path is not None and (self.context.is_main if write is None else write):
            write_artifact(artifact, Path(path))
        return self.quantized_copy(), artifact


def prepare(model: nn.Module, config: RunConfig | Mapping[str, Any] | str | Path, reducer=None, *,
            context: DistContext | None = None, manifest: Any = None,
            state: dict[str, Any] | None = None) -> Handle:
    """Start the configured method on ``model`` (in place) and return its :class:`Handle`.

    ``reducer``: the collectives of the initial k-means (default: the process group when one
    is up, else none); ``context``: this process's place in the run (default: from the
    process group, on the model's device); ``manifest``: the run's data, for methods that
    calibrate on it; ``state``: a checkpoint's ``handle.state_dict()`` to continue from
    (no k-means; load the model's state after this call).
    """
    cfg = as_config(config)
    if context is None:
        context = current_context(next(model.parameters()).device)
    plans = plan_for(model, cfg)
    return Handle(make_scheme(cfg, model, plans, context, reducer, state, manifest), cfg, context)
