"""4-bit group-wise weight quantization along K (``fptq_onnx.quant.quantize_weight_groupwise``).

Each layer's ``[K, N]`` weight (already multiplied by its LAE scales) becomes packed nibbles
``B[N, K/2]``, ``scales[N, K/g]`` and ``zero_points[N, K/g]`` (the op's layout, ``docs/ops.md``).
A K that is not a multiple of the group size is padded with zero rows (``K'``); the
replacement pass pads X to match. The relative weight error ``||W - Q(W)||_F / ||W||_F`` (over
the real rows) is recorded on the layer.
"""
from __future__ import annotations

import numpy as np

from fptq_onnx.quant import dequantize_weight, pack_int4, pad_to_group_multiple, quantize_weight_groupwise

from .base import ConversionContext, Pass


class QuantizeWeightsPass(Pass):
    """Quantize every layer's weight.

    Args:
        group_size: weights per group along K.
        symmetric: symmetric (zero point 8) instead of asymmetric min/max groups.
    """

    name = "quantize_weights"

    def __init__(self, group_size: int = 128, symmetric: bool = False):
        if group_size < 2 or group_size % 2:
            raise ValueError(f"group size must be an even number >= 2, got {group_size}")
        self.group_size = group_size
        self.symmetric = symmetric

    def call(self, ctx: ConversionContext) -> bool:
        for layer in ctx.layers:
            padded = pad_to_group_multiple(layer.weight, self.group_size)
            u, scales, zero_points = quantize_weight_groupwise(padded, self.group_size, self.symmetric)
            restored = dequantize_weight(u, scales, zero_points)[: layer.k]
            norm = float(np.linalg.norm(layer.weight))
            layer.weight_error = float(np.linalg.norm(layer.weight - restored)) / norm if norm else 0.0
            layer.packed = (pack_int4(u), scales, zero_points)
            layer.group_size = self.group_size
            layer.k_padded = padded.shape[0]
            layer.symmetric = self.symmetric
        return False  # the graph changes when the MatMuls are replaced
