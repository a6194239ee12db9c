"""Replace each quantized MatMul/Gemm with the W4A8 op (``ai.fptq::W4A8MatMul``), or, for the
layers mixed precision kept at 8-bit weights, with ``ai.fptq::W8A8MatMul`` (the same inputs and
attributes, B one byte per weight); the rescored head (``rescored_head``) becomes
``ai.fptq::W4A8RescoredMatMul``, whose last three inputs are the residual's weight.

The new node reads the layer's original input, the packed weights, group scales, zero points
and the static activation scale, and writes the original output tensor, so nothing downstream
changes. A Gemm bias becomes an ``Add`` after the op. A K that is not a multiple of the group
size needs nothing: the ops take a partial last group (``docs/ops.md``; models converted before
read X through a ``Pad`` to whole groups). Node and initializer names derive from
the layer name (``model.layers.3.mlp.down_proj/w4a8_matmul``) so a user finds them in Netron.
The op's function body is attached when the model is exported (``functions.add_w4a8_function``).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_onnx.op_contract import OP_DOMAIN, OP_TYPE, RESCORED_OP_TYPE, W8A8_OP_TYPE

from .base import ConversionContext, Pass


class ReplaceMatMulPass(Pass):
    """Swap every quantized layer's node for a W4A8MatMul node."""

    name = "replace_matmul"

    def requires(self, ctx: ConversionContext) -> None:
        self.require_layer_field(ctx, "packed", "run quantize_weights first")
        self.require_layer_field(ctx, "act_scale", "run act_scales first")

    def call(self, ctx: ConversionContext) -> bool:
        for layer in ctx.layers:
            self._replace(ctx, layer)
        if ctx.layers:
            ctx.graph.cleanup().toposort()
        return bool(ctx.layers)

    def _replace(self, ctx: ConversionContext, layer) -> None:
        node, output = layer.node, layer.node.outputs[0]
        name = layer.name
        activation = node.inputs[0]
        act_scale = gs.Constant(f"{name}.act_scale", np.array(layer.act_scale, np.float32))
        op_type, suffix = (W8A8_OP_TYPE, "w8a8_matmul") if layer.weight_bits == 8 else (OP_TYPE, "w4a8_matmul")
        attrs = {"K": layer.k, "N": layer.n, "group_size": layer.group_size,
                 "act_mode": int(layer.act_mode)}
        inputs = [activation, *_weight_constants(f"{name}.weight", layer.packed), act_scale]
        if layer.residual is not None:  # the rescored head
            op_type, suffix = RESCORED_OP_TYPE, "w4a8_rescored_matmul"
            attrs["top_k"] = layer.top_k
            inputs += _weight_constants(f"{name}.residual", layer.residual)
        node.outputs.clear()
        node.inputs.clear()
        result = output
        if layer.bias is not None:
            result = gs.Variable(f"{name}/w4a8_output", dtype=output.dtype, shape=output.shape)
            ctx.graph.nodes.append(gs.Node("Add", name=f"{name}/bias", outputs=[output], inputs=[
                result, gs.Constant(f"{name}.bias", layer.bias.astype(np.float32))]))
        replacement = gs.Node(op_type, name=f"{name}/{suffix}", domain=OP_DOMAIN, inputs=inputs, outputs=[result],
                              attrs=attrs)
        ctx.graph.nodes.append(replacement)
        layer.node = replacement
        layer.replaced_by = replacement.name


def _weight_constants(prefix: str, weight: tuple) -> list[gs.Constant]:
    """The op's (B, scales, zero_points) inputs of ``weight``: B nibbles, or bytes for 8-bit weights."""
    packed, scales, zero_points = weight
    return [gs.Constant(f"{prefix}_packed", packed), gs.Constant(f"{prefix}_scales", scales.astype(np.float32)),
            gs.Constant(f"{prefix}_zero_points", zero_points)]
