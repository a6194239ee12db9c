"""Fuse the exported RMSNorm into one ``SimplifiedLayerNormalization`` node.

Our torch export (the fallback when the GenAI model builder cannot build a model: Gemma-3)
writes each RMSNorm as seven nodes, ``x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)) * gamma``,
which ONNX Runtime does not fuse (its SimplifiedLayerNormFusion wants ``Div``); Gemma-3-270m has
109 of them (6 per layer with q_norm/k_norm, and the final norm): 654 small nodes, each a
dispatch per decode step. ONNX Runtime's ``SimplifiedLayerNormalization`` (the op the GenAI
builder writes, axis -1, float32 statistics) computes the same
``x / sqrt(mean(x^2) + eps) * gamma`` in one pass. Runs last, so that LAE has already folded
its ``1/s`` into ``gamma``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .patterns import FusionPass, constant_value, is_scalar, other_input, sole_consumer


class FuseRmsNormPass(FusionPass):
    """Replace every ``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul(gamma)`` chain
    (or ``... Sqrt -> Div``) over the last axis by ``SimplifiedLayerNormalization(x, gamma)``."""

    name = "fuse_rms_norm"
    anchor_op = "Pow"

    def match(self, power: gs.Node) -> tuple[gs.Node, gs.Node] | str:
        """The chain from ``power``, or why not: "" when ``power`` starts no mean of squares."""
        x = power.inputs[0]
        mean = sole_consumer(power.outputs[0], "ReduceMean")
        if not is_scalar(power.inputs[1], 2.0) or mean is None:
            return ""
        axes = constant_value(mean.inputs[1]) if len(mean.inputs) > 1 else np.asarray(mean.attrs.get("axes", []))
        if axes is None or axes.tolist() not in ([-1], [len(x.shape) - 1] if x.shape else [-1]):
            return "mean of squares not over the last axis alone"
        if not mean.attrs.get("keepdims", 1):
            return "mean of squares without keepdims"
        add = sole_consumer(mean.outputs[0], "Add")
        eps = constant_value(other_input(add, mean.outputs[0])) if add is not None else None
        root = sole_consumer(add.outputs[0], "Sqrt") if add is not None else None
        if eps is None or eps.size != 1 or root is None:
            return "no constant epsilon and Sqrt after the mean of squares"
        normed = None
        divide = sole_consumer(root.outputs[0], "Div")
        reciprocal = sole_consumer(root.outputs[0], "Reciprocal")
        if divide is not None and divide.inputs[0] is x and divide.inputs[1] is root.outputs[0]:
            normed = divide.outputs[0]
        elif reciprocal is not None:
            times = sole_consumer(reciprocal.outputs[0], "Mul")
            if times is not None and other_input(times, reciprocal.outputs[0]) is x:
                normed = times.outputs[0]
        if normed is None:
            return "x is not divided by the root"
        scale = sole_consumer(normed, "Mul")
        gamma = other_input(scale, normed) if scale is not None else None
        gamma_value = constant_value(gamma)
        if gamma_value is None or gamma_value.ndim != 1:
            return "the normalized x is not multiplied by a constant 1-D gamma"
        if not isinstance(gamma, gs.Constant):
            gamma = gs.Constant(f"{scale.name}/gamma", gamma_value)
        return scale, gs.Node("SimplifiedLayerNormalization", name=f"{scale.name}/rms_norm", inputs=[x, gamma],
                              attrs={"axis": -1, "epsilon": float(eps.reshape(())), "stash_type": 1})
