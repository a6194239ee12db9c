"""The rescored head: the language-model head's 4-bit weight plus, for each token's ``top_k``
largest logits, its 4-bit residual (``ai.fptq::W4A8RescoredMatMul``, ``docs/ops.md``).

Decode reads every weight of the head once per token, and the head is most of a small LLM
(Gemma-3-270m: 168M of 268M weights). An 8-bit head doubles those bytes; a 4-bit one costs
accuracy: with Gemma-3's final hidden states in float, Brown perplexity (1,536 tokens) is 40.39
with 8 bits per channel and 45.16 with 4 bits in groups of 128. Only the logits the softmax
can see need the accuracy, so the head keeps its 4-bit weight ``Q(W)`` (``quantize_weights``)
and gains ``R = Q(W - Q(W))`` (``quant.quantize_weight_residual``), which the op adds on the
``top_k`` channels with the largest 4-bit logits: 40.98 at top_k 64, 40.68 at 256 (``W + R`` on
every channel: 40.39, as 8 bits). Storage is 8 bits per weight, as the 8-bit head's; a token
reads 4 of them, plus ``top_k`` residual rows. A tied embedding reads both weights
(``tied_embedding``).
"""
from __future__ import annotations

from fptq_onnx.quant import pack_int4, quantize_weight_groupwise, quantize_weight_residual, relative_weight_error

from .base import ConversionContext, Pass
from .find_linears import is_lm_head


class RescoredHeadPass(Pass):
    """Give the 4-bit language-model head its residual and ``top_k`` (at most N)."""

    name = "rescored_head"

    def __init__(self, top_k: int = 256):
        self.top_k = top_k

    def requires(self, ctx: ConversionContext) -> None:
        self.require_layer_field(ctx, "packed", "run quantize_weights first")

    def call(self, ctx: ConversionContext) -> bool:
        outputs = {tensor.name for tensor in ctx.graph.outputs}
        for layer in ctx.layers:
            if not is_lm_head(layer, outputs):
                continue
            if layer.weight_bits != 4:
                ctx.reject(self.name, layer.name, f"head has {layer.weight_bits}-bit weights, not 4: kept as it is")
                continue
            # round to nearest, not clipped: clipping leaves the clipped weights' excess to the residual,
            # whose groups then span more (Gemma-3's Brown through GenAI: 33.97 clipped, 33.48 rounded;
            # docs/accuracy.md "The rescored head")
            u, scales, zero_points = quantize_weight_groupwise(layer.weight, layer.group_size, layer.symmetric)
            ru, rscales, rzeros = quantize_weight_residual(layer.weight, u, scales, zero_points, layer.group_size)
            layer.packed = (pack_int4(u), scales, zero_points)
            layer.residual = (pack_int4(ru), rscales, rzeros)
            layer.weight_error = relative_weight_error(layer.weight, u, scales, zero_points, layer.group_size)
            layer.clipped, layer.rounding = False, "rtn"
            layer.top_k = min(self.top_k, layer.n)
        return False  # the replacement pass writes the W4A8RescoredMatMul node
