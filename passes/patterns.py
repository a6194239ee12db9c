"""The fusion passes' base class and pattern-matching helpers on graphsurgeon graphs."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import ConversionContext, Pass


class FusionPass(Pass):
    """Replace each matched chain by one node: ``match(anchor)`` for every ``anchor_op`` node gives
    ``(last node of the chain, the fused node)`` or why not ("" for an anchor that starts no
    candidate, so nothing is reported); the fused node takes over the last node's outputs and
    ``cleanup`` removes what fed only it."""

    anchor_op = ""

    def match(self, anchor: gs.Node) -> tuple[gs.Node, gs.Node] | str:
        raise NotImplementedError

    def call(self, ctx: ConversionContext) -> bool:
        fused = 0
        for anchor in [node for node in ctx.graph.nodes if node.op == self.anchor_op]:
            found = self.match(anchor)
            if isinstance(found, str):
                if found:
                    ctx.reject(self.name, anchor.name, found)
                continue
            last, node = found
            node.outputs = list(last.outputs)
            last.outputs.clear()
            ctx.graph.nodes.append(node)
            fused += 1
        if fused:
            ctx.graph.cleanup().toposort()
        return bool(fused)


def sole_consumer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The one node reading ``tensor`` if it is an ``op`` and ``tensor`` is no graph output."""
    consumers = list(tensor.outputs)
    return consumers[0] if len(consumers) == 1 and consumers[0].op == op else None


def producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The ``op`` node writing ``tensor``, or None."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 and tensor.inputs[0].op == op else None


def other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The input of a two-input (commutative) node that is not ``tensor``."""
    if len(node.inputs) != 2 or tensor not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant`` node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor, "Constant") if tensor is not None else None
    if node is not None and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def is_scalar(tensor: gs.Tensor | None, value: float, rtol: float = 1e-6) -> bool:
    """Whether ``tensor`` is a constant holding one element equal to ``value`` (within ``rtol``)."""
    array = constant_value(tensor)
    return array is not None and array.size == 1 and bool(np.isclose(float(array.reshape(())), value, rtol=rtol, atol=0))
