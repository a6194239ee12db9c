"""Mixed precision: the layers that lose the most keep 8-bit weights (``W8A8MatMul``).

W4A8's error is mostly weight error (``docs/accuracy.md``), and it is concentrated: on SmolLM2 a
handful of layers have output errors several times the median. Giving those layers 8-bit weights
(group-wise like their 4-bit weights: the same group size and symmetry, or with ``per_channel``
one group over all of K; ``quant.quantize_weight_groupwise_int8``) removes most of their error for a small size cost.
Activations stay int8 with the layer's scheme, so the layer is W8A8: ``W8A8MatMul``, W4A8MatMul's
contract with one byte per weight (``docs/ops.md``), which our CPU kernel runs.

Ranking: the measured W4A8 output error (``output_error.LayerOutputErrorPass`` must have run).
Budget: ``count`` layers and/or ``fraction`` of all quantized weights (a size budget: each chosen
layer adds 4 bits per weight); a layer is taken while either budget has room. With ``head`` the
language-model head takes 8 bits first, outside the budget: its error lands on the logits
directly (measured on SmolLM2: Brown perplexity 49.9 with a float head, 65.7 with a 4-bit one);
with ``keep_head`` (the rescored head) the head is left out of the budget too.
"""
from __future__ import annotations

from .output_error import layer_output_error
from fptq_onnx.quant import quantize_weight_groupwise_int8, relative_weight_error

from .base import ConversionContext, LinearLayer, Pass, PassPreconditionError
from .find_linears import is_lm_head


class MixedPrecisionPass(Pass):
    """Give the ``count`` (or ``fraction`` of weights) worst layers by output error 8-bit weights,
    and (``head``) the language-model head whatever the budget."""

    name = "mixed_precision"

    def __init__(self, count: int = 0, fraction: float = 0.0, head: bool = False, per_channel: bool = False,
                 keep_head: bool = False):
        self.count, self.fraction, self.head, self.per_channel = count, fraction, head, per_channel
        self.keep_head = keep_head  # the head stays as it is (the rescored head: 4 bits and a residual)

    def requires(self, ctx: ConversionContext) -> None:
        if (self.count or self.fraction) and any(layer.output_error is None for layer in ctx.layers):
            raise PassPreconditionError(f"{self.name}: needs every layer's output error; run output_error first "
                                        "(calibration with error rows > 0)")
        self.require_layer_field(ctx, "group_size", "run quantize_weights first")

    def call(self, ctx: ConversionContext) -> bool:
        pairs = [(layer, group) for group in ctx.groups for layer in group.layers]
        outputs = {tensor.name for tensor in ctx.graph.outputs}
        heads = [(layer, group) for layer, group in pairs if is_lm_head(layer, outputs)]
        for layer, group in heads if self.head else []:
            _to_8_bits(layer, group, self.per_channel)
        # the budget is a share of the other layers' weights: an 8-bit or kept head is not chosen by it
        outside = {id(layer) for layer, _ in heads} if self.head or self.keep_head else set()
        rest = [(layer, group) for layer, group in pairs if id(layer) not in outside and layer.weight_bits != 8]
        total = sum(layer.k * layer.n for layer, _ in rest)
        ranked = sorted(rest, key=lambda pair: pair[0].output_error, reverse=True) if self.count or self.fraction else []
        chosen, weights = 0, 0
        for layer, group in ranked:
            size = layer.k * layer.n
            if chosen >= self.count and weights + size > self.fraction * total:
                break
            _to_8_bits(layer, group, self.per_channel)
            chosen, weights = chosen + 1, weights + size
        return False  # decisions only; the replacement pass writes W8A8MatMul nodes


def _to_8_bits(layer: LinearLayer, group, per_channel: bool) -> None:
    """Re-quantize ``layer`` with 8-bit group-wise weights (``per_channel``: one group of K) and
    measure its output error again (where calibration kept sample rows)."""
    layer.w4_output_error = layer.output_error
    if per_channel:
        layer.group_size = layer.k + layer.k % 2  # one group; the op takes even group sizes
    u, scales, zero_points = quantize_weight_groupwise_int8(layer.weight, layer.group_size, layer.symmetric)
    layer.packed = (u, scales, zero_points)  # the op's B [N, K] as it is
    layer.weight_error = relative_weight_error(layer.weight, u, scales, zero_points, layer.group_size)
    layer.weight_bits = 8
    if group.sample_rows is not None:
        layer.output_error = layer_output_error(group.sample_rows, layer, group.lae_scales)
