"""The fusion passes: the torch export's RMSNorm chains get the ``Div`` that ONNX Runtime fuses into
SimplifiedLayerNormalization, and its tanh GELUs become FastGelu (``passes/rms_norm_div.py``,
``passes/fuse_gelu.py``), with the float64 formula's result; chains that differ are left alone
with a reason."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from conftest import model_from_text, run_model
from fptq_onnx.passes.base import ConversionContext, PassManager
from fptq_onnx.passes.fuse_gelu import FuseGeluPass
from fptq_onnx.passes.rms_norm_div import RmsNormDivPass

EPS = 1e-6

RMS_NORM = """
norm (float[B, S, 8] x) => (float[B, S, 8] y) {{
    two = Constant <value = float {{2.0}}> ()
    sq = Pow (x, two)
    ms = ReduceMean <keepdims = 1> (sq, axes)
    eps_ms = Add (ms, eps)
    rms = Sqrt (eps_ms)
    {normalize}
    y = Mul (normed, gamma)
}}
"""
BY_RECIPROCAL = "inv = Reciprocal (rms)\n    normed = Mul (x, inv)"
BY_DIV = "normed = Div (x, rms)"

GELU = """
gelu (float[B, 8] x) => (float[B, 8] y) {
    three = Constant <value = float {3.0}> ()
    cube = Pow (x, three)
    cubic = Mul (c, cube)
    inner = Add (x, cubic)
    scaled = Mul (k, inner)
    t = Tanh (scaled)
    one_plus = Add (t, one)
    half_of = Mul (half, one_plus)
    y = Mul (x, half_of)
}
"""


def rewritten(model, passes):
    """The model after ``passes`` (through graphsurgeon, as the pipeline runs them), and the rejections."""
    ctx = ConversionContext(graph=gs.import_onnx(model))
    PassManager(passes)(ctx)
    exported = gs.export_onnx(ctx.graph)
    exported.opset_import.extend([o for o in model.opset_import if o.domain != ""])
    if any(node.domain == "com.microsoft" for node in exported.graph.node):
        exported.opset_import.add(domain="com.microsoft", version=1)
    return exported, ctx.rejections


def norm_model(normalize=BY_RECIPROCAL, axes=(-1,)):
    gamma = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    weights = {"axes": np.array(axes, np.int64), "eps": np.array(EPS, np.float32), "gamma": gamma}
    return model_from_text(RMS_NORM.format(normalize=normalize), weights), gamma


def test_rms_norm_gets_the_div_that_onnx_runtime_fuses(rng, tmp_path):
    model, gamma = norm_model(BY_RECIPROCAL)
    rewritten_model, _ = rewritten(model, [RmsNormDivPass()])
    assert [n.op_type for n in rewritten_model.graph.node] == ["Constant", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    onnx.checker.check_model(rewritten_model, full_check=True)  # standard ONNX
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(rewritten_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "SimplifiedLayerNormalization" in [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    x = (rng.standard_normal((2, 3, 8)) * 4).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + EPS) * gamma
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_model(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_a_norm_with_div_already_is_left_as_it_is():
    model, _ = norm_model(BY_DIV)
    rewritten_model, rejections = rewritten(model, [RmsNormDivPass()])
    assert [n.op_type for n in rewritten_model.graph.node] == [n.op_type for n in model.graph.node] and not rejections


def test_mean_over_another_axis_is_no_norm(rng):
    model, _ = norm_model(axes=(1,))
    rewritten_model, rejections = rewritten(model, [RmsNormDivPass()])
    assert "Div" not in [n.op_type for n in rewritten_model.graph.node]
    assert [r.reason for r in rejections] == ["mean of squares not over the last axis alone"]


def gelu_model(k=math.sqrt(2 / math.pi)):
    scalars = {"c": 0.044715, "k": k, "one": 1.0, "half": 0.5}
    return model_from_text(GELU, {name: np.array(value, np.float32) for name, value in scalars.items()})


def test_tanh_gelu_becomes_fast_gelu_with_the_same_result(rng):
    model = gelu_model()
    fused, _ = rewritten(model, [FuseGeluPass()])
    assert [(n.domain, n.op_type) for n in fused.graph.node] == [("com.microsoft", "FastGelu")]
    x = (rng.standard_normal((4, 8)) * 3).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    np.testing.assert_allclose(run_model(fused, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_other_tanh_chains_are_kept_with_a_reason():
    fused, rejections = rewritten(gelu_model(k=0.5), [FuseGeluPass()])
    assert "FastGelu" not in [n.op_type for n in fused.graph.node]
    assert [r.reason for r in rejections] == ["Tanh is not the middle of a tanh-approximated GELU"]
