"""numpy emulation of the sm_90a TMA kernel (custom_ops/w4a8_cuda_sm90_tma.cu, variants 16-19).

Checks on the CPU the index math that no compiler checks and no CPU can run:

* the quantize kernel's tiled, pre-swizzled Xq layout (`xq_offset` of w4a8_cuda.cu);
* the producer's bulk copies of one k-tile into a byte image of a shared-memory stage;
* each consumer thread's 8-byte LDS of its weight words, the widening to int8 (u - z) and the
  wgmma A-operand register fragments (PTX ISA: wgmma .m64nNk32 .s8 A in registers, the same
  per-warp layout as mma.m16n8k32's A: a0 row g / k 4t.., a1 row g + 8, a2 k + 16, a3 both);
* the B operand (Xq) read back through the 128B-swizzle descriptor as this repository reads
  the PTX ISA (:func:`.cuda_emulation.wg_read_operand`, the layout the H200 run proved);
* the accumulator fragment ownership of m64nBT (register 4q + 2h + e is weight row
  16w + g + 8h, token 8q + 2t + e), the magic-number fold with the two per-thread scales,
  the epilogue's (token, weight row) -> Y[m, n] transpose and split-K;
* the mbarrier protocol (full: one arrive.expect_tx + transaction bytes; empty: 8 warp
  arrivals; the OVERLAP consumers' issue-ahead order) under random schedules.

The stage layout (``tma::Cfg<BT>``) and block size are read from the source (:mod:`.cuda_sources`).
"""
from __future__ import annotations

import numpy as np

from . import cuda_sources
from .cuda_emulation import (ATOM_BYTES, ATOM_K, ATOM_N, K_STEPS, MAGIC_F, MAGIC_I, TILE_K, Mbarrier,
                             acc_coords, reduce_splits, row_scale, s8_bytes, wg_read_operand, widen_hi, widen_lo)

BN = cuda_sources.constants("w4a8_cuda_sm90_tma.cu")["kBN"]  # weight rows per block
x_desc = cuda_sources.one_line_function("w4a8_cuda_sm90_tma.cu", "x_desc")  # the B operand's descriptor


def cfg(bt: int):
    """tma::Cfg<BT> of w4a8_cuda_sm90_tma.cu (STAGES, X_BYTES, OFF_W, ..., SMEM_BYTES, NACC)."""
    return cuda_sources.struct_constants("w4a8_cuda_sm90_tma.cu", "Cfg", BT=bt)


def xq_offset(m, k, K: int, tile_rows: int):
    """xq_offset of w4a8_cuda.cu: byte offset of Xq[m, k] (k % 4 == 0) in the tiled layout."""
    m = np.asarray(m, np.int64)
    k = np.asarray(k, np.int64)
    if tile_rows == 0:
        return m * K + k
    mt, r = m // tile_rows, m % tile_rows
    kt, c = k // TILE_K, (k // 16) & 7
    return ((mt * (K // TILE_K) + kt) * tile_rows + r) * TILE_K + ((c ^ (r & 7)) << 4) + (k & 15)


def tiled_xq(xq: np.ndarray, bt: int, K: int) -> np.ndarray:
    """The workspace image the quantize kernel writes for the TMA kernel: m_tiles * bt rows,
    4-byte groups at xq_offset, rows >= M zero."""
    M = xq.shape[0]
    m_tiles = -(-M // bt)
    out = np.full(m_tiles * bt * K, 0x5A, np.uint8)  # garbage first: every byte must be written
    src = np.ascontiguousarray(xq).view(np.uint8).reshape(M, K)
    m = np.arange(m_tiles * bt)[:, None]
    k4 = np.arange(0, K, 4)[None, :]
    off = xq_offset(m, k4, K, bt)
    for i in range(4):
        vals = np.zeros((m_tiles * bt, K // 4), np.uint8)
        vals[:M] = src[:, i::4]
        out[off + i] = vals
    return out


def a_fragment_matrix(regs: np.ndarray) -> np.ndarray:
    """The m64 x k32 int8 A operand that wgmma reads from the warpgroup's registers.
    regs uint32 [4 warps, 32 lanes, 4]. a_i of (warp w, lane g*4+t): row 16w + g (+8 for
    i = 1, 3), k 4t + byte (+16 for i = 2, 3)."""
    A = np.zeros((64, 32), np.int64)
    b = s8_bytes(regs)  # [4, 32, 16]
    for w in range(4):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for i in range(4):
                row = 16 * w + g + 8 * (i & 1)
                col = 4 * t + 16 * (i >> 1)
                A[row, col:col + 4] = b[w, lane, 4 * i:4 * i + 4]
    return A


def fused_quant_rows(x: np.ndarray, m0: int, bt: int, act_mode: int, act_scale: float):
    """FUSEQ producer, first phase: (a_m, 1 / a_m) float32 [bt] of rows m0 .. m0 + bt - 1
    (rows past M: 1, unused), as quantize_rows_kernel computes them (:func:`row_scale`)."""
    a, inv = np.ones(bt, np.float32), np.ones(bt, np.float32)
    for r in range(min(bt, x.shape[0] - m0)):
        a[r], inv[r] = row_scale(x[m0 + r], act_mode, act_scale)
    return a, inv


def fused_quant_stage(x: np.ndarray, m0: int, bt: int, kt: int, inv: np.ndarray) -> np.ndarray:
    """FUSEQ producer, per k-tile: the X tile image [bt * 128] bytes; producer thread tid
    writes row tid / 8, 16-byte chunk tid % 8 at row * 128 + ((chunk ^ (row & 7)) << 4)."""
    M = x.shape[0]
    img = np.full(bt * TILE_K, 0xEE, np.uint8)
    for tid in range(128):
        r, c = tid >> 3, tid & 7
        q = np.zeros(16, np.int8)
        if m0 + r < M:
            with np.errstate(invalid="ignore"):  # Inf * 0 is NaN; rint: half to even, NaN -> 0 (cvt.rni.s32.f32)
                v = x[m0 + r, kt * TILE_K + 16 * c: kt * TILE_K + 16 * c + 16].astype(np.float32) * inv[r]
                q = np.clip(np.nan_to_num(np.rint(v), nan=0.0), -127, 127).astype(np.int8)
        off = r * TILE_K + ((c ^ (r & 7)) << 4)
        img[off:off + 16] = q.view(np.uint8)
    return img


def emu_gemm_tma(bt: int, split: int, xq: np.ndarray, act: np.ndarray, packed: np.ndarray, lay: dict,
                 M: int, N: int, K: int, gs: int, out_half: bool = False, fused=None) -> np.ndarray:
    """w4a8_tma_kernel<bt, *> (+ splitk_reduce_kernel) block by block, thread by thread for
    every address; `lay` is :func:`.cuda_emulation.packed_layout` (N, K, gs). fused = (x, act_mode, act_scale):
    the FUSEQ kernel, which quantizes X itself (xq and act are then not used)."""
    c = cfg(bt)
    nacc = c.NACC
    Npad, KB = lay["Npad"], K // ATOM_K
    assert K % TILE_K == 0 and gs % TILE_K == 0
    k_tiles = K // TILE_K
    tps = -(-k_tiles // split)
    assert -(-k_tiles // tps) == split
    sub_per_group = gs // TILE_K
    xt = tiled_xq(xq, bt, K) if fused is None else None
    act = act.astype(np.float32)
    m_tiles, n_tiles = -(-M // bt), -(-N // BN)
    partial = np.full((split, M, N), np.nan, np.float32)
    rows_of, cols_of = acc_coords(nacc)
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    for bz in range(split):
        kt_begin = bz * tps
        kt_end = min(kt_begin + tps, k_tiles)
        for bx in range(m_tiles):
            for by in range(n_tiles):
                n0 = by * BN
                bp = lay["off_b"] + (n0 // ATOM_N) * KB * ATOM_BYTES
                facc = np.zeros((2, 4, 32, nacc), np.float32)
                if fused is not None:
                    a_blk, inv_blk = fused_quant_rows(fused[0], bx * bt, bt, fused[1], fused[2])
                for kt in range(kt_begin, kt_end):
                    # producer: the bulk copies of k-tile kt into one stage image
                    st = np.full(c.STAGE_BYTES, 0xCD, np.uint8)
                    if fused is not None:
                        st[0:c.X_BYTES] = fused_quant_stage(fused[0], bx * bt, bt, kt, inv_blk)
                    else:
                        src = (bx * k_tiles + kt) * c.X_BYTES
                        st[0:c.X_BYTES] = xt[src:src + c.X_BYTES]
                    for nb in range(BN // ATOM_N):
                        s0 = bp + (nb * KB + kt * K_STEPS) * ATOM_BYTES
                        d0 = c.OFF_W + nb * K_STEPS * ATOM_BYTES
                        st[d0:d0 + K_STEPS * ATOM_BYTES] = packed[s0:s0 + K_STEPS * ATOM_BYTES]
                    grp = kt // sub_per_group
                    s0 = lay["off_s"] + (grp * Npad + n0) * 4
                    st[c.OFF_S:c.OFF_S + c.S_BYTES] = packed[s0:s0 + c.S_BYTES]
                    s0 = lay["off_z"] + grp * Npad + n0
                    st[c.OFF_Z:c.OFF_Z + c.Z_BYTES] = packed[s0:s0 + c.Z_BYTES]
                    sS = st[c.OFF_S:c.OFF_S + c.S_BYTES].view("<f4")
                    # consumers
                    for wgc in range(2):
                        acc = np.full((64, bt), MAGIC_I, np.int64)
                        scl = np.zeros((4, 32, 2), np.float32)
                        for kk in range(K_STEPS):
                            regs = np.zeros((4, 32, 4), np.int64)
                            for w in range(4):
                                row = 64 * wgc + 16 * w + g  # [32]
                                w_off = (c.OFF_W + ((2 * wgc + (w >> 1)) * K_STEPS) * ATOM_BYTES + lane * 16
                                         + 8 * (w & 1))
                                addr = w_off + kk * ATOM_BYTES
                                words = np.stack([st[a:a + 8].view("<u4") for a in addr]).astype(np.int64)  # LDS.64
                                z40 = st[c.OFF_Z + row].astype(np.int64) * 0x01010101
                                z41 = st[c.OFF_Z + row + 8].astype(np.int64) * 0x01010101
                                scl[w, :, 0] = sS[row]
                                scl[w, :, 1] = sS[row + 8]
                                regs[w, :, 0] = widen_lo(words[:, 0], z40)
                                regs[w, :, 1] = widen_lo(words[:, 1], z41)
                                regs[w, :, 2] = widen_hi(words[:, 0], z40)
                                regs[w, :, 3] = widen_hi(words[:, 1], z41)
                            A = a_fragment_matrix(regs)
                            B = wg_read_operand(st, x_desc(kk * 32), bt)  # x_desc(st + kk * 32)
                            acc += A @ B.T
                        a_ = acc[rows_of, cols_of]  # [4, 32, nacc]
                        assert np.all(np.abs(a_ - MAGIC_I) < 2 ** 22)
                        d = a_.astype("<u4").view("<f4") - MAGIC_F
                        s = scl[:, :, (np.arange(nacc) >> 1) & 1]
                        facc[wgc] = (d.astype(np.float64) * s + facc[wgc]).astype(np.float32)
                # epilogue: register r of (wgc, w, lane) -> token m0 + col, weight row n0 + 64 wgc + row
                for wgc in range(2):
                    m = bx * bt + cols_of
                    n = n0 + 64 * wgc + rows_of
                    ok = (m < M) & (n < N)
                    if fused is not None:
                        am = a_blk[cols_of]
                    else:
                        am = np.where(m < M, act[np.minimum(m, M - 1)], 0).astype(np.float32)
                    partial[bz, m[ok], n[ok]] = (facc[wgc] * am)[ok]
    return reduce_splits(partial, out_half)


def emu_tma_pipeline(stages: int, n_kt: int, overlap: bool, rng) -> None:
    """The mbarrier protocol of w4a8_tma_kernel under a random schedule of the producer thread,
    the bulk copies (which land in any order, any time after their issue) and the 8 consumer
    warps. full[s]: count 1 + transaction bytes (arrive.expect_tx adds them first); empty[s]:
    count 8. Asserts no deadlock, that consumers read only landed data of the right k-tile,
    and that a stage is never refilled while a consumer still reads it (OVERLAP consumers hold
    k-tile i until after they issued i + 1)."""
    full = [Mbarrier(1) for _ in range(stages)]
    empty = [Mbarrier(8) for _ in range(stages)]
    content = [None] * stages   # k-tile whose bytes have all landed in the stage
    readers = [0] * stages      # consumer warps currently holding the stage
    copies: list = []           # (stage, k-tile, bytes) issued, not landed
    parts = [3, 5, 7, 11]       # bytes of a k-tile's copies (any split works)

    def producer():
        for i in range(n_kt):
            s = i % stages
            if i >= stages:
                while not empty[s].done(((i // stages) & 1) ^ 1):
                    yield
            assert readers[s] == 0, "producer refills a stage still being read"
            full[s].arrive(tx=sum(parts))
            content[s] = None
            for b in parts:
                copies.append((s, i, b))
            yield

    def consumer():
        def wait_and_hold(i):
            s = i % stages
            while not full[s].done((i // stages) & 1):
                yield
            assert content[s] == i, f"stage {s} holds k-tile {content[s]}, expected {i}"
            readers[s] += 1

        def release(i):
            readers[i % stages] -= 1
            empty[i % stages].arrive()

        if overlap:  # start(0); per i: start(i + 1) if any, wait for i's wgmmas, release(i)
            yield from wait_and_hold(0)
            for i in range(n_kt):
                if i + 1 < n_kt:
                    yield from wait_and_hold(i + 1)
                yield
                release(i)
        else:
            for i in range(n_kt):
                yield from wait_and_hold(i)
                yield
                release(i)

    landed_bytes: dict = {}

    def land_one():
        if not copies:
            return False
        s, i, b = copies.pop(int(rng.integers(len(copies))))
        landed_bytes[(s, i)] = landed_bytes.get((s, i), 0) + b
        if landed_bytes[(s, i)] == sum(parts):
            content[s] = i
        full[s].complete_tx(b)
        return True

    actors = [producer()] + [consumer() for _ in range(8)]
    alive = list(range(len(actors)))
    steps = 0
    while alive or copies:
        steps += 1
        assert steps < 200000, "deadlock"
        if copies and rng.random() < 0.3:
            land_one()
            continue
        if not alive:
            land_one()
            continue
        k = alive[int(rng.integers(len(alive)))]
        try:
            next(actors[k])
        except StopIteration:
            alive.remove(k)
