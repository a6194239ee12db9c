"""The CPU kernels of ai.fptq::W4A8MatMul and W8A8MatMul (libfptq_ops.so) against the function
body and the float64 reference (docs/ops.md), plus their error paths, thread safety and the
Python loader. Tests taking ``bits`` run both ops: 4-bit (W4A8MatMul) and 8-bit (W8A8MatMul)
weights, one kernel with two weight formats.

Numerics bound: |Y_kernel - Y_expected| <= 1e-5 * max|Y_expected| elementwise, where the
expected output is the float64 reference or the function body run by stock ONNX Runtime.
Quantization itself is exact (same float32 operations everywhere), so the only differences
are float32 rounding of the group sums: observed errors are around 1e-7 of max|Y|.
"""
from __future__ import annotations

import threading

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

import fptq_onnx
from fptq_onnx import quant
from fptq_onnx.op_contract import OP_TYPE, W8A8_OP_TYPE, single_op_model, w4a8_function, w8a8_function

REL_TOL = 1e-5
ISAS = ["generic", "avx2", "avx512vnni", "amx"]
WIDTHS = [pytest.param(4, id="w4"), pytest.param(8, id="w8")]  # weight bits: W4A8MatMul, W8A8MatMul


# --- model building -----------------------------------------------------------------------


def quantized_weights(rng, k, n, group_size, symmetric, bits=4):
    """Op inputs of a random [K, N] weight: dict B uint8 [N, K/2] (8 bits: [N, K]), S float32
    [N, G], Z uint8 [N, G]."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    if bits == 8:
        u, scales, zeros = quant.quantize_weight_groupwise_int8(w, group_size, symmetric)
        return {"B": u, "S": scales, "Z": zeros}
    u, scales, zeros = quant.quantize_weight_groupwise(w, group_size, symmetric)
    return {"B": quant.pack_int4(u), "S": scales, "Z": zeros}


w4a8_model = single_op_model  # the one-node model every kernel test runs


def op_model(weights, act_scale, bits=4, **kwargs):
    """single_op_model of the op for ``bits``-bit weights."""
    return single_op_model(weights, act_scale, op_type=W8A8_OP_TYPE if bits == 8 else OP_TYPE, **kwargs)


def reference(x, weights, act_scale, act_mode, bits=4, group_size=None):
    """The float64 reference of the op for ``bits``-bit weights on the inputs of quantized_weights()
    (group_size: needed when it does not divide K)."""
    of = quant.w8a8_matmul_reference if bits == 8 else quant.w4a8_matmul_reference
    return of(x, weights["B"], weights["S"], weights["Z"], act_scale, act_mode, group_size)


def stock_session(model_bytes):
    """Stock ONNX Runtime: runs the function body."""
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def kernel_session(model_bytes, threads=None):
    """ONNX Runtime with libfptq_ops.so: runs the CPU kernel. threads: intra_op_num_threads.

    Without ORT's memory arena every tensor is its own allocation, so that AddressSanitizer
    (.ci/sanitize) sees a read or write past X or Y, not a neighbour inside an arena chunk.
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    if threads is not None:
        options.intra_op_num_threads = threads
    return fptq_onnx.InferenceSession(model_bytes, options)


def assert_close(actual, expected):
    """Elementwise |actual - expected| <= REL_TOL * max|expected| (exact when expected is all 0)."""
    assert actual.shape == expected.shape
    bound = REL_TOL * float(np.abs(expected).max(initial=0.0))
    err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each tile kernel this CPU can run, selected through $FPTQ_CPU_ISA (read at session creation)."""
    monkeypatch.setenv("FPTQ_CPU_ISA", request.param)
    try:
        kernel_session(w4a8_model(quantized_weights(np.random.default_rng(0), 32, 1, 32, True), 1.0,
                                  k=32, n=1, group_size=32, act_mode=0))
    except RuntimeException as e:
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{request.param}: not supported by this CPU")
        raise
    return request.param


# --- numerics -----------------------------------------------------------------------------

CASES = [
    #            M,  K,  N, group, act_mode, symmetric
    pytest.param(1, 128, 7, 32, 0, True, id="static-sym-M1-N7-K128-g32"),
    pytest.param(3, 384, 37, 64, 0, False, id="static-asym-M3-N37-K384-g64"),
    pytest.param(17, 384, 1, 128, 0, True, id="static-sym-M17-N1-K384-g128"),
    pytest.param(17, 128, 37, 64, 1, False, id="dynamic-asym-M17-N37-K128-g64"),
    pytest.param(3, 384, 7, 32, 1, True, id="dynamic-sym-M3-N7-K384-g32"),
    pytest.param(1, 384, 37, 128, 1, False, id="dynamic-asym-M1-N37-K384-g128"),
    pytest.param(8, 128, 32, 128, 1, True, id="dynamic-sym-M8-N32-whole-tiles"),
    # Groups that are not a multiple of the kernels' 8-wide chunks exercise the padding.
    pytest.param(5, 384, 19, 12, 1, False, id="dynamic-asym-g12-padded-groups"),
    pytest.param(2, 128, 9, 2, 0, False, id="static-asym-g2-padded-groups"),
    # Enough work to be split into several row blocks x tile ranges (and a partial last tile).
    pytest.param(130, 1024, 300, 128, 1, False, id="dynamic-asym-M130-N300-K1024-many-tasks"),
    # AVX-512 paths: one row streams with 4 accumulator sets (6 chunks: a remainder of 2);
    # 6 rows x 5 tiles take the blocked path (a 6-row block, tile blocks of 4 and 1); groups
    # past the blocked path's limit stream even for many rows.
    pytest.param(1, 384, 40, 48, 1, False, id="dynamic-asym-M1-g48-chunk-remainder"),
    pytest.param(6, 256, 80, 128, 0, False, id="static-asym-M6-N80-blocked-5-tiles"),
    pytest.param(7, 4096, 20, 2048, 1, False, id="dynamic-asym-M7-g2048-large-group"),
    # K so large that a task's q rows are capped to fit L2 (48 rows per task, not 64 or 256).
    pytest.param(100, 16384, 20, 128, 1, False, id="dynamic-asym-M100-K16384-rows-per-task-capped"),
    # One group per channel (group_size = K: the quantized language-model head), streaming and blocked.
    pytest.param(1, 576, 200, 576, 1, True, id="dynamic-sym-M1-per-channel-K576"),
    pytest.param(37, 576, 70, 576, 0, False, id="static-asym-M37-per-channel-K576"),
    pytest.param(512, 192, 33, 64, 1, False, id="dynamic-asym-M512"),
    # K % group_size != 0: a partial last group (SmolLM2's K = 576 at group 128), no Pad.
    pytest.param(1, 576, 40, 128, 1, False, id="dynamic-asym-M1-K576-g128-partial"),
    pytest.param(33, 576, 37, 128, 0, True, id="static-sym-M33-K576-g128-partial-blocked"),
    pytest.param(3, 100, 19, 32, 1, False, id="dynamic-asym-M3-K100-g32-partial-of-4"),
    pytest.param(20, 100, 21, 128, 0, False, id="static-asym-M20-K100-g128-one-partial-group"),
    # A group far past K (packed to K, not to group_size), blocked rows and a remainder.
    pytest.param(6, 99, 21, 2048, 1, False, id="dynamic-asym-M6-K99-g2048-group-past-K"),
    pytest.param(9, 130, 21, 128, 1, True, id="dynamic-sym-M9-K130-g128-partial-of-2"),
    pytest.param(64, 130, 33, 32, 1, False, id="dynamic-asym-M64-K130-g32-partial-of-2"),
    pytest.param(5, 99, 17, 32, 0, False, id="static-asym-M5-K99-odd"),
]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("m, k, n, group_size, act_mode, symmetric", CASES)
def test_kernel_matches_function_body_and_reference(isa, bits, m, k, n, group_size, act_mode, symmetric):
    rng = np.random.default_rng(m * 1000 + k + n)
    weights = quantized_weights(rng, k, n, group_size, symmetric, bits)
    x = (rng.standard_normal((m, k)) * 3.0).astype(np.float32)
    act_scale = np.float32(np.abs(x).max() / 127.0)
    model = op_model(weights, act_scale, bits, k=k, n=n, group_size=group_size, act_mode=act_mode)
    got = kernel_session(model).run(None, {"X": x})[0]
    assert got.dtype == np.float32
    assert_close(got, reference(x, weights, act_scale, act_mode, bits, group_size))
    assert_close(got, stock_session(model).run(None, {"X": x})[0].astype(np.float64))


@pytest.mark.parametrize("symmetric", [pytest.param(True, id="sym"), pytest.param(False, id="asym")])
def test_w8_extreme_bytes_match_the_reference(isa, symmetric):
    """u = 0 and 255 against z = 0 and 255 (|u - z| = 255, the int16 limit of the AVX2 trick) with
    |q| = 127 everywhere: the exact int32 sums of the 8-bit path, every ISA (41 rows: two AMX
    tiles of 16 rows with unsigned u in tdpbsud, and 9 rows for the AVX-512 kernels)."""
    rng = np.random.default_rng(47)
    k, n, group_size = 256, 37, 64
    u = rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), (n, k))
    z = np.full((n, k // group_size), 128, np.uint8) if symmetric else rng.choice(
        np.array([0, 255, 128], np.uint8), (n, k // group_size))
    weights = {"B": u, "S": rng.uniform(0.5, 2, (n, k // group_size)).astype(np.float32), "Z": z}
    x = np.where(rng.random((41, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    model = op_model(weights, 1.0 / 127, 8, k=k, n=n, group_size=group_size, act_mode=0)
    got = kernel_session(model).run(None, {"X": x})[0]
    assert_close(got, reference(x, weights, np.float32(1.0 / 127), 0, 8))


@pytest.mark.parametrize("k, group_size", [pytest.param(256, 64, id="K256-g64"),
                                           pytest.param(232, 40, id="K232-g40-partial")])
def test_w4_extreme_nibbles_match_the_reference(isa, k, group_size):
    """u = 15 (and 0) with q = +-127 in every position of whole rows: the largest int16 pair sums
    the AVX2 kernel adds before widening (8 x 3810 = 30480 over a run of 4 chunks), group sizes
    of 8 chunks (two runs) and 5 (a run and one chunk), a partial last group, every ISA."""
    rng = np.random.default_rng(48)
    n = 37
    groups = -(-k // group_size)
    u = np.where(rng.random((n, k)) < 0.9, 15, 0).astype(np.uint8)
    z = rng.choice(np.array([0, 8, 15], np.uint8), (n, groups))
    weights = {"B": quant.pack_int4(u), "S": rng.uniform(0.5, 2, (n, groups)).astype(np.float32), "Z": z}
    x = np.concatenate([np.ones((3, k)), -np.ones((3, k)), np.where(rng.random((3, k)) < 0.5, -1.0, 1.0)])
    model = op_model(weights, 1.0 / 127, 4, k=k, n=n, group_size=group_size, act_mode=0)
    got = kernel_session(model).run(None, {"X": x.astype(np.float32)})[0]
    assert_close(got, reference(x.astype(np.float32), weights, np.float32(1.0 / 127), 0, 4, group_size))


@pytest.mark.parametrize("shape", [
    pytest.param((2, 3, 128), id="3d"),
    pytest.param((2, 1, 3, 128), id="4d"),
    pytest.param((128,), id="1d"),
])
@pytest.mark.parametrize("act_mode", [pytest.param(0, id="static"), pytest.param(1, id="dynamic")])
@pytest.mark.parametrize("bits", WIDTHS)
def test_leading_dims_are_flattened(shape, act_mode, bits):
    rng = np.random.default_rng(7)
    weights = quantized_weights(rng, 128, 11, 64, False, bits)
    x = rng.standard_normal(shape).astype(np.float32)
    model = op_model(weights, 0.02, bits, k=128, n=11, group_size=64, act_mode=act_mode, x_rank=len(shape))
    got = kernel_session(model).run(None, {"X": x})[0]
    assert got.shape == shape[:-1] + (11,)
    assert_close(got, reference(x, weights, 0.02, act_mode, bits))


@pytest.mark.parametrize("shape", [pytest.param((0, 128), id="2d"), pytest.param((2, 0, 128), id="3d")])
@pytest.mark.parametrize("bits", WIDTHS)
def test_zero_rows_give_an_empty_output(shape, bits):
    weights = quantized_weights(np.random.default_rng(3), 128, 9, 32, True, bits)
    model = op_model(weights, 0.05, bits, k=128, n=9, group_size=32, act_mode=1, x_rank=len(shape))
    x = np.zeros(shape, np.float32)
    got = kernel_session(model).run(None, {"X": x})[0]
    assert got.shape == shape[:-1] + (9,)
    assert got.shape == stock_session(model).run(None, {"X": x})[0].shape


@pytest.mark.parametrize("bits", WIDTHS)
def test_all_zero_row_gives_zero_output_row(isa, bits):
    """Dynamic mode: a_m = 1 for an all-zero row (no division by zero), so its Y row is exactly 0."""
    rng = np.random.default_rng(5)
    weights = quantized_weights(rng, 128, 37, 32, False, bits)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    x[2] = 0.0
    model = op_model(weights, 1.0, bits, k=128, n=37, group_size=32, act_mode=1)
    got = kernel_session(model).run(None, {"X": x})[0]
    assert not got[2].any()
    assert_close(got, reference(x, weights, 1.0, 1, bits))


def test_dynamic_scale_below_2_to_the_minus_126_counts_as_zero(isa):
    """max|x| / 127 < 2^-126: 1 / a_m would overflow (0 * inf = NaN for a zero element), so
    a_m = 1 as for an all-zero row and the Y row is exactly 0 (docs/ops.md step 2); a row just
    above the floor keeps its tiny scale. Kernel, function body and reference agree."""
    rng = np.random.default_rng(43)
    weights = quantized_weights(rng, 64, 5, 32, False)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[0] = np.float32(1e-37) * np.sign(x[0])  # a_m = 7.9e-40, subnormal
    x[0, 3] = 0.0
    x[1] *= np.float32(1e-35)
    model = w4a8_model(weights, 1.0, k=64, n=5, group_size=32, act_mode=1)
    got = kernel_session(model).run(None, {"X": x})[0]
    np.testing.assert_array_equal(got[0], 0.0)
    assert np.all(got[1] != 0)
    assert_close(got, quant.w4a8_matmul_reference(x, weights["B"], weights["S"], weights["Z"], 1.0, 1))
    assert_close(stock_session(model).run(None, {"X": x})[0], got.astype(np.float64))


def test_static_mode_saturates_beyond_127_act_scale(isa):
    """|x| up to 40 * 127 * act_scale: q clips to +-127 (never -128), as in the reference."""
    rng = np.random.default_rng(11)
    weights = quantized_weights(rng, 384, 23, 128, False)
    act_scale = np.float32(0.01)
    x = (rng.standard_normal((6, 384)) * 127 * act_scale * 10).astype(np.float32)
    x[0, :50] = 127 * act_scale * 40
    x[1, 50:100] = -127 * act_scale * 40
    assert (np.abs(x) > 127 * act_scale).mean() > 0.5
    model = w4a8_model(weights, act_scale, k=384, n=23, group_size=128, act_mode=0)
    got = kernel_session(model).run(None, {"X": x})[0]
    assert_close(got, quant.w4a8_matmul_reference(x, weights["B"], weights["S"], weights["Z"], act_scale, 0))
    assert_close(got, stock_session(model).run(None, {"X": x})[0].astype(np.float64))


def test_ties_round_half_to_even(isa):
    """x / act_scale exactly k + 0.5: rint sends 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2.

    One output channel with u - z = 1 everywhere in group 0 and 0 in group 1 reads back
    sum_k q[k] of the first group, so the expected value is exact.
    """
    k, group_size = 64, 32
    u = np.zeros((1, k), np.uint8)
    u[0, :group_size] = 9  # with z = 8: weight 1
    u[0, group_size:] = 8  # weight 0
    weights = {"B": quant.pack_int4(u), "S": np.ones((1, 2), np.float32), "Z": np.full((1, 2), 8, np.uint8)}
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5], np.float32)
    x = np.zeros((len(halves), k), np.float32)
    x[:, 0] = halves * 0.5  # act_scale 0.5: x * (1 / 0.5) is exact
    model = w4a8_model(weights, 0.5, k=k, n=1, group_size=group_size, act_mode=0)
    got = kernel_session(model).run(None, {"X": x})[0][:, 0]
    np.testing.assert_array_equal(got, np.rint(halves) * 0.5)


@pytest.mark.parametrize("act_mode", [pytest.param(0, id="static"), pytest.param(1, id="dynamic")])
@pytest.mark.parametrize("bits", WIDTHS)
def test_nan_and_inf_rows_follow_the_policy(isa, act_mode, bits):
    """docs/ops.md "NaN and Inf", as the function body does: a NaN makes its Y row NaN in both
    modes; an Inf makes it NaN in dynamic mode (a_m = Inf) and saturates to +-127 in static mode.
    Other rows are untouched. (tests/test_fuzz_kernel.py covers this over random shapes.)"""
    rng = np.random.default_rng(29)
    weights = quantized_weights(rng, 128, 21, 32, False, bits)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    x[1, 5], x[2, 7], x[3, 9] = np.nan, np.inf, -np.inf
    model = op_model(weights, 0.05, bits, k=128, n=21, group_size=32, act_mode=act_mode)
    got = kernel_session(model).run(None, {"X": x})[0]
    nan_rows = [1, 2, 3] if act_mode == 1 else [1]
    np.testing.assert_array_equal(np.isnan(got).all(axis=1), [i in nan_rows for i in range(4)])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(stock_session(model).run(None, {"X": x})[0]))
    # the other rows: +-Inf quantizes to +-127 in static mode, like any |x| > 127 * act_scale
    rows = [i for i in range(4) if i not in nan_rows]
    assert_close(got[rows], reference(x[rows], weights, 0.05, act_mode, bits))


def test_zero_points_beyond_15_match_the_reference(isa):
    """docs/ops.md has z in [0, 15]; larger uint8 zero points still compute the formula (the AMX
    kernel, whose int8 weights u - z need z <= 15, hands such weights to AVX-512)."""
    rng = np.random.default_rng(41)
    weights = quantized_weights(rng, 256, 40, 64, False)
    weights["Z"] = weights["Z"].copy()
    weights["Z"][3, 1] = 200
    weights["Z"][17, 0] = 255
    x = rng.standard_normal((40, 256)).astype(np.float32)
    model = w4a8_model(weights, 1.0, k=256, n=40, group_size=64, act_mode=1)
    got = kernel_session(model).run(None, {"X": x})[0]
    assert_close(got, quant.w4a8_matmul_reference(x, weights["B"], weights["S"], weights["Z"], 1.0, 1))


@pytest.mark.parametrize("bits", WIDTHS)
def test_isas_agree(bits):
    """Every ISA this CPU has computes the same Y (up to float32 rounding of the group sums)."""
    rng = np.random.default_rng(13)
    weights = quantized_weights(rng, 384, 45, 64, False, bits)
    x = rng.standard_normal((9, 384)).astype(np.float32)
    model = op_model(weights, 1.0, bits, k=384, n=45, group_size=64, act_mode=1)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ISAS:
            mp.setenv("FPTQ_CPU_ISA", name)
            try:
                results[name] = kernel_session(model).run(None, {"X": x})[0]
            except RuntimeException as e:
                assert "not supported by this CPU" in str(e)
    assert "generic" in results
    for y in results.values():
        assert_close(y, results["generic"].astype(np.float64))


@pytest.mark.parametrize("m, n, group_size", [
    pytest.param(13, 100, 64, id="M13-N100-g64"),
    pytest.param(70, 37, 32, id="M70-N37-g32-two-row-blocks"),
    pytest.param(53, 37, 128, id="M53-N37-g128-amx-blocks-of-32-and-16"),
])
@pytest.mark.parametrize("bits", WIDTHS)
def test_rows_do_not_depend_on_the_batch(isa, m, n, group_size, bits):
    """Dynamic mode: row i of Y(X) is bit for bit Y(X[i]) run alone, so a token's output does not
    depend on what it is batched with, although the kernels take other paths for one row
    (streaming) than for many (register blocks over unpacked weights; AMX tiles for whole
    blocks of 16 rows)."""
    rng = np.random.default_rng(37)
    weights = quantized_weights(rng, 384, n, group_size, False, bits)
    x = rng.standard_normal((m, 384)).astype(np.float32)
    session = kernel_session(op_model(weights, 1.0, bits, k=384, n=n, group_size=group_size, act_mode=1))
    batched = session.run(None, {"X": x})[0]
    for i in range(m):
        np.testing.assert_array_equal(batched[i:i + 1], session.run(None, {"X": x[i:i + 1]})[0])


@pytest.mark.parametrize("bits", WIDTHS)
def test_weights_fed_as_graph_inputs_are_not_cached(bits):
    """Non-constant weights are packed per run: a second run with other weights sees them."""
    rng = np.random.default_rng(17)
    first, second = (quantized_weights(rng, 128, 7, 32, False, bits) for _ in range(2))
    x = rng.standard_normal((3, 128)).astype(np.float32)
    model = op_model(first, 1.0, bits, k=128, n=7, group_size=32, act_mode=1, graph_inputs=("B", "S", "Z"))
    session = kernel_session(model)
    for weights in (first, second, first):
        got = session.run(None, {"X": x, **weights})[0]
        assert_close(got, reference(x, weights, 1.0, 1, bits))


@pytest.mark.parametrize("x_type", [pytest.param(TensorProto.FLOAT, id="float32"),
                                    pytest.param(TensorProto.FLOAT16, id="float16")])
@pytest.mark.parametrize("bits", WIDTHS)
def test_library_kernel_replaces_the_function_body(x_type, bits):
    """A model whose function body doubles Y: stock ORT doubles, the library's kernel does not."""
    rng = np.random.default_rng(19)
    weights = quantized_weights(rng, 128, 5, 64, True, bits)
    doubled = w8a8_function() if bits == 8 else w4a8_function()
    # Double the body's float32 MatMul product, before the cast back to X's type.
    index, matmul = next((i, node) for i, node in enumerate(doubled.node) if node.op_type == "MatMul")
    product = matmul.output[0]
    matmul.output[0] = product + "_once"
    doubled.node.insert(index + 1, helper.make_node(
        "Constant", [], [product + "_two"], value=numpy_helper.from_array(np.array(2.0, np.float32))))
    doubled.node.insert(index + 2, helper.make_node("Mul", [product + "_once", product + "_two"], [product]))
    model = op_model(weights, 1.0, bits, k=128, n=5, group_size=64, act_mode=1, function=doubled, x_type=x_type)
    x = rng.standard_normal((2, 128)).astype(helper.tensor_dtype_to_np_dtype(x_type))
    expected = reference(x, weights, 1.0, 1, bits)
    # float16 Y: within half an ulp of the float32 result (2^-11 relative), far from 2x.
    tolerance = 2.0**-10 * np.abs(expected) + 1e-5 * np.abs(expected).max()
    assert np.all(np.abs(stock_session(model).run(None, {"X": x})[0] - 2 * expected) <= 2 * tolerance)
    assert np.all(np.abs(kernel_session(model).run(None, {"X": x})[0] - expected) <= tolerance)


@pytest.mark.parametrize("act_mode", [pytest.param(0, id="static"), pytest.param(1, id="dynamic")])
@pytest.mark.parametrize("bits", WIDTHS)
def test_float16_x_matches_function_body(act_mode, bits):
    """float16 X/Y: the same float32 math between a widening and a narrowing cast, as in the body."""
    rng = np.random.default_rng(31)
    weights = quantized_weights(rng, 384, 37, 64, False, bits)
    x = (rng.standard_normal((2, 9, 384)) * 3).astype(np.float16)
    model = op_model(weights, 0.05, bits, k=384, n=37, group_size=64, act_mode=act_mode, x_rank=3,
                     x_type=TensorProto.FLOAT16)
    got = kernel_session(model).run(None, {"X": x})[0]
    expected = stock_session(model).run(None, {"X": x})[0]
    assert got.dtype == np.float16 and got.shape == (2, 9, 37)
    exact = reference(x, weights, 0.05, act_mode, bits)
    tolerance = 2.0**-10 * np.abs(exact) + 1e-5 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= tolerance)
    assert np.all(np.abs(got.astype(np.float64) - expected) <= 2 * tolerance)


def test_version_1_w8a8_models_still_run_their_function_body():
    """ai.fptq version 1 (sessions 4-5) had another W8A8MatMul: int8 W[K, N] and per-channel
    scales. Our kernel serves W8A8MatMul from version 2 on, so such a model, with the library
    loaded, runs its own body (here the old contract's: Y = (q @ W) * a * w_scale) instead of
    failing on input types."""
    old_body = onnx.parser.parse_function("""
        <domain: "ai.fptq", opset_import: ["" : 18]>
        W8A8MatMul <act_mode> (X, W, w_scales, act_scale) => (Y)
        {
            inv = Reciprocal (act_scale)
            scaled = Mul (X, inv)
            q = Round (scaled)
            q_int8 = Cast <to = 3> (q)
            acc = MatMulInteger (q_int8, W)
            acc_f = Cast <to = 1> (acc)
            y_tokens = Mul (acc_f, act_scale)
            Y = Mul (y_tokens, w_scales)
        }
    """)
    rng = np.random.default_rng(53)
    w8 = rng.integers(-127, 128, (32, 6), dtype=np.int8)
    w_scales = rng.uniform(0.5, 2, 6).astype(np.float32)
    node = helper.make_node(W8A8_OP_TYPE, ["X", "W", "S", "A"], ["Y"], domain="ai.fptq", act_mode=0)
    graph = helper.make_graph([node], "v1", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", 32])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", 6])],
                              [numpy_helper.from_array(w8, "W"), numpy_helper.from_array(w_scales, "S"),
                               numpy_helper.from_array(np.float32(0.5), "A")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.fptq", 1)],
                              ir_version=10, functions=[old_body])
    x = np.round(rng.standard_normal((3, 32)) * 8).astype(np.float32) / 2  # multiples of the scale 0.5
    expected = (x / 0.5) @ w8.astype(np.float64) * 0.5 * w_scales
    np.testing.assert_allclose(kernel_session(model.SerializeToString()).run(None, {"X": x})[0], expected,
                               rtol=1e-6)


# --- concurrency --------------------------------------------------------------------------


def test_one_session_from_four_threads_matches_serial_runs():
    """4 Python threads share one session (and its intra-op pool) from the very first run, so
    they also race on packing the weight cache; each must get its serial result bit for bit."""
    rng = np.random.default_rng(23)
    weights = quantized_weights(rng, 384, 100, 64, False)
    model = w4a8_model(weights, 1.0, k=384, n=100, group_size=64, act_mode=1)
    inputs = [rng.standard_normal((33, 384)).astype(np.float32) for _ in range(4)]
    expected = [kernel_session(model, threads=1).run(None, {"X": x})[0] for x in inputs]

    session = kernel_session(model, threads=2)
    start = threading.Barrier(len(inputs))
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def worker(i):
        try:
            start.wait()
            results[i] = [session.run(None, {"X": inputs[i]})[0] for _ in range(20)]
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in results.items():
        for y in runs:
            np.testing.assert_array_equal(y, expected[i])
    assert len(results) == len(inputs)


# --- errors -------------------------------------------------------------------------------

GOOD = dict(k=128, n=8, group_size=32, act_mode=0)


def _weights(n=8, k=128, groups=4):
    return {"B": np.zeros((n, k // 2), np.uint8), "S": np.ones((n, groups), np.float32),
            "Z": np.full((n, groups), 8, np.uint8)}


RUN_ERRORS = [
    pytest.param(_weights(n=7), 1.0, (2, 128), "B has shape \\[7, 64\\], expected \\[8, 64\\]", id="B-rows-not-N"),
    pytest.param({**_weights(), "B": np.zeros((8, 63), np.uint8)}, 1.0, (2, 128), "B has shape", id="B-cols-not-K/2"),
    pytest.param({**_weights(), "S": np.ones((8, 5), np.float32)}, 1.0, (2, 128), "scales has shape",
                 id="scales-groups"),
    pytest.param({**_weights(), "Z": np.full((8,), 8, np.uint8)}, 1.0, (2, 128), "zero_points has shape",
                 id="zero-points-rank"),
    pytest.param(_weights(), np.ones(2, np.float32), (2, 128), "act_scale must hold exactly one element",
                 id="act-scale-two-elements"),
    pytest.param(_weights(), 0.0, (2, 128), "act_scale=0.* must be finite and > 0", id="act-scale-zero"),
    pytest.param(_weights(), np.inf, (2, 128), "must be finite", id="act-scale-inf"),
    pytest.param(_weights(), 1.0, (2, 130), "X has shape \\[2, 130\\], its last dim must be K=128",
                 id="X-last-dim-not-K"),
]


@pytest.mark.parametrize("weights, act_scale, x_shape, match", RUN_ERRORS)
def test_bad_inputs_fail_the_run(weights, act_scale, x_shape, match):
    model = w4a8_model(weights, act_scale, **GOOD)
    session = kernel_session(model)  # weights are only checked when the node runs
    with pytest.raises(InvalidArgument, match=match):
        session.run(None, {"X": np.ones(x_shape, np.float32)})


ATTRIBUTE_ERRORS = [
    pytest.param(dict(K=126, N=8, group_size=3, act_mode=0), "group_size=3 must be even", id="odd-group"),
    pytest.param(dict(K=0, N=8, group_size=32, act_mode=0), "K=0 must be positive", id="K-zero"),
    pytest.param(dict(K=128, N=0, group_size=32, act_mode=0), "N=0 must be positive", id="N-zero"),
    pytest.param(dict(K=128, N=8, group_size=32, act_mode=2), "act_mode=2 must be 0", id="act-mode-2"),
    pytest.param(dict(N=8, group_size=32, act_mode=0), "missing int attribute 'K'", id="K-missing"),
]


@pytest.mark.parametrize("attrs, match", ATTRIBUTE_ERRORS)
def test_bad_attributes_fail_the_session(attrs, match):
    model = w4a8_model(_weights(), 1.0, **GOOD, attrs=attrs)
    with pytest.raises(RuntimeException, match=f"w4a8.*{match}"):
        kernel_session(model)


def _weights8(n=8, k=128, groups=4):
    return {"B": np.zeros((n, k), np.uint8), "S": np.ones((n, groups), np.float32),
            "Z": np.full((n, groups), 128, np.uint8)}


W8_RUN_ERRORS = [
    pytest.param({**_weights8(), "B": np.zeros((8, 64), np.uint8)}, (2, 128),
                 "B has shape \\[8, 64\\], expected \\[8, 128\\] \\(\\[N, K\\]\\)", id="B-packed-like-4-bits"),
    pytest.param(_weights8(n=7), (2, 128), "B has shape \\[7, 128\\], expected \\[8, 128\\]", id="B-rows-not-N"),
    pytest.param({**_weights8(), "Z": np.full((8, 5), 128, np.uint8)}, (2, 128), "zero_points has shape",
                 id="zero-points-groups"),
    pytest.param(_weights8(), (2, 127), "X has shape \\[2, 127\\], its last dim must be K=128", id="X-last-dim"),
]


@pytest.mark.parametrize("weights, x_shape, match", W8_RUN_ERRORS)
def test_w8_bad_inputs_fail_the_run(weights, x_shape, match):
    session = kernel_session(op_model(weights, 1.0, 8, **GOOD))
    with pytest.raises(InvalidArgument, match=f"W8A8MatMul node 'w8a8': {match}"):
        session.run(None, {"X": np.ones(x_shape, np.float32)})


@pytest.mark.parametrize("attrs, match", ATTRIBUTE_ERRORS[:3])
def test_w8_bad_attributes_fail_the_session(attrs, match):
    with pytest.raises(RuntimeException, match=f"W8A8MatMul node 'w8a8': {match}"):
        kernel_session(op_model(_weights8(), 1.0, 8, **GOOD, attrs=attrs))


def test_unknown_isa_request_fails_the_session(monkeypatch):
    monkeypatch.setenv("FPTQ_CPU_ISA", "sse9")
    with pytest.raises(RuntimeException, match="FPTQ_CPU_ISA=sse9: unknown"):
        kernel_session(w4a8_model(_weights(), 1.0, **GOOD))


# --- Python loader ------------------------------------------------------------------------


def test_library_path_finds_the_built_library(monkeypatch):
    monkeypatch.delenv("FPTQ_ONNX_LIBRARY", raising=False)
    path = fptq_onnx.library_path()
    assert path.endswith("libfptq_ops.so")
    monkeypatch.setenv("FPTQ_ONNX_LIBRARY", path)
    assert fptq_onnx.library_path() == path


def test_library_path_rejects_a_missing_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FPTQ_ONNX_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(FileNotFoundError, match="FPTQ_ONNX_LIBRARY=.*does not name an existing file"):
        fptq_onnx.library_path()


def test_session_options_can_be_reused(tmp_path):
    """The library is registered once per SessionOptions (ORT rejects a second registration)."""
    model = w4a8_model(_weights(), 1.0, **GOOD)
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    options = ort.SessionOptions()
    first = fptq_onnx.InferenceSession(model, options)
    second = fptq_onnx.InferenceSession(path, options)  # a path-like works too
    x = np.ones((1, 128), np.float32)
    np.testing.assert_array_equal(first.run(None, {"X": x})[0], second.run(None, {"X": x})[0])
    assert second.get_providers() == ["CPUExecutionProvider"]


def test_checker_accepts_the_test_models():
    onnx.checker.check_model(onnx.load_from_string(w4a8_model(_weights(), 1.0, **GOOD)), full_check=True)
    onnx.checker.check_model(onnx.load_from_string(op_model(_weights8(), 1.0, 8, **GOOD)), full_check=True)
