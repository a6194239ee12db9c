"""Logarithmic Activation Equalization (FPTQ, arXiv 2308.15987, eq. 4).

For a shared input X in the ``mid`` band, per input channel j::

    s_j = max|X_j| / log2(2 + max|X_j|)

Each layer reading X gets ``W[j, :] *= s_j`` (ONNX weights are ``[K, N]``) and sees ``X / s``
instead of X, so ``(X / s) @ (s * W) == X @ W`` exactly in real arithmetic. The activation side
``1 / s`` is folded into the node that produces X when that node ends in a per-channel constant
multiply, which costs nothing at run time:

* ``LayerNormalization(x, gamma, beta)``: ``gamma /= s``, ``beta /= s``;
* ``SimplifiedLayerNormalization`` / ``RMSNormalization(x, gamma)``: ``gamma /= s``;
* ``Mul(a, gamma)`` with a constant per-channel gamma (the decomposed RMSNorm that exporters
  write): ``gamma /= s``;
* ``Mul(a, b)`` where b is the output of a linear layer read by nothing else (a gated MLP's
  ``act(gate) * up`` before down_proj): that layer's output columns, ``W_b[:, j] /= s_j``, since
  ``a * (x @ W_b) / s == a * (x @ (W_b / s))``. Its own group-wise quantization is per output
  channel, so the scaled columns quantize to the same integers with scaled group scales;
* ``GroupQueryAttention`` (o_proj's input): the value projection's output columns. Channel
  ``h * D + d`` of the attention output is ``sum_t p[h, t] * V[h // g, t, d]`` (``g`` query heads
  per key/value head), linear in V, so dividing V's column ``(h // g) * D + d`` by ``s`` divides
  every query head of that group alike. The scales are therefore computed from the channel
  maxima shared within each group (their max), one scale per value column. The KV cache then
  holds ``V / s``, which only this attention reads.

Folding is only valid when every consumer of X is a layer of this group (otherwise the others
would see X / s too). Where it is not, a ``Mul`` by ``1 / s`` named ``<group>/lae_scale`` is
inserted in front of the group, visible in Netron.

``method="smoothquant"`` swaps the scale formula for SmoothQuant's
(``fptq_onnx.quant.smoothquant_scales``), everything else unchanged: the baseline rows of the
accuracy matrix.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fptq_onnx.external_data import release_pages
from fptq_onnx.quant import lae_scales, smoothquant_scales

from .base import ConversionContext, LayerGroup, Pass

# op type -> indices of the inputs that are multiplied per channel at the output
_FOLDABLE_NORMS = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "RMSNormalization": (1,),
    "SkipSimplifiedLayerNormalization": (2,),
}


class LaePass(Pass):
    """Apply LAE to every group whose layers were marked ``lae`` by the strategy pass.

    Args:
        fold: fold ``1 / s`` into the preceding normalization where possible (else always insert
            the Mul node).
        method: ``"lae"`` or ``"smoothquant"`` (with ``alpha``).
    """

    name = "lae"

    def __init__(self, fold: bool = True, method: str = "lae", alpha: float = 0.5):
        self.fold, self.method, self.alpha = fold, method, alpha

    def scales(self, group: LayerGroup, channel_max_abs: np.ndarray | None = None) -> np.ndarray:
        """The group's per-input-channel scales ``s[K]``, from ``channel_max_abs`` (default: the
        group's own)."""
        channel_max = group.channel_max_abs if channel_max_abs is None else channel_max_abs
        if self.method == "lae":
            return lae_scales(channel_max)
        weight_max = np.max([np.abs(layer.weight).max(axis=1) for layer in group.layers], axis=0)
        return smoothquant_scales(channel_max, weight_max, self.alpha)

    def requires(self, ctx: ConversionContext) -> None:
        self.require_layer_field(ctx, "band", "run the strategy pass first")

    def call(self, ctx: ConversionContext) -> bool:
        modified = False
        for group in ctx.groups:
            if not all(layer.lae for layer in group.layers):
                continue
            value = _attention_value(ctx, group) if self.fold else None
            scales = self.scales(group) if value is None else self.scales(group, value.shared_max(group))
            group.lae_scales = scales
            for layer in group.layers:
                original, layer.weight = layer.weight, layer.weight * scales[:, None]
                release_pages(original)  # a memory-mapped weight: read once, not kept resident
                layer.lae_scale_range = (float(scales.min()), float(scales.max()))
                _write_weight(layer)
            if value is not None:
                target = value.fold(scales)
            else:
                target = (self._fold_into_producer(ctx, group, scales) if self.fold else None) or self._insert_mul(
                    ctx, group, scales)
            for layer in group.layers:
                layer.lae_folded_into = target
            modified = True
        if modified:
            ctx.graph.cleanup().toposort()
        return modified

    def _fold_into_producer(self, ctx: ConversionContext, group: LayerGroup, scales: np.ndarray) -> str | None:
        """Divide the producer's per-channel constants by ``scales``; its name, or None if not foldable."""
        tensor = group.input
        group_nodes = {id(layer.node) for layer in group.layers}
        if any(id(consumer) not in group_nodes for consumer in tensor.outputs):
            ctx.reject(self.name, group.name, "input also feeds other nodes: LAE kept as a Mul node")
            return None
        if tensor in ctx.graph.outputs or not tensor.inputs:
            ctx.reject(self.name, group.name, "input is a graph input or output: LAE kept as a Mul node")
            return None
        producer = tensor.inputs[0]
        if len(producer.outputs) > 1 and producer.outputs[0] is not tensor:
            return None
        upstream = _linear_factor(ctx, producer) if producer.op == "Mul" else None
        if upstream is not None:
            original, upstream.weight = upstream.weight, upstream.weight / scales[None, :]
            release_pages(original)
            _write_weight(upstream)
            return upstream.node.name or upstream.node.outputs[0].name
        if producer.op in _FOLDABLE_NORMS:
            indices = [i for i in _FOLDABLE_NORMS[producer.op] if i < len(producer.inputs) and producer.inputs[i].name]
        elif producer.op == "Mul":
            indices = [i for i, operand in enumerate(producer.inputs) if isinstance(operand, gs.Constant)]
            indices = indices[:1] if len(indices) == 1 else []
        else:
            indices = []
        k = scales.shape[0]
        constants = [producer.inputs[i] for i in indices]
        if not constants or not all(_is_per_channel_constant(c, k) for c in constants):
            ctx.reject(self.name, group.name, f"producer {producer.op} {producer.name!r} has no per-channel "
                                              "constant to fold into: LAE kept as a Mul node")
            return None
        for index, constant in zip(indices, constants):
            values = np.asarray(constant.values)
            divided = (values.astype(np.float32) / scales.reshape((1,) * (values.ndim - 1) + (k,))).astype(values.dtype)
            # a private copy: the original constant may be shared with nodes outside this group
            # (exporters store equal initializers once: every norm's all-ones gamma of a fresh
            # model), and then each group's copy needs a name of its own
            name = f"{constant.name}/lae_folded"
            if name in ctx.graph.tensors():  # another group folded into the same shared constant
                name += f"/{group.name}"
            producer.inputs[index] = gs.Constant(name, divided)
        return producer.name or producer.outputs[0].name

    def _insert_mul(self, ctx: ConversionContext, group: LayerGroup, scales: np.ndarray) -> str:
        name = f"{group.name}/lae_scale"
        inverse = gs.Constant(f"{name}/inverse_scales", (1.0 / scales).astype(np.float32))
        scaled = gs.Variable(f"{name}/output", dtype=group.input.dtype, shape=group.input.shape)
        mul = gs.Node("Mul", name=name, inputs=[group.input, inverse], outputs=[scaled])
        for layer in group.layers:
            layer.node.inputs[0] = scaled
        ctx.graph.nodes.append(mul)
        group.input = scaled
        return name


def _write_weight(layer) -> None:
    """Put the layer's (scaled) ``[K, N]`` weight back into its node, so the graph after this pass
    computes the same function in float as before it (and a dump shows the scaled weights)."""
    node = layer.node
    original = node.inputs[1]
    if node.op == "Gemm":
        transposed = bool(node.attrs.get("transB", 0))
        values = layer.weight.T if transposed else layer.weight
        node.attrs["alpha"] = 1.0  # find_linears folded alpha into layer.weight
    else:
        values = layer.weight
    node.inputs[1] = gs.Constant(f"{original.name}/lae_scaled", np.ascontiguousarray(values).astype(original.dtype, copy=False))


class _AttentionValue:
    """The value projection behind a GroupQueryAttention that feeds a group: ``column[j]``, the
    column of ``layer``'s output that channel j of the attention output is a weighted sum of."""

    def __init__(self, layer, column: np.ndarray):
        self.layer, self.column = layer, column

    def shared_max(self, group: LayerGroup) -> np.ndarray:
        """max |X_j| over the channels that read the same value column, for each channel j."""
        per_column = np.zeros(self.column.max() + 1, np.float64)
        np.maximum.at(per_column, self.column, group.channel_max_abs)
        return per_column[self.column].astype(np.float32)

    def fold(self, scales: np.ndarray) -> str:
        """Divide the value columns by the scales (equal within each column's channels)."""
        layer = self.layer
        divisor = np.ones(layer.n, np.float64)
        divisor[self.column] = scales
        original, layer.weight = layer.weight, (layer.weight / divisor[None, :]).astype(layer.weight.dtype)
        release_pages(original)
        _write_weight(layer)
        return layer.node.name or layer.node.outputs[0].name


def _attention_value(ctx: ConversionContext, group: LayerGroup) -> _AttentionValue | None:
    """The value projection of the GroupQueryAttention whose output is the group's input alone,
    when that projection is a linear layer read by the attention alone; else None."""
    tensor = group.input
    group_nodes = {id(layer.node) for layer in group.layers}
    if not tensor.inputs or tensor.inputs[0].op != "GroupQueryAttention" or tensor in ctx.graph.outputs:
        return None
    attention = tensor.inputs[0]
    if attention.outputs[0] is not tensor or any(id(c) not in group_nodes for c in tensor.outputs):
        return None
    heads, kv_heads = int(attention.attrs["num_heads"]), int(attention.attrs["kv_num_heads"])
    k = len(group.channel_max_abs)
    head_size = k // heads
    packed = len(attention.inputs) < 3 or not attention.inputs[1].name or not attention.inputs[2].name
    source = attention.inputs[0] if packed else attention.inputs[2]
    layer = _linear_layer_writing(ctx, source)
    width = (heads + 2 * kv_heads) * head_size if packed else kv_heads * head_size
    if layer is None or k % heads or heads % kv_heads or layer.n != width or len(source.outputs) != 1:
        return None
    channel = np.arange(k)
    head, dim = channel // head_size, channel % head_size
    offset = (heads + kv_heads) * head_size if packed else 0
    return _AttentionValue(layer, offset + head // (heads // kv_heads) * head_size + dim)


def _linear_layer_writing(ctx: ConversionContext, tensor):
    """The MatMul layer of ``ctx.layers`` whose output is ``tensor``, or None."""
    return next((layer for layer in ctx.layers if layer.node.outputs[0] is tensor and layer.node.op == "MatMul"),
                None)


def _linear_factor(ctx: ConversionContext, mul: gs.Node):
    """The linear layer whose output is a factor of ``mul`` and read by ``mul`` alone (its output
    columns then take a per-channel scale of ``mul``'s output), or None."""
    for operand in mul.inputs:
        layer = _linear_layer_writing(ctx, operand)
        if layer is not None and len(operand.outputs) == 1 and operand not in ctx.graph.outputs:
            return layer
    return None


def _is_per_channel_constant(tensor, k: int) -> bool:
    """True for a constant whose shape is ``[K]`` or ``[1, ..., 1, K]``."""
    if not isinstance(tensor, gs.Constant):
        return False
    shape = tuple(tensor.shape)
    return len(shape) >= 1 and shape[-1] == k and all(dim == 1 for dim in shape[:-1])
