"""The rescored head, ``ai.fptq::W4A8RescoredMatMul`` (docs/ops.md): the CPU kernel and the function
body against the float64 reference, its top-k rule (ties, every channel, one channel), its
attribute checks, and a conversion with ``--lm-head rescored`` whose head and tied embedding
read both 4-bit weights.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from fptq_onnx import quant
from fptq_onnx.op_contract import RESCORED_OP_TYPE, single_op_model
from test_kernel_cpu import assert_close, kernel_session, stock_session

STATIC, DYNAMIC = quant.ActMode.PER_TENSOR_STATIC, quant.ActMode.PER_TOKEN_DYNAMIC


def head_weights(rng, k, n, group_size):
    """The op's weights of a random [K, N] weight: its 4-bit weight and 4-bit residual, as the
    converter makes them (``quant.quantize_weight_residual``)."""
    w = rng.standard_normal((k, n))
    u, scales, zeros = quant.quantize_weight_groupwise(w, group_size, symmetric=False)
    ru, rscales, rzeros = quant.quantize_weight_residual(w, u, scales, zeros, group_size)
    return {"B": quant.pack_int4(u), "S": scales, "Z": zeros, "RB": quant.pack_int4(ru), "RS": rscales, "RZ": rzeros}


def head_model(weights, act_scale, k, n, group_size, act_mode, top_k, **kwargs):
    return single_op_model(weights, act_scale, k=k, n=n, group_size=group_size, act_mode=int(act_mode),
                           op_type=RESCORED_OP_TYPE, top_k=top_k, **kwargs)


def reference(x, weights, act_scale, act_mode, top_k, group_size):
    return quant.w4a8_rescored_matmul_reference(x, (weights["B"], weights["S"], weights["Z"]),
                                                (weights["RB"], weights["RS"], weights["RZ"]),
                                                act_scale, act_mode, top_k, group_size)


@pytest.mark.parametrize("m,k,n,group_size,act_mode,top_k", [
    (1, 64, 40, 32, DYNAMIC, 8),      # decode: one row
    (5, 200, 300, 64, DYNAMIC, 17),   # a partial last group, N not a multiple of the 16-value blocks
    (3, 96, 50, 32, STATIC, 50),      # every channel rescored: the op is C + R
    (4, 64, 33, 64, DYNAMIC, 1),
])
def test_kernel_and_function_body_match_the_reference(rng, m, k, n, group_size, act_mode, top_k):
    weights = head_weights(rng, k, n, group_size)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    act_scale = 0.05 if act_mode == STATIC else 1.0
    model = head_model(weights, act_scale, k, n, group_size, act_mode, top_k)
    expected = reference(x, weights, act_scale, act_mode, top_k, group_size)
    kernel = kernel_session(model).run(None, {"X": x})[0]
    assert_close(kernel, expected)
    assert_close(stock_session(model).run(None, {"X": x})[0], expected)
    # the residual changed exactly the top_k channels (it is never 0 on random weights)
    coarse = quant.w4a8_matmul_reference(x, weights["B"], weights["S"], weights["Z"], act_scale, act_mode, group_size)
    changed = np.abs(kernel - coarse) > 1e-4 * np.abs(coarse).max()
    assert changed.sum(axis=-1).max() <= top_k
    assert changed.sum() >= m * top_k * 0.9


def test_top_k_is_the_largest_channels_ties_to_the_lower_one(rng):
    """Zero weights but for channel groups with equal columns: equal coarse values, and the
    kernel, the body and the reference all take the lower channels of a tie."""
    k, n, group_size, top_k = 32, 48, 32, 4
    w = np.zeros((k, n))
    w[:, 7] = w[:, 20] = w[:, 33] = rng.standard_normal(k)  # three equal largest columns...
    w[:, [3, 40]] = w[:, [7]] * 0.5                          # ...and two equal smaller ones
    u, scales, zeros = quant.quantize_weight_groupwise(w, group_size, symmetric=True)
    ru, rscales, rzeros = quant.quantize_weight_residual(w, u, scales, zeros, group_size)
    weights = {"B": quant.pack_int4(u), "S": scales, "Z": zeros, "RB": quant.pack_int4(ru), "RS": rscales, "RZ": rzeros}
    x = np.sign(w[:, 7:8].T).astype(np.float32)  # makes the equal columns' outputs positive and the largest
    model = head_model(weights, 1.0, k, n, group_size, DYNAMIC, top_k)
    expected = reference(x, weights, 1.0, DYNAMIC, top_k, group_size)
    coarse = quant.w4a8_matmul_reference(x, weights["B"], scales, zeros, 1.0, DYNAMIC, group_size)
    assert sorted(np.argsort(-coarse[0], kind="stable")[:top_k]) == [3, 7, 20, 33]  # 3 and 40 tie: the lower one
    assert_close(kernel_session(model).run(None, {"X": x})[0], expected)
    assert_close(stock_session(model).run(None, {"X": x})[0], expected)


@pytest.mark.parametrize("top_k", [0, 41])
def test_top_k_outside_1_to_n_is_refused_in_one_line(rng, top_k):
    weights = head_weights(rng, 32, 40, 32)
    with pytest.raises((InvalidArgument, RuntimeException, Fail), match=rf"{RESCORED_OP_TYPE} node .*top_k={top_k} must be in \[1, N=40\]"):
        kernel_session(head_model(weights, 1.0, 32, 40, 32, DYNAMIC, top_k)).run(None, {"X": np.ones((1, 32), np.float32)})


def test_residual_of_the_wrong_shape_is_refused(rng):
    weights = head_weights(rng, 32, 40, 32)
    weights["RS"] = weights["RS"][:20]
    with pytest.raises((InvalidArgument, RuntimeException, Fail), match=r"residual_scales has shape \[20, 1\], expected \[40, 1\]"):
        kernel_session(head_model(weights, 1.0, 32, 40, 32, DYNAMIC, 4)).run(None, {"X": np.ones((1, 32), np.float32)})


@pytest.fixture(scope="module")
def rescored_model(tmp_path_factory):
    """A tiny random LLaMA (vocabulary 23) converted with ``--lm-head rescored`` and a top_k above
    the vocabulary, which the pass brings down to N."""
    from fptq_onnx.config import CalibrationConfig, ConvertConfig
    from fptq_onnx.export import export_model
    from fptq_onnx.models._tiny import save_tiny_llama, tiny_text
    from fptq_onnx.pipeline import convert

    root = tmp_path_factory.mktemp("rescored")
    source = export_model(save_tiny_llama(root / "hf"), root / "fp32" / "model.onnx", progress=False)
    (root / "calib.txt").write_text(tiny_text(2000))
    config = ConvertConfig(lm_head="rescored", lm_head_top_k=100, calibration=CalibrationConfig(samples=4, seq_len=32))
    return convert(source, root / "out" / "model.onnx", root / "calib.txt", config, progress=False)


def test_converted_head_is_rescored_and_runs_with_and_without_the_library(rescored_model):
    import onnx

    import fptq_onnx
    from fptq_onnx.quant import ActMode
    from fptq_onnx.report import conversion_summary

    [head] = [layer for layer in rescored_model.layers if layer.top_k is not None]
    assert (head.act_mode, head.lae, head.weight_bits) == (ActMode.PER_TOKEN_DYNAMIC, False, 4)  # no LAE
    assert "head: lm_head rescored" in conversion_summary(rescored_model)
    rescored_model = rescored_model.output
    model = onnx.load(str(rescored_model))
    heads = [n for n in model.graph.node if n.op_type == RESCORED_OP_TYPE]
    assert [n.name for n in heads] == ["lm_head/w4a8_rescored_matmul"]
    assert {a.name: a.i for a in heads[0].attribute}["top_k"] == 23  # the vocabulary
    assert RESCORED_OP_TYPE in {f.name for f in model.functions}
    ids = np.array([[1, 5, 9, 4, 7, 22, 0]], np.int64)
    stock = stock_session(str(rescored_model))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in stock.get_inputs()}}
    if "position_ids" in {i.name for i in stock.get_inputs()}:
        feeds["position_ids"] = np.arange(ids.shape[1])[None]
    body = stock.run(["logits"], feeds)[0]
    kernel = fptq_onnx.InferenceSession(str(rescored_model)).run(["logits"], feeds)[0]
    np.testing.assert_allclose(kernel, body, rtol=0, atol=1e-4 * np.abs(body).max())
