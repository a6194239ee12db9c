"""Fuse the exported tanh GELU into one ``FastGelu`` node (``com.microsoft``).

``gelu(x, approximate="tanh") = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` leaves our
torch export as eight nodes (Pow, three Mul, two Add, Tanh, Mul), one per MLP (Gemma-3: 18).
ONNX Runtime's ``FastGelu`` computes exactly this formula in one pass.
"""
from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from .patterns import FusionPass, is_scalar, other_input, producer, sole_consumer

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


class FuseGeluPass(FusionPass):
    """Replace ``x * 0.5 * (1 + tanh(c (x + 0.044715 x^3)))`` chains by ``FastGelu(x)``."""

    name = "fuse_gelu"
    anchor_op = "Tanh"

    def match(self, tanh: gs.Node) -> tuple[gs.Node, gs.Node] | str:
        """The GELU around ``tanh``, or why not."""
        found = self._gelu_input_and_last(tanh)
        if found is None:
            return "Tanh is not the middle of a tanh-approximated GELU"
        x, last = found
        return last, gs.Node("FastGelu", name=f"{last.name}/gelu", domain="com.microsoft", inputs=[x])

    @staticmethod
    def _gelu_input_and_last(tanh: gs.Node):
        """``(x, last node)`` of the GELU around ``tanh``, or None."""
        inner = producer(tanh.inputs[0], "Mul")
        if inner is None:
            return None
        scaled = next((t for t in inner.inputs if is_scalar(t, SQRT_2_OVER_PI)), None)
        cubic_sum = producer(other_input(inner, scaled), "Add") if scaled is not None else None
        if cubic_sum is None:
            return None
        for x in cubic_sum.inputs:  # x + 0.044715 * Pow(x, 3), either order
            times = producer(other_input(cubic_sum, x), "Mul")
            coefficient = next((t for t in times.inputs if is_scalar(t, CUBIC)), None) if times is not None else None
            cube = producer(other_input(times, coefficient), "Pow") if coefficient is not None else None
            if cube is not None and cube.inputs[0] is x and is_scalar(cube.inputs[1], 3.0):
                break
        else:
            return None
        one_plus = sole_consumer(tanh.outputs[0], "Add")
        half = sole_consumer(one_plus.outputs[0], "Mul") if one_plus is not None else None
        last = sole_consumer(half.outputs[0], "Mul") if half is not None else None
        if (last is None or not is_scalar(other_input(one_plus, tanh.outputs[0]), 1.0)
                or not is_scalar(other_input(half, one_plus.outputs[0]), 0.5)
                or other_input(last, half.outputs[0]) is not x):
            return None
        return x, last
