"""Deployment formats of a ``.gppq`` artifact: ONNX (:mod:`gppq_dist.export.onnx`, ``gppq export``).

``onnx`` is an optional extra (``pip install '.[export]'``): :mod:`gppq_dist.export.onnx`
imports it when it exports, so that its absence is one error line; the decoders
(:mod:`gppq_dist.export.onnx_decode`) are built with it and imported from there.
"""
