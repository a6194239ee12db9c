"""Tied embeddings: the token embedding reads the quantized language-model head's weights.

Small LLMs tie the embedding table ``E[V, H]`` to the head's weight ``W[H, V]``: ``E = W^T``.
Once the head is quantized, the float table is the largest tensor left in the model (113 MB
of SmolLM2's 185 MB), kept only for a ``Gather`` of a few rows per step. This pass points that
``Gather`` at the head's quantized weights instead, and the float table leaves the graph.

The head's quantized op stores output channel ``v`` as row ``v`` of ``B`` (``docs/ops.md``),
and output channel ``v`` of the head is exactly embedding row ``v``. So, for token ids ``t``
and ``k < K``, with ``g = k // group_size``::

    u[t, k] = B[t, k]                               (8-bit weights)
            = (B[t, k // 2] >> 4 (k % 2)) & 15       (4-bit: even k low nibble, odd k high)
    E'[t, k] = (u[t, k] - zero_points[t, g]) * scales[t, g]  /  s[k]

and for the rescored head (``W4A8RescoredMatMul``) the same rows of its residual's weight are
added before dividing by ``s``: the embedding gets ``Q(W) + R``, the 8 bits' worth.

where ``s`` are the head's LAE scales (the op holds ``diag(s) W``; 1 without LAE). Every
index above is a constant, so the rewrite is ``Gather`` rows, ``Gather`` along the last axis
with constant index vectors (byte of k, group of k), a shift, a mask, and the affine map: plain
ONNX, any rank of ids, and a last group shorter than ``group_size`` needs nothing special.

Two spellings of the tie are recognized: ``Gather(Transpose(W))`` (the GenAI model builder
stores ``W`` once) and ``Gather(E)`` with a separate constant ``E`` equal to ``W^T`` (exporters
that store both). Equality is checked on the values, the head's float weight after undoing its
LAE scales (``rtol`` 1e-5), so an untied embedding of the same shape is left alone, with a
reason.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_onnx.op_contract import OP_TYPE, RESCORED_OP_TYPE, W8A8_OP_TYPE

from .base import ConversionContext, LayerGroup, LinearLayer, Pass
from .find_linears import is_lm_head

TIE_RTOL = 1e-5  # float32 rounding of W * s / s, far below any real difference between two tables


class TiedEmbeddingPass(Pass):
    """Rewrite the embedding ``Gather`` tied to the quantized head to read the head's weights."""

    name = "tied_embedding"

    def call(self, ctx: ConversionContext) -> bool:
        outputs = {tensor.name for tensor in ctx.graph.outputs}
        heads = [(group, layer) for group in ctx.groups for layer in group.layers
                 if layer.replaced_by is not None and is_lm_head(layer, outputs)]
        changed = False
        for group, layer in heads:
            if layer.node.op not in (OP_TYPE, W8A8_OP_TYPE, RESCORED_OP_TYPE):
                ctx.reject(self.name, layer.name, f"head replaced by {layer.node.op}, not a group-wise quantized op")
                continue
            tied = float_weight_transposed(layer, group)
            for gather in [node for node in ctx.graph.nodes if node.op == "Gather"]:
                table = _table(gather)
                if table is None or tuple(table.shape) != tied.shape:
                    continue
                if not np.allclose(table.values, tied, rtol=TIE_RTOL, atol=TIE_RTOL * float(np.abs(tied).max())):
                    ctx.reject(self.name, gather.name or gather.outputs[0].name,
                               f"table has the shape of {layer.name}'s weight but other values: not tied, kept")
                    continue
                _read_quantized_rows(ctx, gather, layer, group.lae_scales)
                changed = True
        if changed:
            ctx.graph.cleanup().toposort()
        return changed


def float_weight_transposed(layer: LinearLayer, group: LayerGroup) -> np.ndarray:
    """``W^T [N, K]``, the head's float weight as the source model held it: LAE's ``diag(s)`` undone."""
    weight = layer.weight if group.lae_scales is None else layer.weight / group.lae_scales[:, None]
    return np.ascontiguousarray(weight.T, dtype=np.float32)


def _table(gather: gs.Node) -> gs.Constant | None:
    """The constant a row ``Gather`` (axis 0) reads, directly or through ``Transpose(perm=[1, 0])``;
    the transposed view is returned as a constant of the table's shape."""
    if gather.attrs.get("axis", 0) != 0:
        return None
    data = gather.inputs[0]
    if isinstance(data, gs.Constant):
        return data if len(data.shape) == 2 else None
    producer = data.inputs[0] if len(data.inputs) == 1 else None
    if (producer is not None and producer.op == "Transpose" and list(producer.attrs.get("perm", [1, 0])) == [1, 0]
            and isinstance(producer.inputs[0], gs.Constant) and len(producer.inputs[0].shape) == 2):
        source = producer.inputs[0]
        return gs.Constant(f"{source.name}/transposed", np.asarray(source.values).T)
    return None


def _read_quantized_rows(ctx: ConversionContext, gather: gs.Node, layer: LinearLayer, lae_scales) -> None:
    """Replace ``gather`` by the dequantization of rows of ``layer``'s op weights (module docstring)."""
    op = layer.node
    k, group_size = layer.k, int(op.attrs["group_size"])
    ids, output = gather.inputs[1], gather.outputs[0]
    name = f"{layer.name}/tied_embedding"
    nodes = []

    def add(op_type: str, inputs: list, suffix: str, dtype=None, **attrs) -> gs.Variable:
        result = gs.Variable(f"{name}/{suffix}", dtype=dtype)
        nodes.append(gs.Node(op_type, name=f"{name}/{suffix}", inputs=inputs, outputs=[result], attrs=attrs))
        return result

    constants: dict[str, gs.Constant] = {}

    def constant(suffix: str, values) -> gs.Constant:  # one per name: both weights share the index vectors
        if suffix not in constants:
            constants[suffix] = gs.Constant(f"{name}.{suffix}", np.asarray(values))
        return constants[suffix]

    positions = np.arange(k)
    group_of_k = constant("group_of_k", positions // group_size)

    def dequantized_rows(packed: gs.Tensor, scales: gs.Tensor, zero_points: gs.Tensor, nibbles: bool,
                         prefix: str) -> gs.Variable:
        """``(u[ids, k] - zero_points[ids, g]) * scales[ids, g]`` of one weight of the op."""
        rows = add("Gather", [packed, ids], f"{prefix}rows", np.uint8, axis=0)
        if nibbles:  # 4 bits: byte k // 2, nibble k % 2
            rows = add("Gather", [rows, constant("byte_of_k", positions // 2)], f"{prefix}bytes", np.uint8, axis=-1)
            rows = add("BitShift", [rows, constant("shift_of_k", (4 * (positions % 2)).astype(np.uint8))],
                       f"{prefix}shifted", np.uint8, direction="RIGHT")
            rows = add("BitwiseAnd", [rows, constant("low_nibble", np.uint8(15))], f"{prefix}nibbles", np.uint8)
        elif packed.shape[1] != k:  # 8 bits stored for a padded K
            rows = add("Gather", [rows, constant("k", positions)], f"{prefix}bytes", np.uint8, axis=-1)

        def per_k(tensor: gs.Tensor, suffix: str, dtype) -> gs.Variable:
            """``tensor[ids, k // group_size]``: a per-row, per-group constant spread over k."""
            picked = add("Gather", [tensor, ids], f"{prefix}{suffix}_rows", dtype, axis=0)
            return add("Gather", [picked, group_of_k], f"{prefix}{suffix}_of_k", dtype, axis=-1)

        values = add("Cast", [rows], f"{prefix}u", np.float32, to=1)
        zero = add("Cast", [per_k(zero_points, "zero_points", np.uint8)], f"{prefix}zero_points_float",
                   np.float32, to=1)
        centered = add("Sub", [values, zero], f"{prefix}centered", np.float32)
        return add("Mul", [centered, per_k(scales, "scales", np.float32)], f"{prefix}dequantized", np.float32)

    nibbles = op.op != W8A8_OP_TYPE
    rows = dequantized_rows(*op.inputs[1:4], nibbles, "")
    if op.op == RESCORED_OP_TYPE:
        rows = add("Add", [rows, dequantized_rows(*op.inputs[5:8], nibbles, "residual_")], "weight_plus_residual",
                   np.float32)
    gather.outputs.clear()
    gather.inputs.clear()
    if lae_scales is not None:
        nodes.append(gs.Node("Mul", name=f"{name}/embedding", outputs=[output], inputs=[
            rows, constant("inverse_lae_scales", (1.0 / lae_scales).astype(np.float32))]))
    else:
        nodes[-1].outputs = [output]  # the node that made ``rows`` writes the embedding
        nodes[-1].name = f"{name}/embedding"
    ctx.graph.nodes.extend(nodes)
