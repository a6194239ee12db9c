"""Mixed precision: the layers that lose the most keep 8-bit weights (``W8A8MatMul``).

W4A8's error is mostly weight error (``docs/accuracy.md``), and it is concentrated: on SmolLM2 a
handful of layers have output errors several times the median. Giving those layers 8-bit weights
(group-wise like their 4-bit weights: the same group size and symmetry;
``quant.quantize_weight_groupwise_int8``) removes most of their error for a small size cost.
Activations stay int8 with the layer's scheme, so the layer is W8A8: ``W8A8MatMul``, W4A8MatMul's
contract with one byte per weight (``docs/ops.md``), which our CPU kernel runs.

Ranking: the measured W4A8 output error (``layer_error.LayerOutputErrorPass`` must have run).
Budget: ``count`` layers and/or ``fraction`` of all quantized weights (a size budget: each chosen
layer adds 4 bits per weight); a layer is taken while either budget has room.
"""
from __future__ import annotations

from fptq_onnx.layer_error import layer_output_error
from fptq_onnx.quant import quantize_weight_groupwise_int8, relative_weight_error

from .base import ConversionContext, Pass, PassPreconditionError


class MixedPrecisionPass(Pass):
    """Give the ``count`` (or ``fraction`` of weights) worst layers by output error 8-bit weights."""

    name = "mixed_precision"

    def __init__(self, count: int = 0, fraction: float = 0.0):
        if count < 0 or not 0 <= fraction <= 1:
            raise ValueError(f"need count >= 0 and 0 <= fraction <= 1, got {count}, {fraction}")
        self.count, self.fraction = count, fraction

    def requires(self, ctx: ConversionContext) -> None:
        if any(layer.output_error is None for layer in ctx.layers):
            raise PassPreconditionError(f"{self.name}: needs every layer's output error; run output_error first "
                                        "(calibration with error rows > 0)")
        if any(layer.group_size is None for layer in ctx.layers):
            raise PassPreconditionError(f"{self.name}: needs the 4-bit group size; run quantize_weights first")

    def call(self, ctx: ConversionContext) -> bool:
        total = sum(layer.k * layer.n for layer in ctx.layers)
        ranked = sorted(((layer, group) for group in ctx.groups for layer in group.layers),
                        key=lambda pair: pair[0].output_error, reverse=True)
        chosen, weights = 0, 0
        for layer, group in ranked:
            size = layer.k * layer.n
            if chosen >= self.count and weights + size > self.fraction * total:
                break
            layer.w4_output_error = layer.output_error
            u, scales, zero_points = quantize_weight_groupwise_int8(layer.weight, layer.group_size, layer.symmetric)
            layer.packed = (u, scales, zero_points)  # the op's B [N, K] as it is
            layer.weight_error = relative_weight_error(layer.weight, u, scales, zero_points, layer.group_size)
            layer.weight_bits = 8
            layer.output_error = layer_output_error(group.sample_rows, layer, group.lae_scales)
            chosen, weights = chosen + 1, weights + size
        return False  # decisions only; the replacement pass writes W8A8MatMul nodes
