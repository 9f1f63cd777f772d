"""What the trainer trains: the method's handle on the live model (one object per run).

The trainer (:mod:`gppq_dist.train.trainer`) runs the same loop, checkpoints and reports
for every method that trains; a scheme says what is quantized and how:

- :class:`GPScheme` (G&P PQ, two-stage PQ): fixed assignments psi from the initial
  clustering; each quantized weight reparametrized by its K x d codewords
  (:mod:`gppq_dist.pq.reparam`), which the engine's SGD steps like any parameter, the
  residual's scalar recursion hooked onto that SGD (:meth:`GPScheme.attach`); the shipped
  model snapped;
- :class:`SwapScheme` (CLIP-Q, TSQ; :mod:`gppq_dist.methods.clipq_scheme`, :mod:`~gppq_dist.methods.tsq_scheme`):
  straight-through training. Before each forward pass the full-precision weights of the
  coded layers are saved and replaced by their quantized version; after the backward pass
  they are put back, so the optimizer steps the full-precision weights with the gradient
  taken at the quantized ones.

Either way every parameter is a plain SGD parameter that DDP or DeepSpeed reduce. The loop:
``attach(optimizer)`` once the engine's optimizer exists; per step ``before_forward()``,
forward, backward, ``after_backward()``, the engine's step. ``begin_epoch(epoch)`` returns True when a new phase starts there (the lr
and its schedule start over); ``extra_epochs`` are added to ``train.epochs``.
``state_dict()`` is plain tensors and numbers (checkpoints load with ``weights_only``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Protocol

import torch
from torch import nn

from gppq_dist.artifact import Artifact, build_artifact
from gppq_dist.distributed import full_tensor, is_sharded
from gppq_dist.pq import reparam
from gppq_dist.pq.plan import LayerPlan


class Scheme(Protocol):
    plans: list[LayerPlan]
    label: str  # progress bar
    start_label: str  # the model before training, as scored ("direct PQ")
    extra_epochs: int

    def attach(self, optimizer: torch.optim.Optimizer) -> None: ...

    def before_forward(self) -> None: ...

    def after_backward(self) -> None: ...

    def begin_epoch(self, epoch: int) -> bool: ...

    def quantized_copy(self) -> nn.Module: ...

    def gamma(self) -> float: ...

    def artifact(self, info: dict[str, Any]) -> Artifact: ...

    def state_dict(self) -> dict[str, Any]: ...


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the module hooks DeepSpeed installed (ZeRO-3 fetches a
    module's partitioned parameters in its pre-forward hook; the copy holds them whole and is
    evaluated and shipped outside the engine). Other hooks (the model's own, TSQ's input
    quantizers) stay. Take it where the engine lets the whole model be read
    (``engine.gathered()``)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                      module._backward_hooks):
            for key in [key for key, hook in hooks.items() if _from_deepspeed(hook)]:
                del hooks[key]
    return copied


def _from_deepspeed(hook: Any) -> bool:
    function = getattr(hook, "__func__", hook)
    return (getattr(function, "__module__", None) or "").startswith("deepspeed.")


class GPScheme:
    """G&P PQ (``mu`` > 0) or two-stage PQ's codeword finetune (``mu`` = 0, from given
    codewords); ``psi`` fixed. Building it reparametrizes ``model`` in place: build the
    engine (and its optimizer) after it, and load a checkpoint's model state after it."""

    extra_epochs = 0

    def __init__(self, model: nn.Module, plans: list[LayerPlan], psi: dict[str, torch.Tensor], mu: float,
                 codebooks: dict[str, torch.Tensor] | None = None, two_stage: bool = False,
                 build: Callable[[], nn.Module] | None = None) -> None:
        """``build``: a fresh instance of the model's architecture, for the snapped copy of a
        model that cannot be deep-copied (FSDP's)."""
        self.model = model
        self.build = build
        self.plans = plans
        self.layers = reparam.attach_gp(model, plans, psi, mu, codebooks=codebooks)
        self.label = "two-stage PQ" if two_stage else "G&P PQ"
        self.start_label = "two-stage PQ stage 1" if two_stage else "direct PQ"
        self._hook = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Advance the residuals' recursion after each step of ``optimizer`` (which must hold
        the codewords, as torch's SGD; :func:`gppq_dist.pq.reparam.recursion_hook`)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = reparam.recursion_hook(optimizer, self.layers)

    def before_forward(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def begin_epoch(self, epoch: int) -> bool:
        return False

    def codebooks(self) -> dict[str, torch.Tensor]:
        """Current K x d codewords of every quantized layer, whole (FSDP: all-gathered, so
        every rank calls this, in step)."""
        return {name: full_tensor(c) for name, c in reparam.codebooks(self.layers).items()}

    def psi(self) -> dict[str, torch.Tensor]:
        return reparam.assignments(self.layers)

    def quantized_copy(self) -> nn.Module:
        """A plain copy of the model with every quantized weight exactly its codewords (every
        rank calls this, in step, when the parameters are sharded)."""
        if not any(is_sharded(p) for p in self.model.parameters()):
            copied = plain_copy(self.model)
            reparam.snap_(copied)
            return copied
        if self.build is None:
            raise ValueError("a sharded model's snapped copy needs the scheme's build function")
        state: dict[str, torch.Tensor] = {}
        for prefix, module in self.model.named_modules():
            for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                state[f"{prefix}.{key}" if prefix else key] = full_tensor(value).detach()
        for name, layer in self.layers:
            codewords = state[f"{name}.parametrizations.weight.original"]
            state[f"{name}.weight"] = codewords[layer.psi].view(layer.shape).contiguous(
                memory_format=layer.memory_format)
        copied = self.build().to(next(iter(state.values())).device)
        copied.load_state_dict({key: value for key, value in state.items() if ".parametrizations." not in key})
        return copied.train(self.model.training)

    def gamma(self) -> float:
        return float(reparam.gamma(self.layers))

    def artifact(self, info: dict[str, Any]) -> Artifact:
        final = self.quantized_copy().cpu()
        return build_artifact(final, self.plans, {n: c.cpu() for n, c in self.codebooks().items()},
                              {n: p.cpu() for n, p in self.psi().items()}, info)

    def state_dict(self) -> dict[str, Any]:
        return {"psi": {n: p.cpu() for n, p in self.psi().items()}}


class SwapScheme:
    """Straight-through training of the coded layers' weights (module docstring).

    Subclasses give ``quantize(index, weight) -> tensor`` (the forward pass's weight of
    layer ``index`` from its full-precision one) and the artifact.
    """

    extra_epochs = 0

    def __init__(self, model: nn.Module, plans: list[LayerPlan], reducer) -> None:
        self.model = model
        self.plans = plans
        modules = dict(model.named_modules())
        self.weights = [modules[plan.name].weight for plan in plans]
        self._full = [torch.empty_like(w) for w in self.weights]
        self._swapped = False

    def quantize(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    @torch.no_grad()
    def before_forward(self) -> None:
        for index, (weight, full) in enumerate(zip(self.weights, self._full)):
            full.copy_(weight)
            weight.copy_(self.quantize(index, weight))
        self._swapped = True

    @torch.no_grad()
    def after_backward(self) -> None:
        if self._swapped:
            for weight, full in zip(self.weights, self._full):
                weight.copy_(full)
            self._swapped = False

    def begin_epoch(self, epoch: int) -> bool:
        return False

    @torch.no_grad()
    def quantized_copy(self) -> nn.Module:
        quantized = plain_copy(self.model)
        modules = dict(quantized.named_modules())
        for index, (plan, weight) in enumerate(zip(self.plans, self.weights)):
            modules[plan.name].weight.copy_(self.quantize(index, weight))
        return quantized

    @torch.no_grad()
    def gamma(self) -> float:
        """Mean over the coded layers of the mean squared quantization error."""
        errors = [float(((self.quantize(i, w) - w) ** 2).mean()) for i, w in enumerate(self.weights)]
        return sum(errors) / len(errors) if errors else 0.0
