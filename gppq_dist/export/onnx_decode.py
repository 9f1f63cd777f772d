"""Each codec's decoder in ONNX operators: a function that rebuilds a coded layer's dense
weight from the tensors the artifact stores, which the model holds as initializers.

A coded layer is one node of the model, ``gppq.decode_<codec>_<b>bit(codebook/<layer>,
indices/<layer>[, pattern/<layer>]) -> <layer>.weight``, calling a model-local function
(domain ``gppq``) of standard operators; its own numbers (the weight's ``shape``, the
indices' ``count`` and ``pad``) are the node's attributes. Layers whose decoding is the same
but for those numbers call one function, so a model holds a handful of functions however
many layers it has (a decoding subgraph per layer would cost some 1 to 2 kB of nodes each:
a few percent of a compressed ResNet). A runtime inlines the functions (ONNX Runtime does,
then folds them with the rest: :mod:`gppq_dist.export.onnx`); ``onnx.inliner`` does it
for runtimes that take no local functions.

A decoder reads one layer's :class:`~gppq_dist.artifact.StoredLayer` and returns a float32
value of the layer's weight shape, equal bit for bit to the weight
:func:`~gppq_dist.artifact.rebuild_model` holds: fp16 codebooks cast to fp32 (exact), the
codewords gathered and, for ``residual``, added in stage order as
:mod:`gppq_dist.pq.codecs` adds them. Positions and indices are int64, bit fields unsigned.

- unpacking (:func:`unpack`): index j occupies bits ``[j*b, (j+1)*b)`` of a little-endian
  bit stream (:func:`~gppq_dist.pq.codec.pack_indices`), so 8 indices fill b bytes exactly
  and index ``8g + t`` starts at bit ``t*b`` of group g's bytes: the bytes each t touches
  are gathered (constant columns), joined, shifted right and masked to b bits (BitShift,
  BitwiseOr, BitwiseAnd: opset 18) in uint32 (uint64 past 25 bits), then cast to int64
  (b = 8: the bytes are the indices). No intermediate holds a value per bit;
- ``pq``: ``Gather(codebook K x d, indices) -> N x d``, reshaped to the weight (scalar
  k-means is d = 1);
- ``pq_subspace``: the ``m x K x d`` codebooks flattened to ``mK x d``; subvector j reads
  row ``(j mod m) * K + index`` (its sub-space's codebook);
- ``residual``: stage s gathers from codebook s with its n indices (the stage-major slice
  ``[s*n, (s+1)*n)``); the stages' codewords are summed in stage order;
- ``clipq``: the pattern's r-bit gap codes ``c`` become positions
  ``CumSum(c + 1, or 2^r - 1 for the escape code) - 1``; each code that is no escape
  scatters its kept weight's level (the i-th such code, the i-th kept weight) to its
  position in zeros (ScatterElements), each escape into one spare slot cut off after (all
  shapes static: ONNX Runtime folds no Compress, whose output size depends on the data);
- ``ternary``: each 2-bit code gathers its sign from ``{0, +1, -1, 0}``, times its row's alpha.

A codec added at run time (:func:`~gppq_dist.pq.codecs.register_codec`) exports once its
decoder is registered here (:func:`register_decoder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper, numpy_helper

from gppq_dist.errors import ExportError
from gppq_dist.pq.codecs import codec_for
from gppq_dist.pq.ternary import TERNARY

if TYPE_CHECKING:
    from gppq_dist.artifact import StoredLayer
    from gppq_dist.pq.plan import LayerPlan

DOMAIN = "gppq"
MAX_INDEX_BITS = 57  # an index and its start within a byte fit one uint64 word


class Body:
    """One layer's decoding as a function body: its inputs (the stored tensors), its nodes,
    and its numbers, which become attributes of the layer's call (:meth:`numbers`). Value
    names are a counter, so equal decodings give equal bodies."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self.inputs: dict[str, torch.Tensor] = {}  # formal input -> stored tensor
        self.attributes: dict[str, list[int]] = {}  # attribute -> this layer's value
        self._count = 0
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        """Add ``op_type(inputs)``; returns its output's name."""
        output = f"v{self._count}"
        self._count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def input(self, name: str, tensor: torch.Tensor) -> str:
        """A stored tensor of the layer (``name``: its kind, ``codebook``, ``indices``, ...)."""
        self.inputs[name] = tensor
        return name

    def constant(self, value, dtype: type) -> str:
        """A constant of the decoding itself (the same in every layer that shares it)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.op("Constant", value=numpy_helper.from_array(array))
        return self._constants[key]

    def numbers(self, name: str, values: list[int] | tuple[int, ...]) -> str:
        """This layer's own int64 vector, passed as the call's attribute ``name``."""
        self.attributes[name] = [int(v) for v in values]
        output = self.op("Constant")
        self.nodes[-1].attribute.append(AttributeProto(name="value_ints", ref_attr_name=name, type=AttributeProto.INTS))
        return output

    def int64(self, value) -> str:
        return self.constant(value, np.int64)

    def cast(self, value: str, to: int) -> str:
        return self.op("Cast", value, to=to)

    def zeros(self, shape: str, dtype: type) -> str:
        """Zeros of the (int64 vector) ``shape``, made when the model loads."""
        return self.op("ConstantOfShape", shape, value=numpy_helper.from_array(np.zeros(1, dtype)))

    def function(self, name: str, output: str, opset: int) -> FunctionProto:
        return helper.make_function(DOMAIN, name, list(self.inputs), [output], self.nodes,
                                    opset_imports=[helper.make_opsetid("", opset)], attributes=list(self.attributes))


def unpack(body: Body, packed: str, bits: int, count: int, prefix: str = "") -> str:
    """``count`` int64 indices of ``bits`` bits each from the packed uint8 bytes ``packed``
    (``prefix``: of the attributes ``count`` and ``pad``, where a layer unpacks twice).

    Every 8 indices fill exactly ``bits`` bytes, so the stream, padded to whole groups, is
    read as ``groups x bits`` bytes, and index t of every group starts at the same bit
    ``t * bits``: its bytes are gathered by constant columns, joined (byte k shifted left by
    8k), shifted right by ``(t * bits) mod 8`` and masked. Each op runs once over ``count``
    elements.
    """
    if bits == 0:  # K = 1: nothing is stored, every index is 0
        return body.zeros(body.numbers(f"{prefix}count", [count]), np.int64)
    if bits > MAX_INDEX_BITS:
        raise ExportError(f"indices of {bits} bits cannot be unpacked in the graph (at most {MAX_INDEX_BITS})")
    if bits == 8:  # K = 256: a byte is an index
        return body.cast(packed, TensorProto.INT64)
    first_bit = np.arange(8) * bits
    span = int(((first_bit % 8 + bits + 7) // 8).max())  # bytes one index touches, at most
    word_type, np_type = (TensorProto.UINT32, np.uint32) if 8 * span <= 32 else (TensorProto.UINT64, np.uint64)
    pad = -(-count // 8) * bits - -(-count * bits // 8)  # whole groups less the stored bytes
    padded = body.op("Concat", packed, body.zeros(body.numbers(f"{prefix}pad", [pad]), np.uint8), axis=0)
    table = body.op("Reshape", padded, body.int64([-1, bits]))
    word = None
    for k in range(span):
        # a byte past an index's last one lands above its mask: any column of the group will do
        columns = np.minimum(first_bit // 8 + k, bits - 1)
        part = body.cast(body.op("Gather", table, body.int64(columns), axis=1), word_type)
        if k:
            part = body.op("BitShift", part, body.constant(8 * k, np_type), direction="LEFT")
        word = part if word is None else body.op("BitwiseOr", word, part)
    shifted = body.op("BitShift", word, body.constant(first_bit % 8, np_type), direction="RIGHT")
    fields = body.op("BitwiseAnd", shifted, body.constant((1 << bits) - 1, np_type))
    flat = body.op("Reshape", fields, body.int64([-1]))
    counted = body.op("Slice", flat, body.int64([0]), body.numbers(f"{prefix}count", [count]))
    return body.cast(counted, TensorProto.INT64)


def _indices(body: Body, plan: LayerPlan, layer: StoredLayer) -> str:
    return unpack(body, body.input("indices", layer.indices), plan.index_bits, plan.n_indices)


def _codebook(body: Body, layer: StoredLayer) -> str:
    """The codebook(s) as fp32 (the stored fp16 cast: exact)."""
    return body.cast(body.input("codebook", layer.codebook), TensorProto.FLOAT)


def _shaped(body: Body, plan: LayerPlan, value: str) -> str:
    return body.op("Reshape", value, body.numbers("shape", plan.shape))


def decode_pq(body: Body, plan: LayerPlan, layer: StoredLayer) -> str:
    return _shaped(body, plan, body.op("Gather", _codebook(body, layer), _indices(body, plan, layer), axis=0))


def decode_pq_subspace(body: Body, plan: LayerPlan, layer: StoredLayer) -> str:
    codebooks = _codebook(body, layer)
    rows = body.op("Flatten", codebooks, axis=2)  # m x K x d -> mK x d
    sizes = body.op("Shape", codebooks)
    m, k = (body.op("Gather", sizes, body.int64(axis), axis=0) for axis in (0, 1))
    indices = _indices(body, plan, layer)
    subspace = body.op("Mod", body.op("Range", body.int64(0), body.op("Size", indices), body.int64(1)), m)
    row = body.op("Add", body.op("Mul", subspace, k), indices)
    return _shaped(body, plan, body.op("Gather", rows, row, axis=0))


def decode_residual(body: Body, plan: LayerPlan, layer: StoredLayer) -> str:
    codebooks = _codebook(body, layer)
    per_stage = body.op("Reshape", _indices(body, plan, layer), body.int64([plan.stages, -1]))
    vectors = None
    for stage in range(plan.stages):  # summed in stage order, as the codec sums them
        codebook = body.op("Gather", codebooks, body.int64(stage), axis=0)
        codewords = body.op("Gather", codebook, body.op("Gather", per_stage, body.int64(stage), axis=0), axis=0)
        vectors = codewords if vectors is None else body.op("Add", vectors, codewords)
    return _shaped(body, plan, vectors)


def decode_clipq(body: Body, plan: LayerPlan, layer: StoredLayer) -> str:
    levels = body.op("Reshape", _codebook(body, layer), body.int64([-1]))
    kept_values = body.op("Gather", levels, _indices(body, plan, layer), axis=0)
    bits, count = layer.extra_meta
    pattern = body.input(codec_for(plan.codec).extra.name, layer.extra)
    codes = unpack(body, pattern, bits, count, prefix="pattern_")
    is_escape = body.op("Equal", codes, body.int64((1 << bits) - 1))
    kept = body.cast(body.op("Not", is_escape), TensorProto.INT64)
    # a kept weight's position: the steps before it (code + 1 each, 2^r - 1 an escape) plus its code
    position = body.op("Add", body.op("CumSum", body.op("Add", codes, kept), body.int64(0), exclusive=1), codes)
    shape = body.numbers("shape", plan.shape)
    size = body.op("ReduceProd", shape, keepdims=1)
    target = body.op("Where", is_escape, size, position)  # an escape: the spare slot, any value
    values = body.op("Gather", kept_values, body.op("CumSum", kept, body.int64(0), exclusive=1), axis=0)
    slots = body.op("ScatterElements", body.zeros(body.op("Add", size, body.int64([1])), np.float32), target,
                    values, axis=0)
    return body.op("Reshape", body.op("Slice", slots, body.int64([0]), size), shape)


def decode_ternary(body: Body, plan: LayerPlan, layer: StoredLayer) -> str:
    signs = body.op("Gather", body.constant(TERNARY, np.float32), _indices(body, plan, layer), axis=0)
    alpha = body.op("Reshape", _codebook(body, layer), body.int64([-1] + [1] * (len(plan.shape) - 1)))
    return body.op("Mul", _shaped(body, plan, signs), alpha)  # each row times its alpha


Decoder = Callable[[Body, "LayerPlan", "StoredLayer"], str]
DECODERS: dict[str, Decoder] = {
    "pq": decode_pq,
    "pq_subspace": decode_pq_subspace,
    "residual": decode_residual,
    "clipq": decode_clipq,
    "ternary": decode_ternary,
}


def register_decoder(codec: str, decoder: Decoder) -> None:
    """The ONNX decoder of a codec added with :func:`~gppq_dist.pq.codecs.register_codec`."""
    if codec in DECODERS:
        raise ValueError(f"codec {codec!r} already has an ONNX decoder")
    DECODERS[codec] = decoder


class Decoders:
    """The decoding a model gains: one call node per coded layer, the initializers it reads
    (the layer's stored tensors, named ``<kind>/<layer>`` as in the artifact), and the
    functions the calls share."""

    def __init__(self, opset: int) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.functions: list[FunctionProto] = []
        self._opset = opset
        self._by_signature: dict[bytes, str] = {}  # a function's body -> its name

    def add(self, plan: LayerPlan, layer: StoredLayer, output: str) -> None:
        """Compute ``plan``'s weight as the value ``output``."""
        decoder = DECODERS.get(plan.codec)
        if decoder is None:
            raise ExportError(f"layer '{plan.name}' is coded with codec {plan.codec!r}, which has no ONNX decoder "
                              f"(known: {', '.join(DECODERS)}; gppq_dist.export.onnx_decode.register_decoder adds one)")
        body = Body()
        weight = decoder(body, plan, layer)
        self.call(body, weight, f"decode_{plan.codec}_{plan.index_bits}bit", [f"{kind}/{plan.name}" for kind in body.inputs],
                  output)

    def call(self, body: Body, result: str, stem: str, stored: list[str], output: str) -> None:
        """A node computing ``body``'s ``result`` as ``output``, its inputs the initializers
        ``stored`` (one per :meth:`Body.input`): it calls the function of an equal body, or a
        new one named ``stem`` (``stem_2``, ... where that is taken)."""
        signature = body.function("", result, self._opset).SerializeToString()
        name = self._by_signature.get(signature)
        if name is None:
            taken = sum(function.name == stem or function.name.startswith(f"{stem}_") for function in self.functions)
            name = f"{stem}_{taken + 1}" if taken else stem
            self._by_signature[signature] = name
            self.functions.append(body.function(name, result, self._opset))
        for initializer, tensor in zip(stored, body.inputs.values()):
            self.initializers.append(numpy_helper.from_array(tensor.contiguous().numpy(), initializer))
        self.nodes.append(helper.make_node(name, stored, [output], domain=DOMAIN, **body.attributes))
