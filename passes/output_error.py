"""Per-layer output error on calibration data: where a conversion loses accuracy.

For each converted layer with M sampled calibration rows ``X[M, K]`` of its input (see
``calibration.RowReservoir``)::

    output_error = ||X W - Y_w4a8||_F / ||X W||_F

* ``X W`` is float64 with the layer's original float weight ``W[K, N]``. After LAE the layer
  holds ``s * W`` (rows scaled by s); W is recovered as ``(s * W) / s`` in float64, equal to the
  original up to one float32 rounding (6e-8 relative), instead of keeping a second copy of every
  weight in memory. A Gemm's bias is left out on both sides (it is added exactly).
* ``Y_w4a8`` is the op's float64 reference (``quant.w4a8_matmul_reference``) on the rows as the
  op sees them: ``X / s`` (float32) for LAE groups, with the layer's activation scheme and static
  scale (``w8a8_matmul_reference`` for layers kept at 8-bit weights, ``W8A8MatMul``).

It measures the layer alone on the float model's activations (errors of earlier layers do not
propagate), so the worst layers are the ones to exclude (``--nodes-to-exclude``) or to look at.
Example: a layer whose W4A8 output is off by 1% of its norm has ``output_error = 0.01``.
"""
from __future__ import annotations

import numpy as np

from fptq_onnx.external_data import release_pages
from fptq_onnx.quant import w4a8_matmul_reference, w8a8_matmul_reference

from .base import ConversionContext, LayerGroup, LinearLayer, Pass


def layer_output_error(rows: np.ndarray, layer: LinearLayer, lae_scales: np.ndarray | None) -> float:
    """``||X W - Y_w4a8||_F / ||X W||_F`` for ``rows = X[M, K]`` (0.0 when ``X W`` is all zero)."""
    x = np.asarray(rows, np.float32)
    weight = layer.weight.astype(np.float64)
    seen = x
    if lae_scales is not None:
        weight = weight / lae_scales.astype(np.float64)[:, None]
        seen = x / lae_scales
    reference = x.astype(np.float64) @ weight
    reference_of = w8a8_matmul_reference if layer.weight_bits == 8 else w4a8_matmul_reference
    quantized = reference_of(seen, *layer.packed, layer.act_scale, layer.act_mode, layer.group_size)
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - quantized)) / norm if norm else 0.0


class LayerOutputErrorPass(Pass):
    """Record ``output_error`` on every quantized layer whose group has sampled rows (an analysis
    pass: the graph is unchanged). Groups without rows are skipped with a recorded reason."""

    name = "output_error"

    def requires(self, ctx: ConversionContext) -> None:
        self.require_layer_field(ctx, "packed", "run quantize_weights first")

    def call(self, ctx: ConversionContext) -> bool:
        for group in ctx.groups:
            self._measure(ctx, group)
        return False

    def _measure(self, ctx: ConversionContext, group: LayerGroup) -> None:
        rows = group.sample_rows
        if rows is None or len(rows) == 0:
            ctx.reject(self.name, group.name, "no sampled calibration rows (--error-rows 0?): output error not measured")
            return
        for layer in group.layers:  # lae_scales is set exactly when LAE scaled the group's weights
            layer.output_error = layer_output_error(rows, layer, group.lae_scales)
            release_pages(layer.weight)  # memory-mapped: one layer resident at a time
