"""G&P PQ as a reparametrization: the codewords are the parameters, the optimizer is torch's SGD.

With psi fixed, eq. 6 under SGD (momentum m, weight decay wd, lr) keeps every quantized
weight of the form (:mod:`gppq_dist.pq.gp_sgd` derives it)

    W_j = C_psi(j) + alpha_t * R0_j,        C: K x d codewords,  R0 = W0 - C0[psi]: N x d

so the K x d codewords can be the trainable parameter and W is rebuilt from them in the
forward pass (:class:`GPParametrization`, a ``torch.nn.utils.parametrize`` parametrization
of a module's ``weight``). Autograd gives ``dL/dC_k = sum_{j: psi(j) = k} g_j``; the gather's
backward divides that by the member count ``n_k``, so ``C.grad`` is the cluster-mean gradient
``gbar_k``, and a plain ``torch.optim.SGD`` step on C,

    v_k <- m v_k + gbar_k + wd C_k        C_k <- C_k - lr v_k,

is the codeword half of :class:`~gppq_dist.pq.gp_sgd.GPSGD`. The mu pull never reaches the
gradient: it sums to zero over a cluster and only shrinks the residual, which follows the
scalar recursion

    s <- m s + (mu + wd) alpha            alpha <- alpha - lr s        (alpha_0 = 1, s_0 = 0)

advanced after each optimizer step by :func:`recursion_hook` (or :func:`advance`, for
engines whose optimizer is not a ``torch.optim.Optimizer``); ``beta`` holds s. The weights
equal GPSGD's up to fp32 rounding, and so, when C0 are the member means of W0, those of the
eq. 6 transform followed by torch's SGD (tested). Data-parallel engines (DDP, DeepSpeed, FSDP) see an ordinary K x d parameter per
quantized layer and reduce K x d gradients on their own; since ``gbar`` is linear in the
gradient, averaging it over ranks is averaging the sums, then dividing.

State: ``alpha`` and ``beta`` (0-dim buffers); ``psi`` (N, int64) and ``residual`` (R0,
N x d) as the module's extra state, not buffers: they move with ``.to()`` and are
checkpointed by ``state_dict`` like buffers, but an engine that broadcasts a model's buffers
(DDP's ``broadcast_buffers``, before every forward pass) never sends these two, which are as
large as the quantized weights and identical on every rank (the replicated start) anyway.
The member counts are derived from psi. The codewords are stored as the parametrization's
``original``; for a module ``conv`` the keys are ``conv.parametrizations.weight.original``,
``conv.parametrizations.weight.0.{alpha,beta}`` and ``conv.parametrizations.weight.0._extra_state``
(``{"psi", "residual"}``, plain tensors: ``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from gppq_dist.pq.gp import Assignment, cluster_means, codeword_sums, quantization_error
from gppq_dist.pq.subvectors import to_subvectors


class Planned(Protocol):
    """What :func:`attach_gp` reads of a layer; :class:`~gppq_dist.pq.plan.LayerPlan` fits."""

    name: str
    d: int
    k: int


class _RebuildWeight(torch.autograd.Function):
    """``C[psi] + alpha * R0`` (``K x d -> N x d``) in one N x d allocation (the gather's
    output takes the residual in place: the rebuild runs in every forward pass, and a second
    N x d temporary per layer showed up in the step time), whose backward is the
    cluster-mean gradient ``(sum_{j: psi(j) = k} g_j) / n_k`` (``N x d -> K x d``), not the
    plain sum. R0 and alpha are state, not trained: no gradient."""

    @staticmethod
    def forward(ctx: Any, codewords: torch.Tensor, residual: torch.Tensor, alpha: torch.Tensor,
                assignment: Assignment) -> torch.Tensor:
        ctx.assignment = assignment
        return codewords.index_select(0, assignment.psi).addcmul_(residual, alpha)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        assignment: Assignment = ctx.assignment
        sums = codeword_sums(grad.contiguous(), assignment)
        return sums / assignment.counts.clamp_min(1).unsqueeze(1).to(sums.dtype), None, None, None


class GPParametrization(nn.Module):
    """A quantized layer's weight of ``shape`` as ``(C[psi] + alpha * R0).view(shape)``.

    ``psi`` (N int64, N = numel / d) assigns each subvector (:mod:`gppq_dist.pq.subvectors`)
    one of ``k`` codewords. Registered with ``unsafe=True`` (the stored parameter is K x d,
    not the weight's shape); :meth:`right_inverse` turns a dense weight W0 into the starting
    codewords C0 (``codebook`` if given, else the member means of W0) and sets
    ``R0 = W0 - C0[psi]``, alpha = 1, beta = 0. ``codebook`` serves the registration only:
    a later ``module.weight = W`` restarts from W's member means. Use :func:`attach_gp`.
    """

    def __init__(
        self,
        psi: torch.Tensor,
        k: int,
        d: int,
        shape: Sequence[int],
        mu: float,
        codebook: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        n = math.prod(shape) // d if d > 0 else 0
        if psi.dim() != 1 or psi.numel() != n:
            raise ValueError(f"psi of shape {tuple(psi.shape)} does not fit {n} subvectors of {tuple(shape)}")
        if codebook is not None and tuple(codebook.shape) != (k, d):
            raise ValueError(f"codebook of shape {tuple(codebook.shape)}, expected {(k, d)}")
        psi = psi.to(torch.int64)
        if psi.numel() and not 0 <= psi.min() <= psi.max() < k:
            raise ValueError(f"psi indexes outside the {k} codewords")
        self.k, self.d, self.shape, self.mu = k, d, tuple(shape), float(mu)
        self.memory_format = torch.contiguous_format
        # not buffers (the module docstring says why): _apply, get/set_extra_state handle them
        self.psi = psi
        self.residual = torch.zeros(n, d, device=psi.device)
        self.register_buffer("alpha", torch.ones((), device=psi.device))
        self.register_buffer("beta", torch.zeros((), device=psi.device))
        self._codebook = codebook
        self._assignment: Assignment | None = None
        self._assignment_version = -1
        self._base_error: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._owner: parametrize.ParametrizationList | None = None

    @property
    def assignment(self) -> Assignment:
        """psi and its member counts as an :class:`Assignment` (with the CSR members matrix
        on CPU). Rebuilt when psi was replaced (``.to(device)``, ``load_state_dict``) or
        written in place (which bumps its version)."""
        cached = self._assignment
        if cached is None or cached.psi is not self.psi or self._assignment_version != self.psi._version:
            cached = self._assignment = Assignment.from_psi(self.psi, self.k)
            self._assignment_version = self.psi._version
        return cached

    @property
    def counts(self) -> torch.Tensor:
        """Members per codeword (K, fp32)."""
        return self.assignment.counts

    def _apply(self, fn: Any, recurse: bool = True) -> "GPParametrization":
        """Move and cast psi and R0 with the module, as if they were buffers (a dtype cast
        leaves the int64 psi alone, as it does integer buffers)."""
        super()._apply(fn, recurse)
        self.psi = fn(self.psi)
        self.residual = fn(self.residual)
        return self

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"psi": self.psi, "residual": self.residual}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        psi, residual = state["psi"], state["residual"]
        if psi.shape != self.psi.shape or residual.shape != self.residual.shape:
            raise ValueError(f"saved G&P state of psi {tuple(psi.shape)} and R0 {tuple(residual.shape)} "
                             f"does not fit this layer ({tuple(self.psi.shape)}, {tuple(self.residual.shape)})")
        self.psi = psi.to(device=self.psi.device, dtype=torch.int64)
        self.residual = residual.to(self.residual)

    @property
    def codewords(self) -> nn.Parameter:
        """The trainable K x d codewords (the parametrization's ``original``)."""
        if self._owner is None:
            raise RuntimeError("this parametrization is not registered on a module; use attach_gp")
        return self._owner.original

    def bind(self, owner: parametrize.ParametrizationList) -> None:
        """Remember the parametrization list that stores the codewords (not as a submodule)."""
        object.__setattr__(self, "_owner", owner)

    def forward(self, codewords: torch.Tensor) -> torch.Tensor:
        """``K x d -> shape``: ``C[psi] + alpha * R0``, contiguous in the standard layout."""
        return _RebuildWeight.apply(codewords, self.residual, self.alpha, self.assignment).view(self.shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """``shape -> K x d``: the starting codewords of the dense ``weight``; resets R0 and
        the recursion (the weight rebuilt right after is ``weight`` up to rounding)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)}, expected {self.shape}")
        # reshape, not view: a channels_last weight is not contiguous in (Cin, kh, kw) order
        subvectors = to_subvectors(weight.detach(), self.d).float()
        start, self._codebook = self._codebook, None
        codewords = (start.detach().to(subvectors).clone() if start is not None
                     else cluster_means(subvectors, self.assignment))
        self.residual = (subvectors - codewords[self.psi]).to(weight.dtype)
        self.alpha.fill_(1.0)
        self.beta.zero_()
        channels_last = weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
            memory_format=torch.channels_last)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return codewords.to(weight.dtype)

    @torch.no_grad()
    def subvectors(self) -> torch.Tensor:
        """The current weight as ``N x d`` subvectors (no autograd)."""
        return torch.addcmul(self.codewords[self.psi], self.residual, self.alpha)

    @torch.no_grad()
    def quantization_error(self) -> torch.Tensor:
        """This layer's term of Gamma (eq. 7), 0-dim: the mean ``||W_j - c_psi(j)||^2`` with c
        the member means of W. As ``W = C[psi] + alpha R0``, the member mean of W is
        ``C + alpha * mean(R0)`` and the error is ``alpha^2`` times that of R0 around its own
        member means: computed once per R0, it needs neither the codewords (which ZeRO-3
        holds partitioned) nor an N x d pass per call."""
        key = (id(self.residual), self.residual._version, id(self.psi), self.psi._version)
        if self._base_error is None or self._base_error[0] != key:
            self._base_error = (key, quantization_error(self.residual.float(), self.assignment))
        return self._base_error[1] * self.alpha.square()

    @torch.no_grad()
    def advance(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        """One step of the residual's recursion, in place on the buffers' device (no sync).

        beta starts at 0, so the first step with momentum needs no special case (torch's SGD
        starts its momentum buffer at the first gradient, which is the same thing).
        """
        decay = self.alpha * (self.mu + weight_decay)  # the residual's "gradient", per unit R0
        if momentum:
            decay.add_(self.beta, alpha=momentum)
        self.alpha.sub_(decay * lr)
        self.beta.copy_(decay)

    def __getstate__(self) -> dict[str, Any]:
        # the cached CSR members matrix has no storage, so deepcopy cannot copy it
        state = super().__getstate__()
        state["_assignment"] = None
        return state

    def extra_repr(self) -> str:
        return f"k={self.k}, d={self.d}, shape={self.shape}, mu={self.mu}"


GPLayers = Sequence[tuple[str, GPParametrization]]


def _layer_specs(plans: Iterable[Planned] | Mapping[str, tuple[int, int]]) -> list[tuple[str, int, int]]:
    if isinstance(plans, Mapping):
        return [(name, int(d), int(k)) for name, (d, k) in plans.items()]
    specs = []
    for plan in plans:
        codec = getattr(plan, "codec", "pq")
        if codec != "pq":
            raise ValueError(f"{plan.name}: G&P trains one joint codebook (codec 'pq'), not {codec!r}")
        specs.append((plan.name, plan.d, plan.k))
    return specs


def attach_gp(
    model: nn.Module,
    plans: Iterable[Planned] | Mapping[str, tuple[int, int]],
    assignments: Mapping[str, torch.Tensor],
    mu: float,
    codebooks: Mapping[str, torch.Tensor] | None = None,
) -> list[tuple[str, GPParametrization]]:
    """Reparametrize each planned layer's ``weight`` by its codewords, in place.

    ``plans``: :class:`~gppq_dist.pq.plan.LayerPlan` objects (or anything with ``name``,
    ``d``, ``k``), or ``{name: (d, k)}``. ``assignments[name]``: psi of the layer (N int64,
    moved to the weight's device). ``codebooks[name]`` (K x d), where given, are the starting
    codewords (for weights snapped to them R0 is exactly zero and W stays exactly C[psi]);
    else the member means of the current weights. Afterwards ``model.parameters()`` yields
    the K x d codewords in place of the quantized weights, as the same ``Parameter`` objects
    (``register_parametrization`` re-points them), so build the optimizer after this call or
    before any step. Returns ``[(name, parametrization)]`` in plan order, for
    :func:`recursion_hook` and the helpers below.
    """
    modules = dict(model.named_modules())
    layers = []
    for name, d, k in _layer_specs(plans):
        if name not in modules:
            raise ValueError(f"no module named {name!r} in the model")
        module = modules[name]
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{name}.weight is already parametrized")
        weight = module.weight
        start = codebooks.get(name) if codebooks is not None else None
        parametrization = GPParametrization(
            assignments[name].to(weight.device), k, d, weight.shape, mu, codebook=start,
        )
        parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
        parametrization.bind(module.parametrizations["weight"])
        layers.append((name, parametrization))
    return layers


def _check_sgd(group: Mapping[str, Any]) -> None:
    """Refuse settings under which the scalar recursion is not what the optimizer does."""
    if "momentum" not in group or "weight_decay" not in group:
        raise ValueError("the G&P recursion follows torch.optim.SGD; this optimizer's groups have no momentum")
    for key in ("dampening", "nesterov", "maximize"):
        if group.get(key):
            raise ValueError(f"the G&P recursion assumes SGD without {key}; got {key}={group[key]}")


@torch.no_grad()
def advance(layers: GPLayers, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
    """Advance every layer's alpha and beta by one SGD step of ``lr``, ``momentum``,
    ``weight_decay``: call right after the optimizer stepped the codewords."""
    for _, parametrization in layers:
        parametrization.advance(lr, momentum, weight_decay)


def recursion_hook(optimizer: torch.optim.Optimizer, layers: GPLayers) -> RemovableHandle:
    """Advance alpha and beta after every ``optimizer.step()`` (a step post-hook).

    Each layer follows the ``lr``, ``momentum`` and ``weight_decay`` of the parameter group
    holding its codewords (found by identity, at every step, so schedulers and
    ``add_param_group`` are followed). A layer whose codewords are in no group (an engine
    that flattens its parameters into buffers of its own) follows group 0. The optimizer
    must step as torch's SGD does, without dampening, Nesterov or maximize (checked). A
    step not taken (``GradScaler`` skipping one with inf gradients) does not advance the
    recursion either. Returns the hook's handle.
    """
    layers = list(layers)
    for group in optimizer.param_groups:
        _check_sgd(group)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        by_group: dict[int, list[tuple[str, GPParametrization]]] = {}
        for name, parametrization in layers:
            index = group_of.get(id(parametrization.codewords), 0)
            by_group.setdefault(index, []).append((name, parametrization))
        for index, members in by_group.items():
            group = optimizer.param_groups[index]
            _check_sgd(group)
            advance(members, group["lr"], group["momentum"], group["weight_decay"])

    return optimizer.register_step_post_hook(hook)


@torch.no_grad()
def gamma(layers: GPLayers) -> torch.Tensor:
    """The quantization loss Gamma (eq. 7) as a 0-dim tensor: the mean over layers of the mean
    ``||W_j - c_psi(j)||^2``, c the member means of the current W (no host sync)."""
    errors = [p.quantization_error() for _, p in layers]
    return torch.stack(errors).mean() if errors else torch.zeros(())


def codebooks(layers: GPLayers) -> dict[str, torch.Tensor]:
    """``{name: C}``, each the layer's current K x d codewords (detached, shared storage)."""
    return {name: p.codewords.detach() for name, p in layers}


def assignments(layers: GPLayers) -> dict[str, torch.Tensor]:
    """``{name: psi}``, each N int64."""
    return {name: p.psi for name, p in layers}


def _gp_of(module: nn.Module) -> GPParametrization | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    stack = module.parametrizations["weight"]
    if not any(isinstance(p, GPParametrization) for p in stack):
        return None
    if len(stack) != 1:
        raise ValueError("a G&P weight with further parametrizations stacked on it cannot be removed")
    return stack[0]


def _unparametrize(module: nn.Module) -> None:
    """Drop ``module``'s parametrizations and give it back its own class, leaving the class
    torch injected untouched: ``deepcopy`` shares that class between a model and its copy,
    and ``parametrize.remove_parametrizations`` deletes the parametrized property from it,
    which would break the original when the copy is snapped."""
    if len(module.parametrizations) != 1:
        raise ValueError("a G&P weight beside other parametrized tensors of the same module cannot be removed")
    delattr(module, "parametrizations")
    module.__class__ = module.__class__.__bases__[0]


@torch.no_grad()
def remove_gp(model: nn.Module, snap: bool = True) -> list[str]:
    """Remove every G&P parametrization from ``model``, in place; returns the layers' names.

    Each weight becomes a plain new ``Parameter``: ``C[psi]`` exactly when ``snap`` (what a
    compressed artifact stores), else the current ``C[psi] + alpha * R0``; in the memory
    format the weight had when attached. The codeword parameters an optimizer holds are
    left as they are (K x d), so build a new optimizer to keep training.
    """
    removed = []
    for name, module in list(model.named_modules()):
        parametrization = _gp_of(module)
        if parametrization is None:
            continue
        codewords = parametrization.codewords
        weight = codewords[parametrization.psi] if snap else parametrization.subvectors()
        weight = weight.view(parametrization.shape).contiguous(memory_format=parametrization.memory_format)
        requires_grad = codewords.requires_grad
        _unparametrize(module)
        module.weight = nn.Parameter(weight, requires_grad=requires_grad)
        removed.append(name)
    return removed


def snap_(model: nn.Module) -> list[str]:
    """Remove the G&P parametrizations leaving every weight exactly ``C[psi]``
    (:func:`remove_gp` with ``snap=True``)."""
    return remove_gp(model, snap=True)
