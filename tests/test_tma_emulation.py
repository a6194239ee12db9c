"""The sm_90a TMA kernel's index math and pipeline protocol, emulated in numpy (no GPU, no nvcc):
fptq_onnx/testing/cuda_emulation_tma.py against the float64 reference of the op. The GPU suite
(tests/test_cuda_gpu.py, ``pytest -m gpu``) checks the kernel itself; this pins down the layouts it
was written from (tiled pre-swizzled Xq, weight atoms -> wgmma A registers, 128B-swizzle B operand,
accumulator fragments, split-K) so that a change to one of them cannot go unnoticed on a machine
without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from fptq_onnx import quant
from fptq_onnx.testing import cuda_emulation as emu
from fptq_onnx.testing import cuda_emulation_tma as emu_tma
from fptq_onnx.testing.cuda_correctness import random_problem


@pytest.mark.parametrize("name,bt,M,N,K,gs,split,act_mode,sym,fused", [
    ("decode one token, split-K, N tail", 16, 1, 130, 256, 128, 2, 1, False, False),
    ("two token tiles, static scale, symmetric", 16, 17, 37, 384, 128, 3, 0, True, False),
    ("group of 256", 64, 70, 200, 256, 256, 1, 1, False, False),
    ("128-token tiles, partial second tile", 128, 130, 40, 256, 128, 2, 1, False, False),
    ("fused quantization, decode, split-K", 16, 1, 130, 256, 128, 2, 1, False, True),
    ("fused quantization, static scale, rows past M", 16, 17, 37, 512, 256, 1, 0, True, True),
])
def test_tma_kernel_emulation_matches_the_reference(name, bt, M, N, K, gs, split, act_mode, sym, fused):
    rng = np.random.default_rng(7)
    x, B, scales, zp, act_scale = random_problem(rng, M, N, K, gs, sym, act_mode)
    packed = emu.emu_repack(B, scales, zp, N, K, gs)
    xq, act, _ = emu.emu_quantize(x, act_mode, act_scale, 128, -(-M // 4) * 4)
    y = emu_tma.emu_gemm_tma(bt, split, xq, act, packed, emu.packed_layout(N, K, gs), M, N, K, gs,
                             fused=(x, act_mode, act_scale) if fused else None)
    ref = quant.w4a8_matmul_reference(x, B, scales, zp, act_scale, act_mode)
    assert np.all(np.isfinite(y))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_a_fragment_order_is_checked():
    """Swapping two A registers (rows g + 8 and k + 16) must break the result: the emulation is
    sensitive to the fragment order it asserts."""
    regs = np.zeros((4, 32, 4), np.int64)
    regs[0, 0, 1] = 0x01  # a1 of warp 0 lane 0: row 8, k 0
    regs[0, 0, 2] = 0x02  # a2: row 0, k 16
    A = emu_tma.a_fragment_matrix(regs)
    assert A[8, 0] == 1 and A[0, 16] == 2 and np.count_nonzero(A) == 2


def test_tiled_xq_layout_is_a_permutation_with_zero_padding():
    rng = np.random.default_rng(3)
    M, K, bt = 19, 256, 16
    xq = rng.integers(-127, 128, (M, K), dtype=np.int8)
    image = emu_tma.tiled_xq(xq, bt, K)
    assert image.size == 2 * bt * K
    off = emu_tma.xq_offset(np.arange(M)[:, None], np.arange(K)[None, :] & ~3, K, bt) + (np.arange(K) & 3)[None, :]
    assert len(np.unique(off)) == M * K
    assert np.array_equal(image[off].view(np.int8), xq)
    rest = np.setdiff1d(np.arange(image.size), off.ravel())
    assert np.all(image[rest] == 0)


@pytest.mark.parametrize("stages,n_kt,overlap", [(6, 1, True), (6, 2, True), (10, 23, True), (6, 7, False)])
def test_tma_pipeline_protocol_under_random_schedules(stages, n_kt, overlap):
    rng = np.random.default_rng(stages * 100 + n_kt)
    for _ in range(10):
        emu_tma.emu_tma_pipeline(stages, n_kt, overlap, rng)


@pytest.mark.parametrize("bt", [16, 64, 128])
def test_stages_fit_shared_memory_and_stay_1024_aligned(bt):
    """tma::Cfg<BT> as the source defines it: the 128B swizzle repeats every 1024 bytes, and an
    sm_90 block gets at most 227 KB."""
    c = emu_tma.cfg(bt)
    assert c.SMEM_BYTES <= 227 * 1024 and c.STAGE_BYTES % 1024 == 0 and c.X_BYTES % 1024 == 0


def test_fused_quantization_matches_the_quantize_kernel():
    """The FUSEQ producer's a_m and int8 tile bytes are those of quantize_rows_kernel's tiled Xq."""
    rng = np.random.default_rng(5)
    M, K, bt = 11, 384, 16
    x, *_ = random_problem(rng, M, 64, K, 128, False, 1)
    xq, act, _ = emu.emu_quantize(x, 1, 0.0, 128, 12)
    tiled = emu_tma.tiled_xq(xq, bt, K)
    a, inv = emu_tma.fused_quant_rows(x, 0, bt, 1, 0.0)
    assert np.array_equal(a[:M], act)
    for kt in range(K // 128):
        assert np.array_equal(emu_tma.fused_quant_stage(x, 0, bt, kt, inv), tiled[kt * bt * 128:(kt + 1) * bt * 128])


@pytest.mark.parametrize("act_mode", [0, 1], ids=["static", "dynamic"])
def test_cuda_row_scales_follow_the_nan_policy(act_mode):
    """docs/ops.md "NaN and Inf", as the CUDA kernels' row_scale computes it (emulated): the same
    rows the CPU kernel poisons (tests/test_fuzz_kernel.py), and the dynamic tiny-row rule."""
    tiny = np.finfo(np.float32).tiny
    rows = {"finite": [1.0, -3.0, 0.5, 2.0], "nan": [1.0, np.nan, 0.5, 2.0], "inf": [1.0, np.inf, 0.5, 2.0],
            "nan and inf": [np.nan, -np.inf, 0.0, 0.0], "zero": [0.0] * 4, "subnormal max": [tiny / 4, 0.0, 0.0, 0.0]}
    x = np.asarray(list(rows.values()), np.float32)
    xq, act, _ = emu.emu_quantize_kernel(x, act_mode, 0.05, 4, 8)
    poisoned = {"nan", "nan and inf"} | ({"inf"} if act_mode == 1 else set())
    for (name, row), a, q in zip(rows.items(), act, xq):
        assert np.isnan(a) == (name in poisoned), name
        if name not in poisoned:
            dynamic = np.float32(np.max(np.abs(np.float32(row)))) / np.float32(127)
            expected = np.float32(0.05) if act_mode == 0 else (np.float32(1.0) if dynamic < tiny else dynamic)
            assert a == expected, name
            np.testing.assert_array_equal(q, np.clip(np.rint(np.float32(row) / expected), -127, 127), err_msg=name)
    a, _ = emu_tma.fused_quant_rows(x, 0, 16, act_mode, 0.05)  # the TMA kernel's fused producer: the same
    np.testing.assert_array_equal(a[:len(rows)], act)
