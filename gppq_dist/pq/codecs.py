"""How a layer's codes are laid out, decoded and counted: one :class:`Codec` per name.

A :class:`~gppq_dist.pq.plan.LayerPlan` names its codec (``plan.codec``) and artifacts store
that name, so a name once written keeps its meaning. Planning, accounting, decoding and the
artifact look the codec up (:func:`codec_for`); none of them branches on its name.

- ``pq``: one joint codebook of K codewords (``K x d``) for all subvectors, one index per
  subvector (G&P PQ, direct PQ, two-stage PQ; scalar k-means is ``pq`` with d = 1);
- ``pq_subspace``: a ``K x d`` codebook of its own for every sub-space (column block j of
  the rows), each fitted on the layer's ``Cout`` rows, so K is clamped against ``Cout``;
  codebooks ``m x K x d``, indices in subvector order (Gong et al. 2014);
- ``residual``: ``stages`` joint codebooks, each coding what the stages before it left;
  codebooks ``S x K x d``, one index per subvector and stage, stage-major (Gong et al. 2014);
- ``clipq``: single weights (d = 1), the smallest-magnitude fraction ``prune`` pruned and
  the rest coded with K = 2^bits levels (codebook ``K x 1``, :mod:`gppq_dist.pq.clipq`); one
  index per kept weight, the sparsity pattern stored beside them (its extra tensor);
- ``ternary``: single weights in {-alpha, 0, +alpha}, a 2-bit code each (K = 4, three used)
  and one fp16 alpha per output row (codebook ``Cout x 1``, :mod:`gppq_dist.pq.ternary`);
  the layer's input quantizer stored beside them (its extra tensor).

Every codec is costed the same way (:mod:`gppq_dist.pq.accounting`): log2(K) bits per
index, fp16 codebooks, plus its extra tensor's own cost. A codec turns a layer rule into the
layer's plan (:meth:`Codec.plan`): the PQ codecs read the rule's ``d`` and ``k`` (K clamped,
:func:`clamp_k`), ``clipq`` its ``prune`` and ``bits``, ``ternary`` nothing.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from gppq_dist.pq.clipq import best_gap_bits, expected_pattern_bytes, gap_codes, mask_from_gap_codes, n_kept
from gppq_dist.pq.clipq import decode as clipq_decode
from gppq_dist.pq.clipq import pattern_bytes as coded_pattern_bytes
from gppq_dist.pq.codec import pack_indices, unpack_indices
from gppq_dist.pq.subvectors import from_subvectors, row_length
from gppq_dist.pq.ternary import TERNARY, InputQuantizer

if TYPE_CHECKING:
    from gppq_dist.pq.plan import LayerPlan

FP32_BYTES = 4


class ExtraTensor(Protocol):
    """A tensor a codec keeps per layer beside the indices and the codebook. In memory it is
    ``Artifact.extras[layer]``; in the file ``<name>/<layer>``, with its JSON metadata (if
    any) under the payload's ``<name>s``."""

    name: str

    def cost(self, plan: LayerPlan, value: torch.Tensor | None) -> float:
        """Accounted bytes; ``value`` None: the estimate before there is one (``gppq size``)."""
        ...

    def check(self, plan: LayerPlan, value: torch.Tensor) -> torch.Tensor:
        """``value`` as kept in memory (CPU); ``ValueError`` when it does not fit the plan."""
        ...

    def pack(self, plan: LayerPlan, value: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The stored tensor and its JSON metadata (None: none)."""
        ...

    def unpack(self, plan: LayerPlan, stored: torch.Tensor, meta: Any) -> torch.Tensor:
        """Inverse of :meth:`pack`."""
        ...

    def install(self, module: nn.Module, value: torch.Tensor) -> None:
        """What the rebuilt model's layer needs besides its decoded weight."""
        ...


class Codec(Protocol):
    """One layout of a layer's codes (module docstring)."""

    name: str
    extra: ExtraTensor | None

    def plan(self, layer: LayerPlan, rule: Any, stages: int) -> LayerPlan:
        """``layer`` (name, kind, shape and rule key set) coded as ``rule`` says, with
        ``stages`` codebooks where the codec stacks them; ``d`` must divide the rows."""
        ...

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        """The stored codebook tensor's shape (fp16)."""
        ...

    def n_indices(self, plan: LayerPlan) -> int:
        """Stored indices, each of ``plan.index_bits`` bits."""
        ...

    def decode(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        """The coded weight of ``plan.shape`` from its codebook, flat indices and extra tensor."""
        ...


def clamp_k(k: int, n_subvectors: int) -> int:
    """``min(k, largest power of two p with 4p < n_subvectors)``, at least 1 (DESIGN §2)."""
    if n_subvectors <= 4:
        return 1
    return min(k, 1 << ((n_subvectors - 1).bit_length() - 3))


class JointPQ:
    """``pq``: one ``K x d`` codebook, one index per subvector."""

    name = "pq"
    extra = None

    def plan(self, layer: LayerPlan, rule: Any, stages: int) -> LayerPlan:
        return replace(layer, d=rule.d, k=clamp_k(rule.k, self.fitted_on(layer.shape, rule.d)), k_requested=rule.k)

    def fitted_on(self, shape: tuple[int, ...], d: int) -> int:
        """Subvectors each codebook is fitted on (K is clamped against them)."""
        return math.prod(shape) // d

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        return (plan.k, plan.d)

    def n_indices(self, plan: LayerPlan) -> int:
        return plan.n_subvectors

    def decode(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        return from_subvectors(self.vectors(plan, codebook, indices), plan.shape)

    def vectors(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``N x d``: every subvector's codeword."""
        return codebook[indices]


class SubspacePQ(JointPQ):
    """``pq_subspace``: ``m x K x d``, sub-space j's codebook fitted on one subvector per row."""

    name = "pq_subspace"

    def fitted_on(self, shape: tuple[int, ...], d: int) -> int:
        return shape[0]

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        return (row_length(plan.shape) // plan.d, plan.k, plan.d)

    def vectors(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        subspace = torch.arange(indices.numel(), device=indices.device) % plan.n_codebooks
        return codebook[subspace, indices]


class ResidualPQ(JointPQ):
    """``residual``: ``S x K x d``, S indices per subvector (stage-major), the codewords summed."""

    name = "residual"

    def plan(self, layer: LayerPlan, rule: Any, stages: int) -> LayerPlan:
        return replace(super().plan(layer, rule, stages), stages=stages)

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        return (plan.stages, plan.k, plan.d)

    def n_indices(self, plan: LayerPlan) -> int:
        return plan.n_subvectors * plan.stages

    def vectors(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        per_stage = indices.view(plan.stages, plan.n_subvectors)
        vectors = codebook[0][per_stage[0]]
        for stage in range(1, plan.stages):
            vectors = vectors + codebook[stage][per_stage[stage]]
        return vectors


class SparsityPattern:
    """CLIP-Q's kept weights: in memory a flat bool mask, stored as relative indices of
    ``r`` bits bit-packed, ``[r, count]`` in the payload's ``patterns``."""

    name = "pattern"

    def cost(self, plan: LayerPlan, value: torch.Tensor | None) -> float:
        if value is None:  # a random pattern of the same density
            return expected_pattern_bytes(plan.n_subvectors, plan.n_indices)
        return coded_pattern_bytes(value.numpy())

    def check(self, plan: LayerPlan, value: torch.Tensor) -> torch.Tensor:
        mask = value.detach().cpu().reshape(-1).bool()
        if int(mask.sum()) != plan.n_indices:
            raise ValueError(f"the sparsity pattern of layer {plan.name!r} keeps {int(mask.sum())} weights, "
                             f"its layout says {plan.n_indices}")
        return mask

    def pack(self, plan: LayerPlan, value: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mask = value.numpy()
        bits, _ = best_gap_bits(mask)
        codes = gap_codes(mask, bits)
        return torch.from_numpy(pack_indices(torch.from_numpy(codes), bits)), [bits, int(codes.size)]

    def unpack(self, plan: LayerPlan, stored: torch.Tensor, meta: Any) -> torch.Tensor:
        if meta is None:
            raise ValueError(f"the payload has no code width and count of layer {plan.name!r}'s sparsity pattern")
        bits, count = meta
        codes = unpack_indices(stored.numpy(), bits, count).numpy()
        return torch.from_numpy(mask_from_gap_codes(codes, bits, plan.n_subvectors))

    def install(self, module: nn.Module, value: torch.Tensor) -> None:
        pass


class ClipQ:
    """``clipq``: 2^bits levels (``K x 1``), one index per kept weight, the pattern beside."""

    name = "clipq"
    extra = SparsityPattern()

    def plan(self, layer: LayerPlan, rule: Any, stages: int) -> LayerPlan:
        return replace(layer, d=1, k=1 << rule.bits, k_requested=1 << rule.bits, prune=rule.prune)

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        return (plan.k, plan.d)

    def n_indices(self, plan: LayerPlan) -> int:
        return n_kept(plan.n_subvectors, plan.prune)

    def decode(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is None:
            raise ValueError(f"layer {plan.name!r} (clipq) needs its sparsity mask")
        return clipq_decode(extra.to(indices.device), codebook[:, 0], indices, plan.shape)


class InputQuantizerValues:
    """TSQ's input quantizer of a layer: fp32 ``[eps, step, levels]``, installed on the
    rebuilt layer as a forward pre-hook."""

    name = "activation"

    def cost(self, plan: LayerPlan, value: torch.Tensor | None) -> float:
        return 3 * FP32_BYTES

    def check(self, plan: LayerPlan, value: torch.Tensor) -> torch.Tensor:
        return value.detach().float().cpu().reshape(3)

    def pack(self, plan: LayerPlan, value: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return value, None

    def unpack(self, plan: LayerPlan, stored: torch.Tensor, meta: Any) -> torch.Tensor:
        return stored

    def install(self, module: nn.Module, value: torch.Tensor) -> None:
        module.register_forward_pre_hook(InputQuantizer.from_tensor(value))


class Ternary:
    """``ternary``: a 2-bit sign code per weight, one alpha per output row (``Cout x 1``)."""

    name = "ternary"
    extra = InputQuantizerValues()

    def plan(self, layer: LayerPlan, rule: Any, stages: int) -> LayerPlan:
        return replace(layer, d=1, k=4, k_requested=4)

    def codebook_shape(self, plan: LayerPlan) -> tuple[int, ...]:
        return (plan.shape[0], 1)

    def n_indices(self, plan: LayerPlan) -> int:
        return plan.n_subvectors

    def decode(self, plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
               extra: torch.Tensor | None = None) -> torch.Tensor:
        signs = torch.tensor(TERNARY, dtype=codebook.dtype, device=indices.device)[indices]
        return (signs.view(plan.shape[0], -1) * codebook[:, :1]).view(plan.shape)


CODECS: dict[str, Codec] = {codec.name: codec for codec in (JointPQ(), SubspacePQ(), ResidualPQ(), ClipQ(), Ternary())}
BUILT_IN = tuple(CODECS)


def codec_for(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; expected one of {', '.join(CODECS)}") from None


def register_codec(codec: Codec) -> None:
    """Add a codec (a method with a storage layout of its own)."""
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is already registered")
    CODECS[codec.name] = codec


def unregister_codec(name: str) -> None:
    """Take away a codec added by :func:`register_codec`."""
    if name in BUILT_IN:
        raise ValueError(f"codec {name!r} is built in")
    del CODECS[name]


def decode_layer(plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """The coded weight of ``plan.shape`` from its codebook(s), flat indices and extra
    tensor (``clipq`` needs its mask of kept weights), any codec."""
    return codec_for(plan.codec).decode(plan, codebook, indices, extra)
