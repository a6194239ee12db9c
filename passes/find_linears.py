"""Find the linear layers: MatMul/Gemm nodes whose weight is a constant 2-D initializer.

A layer qualifies when its second operand is a constant ``[K, N]`` tensor (``[N, K]`` for a
Gemm with ``transB=1``) and its name does not match the exclusion pattern. (A K that is not a
multiple of the group size is padded later, see ``quant.pad_to_group_multiple``.) The language-model head (the layer producing a graph output, or named
``lm_head``) is excluded by default: its error lands directly on the logits and it is usually
tied to the embedding. Layers that read the same tensor are grouped, since the activation
decision (band, LAE scales, static scale) belongs to the shared input.

Layer names are module paths (``model.layers.0.mlp.up_proj``), so a user finds a layer in Netron
and in ``--nodes-to-exclude`` by the name they know from the model code. They come from, in
order: the torch exporter's ``pkg.torch.onnx.name_scopes`` node metadata (see
:func:`module_paths`; onnx-graphsurgeon drops node metadata, so it is read from the proto), the
weight initializer's name (``model.layers.0.mlp.up_proj.weight``), or the node name.
"""
from __future__ import annotations

import ast
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import ConversionContext, LayerGroup, LinearLayer, Pass

NOT_A_LINEAR_LAYER = "weight is not a constant initializer"
LM_HEAD_PATTERN = re.compile(r"(^|[./_])lm_head([./_]|$)")


# the module attribute under which fptq_onnx.export wraps the Hugging Face model
EXPORT_WRAPPER_PREFIX = "inner."


def module_paths(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: module path}`` from the torch exporter's name-scope metadata.

    The metadata value is a Python list literal of nested scopes, e.g. ``['', 'inner', ...,
    'inner.model.layers.0.self_attn.q_proj', 'linear']``; the deepest module path is the layer
    (``model.layers.0.self_attn.q_proj``, without our exporter's wrapper prefix).
    """
    paths = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key != "pkg.torch.onnx.name_scopes" or not node.name:
                continue
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                continue
            path = _deepest_module(scopes) if isinstance(scopes, list) else ""
            if path:
                paths[node.name] = path[len(EXPORT_WRAPPER_PREFIX):] if path.startswith(EXPORT_WRAPPER_PREFIX) else path
    return paths


def _deepest_module(scopes: list) -> str:
    """The last scope of the chain in which each scope extends the previous one by ``.name``."""
    path = ""
    for scope in scopes:
        if isinstance(scope, str) and scope and (not path or scope.startswith(path + ".")):
            path = scope
    return path


def is_lm_head_node(name: str, node: gs.Node, graph_outputs: set[str]) -> bool:
    """The language-model head: a linear layer named ``lm_head``, or one writing a graph output."""
    return bool(LM_HEAD_PATTERN.search(name)) or node.outputs[0].name in graph_outputs


def is_lm_head(layer, graph_outputs: set[str]) -> bool:
    """:func:`is_lm_head_node` of a found :class:`LinearLayer`."""
    return is_lm_head_node(layer.name, layer.node, graph_outputs)


def layer_name(node: gs.Node, weight: gs.Constant, module_names: dict[str, str] | None = None) -> str:
    """Module-path name of a linear layer: exporter metadata, else its weight's name, else the node's."""
    if module_names and node.name in module_names:
        return module_names[node.name]
    name = weight.name
    for suffix in (".weight", "_weight", ".w"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return node.name or name


class FindLinearLayersPass(Pass):
    """Collect quantizable linear layers into ``ctx.groups`` (one group per shared input).

    Args:
        nodes_to_exclude: regular expression; layers whose name or node name matches (``re.search``)
            are skipped.
        exclude_lm_head: skip the layer that produces the logits.
        module_names: ``{node name: module path}`` (:func:`module_paths` of the source model).
    """

    name = "find_linears"

    def __init__(self, nodes_to_exclude: str | None = None, exclude_lm_head: bool = True,
                 module_names: dict[str, str] | None = None):
        self.module_names = module_names or {}
        self.exclude = re.compile(nodes_to_exclude) if nodes_to_exclude else None
        self.exclude_lm_head = exclude_lm_head

    def call(self, ctx: ConversionContext) -> bool:
        graph_outputs = {tensor.name for tensor in ctx.graph.outputs}
        groups: dict[str, LayerGroup] = {}
        for node in ctx.graph.nodes:
            if node.op not in ("MatMul", "Gemm"):
                continue
            layer = self._as_layer(ctx, node, graph_outputs)
            if layer is None:
                continue
            source = node.inputs[0]
            groups.setdefault(source.name, LayerGroup(input=source, layers=[])).layers.append(layer)
        ctx.groups = list(groups.values())
        return False  # finding changes nothing in the graph

    def _as_layer(self, ctx: ConversionContext, node: gs.Node, graph_outputs: set[str]) -> LinearLayer | None:
        label = node.name or node.outputs[0].name
        weight_tensor = node.inputs[1] if len(node.inputs) > 1 else None
        if not isinstance(weight_tensor, gs.Constant):
            ctx.reject(self.name, label, NOT_A_LINEAR_LAYER)
            return None
        if not isinstance(node.inputs[0], gs.Variable):
            ctx.reject(self.name, label, "both operands are constants (nothing to quantize at run time)")
            return None
        weight = np.asarray(weight_tensor.values)
        if weight.ndim != 2:
            ctx.reject(self.name, label, f"weight has rank {weight.ndim}, not 2 (batched MatMul)")
            return None
        if weight.dtype not in (np.float32, np.float16):
            ctx.reject(self.name, label, f"weight dtype {weight.dtype} is not float32/float16")
            return None
        bias = None
        if node.op == "Gemm":
            parsed = self._parse_gemm(ctx, node, label, weight)
            if parsed is None:
                return None
            weight, bias = parsed
        name = layer_name(node, weight_tensor, self.module_names)
        if self.exclude_lm_head and is_lm_head_node(name, node, graph_outputs):
            ctx.reject(self.name, name, "language-model head (--lm-head float keeps it in float)")
            return None
        if self.exclude is not None and (self.exclude.search(name) or self.exclude.search(node.name or "")):
            ctx.reject(self.name, name, f"matches --nodes-to-exclude {self.exclude.pattern!r}")
            return None
        # no copy of a float32 weight: a memory-mapped one stays on disk until a pass reads it
        return LinearLayer(name=name, node=node, weight=weight.astype(np.float32, copy=False), bias=bias)

    def _parse_gemm(self, ctx, node, label, weight):
        """Gemm(A, B, C) = alpha * A' @ B' + beta * C as a [K, N] weight and an optional bias."""
        if node.attrs.get("transA", 0):
            ctx.reject(self.name, label, "Gemm with transA=1 (the activation is transposed)")
            return None
        if node.attrs.get("transB", 0):
            weight = weight.T
        weight = weight.astype(np.float32) * np.float32(node.attrs.get("alpha", 1.0))
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            if not isinstance(node.inputs[2], gs.Constant):
                ctx.reject(self.name, label, "Gemm bias is not a constant")
                return None
            bias = np.asarray(node.inputs[2].values, np.float32) * np.float32(node.attrs.get("beta", 1.0))
            if bias.size not in (1, weight.shape[1]) or (bias.ndim == 2 and bias.shape[0] != 1):
                ctx.reject(self.name, label, f"Gemm bias shape {bias.shape} is not per output channel")
                return None
            bias = np.broadcast_to(bias.reshape(-1), (weight.shape[1],)).copy()
        return weight, bias
