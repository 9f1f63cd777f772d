"""``gppq export --format onnx``: the compressed model as an ONNX file of about its accounted
size, its weights decoded in the graph.

The graph is :func:`~gppq_dist.artifact.rebuild_model` (eval mode) as torch's exporter
traces it, with every coded layer's weight initializer replaced by a node that decodes it
(:mod:`gppq_dist.export.onnx_decode`: a call of a model-local function of standard
operators) from the artifact's own tensors, now the model's initializers:
``codebook/<layer>`` (fp16), ``indices/<layer>`` (uint8, bit-packed as in the artifact)
and a ``clipq`` layer's ``pattern/<layer>`` (uint8, its gap codes packed). The unquantized
tensors (the stem, biases, each BatchNorm's folded scale and shift) stay fp32 initializers;
a tensor whose elements are all equal, such as the folded BatchNorms' running mean 0 and
variance 1 (buffers, which the accounting does not count), is a ``ConstantOfShape``. Every
input of the decoding is an initializer, so ONNX Runtime computes the dense weights once,
when the session starts (it inlines the functions and folds constants), then fuses
BatchNorm into the convs and runs the same graph as for the dense export. TSQ's input
quantizers, forward pre-hooks on the rebuilt model, are traced into the graph as
elementwise ops. With ``dense`` the traced graph is written as it is, the decoded fp32
weights its initializers: what an ordinary export stores, for comparison.

Input ``images`` (``N x C x H x W``, batch, height and width dynamic; traced at the
artifact's image size), output ``logits`` (``N x classes``); the model's metadata holds the
artifact's arch, method and preprocessing (``gppq.*`` keys).

Why the TorchScript-based exporter (``dynamo=False``), not torch 2.x's default dynamo one:

- it needs nothing beyond torch (the dynamo exporter needs ``onnxscript`` besides ``onnx``);
- with ``do_constant_folding=False`` it leaves the weights alone: its eval-mode peephole pass,
  which folds BatchNorm into the preceding conv's weight, and its constant folding run only
  with constant folding on; the weights keep their state-dict names, and equal tensors are
  stored once (its initializer deduplication, the rest ``Identity`` nodes).

The coded weights are found by value all the same, not by name: each layer's weight as the
rebuilt model holds it is matched to the initializer with exactly its bytes, and a graph in
which no initializer equals it (an exporter that fused or transformed it) is an error, never
a silently dense file. ``onnx.checker.check_model`` (with shape inference) passes on every
file written.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from gppq_dist.artifact import Artifact, rebuild_model, stored_layer
from gppq_dist.errors import ExportError
from gppq_dist.io import atomic_path

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 18
OPSETS = range(18, 21)  # the decoders use BitwiseAnd (opset 18); torch's TorchScript exporter stops at 20
INPUT, OUTPUT = "images", "logits"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    file_bytes: int
    accounted_bytes: float
    opset: int
    dense: bool
    decoded_layers: int  # coded layers whose weight the graph decodes (0 when dense)

    @property
    def over_accounted(self) -> float:
        return self.file_bytes / self.accounted_bytes


def require_onnx():
    """The ``onnx`` module, or one :class:`ExportError` saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ExportError("exporting to ONNX needs the 'onnx' package, which is not installed: "
                          "pip install '.[export]' (onnx and onnxruntime)") from None
    return onnx


def export_onnx(artifact: Artifact, path: str | Path, opset: int | None = None, dense: bool = False) -> OnnxExport:
    """Write the artifact's model as ONNX to ``path`` (atomically), at ``opset`` (default
    :data:`DEFAULT_OPSET`); see the module docstring."""
    onnx = require_onnx()
    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in OPSETS:
        raise ExportError(f"--opset: expected {OPSETS.start} to {OPSETS.stop - 1}, got {opset} "
                          "(the decoders need BitwiseAnd, opset 18)")
    model = rebuild_model(artifact).requires_grad_(False)
    proto = trace(model, example_input(artifact), opset)
    decoded = 0 if dense else decode_in_graph(proto, artifact, model)
    _describe(proto, artifact, dense)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return OnnxExport(path=path, file_bytes=path.stat().st_size, accounted_bytes=artifact.accounted_bytes,
                      opset=opset, dense=dense, decoded_layers=decoded)


def example_input(artifact: Artifact) -> torch.Tensor:
    """One image of the artifact's preprocessing (channels from its normalisation, its crop
    size; ImageNet's 3 x 224 x 224 when it records none)."""
    preprocess = artifact.info.get("preprocess") or {}
    size = preprocess.get("image_size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    return torch.zeros(1, len(preprocess.get("mean", (0, 0, 0))), height, width)


def trace(model: nn.Module, images: torch.Tensor, opset: int) -> onnx.ModelProto:
    """``model`` as the TorchScript-based exporter writes it, weights untouched (module docstring)."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of the dynamo one (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (images,), buffer, dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch"}})
    return onnx.load_model_from_string(buffer.getvalue())


def decode_in_graph(proto: onnx.ModelProto, artifact: Artifact, model: nn.Module) -> int:
    """Replace each coded layer's weight initializer by its decoding (in place), and each
    tensor whose elements are all equal by ``ConstantOfShape``; returns how many weights the
    graph decodes (coded layers with equal weights share one)."""
    from onnx import helper

    from gppq_dist.export.onnx_decode import DOMAIN, Decoders

    graph = proto.graph
    by_value = _floats_by_value(graph.initializer)
    modules = dict(model.named_modules())
    decoders = Decoders(opset=next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")))
    aliases = []
    replaced: set[str] = set()
    for plan in artifact.layers:
        weight = modules[plan.name].weight.detach().contiguous()
        names = by_value.get((tuple(weight.shape), weight.numpy().tobytes()))
        if not names:
            raise ExportError(f"the traced graph holds no initializer equal to the weight of layer '{plan.name}' "
                              "(the exporter fused or transformed it), so it cannot be decoded in the graph")
        if names[0] in replaced:  # another coded layer with the very same weight
            continue
        decoders.add(plan, stored_layer(artifact, plan), names[0])
        aliases += [helper.make_node("Identity", [names[0]], [alias]) for alias in names[1:]]
        replaced.update(names)
    kept, fills = _fills([tensor for tensor in graph.initializer if tensor.name not in replaced])
    del graph.initializer[:]
    graph.initializer.extend(kept + decoders.initializers)
    nodes = decoders.nodes + aliases + fills + list(graph.node)  # a weight is made before its use
    del graph.node[:]
    graph.node.extend(nodes)
    proto.functions.extend(decoders.functions)
    proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(decoders.nodes)


def _floats_by_value(initializers) -> dict[tuple[tuple[int, ...], bytes], list[str]]:
    """The names of the fp32 initializers, by shape and bytes."""
    from onnx import TensorProto, numpy_helper

    by_value: dict[tuple[tuple[int, ...], bytes], list[str]] = {}
    for initializer in initializers:
        if initializer.data_type == TensorProto.FLOAT:
            key = (tuple(initializer.dims), numpy_helper.to_array(initializer).tobytes())
            by_value.setdefault(key, []).append(initializer.name)
    return by_value


def _fills(initializers) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """``initializers`` less those whose elements are all equal (the folded BatchNorms' mean
    0 and variance 1), and for those ``ConstantOfShape`` nodes of the same names."""
    from onnx import helper, numpy_helper

    kept, nodes = [], []
    for initializer in initializers:
        values = numpy_helper.to_array(initializer)
        if values.size > 1 and (values == values.flat[0]).all():
            shape = f"{initializer.name}/shape"
            nodes += [helper.make_node("Constant", [], [shape],
                                       value=numpy_helper.from_array(np.array(values.shape, dtype=np.int64))),
                      helper.make_node("ConstantOfShape", [shape], [initializer.name],
                                       value=numpy_helper.from_array(values.reshape(-1)[:1]))]
        else:
            kept.append(initializer)
    return kept, nodes


def _describe(proto: onnx.ModelProto, artifact: Artifact, dense: bool) -> None:
    """The artifact's identity and preprocessing as the model's metadata (``gppq.*``)."""
    from onnx import helper

    described = {
        "gppq.arch": artifact.arch,
        "gppq.num_classes": str(artifact.num_classes),
        "gppq.method": str(artifact.info.get("method", "")),
        "gppq.preprocess": json.dumps(artifact.info.get("preprocess") or {}, sort_keys=True),
        "gppq.weights": "dense fp32" if dense else "decoded in the graph from codebooks and packed indices",
    }
    helper.set_model_props(proto, described)
