"""Hypothesis fuzz test of the CPU kernels of ai.fptq::W4A8MatMul and W8A8MatMul against the
float64 reference and the function body (stock ONNX Runtime), and of their refusals of
malformed inputs.

Shapes (M from 0, K as groups of 2 to 128, the last one maybe partial, N odd and even around
the 16-channel tiles), both
weight widths, both activation modes, every ISA this CPU runs, and values from float32's subnormals to 1e25 with
outliers, all-zero rows, NaN and +-Inf rows (docs/ops.md, "NaN and Inf"). Weights, scales and zero points
are fed as graph inputs, so one session per (ISA, K, N, group_size, act_mode) serves every
example of that shape and op. ``FPTQ_FUZZ_EXAMPLES`` (default 2000) sets the number of examples
(.ci/sanitize runs fewer under AddressSanitizer).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, RuntimeException

from fptq_onnx import quant

from test_kernel_cpu import ISAS, kernel_session, op_model, stock_session, w4a8_model

EXAMPLES = int(os.environ.get("FPTQ_FUZZ_EXAMPLES", "2000"))
WEIGHT_INPUTS = ("B", "S", "Z", "A")
GROUP_SIZES = [2, 12, 32, 128]  # 2 and 12 are not multiples of the kernels' 8-wide chunks
N_VALUES = [1, 2, 15, 16, 17, 37]  # around the 16-channel tiles, odd and even
U = 2.0**-24  # unit roundoff of float32
SUBNORMAL_ULP = 2.0**-149  # absolute rounding error of a float32 result in the subnormal range

# --- sessions -----------------------------------------------------------------------------


def _unknown_shapes(model_bytes: bytes) -> bytes:
    """The model with no shape (not even a rank) on its graph inputs, so that the kernel, not
    ONNX Runtime's feed check, sees the shapes of what is fed."""
    model = onnx.load_from_string(model_bytes)
    for value in model.graph.input:
        value.type.tensor_type.ClearField("shape")
    return model.SerializeToString()


@functools.cache
def sessions(isa: str, k: int, n: int, group_size: int, act_mode: int, bits: int = 4):
    """(kernel session with $FPTQ_CPU_ISA=isa, stock session running the body) for one shape of
    the op for bits-bit weights."""
    groups = -(-k // group_size)
    placeholder = {"B": np.zeros((n, -(-k * bits // 8)), np.uint8), "S": np.ones((n, groups), np.float32),
                   "Z": np.zeros((n, groups), np.uint8)}
    model = _unknown_shapes(op_model(placeholder, 1.0, bits, k=k, n=n, group_size=group_size, act_mode=act_mode,
                                     graph_inputs=WEIGHT_INPUTS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FPTQ_CPU_ISA", isa)
        kernel = kernel_session(model)
    return kernel, stock_session(model)


@functools.cache
def supported_isas() -> tuple[str, ...]:
    usable = []
    for isa in ISAS:
        try:
            sessions(isa, 32, 1, 32, 0)
        except RuntimeException as error:
            assert "not supported by this CPU" in str(error)
            continue
        usable.append(isa)
    return tuple(usable)


# --- data ---------------------------------------------------------------------------------


def random_weights(rng: np.random.Generator, k: int, n: int, group_size: int, symmetric: bool, scale_exp: int,
                   bits: int = 4):
    """Op inputs B, S, Z of random weights (not necessarily from quantizing anything): any u and
    z in [0, 2^bits - 1] (z = 2^(bits - 1) when symmetric) and positive scales around 10**scale_exp.
    B: the nibbles packed (4 bits) or u itself (8 bits)."""
    groups = -(-k // group_size)
    levels = 2**bits
    u = rng.integers(0, levels, (n, k), dtype=np.uint8)
    z = (np.full((n, groups), levels // 2, np.uint8) if symmetric
         else rng.integers(0, levels, (n, groups), dtype=np.uint8))
    s = (rng.uniform(0.5, 2.0, (n, groups)) * 10.0**scale_exp).astype(np.float32)
    return {"B": quant.pack_int4(u) if bits == 4 else u, "S": s, "Z": z}


def random_activations(rng: np.random.Generator, m: int, k: int, exp: int, spread: int, specials: bool) -> np.ndarray:
    """X[m, k]: Gaussian values times 10**(exp + e), e uniform in [-spread, spread] per element
    (outliers and near-zero values in one row), and when ``specials`` some all-zero rows and
    rows holding a NaN, +Inf or -Inf."""
    magnitude = 10.0 ** (exp + rng.integers(-spread, spread + 1, (m, k)))
    x = (rng.standard_normal((m, k)) * magnitude).astype(np.float32)
    if specials and m:
        for value in (0.0, np.nan, np.inf, -np.inf):
            rows = rng.random(m) < 0.15
            if value == 0.0:
                x[rows] = 0.0
            else:
                x[rows, rng.integers(0, k, m)[rows]] = value
    return x


def expected_output(x, weights, act_scale, act_mode, group_size, bits=4) -> np.ndarray:
    """The float64 reference, docs/ops.md's NaN policy included (``quant.poisoned_rows``)."""
    of = quant.w8a8_matmul_reference if bits == 8 else quant.w4a8_matmul_reference
    return of(x, weights["B"], weights["S"], weights["Z"], act_scale, act_mode, group_size)


def error_bounds(x, weights, act_scale, act_mode, group_size, bits=4):
    """Elementwise bounds on |Y - reference| for the kernel and for the function body.

    Quantization is exact in both: q[m, k] = clip(rint(x * (1 / a_m)), -127, 127) comes from
    the same correctly rounded float32 operations as in the reference (a max, a division, one
    multiply; no sum, so no FMA contraction and no order dependence). A q one step off at a
    rounding boundary would therefore be a bug, and the bounds allow for none. What differs is
    the float32 arithmetic after the exact int32 group sums D_g = sum_{k in g} q (u - z)
    (|D_g| < 2^24, so float(D_g) is exact: 127 * 255 * 128 < 2^23 for 8-bit weights too):

    * kernel: Y = a_m * sum_g s_g * D_g, summed in float32 over G groups, one rounding per
      product (or none with FMA) and per addition, one for the final * a_m. Standard summation
      error analysis: |err| <= (G + 2) u * a_m * sum_g |s_g D_g|, u = 2^-24, plus absolute
      errors of at most 2^-149 per rounding when partial results are subnormal (tiny values).
    * body: Y = sum_k (q_k a_m) * ((u - z) s)_kn, each factor rounded once, then a float32
      MatMul over K terms: |err| <= (K + 3) u * sum_k |q_k a_m w_kn| (+ subnormal terms).

    The reference itself is float64 (error ~K 2^-53 relative): far below either bound.
    """
    x64 = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if act_mode == quant.ActMode.PER_TOKEN_DYNAMIC:
        q, a = quant.quantize_activation_per_token(x64.astype(np.float32))
        a = a.astype(np.float64)
    else:
        q = quant.quantize_activation_per_tensor(np.where(np.isinf(x), x, x64).astype(np.float32), act_scale)
        a = np.float64(np.float32(act_scale))
    k = x.shape[-1]
    u = (quant.unpack_int4(weights["B"], k) if bits == 4 else weights["B"]).astype(np.int64)  # [N, K]
    n = u.shape[0]
    groups = -(-k // group_size)
    pad = groups * group_size - k  # a partial last group: zeros in q and u add nothing to D_g
    centered = (np.pad(u, ((0, 0), (0, pad))).reshape(n, groups, group_size)
                - weights["Z"][..., None].astype(np.int64))  # [N, G, g]
    q_grouped = np.pad(q.astype(np.int64), ((0, 0), (0, pad))).reshape(-1, groups, group_size)  # [M, G, g]
    d = np.einsum("mgj,ngj->mng", q_grouped, centered).astype(np.float64)  # exact D_g
    s = weights["S"].astype(np.float64)  # [N, G]
    kernel_terms = np.abs(d * s[None]).sum(axis=-1) * a  # a_m * sum_g |s_g D_g|
    kernel = (groups + 2) * U * kernel_terms + a * (groups + 1) * SUBNORMAL_ULP + SUBNORMAL_ULP
    w_abs = np.abs(centered.reshape(n, -1) * np.repeat(s, group_size, axis=1))[:, :k]  # |w[n, k]|
    body_terms = (np.abs(q.astype(np.float64)) * a) @ w_abs.T
    body = (k + 3) * U * body_terms + (k + 2) * SUBNORMAL_ULP
    return kernel, body


def assert_matches(name, got, expected, bound):
    assert got.shape == expected.shape, name
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{name}: NaN rows differ from the policy")
    error = np.abs(got.astype(np.float64) - expected)
    bad = ~nan & ~(error <= bound)
    assert not bad.any(), (f"{name}: {bad.sum()} outputs beyond the bound, worst "
                           f"{float(np.max(np.where(bad, error / bound, 0))):.3g} x bound")


# --- the fuzz test ------------------------------------------------------------------------

problems = st.fixed_dictionaries({
    "isa": st.sampled_from(ISAS),  # one not supported here is replaced below
    "bits": st.sampled_from([4, 8]),
    "act_mode": st.sampled_from([quant.ActMode.PER_TENSOR_STATIC, quant.ActMode.PER_TOKEN_DYNAMIC]),
    "group_size": st.sampled_from(GROUP_SIZES),
    "groups": st.integers(1, 3),
    "trim": st.integers(0, 127),  # K = group_size * groups - trim % group_size: a partial last group
    "n": st.sampled_from(N_VALUES),
    "m": st.one_of(st.sampled_from([0, 1]), st.integers(2, 70)),  # 70: several AMX row blocks
    "symmetric": st.booleans(),
    "x_exp": st.integers(-45, 25),  # subnormals up; with weight scales <= 2e3 |Y| stays below float32's max
    "spread": st.integers(0, 4),
    "scale_exp": st.integers(-8, 3),
    "act_scale_log2": st.floats(-3.0, 3.0),  # static scale relative to max|x| / 127: <1 saturates
    "specials": st.booleans(),
    "seed": st.integers(0, 2**32 - 1),
})


# no example database: nothing written into the checkout; a failure prints the example to reproduce it
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_kernel_matches_reference_and_body(p):
    isas = supported_isas()
    isa = p["isa"] if p["isa"] in isas else isas[0]
    rng = np.random.default_rng(p["seed"])
    k = p["group_size"] * p["groups"] - p["trim"] % p["group_size"]
    spread = min(p["spread"], 25 - p["x_exp"])  # magnitudes up to 1e25 (below 1e-45: zeros)
    x = random_activations(rng, p["m"], k, p["x_exp"], spread, p["specials"])
    weights = random_weights(rng, k, p["n"], p["group_size"], p["symmetric"], p["scale_exp"], p["bits"])
    finite_max = float(np.abs(np.where(np.isfinite(x), x, 0)).max(initial=0.0))
    act_scale = np.float32(max(finite_max / 127 * 2.0 ** p["act_scale_log2"], np.finfo(np.float32).tiny)
                           if finite_max else 1.0)
    feeds = {"X": x, **weights, "A": np.asarray(act_scale, np.float32)}

    kernel, body = sessions(isa, k, p["n"], p["group_size"], p["act_mode"], p["bits"])
    expected = expected_output(x, weights, act_scale, p["act_mode"], p["group_size"], p["bits"])
    kernel_bound, body_bound = error_bounds(x, weights, act_scale, p["act_mode"], p["group_size"], p["bits"])
    assert_matches(f"kernel ({isa}, {p['bits']}-bit weights)", kernel.run(None, feeds)[0], expected, kernel_bound)
    assert_matches("function body", body.run(None, feeds)[0], expected, body_bound)


# --- malformed inputs: an ONNX Runtime error, never a crash --------------------------------


def _good_feeds(k=64, n=7, group_size=32, m=3):
    rng = np.random.default_rng(0)
    return {"X": rng.standard_normal((m, k)).astype(np.float32),
            **random_weights(rng, k, n, group_size, False, 0), "A": np.asarray(0.05, np.float32)}


MALFORMED = [
    pytest.param({"X": np.zeros((3, 66), np.float32)}, "X has shape", id="X-wrong-K"),
    pytest.param({"X": np.zeros((), np.float32)}, "X has shape", id="X-scalar"),
    pytest.param({"B": np.zeros((7, 31), np.uint8)}, "B has shape", id="B-wrong-K"),
    pytest.param({"B": np.zeros((7,), np.uint8)}, "B has shape", id="B-rank-1"),
    pytest.param({"S": np.ones((7, 3), np.float32)}, "scales has shape", id="scales-wrong-groups"),
    pytest.param({"S": np.ones((8, 2), np.float32)}, "scales has shape", id="scales-wrong-N"),
    pytest.param({"S": np.ones((0, 2), np.float32)}, "scales has shape", id="scales-empty"),
    pytest.param({"Z": np.zeros((7, 2, 1), np.uint8)}, "zero_points has shape", id="zero-points-rank-3"),
    pytest.param({"A": np.ones((0,), np.float32)}, "act_scale must hold exactly one element", id="act-scale-empty"),
    pytest.param({"A": np.asarray(1e-40, np.float32)}, "at least 2\\^-126", id="act-scale-subnormal"),
    pytest.param({"A": np.asarray(np.nan, np.float32)}, "must be finite", id="act-scale-nan"),
]


@pytest.mark.parametrize("change, match", MALFORMED)
def test_malformed_inputs_fail_the_run(change, match):
    kernel, _ = sessions("generic", 64, 7, 32, quant.ActMode.PER_TENSOR_STATIC)
    with pytest.raises(InvalidArgument, match=match):
        kernel.run(None, {**_good_feeds(), **change})


W8_MALFORMED = [
    pytest.param({"B": np.zeros((7, 32), np.uint8)}, "B has shape \\[7, 32\\], expected \\[7, 64\\]", id="B-4-bit-shape"),
    pytest.param({"B": np.zeros((7, 64, 1), np.uint8)}, "B has shape", id="B-rank-3"),
    pytest.param({"S": np.ones((7, 1), np.float32)}, "scales has shape", id="scales-wrong-groups"),
    pytest.param({"X": np.zeros((0, 65), np.float32)}, "X has shape", id="X-no-rows-wrong-K"),
]


@pytest.mark.parametrize("change, match", W8_MALFORMED)
def test_w8_malformed_inputs_fail_the_run(change, match):
    kernel, _ = sessions("generic", 64, 7, 32, quant.ActMode.PER_TOKEN_DYNAMIC, 8)
    rng = np.random.default_rng(0)
    feeds = {"X": rng.standard_normal((3, 64)).astype(np.float32), **random_weights(rng, 64, 7, 32, False, 0, 8),
             "A": np.asarray(1.0, np.float32)}
    with pytest.raises(InvalidArgument, match=f"W8A8MatMul node 'w8a8': {match}"):
        kernel.run(None, {**feeds, **change})


@pytest.mark.parametrize("name, dtype", [
    pytest.param("X", np.float64, id="X-float64"),
    pytest.param("X", np.int32, id="X-int32"),
    pytest.param("B", np.int8, id="B-int8"),
    pytest.param("S", np.float16, id="scales-float16"),
    pytest.param("Z", np.int32, id="zero-points-int32"),
])
def test_wrong_input_types_are_refused(name, dtype):
    """A feed of another element type than the model declares: ONNX Runtime refuses it."""
    kernel, _ = sessions("generic", 64, 7, 32, quant.ActMode.PER_TENSOR_STATIC)
    feeds = _good_feeds()
    feeds[name] = feeds[name].astype(dtype)
    with pytest.raises((InvalidArgument, Fail), match="type"):
        kernel.run(None, feeds)


@pytest.mark.parametrize("name, elem_type", [
    pytest.param("X", onnx.TensorProto.DOUBLE, id="X-double"),
    pytest.param("B", onnx.TensorProto.INT8, id="B-int8"),
    pytest.param("S", onnx.TensorProto.FLOAT16, id="scales-float16"),
])
def test_models_with_wrong_input_types_fail_the_session(name, elem_type):
    """A model whose W4A8MatMul inputs have other types than the op's: no kernel matches, and
    the session (not the process) fails."""
    model = onnx.load_from_string(w4a8_model({"B": np.zeros((7, 32), np.uint8), "S": np.ones((7, 2), np.float32),
                                              "Z": np.zeros((7, 2), np.uint8)}, 1.0, k=64, n=7, group_size=32,
                                             act_mode=0, graph_inputs=WEIGHT_INPUTS))
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name == name or (name == "X" and value.name == "Y"):
            value.type.tensor_type.elem_type = elem_type
    with pytest.raises(InvalidGraph, match=f"Type Error: .* input parameter \\({name}\\) of operator \\(W4A8MatMul\\)"):
        kernel_session(model.SerializeToString())
