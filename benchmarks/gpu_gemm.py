#!/usr/bin/env python3
"""Correctness and speed of the W4A8 CUDA kernel (custom_ops/w4a8_cuda.cu), without ONNX Runtime.

Loads ``libfptq_cuda_standalone.so`` (built by ``benchmarks/build_cuda_standalone.sh``) with
ctypes and drives it with torch CUDA tensors.

1. CPU checks (always; no GPU needed):
   * a numpy emulation of the kernel's index math -- weight repacking, the XOR-swizzled
     shared-memory tiles, ldmatrix / LDS.128 fragment loads, the mma.m16n8k32 fragment
     layouts of the PTX ISA, the magic-number int->float fold, split-K -- run for every tile
     config and sub-group size on small odd shapes and compared with the float64 reference
     ``fptq_onnx.quant.w4a8_matmul_reference``;
   * the host-side tile planner of the library (``fptq_w4a8_plan_info``), when it loads.
2. GPU correctness: many shapes (M in {0, 1, 3, 16, 17, 64, 65, 257, ...}, odd N, K tails,
   group sizes 32/64/128/256, both act modes, symmetric and asymmetric, float16 too) against
   the float64 reference, fresh random data per case, NaN-poisoned outputs, guard bytes after
   every buffer, a second run compared bit for bit.
3. GPU timing: CUDA events, median of 50 after warm-up, weights rotated through more memory
   than L2 holds, against torch float16 matmul (cuBLAS).

Exit status: 0 all good; 1 a correctness failure (CPU emulation or GPU); 2 no CUDA device
(the CPU checks ran and passed).

    python3 benchmarks/gpu_gemm.py [--lib PATH] [--quick] [--no-bench] [--json PATH]
    python3 benchmarks/gpu_gemm.py --self-test     # this script's GPU paths, emulated on the CPU
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LIB = REPO / "build" / "cuda_standalone" / "libfptq_cuda_standalone.so"
BUILD_SCRIPT = REPO / "benchmarks" / "build_cuda_standalone.sh"


def log(*args) -> None:
    print(*args, flush=True)


def load_quant():
    """fptq_onnx/quant.py loaded by file path: it needs only numpy, the package may need more."""
    spec = importlib.util.spec_from_file_location("fptq_quant", REPO / "fptq_onnx" / "quant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quant = load_quant()

# ------------------------------------------------------------------------------------------
# Mirror of the kernel's constants (custom_ops/w4a8_cuda.h, w4a8_cuda.cu). The CPU checks
# compare the shared-memory sizes derived here with the library's plan, so a drift shows.
# ------------------------------------------------------------------------------------------
TILE_K = 128
MMA_K = 32
K_STEPS = TILE_K // MMA_K
N_PAD_ALIGN = 128
ATOM_N = 32
ATOM_K = 32
ATOM_BYTES = ATOM_N * ATOM_K // 2
MAGIC_I = 0x4B400000
MAGIC_F = np.float32(12582912.0)
MAX_SPLIT_K = 16
BUFFER_ALIGN = 256
DTYPE_FLOAT32, DTYPE_FLOAT16 = 0, 1


@dataclass(frozen=True)
class TileCfg:
    """Tile<BM, BN, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS, SG> of w4a8_cuda.cu."""

    BM: int
    BN: int
    WARPS_M: int
    WARPS_N: int
    STAGES: int
    MIN_BLOCKS: int
    SG: int

    @property
    def THREADS(self):
        return 32 * self.WARPS_M * self.WARPS_N

    @property
    def WM(self):
        return self.BM // self.WARPS_M

    @property
    def WN(self):
        return self.BN // self.WARPS_N

    @property
    def MT(self):
        return self.WM // 16

    @property
    def NT(self):
        return self.WN // 8

    @property
    def NA(self):
        return self.WN // ATOM_N

    @property
    def NSG(self):
        return TILE_K // self.SG

    @property
    def KK_PER_SG(self):
        return self.SG // MMA_K

    @property
    def A_BYTES(self):
        return self.BM * TILE_K

    @property
    def B_BYTES(self):
        return self.BN * TILE_K // 2

    @property
    def S_BYTES(self):
        return self.NSG * self.BN * 4

    @property
    def Z_BYTES(self):
        return self.NSG * self.BN

    @property
    def R_BYTES(self):
        return self.NSG * self.BM * 4

    @property
    def STAGE_BYTES(self):
        return self.A_BYTES + self.B_BYTES + self.S_BYTES + self.Z_BYTES + self.R_BYTES

    @property
    def SMEM_BYTES(self):
        return self.STAGES * self.STAGE_BYTES


# ConfigTile<CFG, SG> of w4a8_cuda.cu: (BM, BN, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS)
CONFIGS = {0: (16, 128, 1, 4, 4, 4), 1: (32, 128, 1, 4, 4, 3), 2: (128, 128, 2, 4, 3, 1)}


def tile_cfg(cfg: int, sg: int) -> TileCfg:
    return TileCfg(*CONFIGS[cfg], sg)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def align_up(x: int, a: int) -> int:
    return ceil_div(x, a) * a


def sub_group_size(gs: int) -> int:
    return gs if gs < TILE_K else TILE_K


def packed_layout(N: int, K: int, gs: int) -> dict:
    Npad = ceil_div(N, N_PAD_ALIGN) * N_PAD_ALIGN
    G = K // gs
    off_s = align_up(Npad * K // 2, BUFFER_ALIGN)
    off_z = align_up(off_s + G * Npad * 4, BUFFER_ALIGN)
    total = align_up(off_z + G * Npad, BUFFER_ALIGN)
    return dict(Npad=Npad, G=G, off_b=0, off_s=off_s, off_z=off_z, total=total)


# ------------------------------------------------------------------------------------------
# numpy emulation of the kernel
# ------------------------------------------------------------------------------------------


def emu_repack(B: np.ndarray, scales: np.ndarray, zp: np.ndarray, N: int, K: int, gs: int) -> np.ndarray:
    """repack_weights_kernel + repack_scales_kernel: the packed buffer as bytes."""
    lay = packed_layout(N, K, gs)
    Npad, G, KB = lay["Npad"], lay["G"], K // ATOM_K
    words = Npad * K // 8
    idx = np.arange(words, dtype=np.int64)
    j = idx & 3
    lane = (idx >> 2) & 31
    atom = idx >> 7
    kb = atom % KB
    nb = atom // KB
    g, t = lane >> 2, lane & 3
    n = nb * ATOM_N + j * 8 + g
    valid = n < N
    nn = np.where(valid, n, 0)
    w = np.zeros(words, np.uint32)
    for i in range(4):
        k_lo = kb * ATOM_K + 4 * t + i
        k_hi = k_lo + 16
        u_lo = (B[nn, k_lo >> 1].astype(np.uint32) >> ((k_lo & 1) * 4).astype(np.uint32)) & 0xF
        u_hi = (B[nn, k_hi >> 1].astype(np.uint32) >> ((k_hi & 1) * 4).astype(np.uint32)) & 0xF
        w |= (u_lo << np.uint32(8 * i)) | (u_hi << np.uint32(8 * i + 4))
    w[~valid] = 0
    buf = np.zeros(lay["total"], np.uint8)
    buf[: words * 4] = w.astype("<u4").view(np.uint8)
    sp = np.zeros((G, Npad), np.float32)
    sp[:, :N] = scales.T
    zpp = np.zeros((G, Npad), np.uint8)
    zpp[:, :N] = zp.T
    buf[lay["off_s"] : lay["off_s"] + sp.nbytes] = sp.astype("<f4").view(np.uint8).ravel()
    buf[lay["off_z"] : lay["off_z"] + zpp.nbytes] = zpp.ravel()
    return buf


def emu_quantize(x: np.ndarray, act_mode: int, act_scale: float, sg: int, Mp: int):
    """quantize_rows_kernel: (xq int8 [M, K], act float32 [M], rowsum int32 [K/sg, Mp])."""
    M, K = x.shape
    if act_mode == 0:
        q = quant.quantize_activation_per_tensor(x, act_scale)
        a = np.full(M, np.float32(act_scale), np.float32)
    else:
        q, a = quant.quantize_activation_per_token(x)
        a = a[:, 0]
    rowsum = np.zeros((K // sg, Mp), np.int32)
    rowsum[:, :M] = q.astype(np.int32).reshape(M, K // sg, sg).sum(-1).T
    return q, a, rowsum


QUANT_THREADS, QUANT_CACHE = 512, 8  # kQuantThreads, kQuantCache


def emu_quantize_kernel(x: np.ndarray, act_mode: int, act_scale: float, sg: int, Mp: int):
    """quantize_rows_kernel thread by thread (steps, lane groups, xor shuffles), for one
    block per row; same outputs as emu_quantize."""
    M, K = x.shape
    xq = np.full((M, K), 99, np.int8)  # poison: every element must be written
    act = np.zeros(Mp, np.float32)
    rowsum = np.full((K // sg, Mp), -12345, np.int32)
    tid = np.arange(QUANT_THREADS)
    lane = tid & 31
    lanes_per_sub = sg // 4
    step = 4 * QUANT_THREADS
    for m in range(Mp):
        if m >= M:
            rowsum[:, m] = 0
            continue
        xr = x[m].astype(np.float32)
        if act_mode == 1:
            amax = np.float32(np.max(np.abs(xr))) if K else np.float32(0)
            a = np.float32(amax / np.float32(127.0))
            a = np.float32(1.0) if a == 0 else a
        else:
            a = np.float32(act_scale)
        inv = np.float32(1.0) / a
        act[m] = a
        n_steps = ceil_div(K, step)
        for it in range(n_steps):  # block-uniform loop: every lane takes part
            k = 4 * tid + it * step
            inside = k < K
            qsum = np.zeros(QUANT_THREADS, np.int64)
            for e in range(4):
                kk = np.where(inside, k + e, 0)
                q = np.clip(np.rint(xr[kk] * inv), -127, 127).astype(np.int64)
                q = np.where(inside, q, 0)
                xq[m, k[inside] + e] = q[inside]
                qsum += q
            off = 1
            while off < lanes_per_sub:  # __shfl_xor_sync within each warp
                partner = (tid & ~31) | (lane ^ off)
                qsum = qsum + qsum[partner]
                off <<= 1
            writer = inside & ((lane & (lanes_per_sub - 1)) == 0)
            rowsum[k[writer] // sg, m] = qsum[writer]
    return xq, act[:M], rowsum


def _s8(words: np.ndarray) -> np.ndarray:
    """[..., n_words] uint32 -> [..., n_words * 4] int8 (little-endian bytes)."""
    return np.ascontiguousarray(words.astype("<u4")).view(np.int8)


def emu_mma(a_regs: np.ndarray, b_regs: np.ndarray, c: np.ndarray) -> np.ndarray:
    """mma.sync.m16n8k32.row.col.s32.s8.s8.s32 from the PTX ISA fragment layouts.

    a_regs uint32 [32 lanes, 4], b_regs uint32 [32, 2], c int64 [32, 4] -> d int64 [32, 4].
    A (16x32): a_i of lane (g, t) is row g for i < 4 or 8 <= i < 12, else g + 8; column
    4t + (i & 3), + 16 for i >= 8. B (32x8): b_i is row 4t + (i & 3), + 16 for i >= 4; column
    g. C (16x8): c_i is row g (i < 2) or g + 8, column 2t + (i & 1).
    """
    A = np.zeros((16, 32), np.int64)
    Bm = np.zeros((32, 8), np.int64)
    Cm = np.zeros((16, 8), np.int64)
    a8 = _s8(a_regs)  # [32, 16]: element i of lane is byte i % 4 of register i // 4
    b8 = _s8(b_regs)  # [32, 8]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(16):
            row = g if (i < 4 or 8 <= i < 12) else g + 8
            col = 4 * t + (i & 3) + (16 if i >= 8 else 0)
            A[row, col] = a8[lane, i]
        for i in range(8):
            row = 4 * t + (i & 3) + (16 if i >= 4 else 0)
            Bm[row, g] = b8[lane, i]
        for i in range(4):
            Cm[g + 8 * (i >= 2), 2 * t + (i & 1)] = c[lane, i]
    D = A @ Bm + Cm
    d = np.zeros((32, 4), np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            d[lane, i] = D[g + 8 * (i >= 2), 2 * t + (i & 1)]
    return d


def emu_ldmatrix_x4(smem: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l gets
    32-bit word l % 4 of row l / 4 of each matrix. -> uint32 [32, 4]."""
    out = np.zeros((32, 4), np.uint32)
    for i in range(4):
        for lane in range(32):
            a = int(addr[8 * i + lane // 4]) + 4 * (lane % 4)
            assert a % 4 == 0 and 0 <= a <= smem.size - 4
            out[lane, i] = smem[a : a + 4].view("<u4")[0]
    return out


def emu_gemm(cfg: TileCfg, split: int, xq, act, rowsum, packed, M, N, K, gs, Mp, out_half=False):
    """w4a8_gemm_kernel (+ splitk_reduce_kernel) for every block, warp and lane."""
    lay = packed_layout(N, K, gs)
    Npad, KB = lay["Npad"], K // ATOM_K
    k_tiles = ceil_div(K, TILE_K)
    tps = ceil_div(k_tiles, split)
    assert ceil_div(k_tiles, tps) == split, "plan would leave an empty split"
    sub_per_group = gs // cfg.SG
    xq_bytes = np.ascontiguousarray(xq).view(np.uint8).ravel()
    rs_bytes = np.ascontiguousarray(rowsum.astype("<i4")).view(np.uint8).ravel()
    act = act.astype(np.float32)
    partial = np.full((split, M, N), np.nan, np.float32)
    m_tiles, n_tiles = ceil_div(M, cfg.BM), ceil_div(N, cfg.BN)

    def copy16(smem, dst, src_buf, src_off, ok):
        assert dst % 16 == 0 and 0 <= dst <= smem.size - 16
        if ok:
            assert src_off % 16 == 0 and 0 <= src_off <= src_buf.size - 16, (src_off, src_buf.size)
            smem[dst : dst + 16] = src_buf[src_off : src_off + 16]
        else:
            smem[dst : dst + 16] = 0

    for bz in range(split):
        for bx in range(m_tiles):
            for by in range(n_tiles):
                m0, n0 = bx * cfg.BM, by * cfg.BN
                kt_begin = bz * tps
                kt_end = min(kt_begin + tps, k_tiles)
                rows = min(M - m0, cfg.BM)
                rows_padded = min(Mp - m0, cfg.BM)
                xq_base = m0 * K  # BlockInputs, byte offsets into the global buffers
                bp_base = lay["off_b"] + (n0 // ATOM_N) * KB * ATOM_BYTES
                sp_base = lay["off_s"] + n0 * 4
                zp_base = lay["off_z"] + n0
                rs_base = m0 * 4
                nwarps = cfg.WARPS_M * cfg.WARPS_N
                acc = np.full((nwarps, cfg.MT, cfg.NT, 32, 4), MAGIC_I, np.int64)
                facc = np.zeros((nwarps, cfg.MT, cfg.NT, 32, 4), np.float32)
                for kt in range(kt_begin, kt_end):
                    slot = np.full(cfg.STAGE_BYTES, 0xCD, np.uint8)  # garbage where not copied
                    sA, sB = 0, cfg.A_BYTES
                    sS = sB + cfg.B_BYTES
                    sZ = sS + cfg.S_BYTES
                    sR = sZ + cfg.Z_BYTES
                    k0 = kt * TILE_K
                    for c in range(cfg.BM * (TILE_K // 16)):  # A
                        r, ch = c >> 3, c & 7
                        k = k0 + ch * 16
                        ok = r < rows and k < K
                        copy16(slot, sA + r * TILE_K + ((ch ^ (r & 7)) << 4), xq_bytes, xq_base + r * K + k, ok)
                    for c in range(cfg.B_BYTES // 16):  # B
                        nbl, kbl, ch = c // (K_STEPS * 32), (c // 32) % K_STEPS, c % 32
                        kb = kt * K_STEPS + kbl
                        ok = kb < KB
                        copy16(slot, sB + (nbl * K_STEPS + kbl) * ATOM_BYTES + ch * 16, packed,
                               bp_base + (nbl * KB + kb) * ATOM_BYTES + ch * 16, ok)
                    for chunks, kind in ((cfg.BN // 4, "S"), (cfg.BN // 16, "Z"), (cfg.BM // 4, "R")):
                        for c in range(cfg.NSG * chunks):  # copy_sub_groups
                            j, ch = c // chunks, c % chunks
                            sub = kt * cfg.NSG + j
                            in_k = sub * cfg.SG < K
                            grp = sub if sub_per_group == 1 else sub // sub_per_group
                            if kind == "S":
                                copy16(slot, sS + (j * cfg.BN + ch * 4) * 4, packed, sp_base + (grp * Npad + ch * 4) * 4, in_k)
                            elif kind == "Z":
                                copy16(slot, sZ + j * cfg.BN + ch * 16, packed, zp_base + grp * Npad + ch * 16, in_k)
                            else:
                                ok = in_k and ch * 4 < rows_padded
                                copy16(slot, sR + (j * cfg.BM + ch * 4) * 4, rs_bytes, rs_base + (sub * Mp + ch * 4) * 4, ok)
                    # compute_stage, every warp
                    lanes = np.arange(32)
                    for warp in range(nwarps):
                        warp_m, warp_n = warp // cfg.WARPS_N, warp % cfg.WARPS_N
                        for kk in range(K_STEPS):
                            af = []
                            for mt in range(cfg.MT):
                                r = warp_m * cfg.WM + mt * 16 + (lanes & 7) + ((lanes >> 3) & 1) * 8
                                ch = 2 * kk + (lanes >> 4)
                                af.append(emu_ldmatrix_x4(slot, sA + r * TILE_K + ((ch ^ (r & 7)) << 4)))
                            bf = [None] * cfg.NT
                            for na in range(cfg.NA):
                                addr = sB + ((warp_n * cfg.NA + na) * K_STEPS + kk) * ATOM_BYTES + lanes * 16
                                words = np.stack([slot[a : a + 16].view("<u4") for a in addr])  # [32, 4]
                                for q in range(4):
                                    w = words[:, q]
                                    bf[na * 4 + q] = np.stack([w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F], 1)
                            for mt in range(cfg.MT):
                                for nt in range(cfg.NT):
                                    acc[warp, mt, nt] = emu_mma(af[mt], bf[nt], acc[warp, mt, nt])
                            if (kk + 1) % cfg.KK_PER_SG == 0:  # fold_sub_group
                                j = kk // cfg.KK_PER_SG
                                sRw = slot[sR : sR + cfg.R_BYTES].view("<i4")
                                sSw = slot[sS : sS + cfg.S_BYTES].view("<f4")
                                sZw = slot[sZ : sZ + cfg.Z_BYTES]
                                for mt in range(cfg.MT):
                                    r = warp_m * cfg.WM + mt * 16 + (lanes >> 2)
                                    rs0 = sRw[j * cfg.BM + r].astype(np.int64)
                                    rs1 = sRw[j * cfg.BM + r + 8].astype(np.int64)
                                    for nt in range(cfg.NT):
                                        cc = warp_n * cfg.WN + nt * 8 + 2 * (lanes & 3)
                                        s0, s1 = sSw[j * cfg.BN + cc], sSw[j * cfg.BN + cc + 1]
                                        z0 = sZw[j * cfg.BN + cc].astype(np.int64)
                                        z1 = sZw[j * cfg.BN + cc + 1].astype(np.int64)
                                        for i, (rs, z, s) in enumerate(((rs0, z0, s0), (rs0, z1, s1), (rs1, z0, s0), (rs1, z1, s1))):
                                            bits = acc[warp, mt, nt, :, i] - z * rs
                                            assert np.all(np.abs(bits - MAGIC_I) < 2**22)
                                            d = bits.astype("<u4").view("<f4") - MAGIC_F
                                            # fmaf(d, s, out): d * s is exact in float64, one rounding
                                            facc[warp, mt, nt, :, i] = (
                                                d.astype(np.float64) * s.astype(np.float64)
                                                + facc[warp, mt, nt, :, i].astype(np.float64)
                                            ).astype(np.float32)
                                            acc[warp, mt, nt, :, i] = MAGIC_I
                # epilogue
                for warp in range(nwarps):
                    warp_m, warp_n = warp // cfg.WARPS_N, warp % cfg.WARPS_N
                    for mt in range(cfg.MT):
                        for h in range(2):
                            for lane in range(32):
                                m = m0 + warp_m * cfg.WM + mt * 16 + (lane >> 2) + 8 * h
                                if m >= M:
                                    continue
                                for nt in range(cfg.NT):
                                    n = n0 + warp_n * cfg.WN + nt * 8 + 2 * (lane & 3)
                                    v0 = facc[warp, mt, nt, lane, 2 * h] * act[m]
                                    v1 = facc[warp, mt, nt, lane, 2 * h + 1] * act[m]
                                    if n < N:
                                        partial[bz, m, n] = v0
                                    if n + 1 < N:
                                        partial[bz, m, n + 1] = v1
    y = partial[0].copy()
    for z in range(1, split):
        y = (y + partial[z]).astype(np.float32)
    return y.astype(np.float16) if out_half else y


def random_problem(rng, M, N, K, gs, sym, act_mode, dtype=np.float32):
    """Fresh random inputs: every nibble value, zero points across [0, 15], outliers in X,
    and (static mode) a scale that makes some activations saturate."""
    G = K // gs
    u = rng.integers(0, 16, (N, K), dtype=np.uint8)
    zp = np.full((N, G), 8, np.uint8) if sym else rng.integers(0, 16, (N, G), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, (N, G)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    if M and K >= 8:
        x[rng.integers(0, M, 3), rng.integers(0, K, 3)] *= 20.0  # outliers
    if M > 2:
        x[1] = 0.0  # an all-zero row (a_m = 1 in the dynamic mode)
    x = x.astype(dtype)
    amax = float(np.abs(x.astype(np.float32)).max()) if x.size else 1.0
    act_scale = float(np.float32(max(amax, 1e-3) / 127.0 * 0.5))
    return x, quant.pack_int4(u), scales, zp, act_scale


def emulation_checks(quick: bool, lib=None) -> int:
    """Runs the emulation for each tile config x sub-group size on small shapes with tails."""
    rng = np.random.default_rng(1234)
    cases = [
        # (cfg, M, N, K, gs, split, act_mode, sym)
        (0, 3, 37, 128, 128, 1, 1, False),
        (0, 16, 160, 96, 32, 1, 0, False),  # K tail inside a k-tile, 2 n-tiles, odd-free N
        (0, 1, 37, 256, 64, 2, 1, True),  # split-K
        (1, 17, 37, 192, 64, 1, 1, False),  # K tail (1.5 k-tiles)
        (1, 33, 131, 128, 32, 1, 0, True),  # 2 m-tiles, 2 n-tiles, odd N
        (1, 20, 64, 384, 128, 3, 1, False),
        (2, 65, 37, 256, 256, 1, 1, False),  # group of 256: two 128 sub-groups per group
        (2, 130, 33, 160, 32, 2, 0, False),  # 2 m-tiles, split with a tail tile
        (2, 70, 129, 128, 128, 1, 1, True),
    ]
    if quick:
        cases = cases[::2]
    failures = 0
    for M, K, sg, act_mode in [(3, 16384 + 384, 32, 1), (2, 20480, 128, 0), (5, 96, 32, 1), (1, 2048 + 64, 64, 1)]:
        name = f"emulate quantize_rows_kernel M={M} K={K} sg={sg} mode={act_mode}"
        x = rng.standard_normal((M, K)).astype(np.float32)
        Mp = ceil_div(M, 4) * 4
        a = emu_quantize(x, act_mode, 0.01, sg, Mp)
        b = emu_quantize_kernel(x, act_mode, 0.01, sg, Mp)
        ok = all(np.array_equal(u, v) for u, v in zip(a, b))
        failures += not ok
        log(f"{'ok  ' if ok else 'FAIL'} {name}")
    for cfg_id, M, N, K, gs, split, act_mode, sym in cases:
        name = f"emulate cfg={cfg_id} M={M} N={N} K={K} gs={gs} split={split} mode={act_mode} sym={sym}"
        try:
            t0 = time.time()
            sg = sub_group_size(gs)
            cfg = tile_cfg(cfg_id, sg)
            x, B, scales, zp, act_scale = random_problem(rng, M, N, K, gs, sym, act_mode)
            Mp = ceil_div(M, 4) * 4
            packed = emu_repack(B, scales, zp, N, K, gs)
            xq, act, rowsum = emu_quantize(x, act_mode, act_scale, sg, Mp)
            xq2, act2, rowsum2 = emu_quantize_kernel(x, act_mode, act_scale, sg, Mp)
            if not (np.array_equal(xq, xq2) and np.array_equal(act, act2) and np.array_equal(rowsum, rowsum2)):
                raise AssertionError("quantize_rows_kernel emulation differs from the reference quantization")
            y = emu_gemm(cfg, split, xq, act, rowsum, packed, M, N, K, gs, Mp)
            ref = quant.w4a8_matmul_reference(x, B, scales, zp, act_scale, act_mode)
            err = float(np.max(np.abs(y - ref))) if y.size else 0.0
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            ok = bool(np.all(np.isfinite(y))) and err <= 1e-5 * max(scale, 1e-30)
            failures += not ok
            log(f"{'ok  ' if ok else 'FAIL'} {name}: max|err|={err:.3g} max|ref|={scale:.3g} ({time.time() - t0:.1f}s)")
        except Exception:  # noqa: BLE001 - report and go on with the next case
            failures += 1
            log(f"FAIL {name}: exception")
            traceback.print_exc()
    return failures


# ------------------------------------------------------------------------------------------
# The library
# ------------------------------------------------------------------------------------------


def build_library(lib_path: Path) -> None:
    log(f"building {lib_path} with {BUILD_SCRIPT} ...")
    t0 = time.time()
    subprocess.run(["bash", str(BUILD_SCRIPT), str(lib_path.parent)], check=True)
    log(f"built in {time.time() - t0:.0f}s")


def load_library(path: Path):
    lib = ctypes.CDLL(str(path))
    c_int, c_i64, c_sz, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    lib.fptq_w4a8_packed_size.argtypes = [c_int, c_int, c_int, ctypes.POINTER(c_sz)]
    lib.fptq_w4a8_packed_size.restype = c_int
    lib.fptq_w4a8_repack_cuda.argtypes = [vp, vp, vp, c_int, c_int, c_int, vp, vp]
    lib.fptq_w4a8_repack_cuda.restype = c_int
    lib.fptq_w4a8_workspace_size.argtypes = [c_i64, c_int, c_int, c_int, ctypes.POINTER(c_sz)]
    lib.fptq_w4a8_workspace_size.restype = c_int
    lib.fptq_w4a8_matmul_cuda.argtypes = [vp, c_int, c_i64, c_int, c_int, c_int, c_int, vp, vp, vp, c_sz, vp, vp]
    lib.fptq_w4a8_matmul_cuda.restype = c_int
    lib.fptq_w4a8_plan_info.argtypes = [c_i64, c_int, c_int, c_int, c_int, c_int, ctypes.POINTER(c_i64), ctypes.POINTER(c_sz)]
    lib.fptq_w4a8_plan_info.restype = c_int
    return lib


def packed_size(lib, N, K, gs) -> int:
    out = ctypes.c_size_t()
    rc = lib.fptq_w4a8_packed_size(N, K, gs, ctypes.byref(out))
    if rc:
        raise RuntimeError(f"fptq_w4a8_packed_size({N}, {K}, {gs}) -> {rc}")
    return out.value


def plan_info(lib, M, N, K, gs, sms, smem_per_sm) -> dict:
    out = (ctypes.c_int64 * 8)()
    ws = ctypes.c_size_t()
    rc = lib.fptq_w4a8_plan_info(M, N, K, gs, sms, smem_per_sm, out, ctypes.byref(ws))
    if rc:
        raise RuntimeError(f"fptq_w4a8_plan_info({M}, {N}, {K}, {gs}) -> {rc}")
    keys = ["cfg", "split", "tiles_per_split", "k_tiles", "m_tiles", "n_tiles", "smem", "occupancy"]
    return dict(zip(keys, list(out)), workspace=ws.value)


def library_host_checks(lib) -> int:
    """Host-only entry points, no GPU needed: sizes, plans, argument validation."""
    failures = 0

    def check(cond, what):
        nonlocal failures
        failures += not cond
        log(f"{'ok  ' if cond else 'FAIL'} host: {what}")

    for N, K, gs in [(37, 128, 32), (4097, 4096, 128), (11008, 4096, 64), (33, 512, 256)]:
        check(packed_size(lib, N, K, gs) == packed_layout(N, K, gs)["total"], f"packed_size N={N} K={K} gs={gs}")
    for bad in [(0, 128, 32), (37, 100, 32), (37, 96, 48), (37, 128, 16), (37, 384, 192)]:
        out = ctypes.c_size_t()
        check(lib.fptq_w4a8_packed_size(*bad, ctypes.byref(out)) != 0, f"packed_size rejects N,K,gs={bad}")
    # The planner's shared-memory sizes must match the Tile mirror above.
    for cfg_id, M in [(0, 1), (1, 40), (2, 300)]:
        for gs in (32, 64, 128, 256):
            p = plan_info(lib, M, 4096, 4096, gs, 132, 233472)
            check(p["cfg"] == cfg_id and p["smem"] == tile_cfg(cfg_id, sub_group_size(gs)).SMEM_BYTES,
                  f"plan cfg/smem M={M} gs={gs}: {p['cfg']}/{p['smem']}")
    for M, N, K in [(1, 4096, 4096), (16, 37, 4096), (256, 4096, 4096), (4096, 4096, 4096), (0, 64, 128)]:
        p = plan_info(lib, M, N, K, 128, 132, 233472)
        sane = 1 <= p["split"] <= MAX_SPLIT_K and ceil_div(p["k_tiles"], p["tiles_per_split"]) == p["split"]
        check(sane, f"plan M={M} N={N} K={K}: {p}")
    # No device here (or there): workspace_size either works or returns a CUDA error, no crash.
    out = ctypes.c_size_t()
    rc = lib.fptq_w4a8_workspace_size(0, 37, 128, 32, ctypes.byref(out))
    check(rc == 0 and out.value == 0, "workspace_size(M=0) == 0")
    rc = lib.fptq_w4a8_matmul_cuda(None, 0, 0, 37, 128, 32, 1, None, None, None, 0, None, None)
    check(rc == 0, "matmul with M=0 launches nothing and succeeds")
    rc = lib.fptq_w4a8_matmul_cuda(None, 0, 1, 37, 100, 32, 1, None, None, None, 0, None, None)
    check(rc != 0, "matmul rejects K % group_size != 0")
    return failures


# ------------------------------------------------------------------------------------------
# GPU checks (also runnable on the CPU through FakeGpuLib, to test this script itself)
# ------------------------------------------------------------------------------------------

GUARD = 4096  # bytes after every device buffer that must stay untouched


class Backend:
    """Where the tensors live and how to wait and time: CUDA, or the CPU for --self-test."""

    def __init__(self, torch, fake: bool):
        self.torch = torch
        self.fake = fake
        self.dev = torch.device("cpu" if fake else "cuda")

    def stream(self) -> int:
        return 0 if self.fake else self.torch.cuda.current_stream().cuda_stream

    def sync(self) -> None:
        if not self.fake:
            self.torch.cuda.synchronize()

    def time_us(self, fn, iters: int, warmup: int = 5) -> float:
        """Median microseconds of fn(i) over `iters` calls. On the GPU a spin kernel first keeps
        the device busy while all calls are queued, so host launch overhead stays out of the
        event intervals."""
        torch = self.torch
        for i in range(warmup):
            fn(i)
        self.sync()
        if self.fake:
            times = []
            for i in range(iters):
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1e6)
        else:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            torch.cuda._sleep(20_000_000)  # ~10 ms: longer than queuing the calls takes
            for i in range(iters):
                starts[i].record()
                fn(i)
                ends[i].record()
            self.sync()
            times = [st.elapsed_time(en) * 1e3 for st, en in zip(starts, ends)]
        times.sort()
        return times[len(times) // 2]


class FakeGpuLib:
    """The library's GPU entry points emulated on host memory (emu_*), its host-only ones
    passed through: lets --self-test run gpu_correctness / gpu_bench on the CPU."""

    SMS, SMEM_PER_SM = 132, 233472

    def __init__(self, real):
        self.real = real
        self.fptq_w4a8_packed_size = real.fptq_w4a8_packed_size
        self.fptq_w4a8_plan_info = real.fptq_w4a8_plan_info

    def fptq_w4a8_workspace_size(self, M, N, K, gs, out):
        out._obj.value = plan_info(self.real, M, N, K, gs, self.SMS, self.SMEM_PER_SM)["workspace"]
        return 0

    def fptq_w4a8_repack_cuda(self, pB, ps, pz, N, K, gs, packed, stream):
        G = K // gs
        B = np.frombuffer(ctypes.string_at(pB, N * K // 2), np.uint8).reshape(N, K // 2)
        sc = np.frombuffer(ctypes.string_at(ps, N * G * 4), np.float32).reshape(N, G)
        zp = np.frombuffer(ctypes.string_at(pz, N * G), np.uint8).reshape(N, G)
        buf = emu_repack(B, sc, zp, N, K, gs)
        ctypes.memmove(packed, buf.ctypes.data, buf.size)
        return 0

    def fptq_w4a8_matmul_cuda(self, X, dtype, M, N, K, gs, act_mode, pa, packed, ws, ws_bytes, Y, stream):
        if M == 0:
            return 0
        p = plan_info(self.real, M, N, K, gs, self.SMS, self.SMEM_PER_SM)
        if ws_bytes < p["workspace"]:
            return 1  # cudaErrorInvalidValue
        ctypes.memset(ws, 0x77, p["workspace"])  # the workspace is the kernel's to scribble on
        npdt = np.float16 if dtype == DTYPE_FLOAT16 else np.float32
        x = np.frombuffer(ctypes.string_at(X, M * K * np.dtype(npdt).itemsize), npdt).reshape(M, K)
        act_scale = float(np.frombuffer(ctypes.string_at(pa, 4), np.float32)[0])
        lay = packed_layout(N, K, gs)
        pk = np.frombuffer(ctypes.string_at(packed, lay["total"]), np.uint8)
        sg = sub_group_size(gs)
        Mp = ceil_div(M, 4) * 4
        xq, act, rowsum = emu_quantize(x.astype(np.float32), act_mode, act_scale, sg, Mp)
        y = emu_gemm(tile_cfg(p["cfg"], sg), p["split"], xq, act, rowsum, pk, M, N, K, gs, Mp,
                     out_half=dtype == DTYPE_FLOAT16)
        y = np.ascontiguousarray(y)
        ctypes.memmove(Y, y.ctypes.data, y.nbytes)
        return 0


def correctness_cases(quick: bool):
    """(M, N, K, gs, act_mode, sym, dtype) tuples."""
    cases = []
    small_m = [0, 1, 3, 16, 17, 64, 65, 257]
    i = 0
    for M in small_m:  # small N and K: every gs x mode x sym
        for gs in (32, 64, 128):
            for act_mode in (0, 1):
                for sym in (True, False):
                    i += 1
                    if quick and i % 3:
                        continue
                    cases.append((M, 37, 128, gs, act_mode, sym, "float32"))
    # Large K, odd and large N; cycle the other parameters.
    big = [(1, 4097), (3, 4097), (16, 4097), (17, 4097), (64, 4097), (65, 4097), (257, 4097),
           (1, 37), (16, 256), (17, 37), (257, 37), (1024, 4096)]
    for i, (M, N) in enumerate(big):
        if quick and i % 2:
            continue
        gs = (32, 64, 128)[i % 3]
        cases.append((M, N, 4096, gs, i % 2, bool((i // 2) % 2), "float32"))
    # K tails (K not a multiple of 128), group 256, float16, an M that is not a multiple of 4.
    cases += [
        (5, 130, 96, 32, 1, False, "float32"),
        (33, 61, 448, 64, 0, False, "float32"),
        (129, 257, 160, 32, 1, True, "float32"),
        (7, 4097, 4096, 256, 1, False, "float32"),
        (300, 600, 1024, 256, 0, False, "float32"),
        (2, 37, 128, 32, 1, False, "float16"),
        (17, 4097, 4096, 128, 1, False, "float16"),
        (257, 1000, 512, 64, 0, True, "float16"),
        # "u": X and Y one element off their allocation's alignment (scalar load/store paths)
        (3, 37, 128, 32, 1, False, "float32u"),
        (17, 64, 256, 64, 0, True, "float32u"),
        (70, 4097, 4096, 128, 1, False, "float32u"),
        (5, 38, 128, 128, 1, False, "float16u"),
    ]
    return cases


SELF_TEST_CASES = [  # small enough for the emulator
    (0, 37, 128, 32, 1, False, "float32"),
    (1, 37, 256, 64, 1, False, "float32"),
    (3, 37, 128, 128, 0, True, "float32"),
    (17, 37, 160, 32, 0, False, "float32"),
    (65, 40, 128, 128, 1, False, "float32"),
    (2, 37, 128, 32, 1, False, "float16"),
    (3, 37, 128, 32, 1, False, "float32u"),
    (5, 38, 128, 128, 1, False, "float16u"),
]


def gpu_correctness(lib, be: Backend, cases) -> int:
    torch = be.torch
    rng = np.random.default_rng(20261127)
    failures = 0
    log(f"\n== {'emulated ' if be.fake else ''}GPU correctness: {len(cases)} cases")
    for idx, (M, N, K, gs, act_mode, sym, dtype) in enumerate(cases):
        name = f"[{idx + 1}/{len(cases)}] M={M} N={N} K={K} gs={gs} mode={act_mode} sym={int(sym)} {dtype}"
        try:
            t0 = time.time()
            half = dtype.startswith("float16")
            off = 1 if dtype.endswith("u") else 0  # elements X and Y are moved off alignment
            npdt = np.float16 if half else np.float32
            x, B, scales, zp, act_scale = random_problem(rng, M, N, K, gs, sym, act_mode, npdt)
            ref = quant.w4a8_matmul_reference(x.astype(np.float32), B, scales, zp, act_scale, act_mode)

            def guarded(nbytes, fill):
                return torch.full((nbytes + GUARD,), fill, dtype=torch.uint8, device=be.dev)

            pk_bytes = packed_size(lib, N, K, gs)
            packed = guarded(pk_bytes, 0x5A)
            d_B = torch.from_numpy(B).to(be.dev)
            d_s = torch.from_numpy(scales).to(be.dev)
            d_z = torch.from_numpy(zp).to(be.dev)
            rc = lib.fptq_w4a8_repack_cuda(d_B.data_ptr(), d_s.data_ptr(), d_z.data_ptr(), N, K, gs,
                                           packed.data_ptr(), be.stream())
            if rc:
                raise RuntimeError(f"repack -> cudaError {rc}")
            ws_size = ctypes.c_size_t()
            rc = lib.fptq_w4a8_workspace_size(M, N, K, gs, ctypes.byref(ws_size))
            if rc:
                raise RuntimeError(f"workspace_size -> cudaError {rc}")
            ws = guarded(ws_size.value, 0xA5)
            tdt = torch.float16 if half else torch.float32
            x_buf = torch.empty(M * K + 8, dtype=tdt, device=be.dev)
            d_x = x_buf[off : off + M * K]
            d_x.copy_(torch.from_numpy(x.reshape(-1)))
            d_a = torch.tensor([act_scale], dtype=torch.float32, device=be.dev)
            elem = 2 if half else 4
            y0 = off * elem  # byte offset of Y in its buffer
            y_buf = guarded(y0 + M * N * elem, 0x3C)
            y_view = y_buf[y0 : y0 + M * N * elem].view(tdt)
            outs = []
            for _ in range(2):  # the second run must give the same bits
                y_view.fill_(float("nan"))
                rc = lib.fptq_w4a8_matmul_cuda(
                    d_x.data_ptr() if M else None, DTYPE_FLOAT16 if half else DTYPE_FLOAT32,
                    M, N, K, gs, act_mode, d_a.data_ptr(), packed.data_ptr(), ws.data_ptr(), ws_size.value,
                    y_buf.data_ptr() + y0, be.stream())
                if rc:
                    raise RuntimeError(f"matmul -> cudaError {rc}")
                be.sync()
                outs.append(y_view.clone())
            y = outs[0].float().cpu().numpy().reshape(M, N)
            problems = []
            bits = torch.int16 if half else torch.int32
            if not torch.equal(outs[0].view(bits), outs[1].view(bits)):
                problems.append("two runs differ")
            for buf, n, fill, what in ((packed, pk_bytes, 0x5A, "packed"), (ws, ws_size.value, 0xA5, "workspace"),
                                       (y_buf, y0 + M * N * elem, 0x3C, "Y")):
                if not bool((buf[n:] == fill).all()):
                    problems.append(f"wrote past the end of {what}")
            if y0 and not bool((y_buf[:y0] == 0x3C).all()):
                problems.append("wrote before the start of Y")
            if not np.all(np.isfinite(y)):
                problems.append(f"{int(np.sum(~np.isfinite(y)))} non-finite outputs (unwritten?)")
            err = float(np.max(np.abs(y - ref))) if y.size else 0.0
            scale = float(np.max(np.abs(ref))) if ref.size else 0.0
            rtol = 2e-3 if half else 1e-4
            if err > rtol * max(scale, 1e-30):
                problems.append(f"max|err| {err:.3g} > {rtol:g} * max|ref| {scale:.3g}")
            ok = not problems
            failures += not ok
            log(f"{'ok  ' if ok else 'FAIL'} {name}: max|err|/max|ref|={err / max(scale, 1e-30):.2e}"
                f" ({time.time() - t0:.2f}s){'' if ok else '  ' + '; '.join(problems)}")
        except Exception:  # noqa: BLE001 - report and go on with the next case
            failures += 1
            log(f"FAIL {name}: exception")
            traceback.print_exc()
            sys.stdout.flush()
    return failures


BENCH_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (K, N)
BENCH_MS = [1, 16, 64, 256, 1024, 4096]


def gpu_bench(lib, be: Backend, shapes, ms, results: list, gpu_name: str, sms: int, l2: int,
              smem_per_sm: int, iters: int = 50) -> int:
    """Times ours vs torch float16 matmul; appends dicts to results; returns the failures."""
    torch = be.torch
    gs, act_mode = 128, 1
    failures = 0
    log(f"\n== timing on {gpu_name} ({sms} SMs): group_size={gs}, per-token activations, float32 X/Y; "
        f"fp16 = torch.matmul float16 (cuBLAS); median of {iters}; weights rotated over >= 3x L2")
    log(f"{'M':>5} {'K':>6} {'N':>6} {'ours us':>9} {'fp16 us':>9} {'speedup':>8} {'our TOPS':>9} "
        f"{'our wGB/s':>10}  plan (cfg m-tiles x n-tiles x split)")
    for K, N in shapes:
        G = K // gs
        try:
            pk_bytes = packed_size(lib, N, K, gs)
            n_ours = max(1, min(16, ceil_div(3 * l2, pk_bytes)))
            n_fp16 = max(1, min(16, ceil_div(3 * l2, K * N * 2)))
            packs = []
            for _ in range(n_ours):
                d_B = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=be.dev)
                d_s = torch.rand(N, G, device=be.dev) * 0.01 + 0.001
                d_z = torch.randint(0, 16, (N, G), dtype=torch.uint8, device=be.dev)
                packed = torch.empty(pk_bytes, dtype=torch.uint8, device=be.dev)
                rc = lib.fptq_w4a8_repack_cuda(d_B.data_ptr(), d_s.data_ptr(), d_z.data_ptr(), N, K, gs,
                                               packed.data_ptr(), be.stream())
                if rc:
                    raise RuntimeError(f"repack -> cudaError {rc}")
                packs.append(packed)
            del d_B, d_s, d_z
            w16 = [torch.randn(K, N, device=be.dev, dtype=torch.float16) * 0.05 for _ in range(n_fp16)]
        except Exception:  # noqa: BLE001
            failures += 1
            log(f"FAIL setup K={K} N={N}")
            traceback.print_exc()
            continue
        for M in ms:
            try:
                x = torch.randn(M, K, device=be.dev)
                x16 = x.half()
                y = torch.empty(M, N, device=be.dev)
                y16 = torch.empty(M, N, device=be.dev, dtype=torch.float16)
                a = torch.ones(1, device=be.dev)
                ws_size = ctypes.c_size_t()
                rc = lib.fptq_w4a8_workspace_size(M, N, K, gs, ctypes.byref(ws_size))
                if rc:
                    raise RuntimeError(f"workspace_size -> cudaError {rc}")
                ws = torch.empty(max(ws_size.value, 1), dtype=torch.uint8, device=be.dev)
                rcs = []

                def ours(i):
                    rcs.append(lib.fptq_w4a8_matmul_cuda(
                        x.data_ptr(), DTYPE_FLOAT32, M, N, K, gs, act_mode, a.data_ptr(),
                        packs[i % n_ours].data_ptr(), ws.data_ptr(), ws_size.value, y.data_ptr(), be.stream()))

                def fp16(i):
                    torch.matmul(x16, w16[i % n_fp16], out=y16)

                t_ours = be.time_us(ours, iters)
                if any(rcs):
                    raise RuntimeError(f"matmul -> cudaError {max(rcs)}")
                t_fp16 = be.time_us(fp16, iters)
                tops = 2.0 * M * N * K / (t_ours * 1e-6) / 1e12
                gbs = (N * K / 2 + N * G * 5) / (t_ours * 1e-6) / 1e9
                p = plan_info(lib, M, N, K, gs, sms, smem_per_sm)
                plan = f"cfg{p['cfg']} {p['m_tiles']}x{p['n_tiles']}x{p['split']}"
                log(f"{M:>5} {K:>6} {N:>6} {t_ours:>9.1f} {t_fp16:>9.1f} {t_fp16 / t_ours:>8.2f} {tops:>9.1f} "
                    f"{gbs:>10.0f}  {plan}")
                results.append(dict(M=M, K=K, N=N, ours_us=t_ours, fp16_us=t_fp16, speedup=t_fp16 / t_ours,
                                    tops=tops, weight_gbs=gbs, plan=p))
            except Exception:  # noqa: BLE001
                failures += 1
                log(f"FAIL timing M={M} K={K} N={N}")
                traceback.print_exc()
        packs = w16 = None  # free this shape's weights before the next
        if not be.fake:
            torch.cuda.empty_cache()
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", type=Path, default=None, help=f"the .so (default {DEFAULT_LIB}, built if missing)")
    ap.add_argument("--rebuild", action="store_true", help="run the build script even if the .so exists")
    ap.add_argument("--quick", action="store_true", help="fewer cases and shapes")
    ap.add_argument("--no-bench", action="store_true", help="correctness only")
    ap.add_argument("--no-emulate", action="store_true", help="skip the CPU emulation of the kernel")
    ap.add_argument("--emulate-only", action="store_true", help="only the CPU emulation (no library)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--self-test", action="store_true",
                    help="run the GPU code paths of this script on the CPU through the emulator")
    args = ap.parse_args()
    t_start = time.time()

    failures = 0
    report: dict = {"emulation_failures": None, "host_failures": None, "gpu_failures": None, "timing": []}
    if not args.no_emulate:
        log("== CPU emulation of the kernel's index math vs the float64 reference")
        n = emulation_checks(args.quick)
        report["emulation_failures"] = n
        failures += n
    if args.emulate_only:
        log(f"\n{'PASS' if not failures else 'FAIL'}: emulation ({time.time() - t_start:.0f}s)")
        return 1 if failures else 0

    lib_path = args.lib or DEFAULT_LIB
    lib = None
    try:
        if args.rebuild or (args.lib is None and not lib_path.exists()):
            build_library(lib_path)
        lib = load_library(lib_path)
        log(f"\n== library {lib_path}: host-side checks")
        n = library_host_checks(lib)
        report["host_failures"] = n
        failures += n
    except Exception:  # noqa: BLE001
        failures += 1
        log(f"FAIL: could not build or load {lib_path}")
        traceback.print_exc()

    try:
        import torch
    except ImportError:
        torch = None

    if args.self_test:  # the GPU code paths on the CPU, through the emulator
        if lib is None or torch is None:
            log("FAIL: --self-test needs the library (host functions) and torch")
            return 1
        be = Backend(torch, fake=True)
        fake = FakeGpuLib(lib)
        n = gpu_correctness(fake, be, SELF_TEST_CASES)
        n += gpu_bench(fake, be, [(256, 64)], [1, 3], report["timing"], "CPU (emulated)", fake.SMS,
                       50 << 20, fake.SMEM_PER_SM, iters=2)
        failures += n
        log(f"\n{'PASS' if not failures else 'FAIL'}: self-test, {failures} failure(s), {time.time() - t_start:.0f}s")
        return 1 if failures else 0

    has_gpu = torch is not None and torch.cuda.is_available()
    if not has_gpu:
        log(f"\nNo CUDA device (torch {'missing' if torch is None else torch.__version__}): "
            "GPU correctness and timing SKIPPED.")
        log(f"{'CPU checks passed' if not failures else f'{failures} CPU check(s) FAILED'} "
            f"({time.time() - t_start:.0f}s)")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 1 if failures else 2
    if lib is None:
        return 1

    props = torch.cuda.get_device_properties(0)
    log(f"\nGPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
        f"capability {props.major}.{props.minor}; torch {torch.__version__}")
    be = Backend(torch, fake=False)
    cases = correctness_cases(args.quick)
    n = gpu_correctness(lib, be, cases)
    report["gpu_failures"] = n
    failures += n
    log(f"GPU correctness: {len(cases) - n} passed, {n} failed")
    if not args.no_bench:
        shapes, ms = (BENCH_SHAPES[:2], [1, 16, 256, 4096]) if args.quick else (BENCH_SHAPES, BENCH_MS)
        try:
            l2 = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
            smem = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 233472)
            nb = gpu_bench(lib, be, shapes, ms, report["timing"], props.name, props.multi_processor_count, l2, smem)
            report["bench_failures"] = nb
        except Exception:  # noqa: BLE001
            log("FAIL: timing")
            traceback.print_exc()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    log(f"\n{'PASS' if not failures else 'FAIL'}: {failures} correctness failure(s), {time.time() - t_start:.0f}s total")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
