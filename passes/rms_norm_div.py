"""Write the exported RMSNorm's ``x * Reciprocal(r)`` as ``x / r``, which ONNX Runtime fuses.

Our torch export (the fallback when the GenAI model builder cannot build a model: Gemma-3)
writes each RMSNorm as seven nodes, ``x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)) * gamma``.
ONNX Runtime's SimplifiedLayerNormFusion turns ``Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul``
into one ``SimplifiedLayerNormalization`` (the op the GenAI builder writes) when it creates a
session, but not the ``Reciprocal -> Mul`` spelling, so Gemma-3-270m's 109 norms (6 per layer
with q_norm/k_norm, and the final one) ran as 763 small nodes, each a dispatch per decode step.
With ``Div`` the file keeps standard ONNX ops (it passes onnx.checker; the fused op is
ONNX Runtime's own, outside the ONNX domain's schemas) and the session runs one node per norm.
Runs last, after LAE has folded its ``1/s`` into ``gamma``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .patterns import FusionPass, constant_value, is_scalar, other_input, sole_consumer


class RmsNormDivPass(FusionPass):
    """In every ``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul(gamma)`` chain over
    the last axis, replace ``Reciprocal -> Mul`` by ``Div``: the chain ONNX Runtime fuses."""

    name = "rms_norm_div"
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
        reciprocal = sole_consumer(root.outputs[0], "Reciprocal")
        times = sole_consumer(reciprocal.outputs[0], "Mul") if reciprocal is not None else None
        if times is None or other_input(times, reciprocal.outputs[0]) is not x:
            return "" if sole_consumer(root.outputs[0], "Div") is not None else "x is not multiplied by 1 / root"
        scale = sole_consumer(times.outputs[0], "Mul")
        if scale is None or constant_value(other_input(scale, times.outputs[0])) is None:
            return "the normalized x is not multiplied by a constant gamma"
        return times, gs.Node("Div", name=f"{times.name}/div", inputs=[x, root.outputs[0]])
