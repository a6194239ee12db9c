"""The W4A8 function body (stock ONNX Runtime) against the float64 reference of docs/ops.md."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fptq_onnx import quant
from fptq_onnx.op_contract import OP_DOMAIN, OP_TYPE, add_w4a8_function, w4a8_function

from conftest import run_model


def w4a8_model(k, n, group_size, act_mode, symmetric, rng, act_scale=0.05, opset=18, rank=3):
    w = rng.standard_normal((k, n)).astype(np.float32)
    u, scales, zeros = quant.quantize_weight_groupwise(w, group_size, symmetric)
    weights = {"B": quant.pack_int4(u), "S": scales, "Z": zeros, "A": np.array(act_scale, np.float32)}
    node = helper.make_node(OP_TYPE, ["X", "B", "S", "Z", "A"], ["Y"], domain=OP_DOMAIN,
                            K=k, N=n, group_size=group_size, act_mode=act_mode)
    dims = ["d%d" % i for i in range(rank - 1)]
    graph = helper.make_graph(
        [node], "w4a8", [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims + [k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims + [n])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    add_w4a8_function(model)
    onnx.checker.check_model(model, full_check=True)
    return model, weights


CASES = [
    pytest.param(128, 37, 128, 0, False, id="static-asym-g128-oddN"),
    pytest.param(256, 16, 64, 0, True, id="static-sym-g64"),
    pytest.param(384, 7, 128, 1, False, id="dynamic-asym-K384"),
    pytest.param(64, 33, 32, 1, True, id="dynamic-sym-g32"),
]


@pytest.mark.parametrize("k, n, group_size, act_mode, symmetric", CASES)
@pytest.mark.parametrize("opset", [pytest.param(15, id="opset15"), pytest.param(18, id="opset18")])
def test_function_body_matches_reference(rng, k, n, group_size, act_mode, symmetric, opset):
    model, w = w4a8_model(k, n, group_size, act_mode, symmetric, rng, opset=opset)
    x = rng.standard_normal((2, 5, k)).astype(np.float32) * 3.0
    x[0, 1] = 0.0  # an all-zero token: dynamic scale falls back to 1
    x[1, 2, :4] = 1e3  # saturates in static mode
    got = run_model(model, {"X": x})[0]
    ref = quant.w4a8_matmul_reference(x, w["B"], w["S"], w["Z"], float(w["A"]), act_mode)
    assert got.shape == (2, 5, n)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_function_body_handles_zero_rows(rng):
    model, _ = w4a8_model(128, 9, 128, 1, False, rng)
    assert run_model(model, {"X": np.zeros((1, 0, 128), np.float32)})[0].shape == (1, 0, 9)


def test_function_body_is_exact_on_integer_grid(rng):
    """Inputs already on the int8 grid: the body must reproduce q exactly (no double rounding)."""
    model, w = w4a8_model(128, 5, 128, 0, False, rng, act_scale=0.5, rank=2)
    q = rng.integers(-127, 128, size=(4, 128)).astype(np.float32)
    got = run_model(model, {"X": q * 0.5})[0]
    deq = quant.dequantize_weight(quant.unpack_int4(w["B"]), w["S"], w["Z"])
    np.testing.assert_allclose(got, (q.astype(np.float64) @ deq) * 0.5, rtol=1e-5, atol=1e-4)


def test_old_opset_is_refused():
    with pytest.raises(ValueError, match="opset >= 15"):
        w4a8_function(13)
