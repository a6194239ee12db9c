"""Quantization primitives against hand-computed and loop-based float64 references."""
import math

import numpy as np
import pytest

from fptq_onnx import quant


@pytest.mark.parametrize("value, expected", [
    pytest.param(0.5, 0, id="half-rounds-to-even-0"),
    pytest.param(1.5, 2, id="half-rounds-to-even-2"),
    pytest.param(2.5, 2, id="2.5-to-2"),
    pytest.param(-2.5, -2, id="negative-half"),
    pytest.param(126.6, 127, id="near-max"),
    pytest.param(1000.0, 127, id="saturates-high"),
    pytest.param(-1000.0, -127, id="saturates-low-at-minus-127-not-128"),
])
def test_per_tensor_rounding_and_saturation(value, expected):
    assert quant.quantize_activation_per_tensor(np.array([value], np.float32), 1.0)[0] == expected


def test_per_token_scales_and_zero_row():
    x = np.array([[0.0, 0.0, 0.0], [1.0, -254.0, 127.0]], np.float32)
    q, scale = quant.quantize_activation_per_token(x)
    assert scale[:, 0].tolist() == [1.0, 2.0]
    assert q.tolist() == [[0, 0, 0], [0, -127, 64]]  # 127 / 2 = 63.5 rounds to even 64


BITS = [pytest.param(4, id="4-bit"), pytest.param(8, id="8-bit")]


def _quantizer(bits):
    return quant.quantize_weight_groupwise if bits == 4 else quant.quantize_weight_groupwise_int8


def _loop_quantize(w, group_size, symmetric, bits=4):
    """Element-by-element reference of the group-wise rule in quant.quantize_weight_groupwise
    (bits 4) and quant.quantize_weight_groupwise_int8 (bits 8)."""
    levels, half = 2**bits - 1, 2 ** (bits - 1)
    k, n = w.shape
    u = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // group_size))
    zeros = np.zeros((n, k // group_size), np.uint8)
    for col in range(n):
        for g in range(k // group_size):
            block = w[g * group_size:(g + 1) * group_size, col].astype(np.float64)
            if symmetric:
                scale, zero = max(abs(block.max()), abs(block.min())) / (half - 1), half
            else:
                lo, hi = min(block.min(), 0.0), max(block.max(), 0.0)
                scale = (hi - lo) / levels
                zero = min(max(round(-lo / scale), 0), levels) if scale else 0
            scale = float(np.float32(scale)) or 1.0
            scales[col, g], zeros[col, g] = scale, zero
            for i, value in enumerate(block):
                u[col, g * group_size + i] = min(max(int(np.rint(value / scale)) + zero, 0), levels)
    return u, scales, zeros


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [pytest.param(True, id="symmetric"), pytest.param(False, id="asymmetric")])
def test_weight_quantization_matches_loop_reference(rng, symmetric, bits):
    w = rng.standard_normal((64, 5)).astype(np.float32)
    w[:16, 0] = np.abs(w[:16, 0])  # an all-positive group: asymmetric range starts at 0
    w[16:32, 1] = 0.0  # an all-zero group: scale 1
    u, scales, zeros = _quantizer(bits)(w, 16, symmetric)
    ref_u, ref_scales, ref_zeros = _loop_quantize(w, 16, symmetric, bits)
    np.testing.assert_array_equal(u, ref_u)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
    np.testing.assert_array_equal(zeros, ref_zeros)


def test_int8_symmetric_weights_never_use_byte_0(rng):
    """Symmetric 8-bit: u = clip(rint(w / s), -127, 127) + 128 in [1, 255], the extremes of each
    group at 1 or 255; per channel (group_size = K) one scale per column."""
    w = rng.standard_normal((96, 6))
    u, scales, zeros = quant.quantize_weight_groupwise_int8(w, 96, symmetric=True)
    assert u.min() >= 1 and scales.shape == (6, 1) and np.all(zeros == 128)
    np.testing.assert_array_equal(np.abs(u.astype(int) - 128).max(axis=1), 127)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [pytest.param(True, id="symmetric"), pytest.param(False, id="asymmetric")])
def test_weight_error_is_at_most_half_a_step(rng, symmetric, bits):
    w = rng.standard_normal((256, 7)).astype(np.float32)
    u, scales, zeros = _quantizer(bits)(w, 128, symmetric=symmetric)
    error = np.abs(quant.dequantize_weight(u, scales, zeros) - w)
    step = np.repeat(scales, 128, axis=1).T
    assert np.all(error <= 0.5 * step * (1 + 1e-5) + 1e-7)
    assert quant.relative_weight_error(w, u, scales, zeros, 128) == pytest.approx(
        np.linalg.norm(error) / np.linalg.norm(w), rel=1e-9)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k, group_size", [pytest.param(576, 128, id="K576-g128"), pytest.param(100, 32, id="K100-g32"),
                                           pytest.param(130, 128, id="K130-g128")])
def test_partial_last_group_is_the_group_quantized_alone(rng, bits, k, group_size):
    """K % group_size != 0: G = ceil(K / group_size), and the last group's scale, zero point and
    u are those of its K % group_size weights quantized on their own."""
    w = rng.standard_normal((k, 5)).astype(np.float32)
    u, scales, zeros = _quantizer(bits)(w, group_size, symmetric=False)
    count = -(-k // group_size)
    assert u.shape == (5, k) and scales.shape == zeros.shape == (5, count)
    first = (count - 1) * group_size
    tail_u, tail_scales, tail_zeros = _loop_quantize(w[first:], k - first, False, bits)
    np.testing.assert_array_equal(u[:, first:], tail_u)
    np.testing.assert_allclose(scales[:, -1:], tail_scales, rtol=1e-6)
    np.testing.assert_array_equal(zeros[:, -1:], tail_zeros)
    restored = quant.dequantize_weight(u, scales, zeros, group_size)
    assert restored.shape == (k, 5) and quant.relative_weight_error(w, u, scales, zeros, group_size) < 0.2
    if k % count:  # (K = 100 in 4 groups would read as groups of 25: group_size must be passed)
        with pytest.raises(ValueError, match="pass group_size"):
            quant.dequantize_weight(u, scales, zeros)


def test_pack_odd_k_leaves_the_last_high_nibble_zero():
    u = np.array([[1, 2, 3]], np.uint8)
    assert quant.pack_int4(u).tolist() == [[1 + 2 * 16, 3]]
    np.testing.assert_array_equal(quant.unpack_int4(quant.pack_int4(u), 3), u)


def test_pack_layout_low_nibble_first():
    u = np.array([[1, 2, 3, 4], [15, 0, 0, 15]], np.uint8)
    packed = quant.pack_int4(u)
    assert packed.tolist() == [[1 + 2 * 16, 3 + 4 * 16], [15, 15 * 16]]
    np.testing.assert_array_equal(quant.unpack_int4(packed), u)


def test_lae_scales_formula():
    m = np.array([0.0, 1.0, 6.0, 1000.0])
    expected = [1.0, 1.0 / math.log2(3.0), 6.0 / 3.0, 1000.0 / math.log2(1002.0)]
    np.testing.assert_allclose(quant.lae_scales(m), expected, rtol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_reference_matmul_matches_explicit_sum(rng, bits):
    """w4a8_matmul_reference (w8a8_matmul_reference) against the contract's sum written out per
    group with integers."""
    k, n, group = 64, 3, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    u, scales, zeros = _quantizer(bits)(w, group, symmetric=False)
    x = rng.standard_normal((2, k)).astype(np.float32) * 4
    for mode in (quant.ActMode.PER_TENSOR_STATIC, quant.ActMode.PER_TOKEN_DYNAMIC):
        if bits == 4:
            got = quant.w4a8_matmul_reference(x, quant.pack_int4(u), scales, zeros, 0.05, mode)
        else:
            got = quant.w8a8_matmul_reference(x, u, scales, zeros, 0.05, mode)
        for m in range(2):
            if mode == quant.ActMode.PER_TENSOR_STATIC:
                a = np.float32(0.05)
            else:
                a = np.float32(np.abs(x[m]).max()) / np.float32(127)
            q = np.clip(np.rint(x[m] * (np.float32(1) / np.float32(a))), -127, 127).astype(np.int64)
            for col in range(n):
                total = 0.0
                for g in range(k // group):
                    span = slice(g * group, (g + 1) * group)
                    integer = int(np.dot(q[span], u[col, span].astype(np.int64) - int(zeros[col, g])))
                    total += float(scales[col, g]) * integer
                assert got[m, col] == pytest.approx(float(a) * total, rel=1e-12, abs=1e-12)


def test_docstring_examples():
    import doctest

    from fptq_onnx.passes import act_scales

    for module in (quant, act_scales):
        assert doctest.testmod(module).failed == 0
