"""Replace each quantized MatMul/Gemm with the W4A8 op (``ai.fptq::W4A8MatMul``).

The new node reads the layer's original input, the packed weights, group scales, zero points
and the static activation scale, and writes the original output tensor, so nothing downstream
changes. A Gemm bias becomes an ``Add`` after the op. Node and initializer names derive from
the layer name (``model.layers.3.mlp.down_proj/w4a8_matmul``) so a user finds them in Netron.
The op's function body is attached when the model is exported (``functions.add_w4a8_function``).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_onnx.quant import ACT_PER_TENSOR_STATIC, ACT_PER_TOKEN_DYNAMIC

from .base import ConversionContext, Pass, PassPreconditionError
from .functions import OP_DOMAIN, OP_TYPE
from .strategy import PER_TENSOR_STATIC

ACT_MODE_CODES = {PER_TENSOR_STATIC: ACT_PER_TENSOR_STATIC, "per_token_dynamic": ACT_PER_TOKEN_DYNAMIC}


class ReplaceMatMulPass(Pass):
    """Swap every quantized layer's node for a W4A8MatMul node."""

    name = "replace_matmul"

    def requires(self, ctx: ConversionContext) -> None:
        if any(layer.packed is None for layer in ctx.layers):
            raise PassPreconditionError(f"{self.name}: layers without quantized weights; run quantize_weights first")

    def call(self, ctx: ConversionContext) -> bool:
        for layer in ctx.layers:
            packed, scales, zero_points = layer.packed
            node, output = layer.node, layer.node.outputs[0]
            name = layer.name
            inputs = [
                node.inputs[0],
                gs.Constant(f"{name}.weight_packed", packed),
                gs.Constant(f"{name}.weight_scales", scales.astype(np.float32)),
                gs.Constant(f"{name}.weight_zero_points", zero_points),
                gs.Constant(f"{name}.act_scale", np.array(layer.act_scale, np.float32)),
            ]
            node.outputs.clear()
            node.inputs.clear()
            result = output
            if layer.bias is not None:
                result = gs.Variable(f"{name}/w4a8_output", dtype=output.dtype, shape=output.shape)
                ctx.graph.nodes.append(gs.Node("Add", name=f"{name}/bias", outputs=[output], inputs=[
                    result, gs.Constant(f"{name}.bias", layer.bias.astype(np.float32))]))
            replacement = gs.Node(
                OP_TYPE, name=f"{name}/w4a8_matmul", domain=OP_DOMAIN, inputs=inputs, outputs=[result],
                attrs={"K": layer.k, "N": layer.n, "group_size": layer.group_size,
                       "act_mode": ACT_MODE_CODES[layer.act_mode]},
            )
            ctx.graph.nodes.append(replacement)
            layer.node = replacement
            layer.replaced_by = replacement.name
        if ctx.layers:
            ctx.graph.cleanup().toposort()
        return bool(ctx.layers)
