"""The mma.sync kernel's index math and the quantize kernel, emulated in numpy (no GPU, no nvcc),
against the float64 reference of the op; and the reading of the CUDA sources those emulations take
their constants from. The TMA kernel's emulation: tests/test_tma_emulation.py."""
from __future__ import annotations

import numpy as np
import pytest

from fptq_onnx import quant
from fptq_onnx.testing import cuda_emulation as emu
from fptq_onnx.testing import cuda_sources
from fptq_onnx.testing.cuda_correctness import random_problem


def assert_matches_reference(y, x, B, scales, zp, act_scale, act_mode):
    ref = quant.w4a8_matmul_reference(x, B, scales, zp, act_scale, act_mode)
    assert np.all(np.isfinite(y))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


# --- the sources ---------------------------------------------------------------------------------


def test_variant_table_and_header_name_the_same_variants():
    """Every FPTQ_W4A8_VARIANT_* id but AUTO has exactly one row of kVariants, and the deleted
    variants (3-8, 12-15) have neither."""
    ids = {value for name, value in cuda_sources.defines("w4a8_cuda.h").items()
           if name.startswith("FPTQ_W4A8_VARIANT_") and value != cuda_sources.AUTO}
    assert set(cuda_sources.variants()) == ids
    assert not {3, 4, 5, 6, 7, 8, 12, 13, 14, 15} & ids
    names = [v.name for v in cuda_sources.variants().values()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("expr,names,expected", [
    ("(OFF + 1023) / 1024 * 1024", {"OFF": 1025}, 2048),
    ("BT >= 128 ? 6 : (BT >= 64 ? 8 : 10)", {"BT": 16}, 10),
    ("BM == 128 ? 4 : 6", {"BM": 128}, 4),
    ("0x4B400000", {}, 0x4B400000),
    ("12582912.0f", {}, 12582912.0),
    ("-7 / 2", {}, -3),  # C++ truncates toward zero
    ("1 << 4 | 3 & 1", {}, 17),
])
def test_cpp_constant_expressions(expr, names, expected):
    assert cuda_sources.evaluate(expr, names) == expected


@pytest.mark.parametrize("expr,error,match", [
    ("kNoSuchConstant * 2", KeyError, "kNoSuchConstant is not a known constant"),
    ("a $ b", ValueError, "cannot read the C\\+\\+ expression"),
    ("(1 + 2", ValueError, "expected \\)"),
])
def test_unreadable_expressions_are_an_error(expr, error, match):
    with pytest.raises(error, match=match):
        cuda_sources.evaluate(expr, {"a": 1, "b": 2})


def test_tile_configs_are_read_from_the_source():
    configs = cuda_sources.mma_tile_configs()
    assert [configs[c]["BM_"] for c in sorted(configs)] == cuda_sources.constants("w4a8_cuda.cu")["kConfigBM"]
    tile = cuda_sources.mma_tile(2, 64)
    assert tile.SMEM_BYTES == tile.STAGES * (tile.A_BYTES + tile.B_BYTES + tile.S_BYTES + tile.Z_BYTES + tile.R_BYTES)
    assert tile.NSG == 2 and tile.THREADS == 32 * tile.WARPS_M * tile.WARPS_N


# --- the quantize kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("name,M,K,sg,act_mode", [
    ("rows longer than the register cache", 3, 16384 + 384, 32, 1),
    ("long row, static scale", 2, 20480, 128, 0),
    ("short row, sub-groups of 32", 5, 96, 32, 1),
    ("K tail past a block step", 1, 2048 + 64, 64, 1),
])
def test_quantize_kernel_lanes_match_the_reference_quantization(name, M, K, sg, act_mode):
    x = np.random.default_rng(K).standard_normal((M, K)).astype(np.float32)
    Mp = emu.ceil_div(M, 4) * 4
    for by_thread, reference in zip(emu.emu_quantize_kernel(x, act_mode, 0.01, sg, Mp),
                                    emu.emu_quantize(x, act_mode, 0.01, sg, Mp)):
        np.testing.assert_array_equal(by_thread, reference)


# --- the mma.sync kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg,M,N,K,gs,split,act_mode,sym", [
    ("decode tile", 0, 3, 37, 128, 128, 1, 1, False),
    ("K tail inside a k-tile, 2 n-tiles", 0, 16, 160, 96, 32, 1, 0, False),
    ("split-K", 0, 1, 37, 256, 64, 2, 1, True),
    ("1.5 k-tiles", 1, 17, 37, 192, 64, 1, 1, False),
    ("2 m-tiles, 2 n-tiles, odd N", 1, 33, 131, 128, 32, 1, 0, True),
    ("three splits", 1, 20, 64, 384, 128, 3, 1, False),
    ("group of 256: two sub-groups per group", 2, 65, 37, 256, 256, 1, 1, False),
    ("2 m-tiles, split with a tail tile", 2, 130, 33, 160, 32, 2, 0, False),
    ("large tile, symmetric", 2, 70, 129, 128, 128, 1, 1, True),
])
def test_mma_kernel_emulation_matches_the_reference(name, cfg, M, N, K, gs, split, act_mode, sym):
    rng = np.random.default_rng(cfg * 1000 + M)
    sg = emu.sub_group_size(gs)
    x, B, scales, zp, act_scale = random_problem(rng, M, N, K, gs, sym, act_mode)
    Mp = emu.ceil_div(M, 4) * 4
    packed = emu.emu_repack(B, scales, zp, N, K, gs)
    xq, act, rowsum = emu.emu_quantize(x, act_mode, act_scale, sg, Mp)
    y = emu.emu_gemm(cuda_sources.mma_tile(cfg, sg), split, xq, act, rowsum, packed, M, N, K, gs, Mp)
    assert_matches_reference(y, x, B, scales, zp, act_scale, act_mode)


def test_mma_fragment_layout_is_checked():
    """A lane's A register 1 holds row g + 8 (PTX ISA m16n8k32): moving a value there moves it
    to that row of the product, so the emulation is sensitive to the layout it asserts."""
    a, b, c = np.zeros((32, 4), np.uint32), np.zeros((32, 2), np.uint32), np.zeros((32, 4), np.int64)
    a[0, 1] = 1  # lane 0 (g = 0, t = 0), register 1, byte 0: row 8, k 0
    b[:, 0] = 0x01010101  # every B element of k 0..3 and 16..19 (all columns) is 1
    d = emu.emu_mma(a, b, c)
    assert d[0, 2] == 1 and d[0, 0] == 0  # lane 0's C register 2 is row 8, column 0
