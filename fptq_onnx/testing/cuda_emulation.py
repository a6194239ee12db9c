"""numpy emulations of the W4A8 CUDA kernels' index math (custom_ops/w4a8_cuda*.cu).

Checks on the CPU what no compiler checks and no CPU can run, against the float64 reference
``fptq_onnx.quant.w4a8_matmul_reference``:

* the weight repacking (``repack_weights_kernel``, ``repack_scales_kernel``) and the quantize
  kernel (``quantize_rows_kernel``: its lane groups, xor shuffles and the NaN policy's a_m);
* the mma.sync GEMM (``w4a8_gemm_kernel``) block by block, warp by warp and lane by lane: the
  XOR-swizzled shared-memory tiles, ldmatrix / LDS.128 fragment loads, the mma.m16n8k32
  fragment layouts of the PTX ISA, the magic-number int->float fold and split-K;
* what the sm_90a TMA kernel's emulation (:mod:`.cuda_emulation_tma`) shares: the nibble widening,
  a wgmma operand read through its shared-memory descriptor, the accumulator fragment ownership
  and the mbarrier.

Every constant (tile sizes, stage counts, magic numbers) is read from the sources by
:mod:`.cuda_sources`.
"""
from __future__ import annotations

import numpy as np

from . import cuda_sources

_HEADER = cuda_sources.constants("w4a8_cuda.h")
TILE_K = _HEADER["kTileK"]
MMA_K = _HEADER["kMmaK"]
K_STEPS = _HEADER["kKSteps"]
N_PAD_ALIGN = _HEADER["kNPadAlign"]
ATOM_N = _HEADER["kAtomN"]
ATOM_K = _HEADER["kAtomK"]
ATOM_BYTES = _HEADER["kAtomBytes"]
MAGIC_I = _HEADER["kMagicI"]
MAGIC_F = np.float32(_HEADER["kMagicF"])
BUFFER_ALIGN = _HEADER["kBufferAlign"]
QUANT_THREADS = cuda_sources.constants("w4a8_cuda.cu")["kQuantThreads"]


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


def row_scale(row: np.ndarray, act_mode: int, act_scale: float) -> tuple[np.float32, np.float32]:
    """``(a_m as the epilogue uses it, 1 / a_m that quantizes)`` of one row, float32: the
    kernels' ``row_scale`` (w4a8_cuda_device.cuh). The row max in both modes; a NaN in the row
    (either mode) or an infinite dynamic a_m gives a_m = NaN (Y row NaN); a dynamic a_m below
    2^-126 becomes 1."""
    finfo = np.finfo(np.float32)
    amax = np.float32(np.max(np.abs(row.astype(np.float32)))) if row.size else np.float32(0)  # NaN propagates
    a = np.float32(amax / np.float32(127.0)) if act_mode == 1 else np.float32(act_scale)
    if act_mode == 1 and a < finfo.tiny:
        a = np.float32(1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.float32(1.0) / a
    poisoned = bool(np.isnan(amax)) or not a <= finfo.max
    return (np.float32(np.nan) if poisoned else a), inv


def emu_quantize(x: np.ndarray, act_mode: int, act_scale: float, sg: int, Mp: int):
    """quantize_rows_kernel: (xq int8 [M, K], act float32 [M], rowsum int32 [K/sg, Mp]).
    a_m from :func:`row_scale` (NaN for the rows the NaN policy poisons); q = clip(rint(x / a_m))
    with cvt.rni.s32.f32's NaN -> 0."""
    M, K = x.shape
    scales = [row_scale(row, act_mode, act_scale) for row in x]
    a = np.array([s[0] for s in scales], np.float32)
    inv = np.array([s[1] for s in scales], np.float32).reshape(M, 1)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(np.nan_to_num(np.rint(x.astype(np.float32) * inv), nan=0.0), -127, 127).astype(np.int8)
    rowsum = np.zeros((K // sg, Mp), np.int32)
    rowsum[:, :M] = q.astype(np.int32).reshape(M, K // sg, sg).sum(-1).T
    return q, a, rowsum


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
        a, inv = row_scale(xr, act_mode, act_scale)
        act[m] = a
        n_steps = ceil_div(K, step)
        for it in range(n_steps):  # block-uniform loop: every lane takes part
            k = 4 * tid + it * step
            inside = k < K
            qsum = np.zeros(QUANT_THREADS, np.int64)
            for e in range(4):
                kk = np.where(inside, k + e, 0)
                with np.errstate(invalid="ignore"):  # cvt.rni.s32.f32 turns NaN into 0
                    q = np.clip(np.nan_to_num(np.rint(xr[kk] * inv), nan=0.0), -127, 127).astype(np.int64)
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


def s8_bytes(words: np.ndarray) -> np.ndarray:
    """[..., n_words] uint32 -> [..., n_words * 4] int8 (little-endian bytes: register i byte j
    at 4i + j)."""
    return np.ascontiguousarray(words.astype("<u4")).view(np.int8)


def widen_lo(w: np.ndarray, z4: np.ndarray) -> np.ndarray:
    """The Hopper kernel's nibble widening: the even nibbles of ``w`` as four int8 ``u - z``
    (``z4``: the zero point in each byte), no borrow between bytes."""
    w = np.asarray(w, np.int64)
    return ((((w & 0x0F0F0F0F) | 0x80808080) - z4) ^ 0x80808080) & 0xFFFFFFFF


def widen_hi(w: np.ndarray, z4: np.ndarray) -> np.ndarray:
    """:func:`widen_lo` of the odd nibbles."""
    return widen_lo(np.asarray(w, np.int64) >> 4, z4)


def reduce_splits(partial: np.ndarray, out_half: bool) -> np.ndarray:
    """splitk_reduce_kernel: the float32 partials ``[split, M, N]`` summed in split order."""
    y = partial[0].copy()
    for z in range(1, partial.shape[0]):
        y = (y + partial[z]).astype(np.float32)
    return y.astype(np.float16) if out_half else y


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
    a8 = s8_bytes(a_regs)  # [32, 16]: element i of lane is byte i % 4 of register i // 4
    b8 = s8_bytes(b_regs)  # [32, 8]
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


def emu_gemm(cfg, split: int, xq, act, rowsum, packed, M, N, K, gs, Mp, out_half=False):
    """w4a8_gemm_kernel (+ splitk_reduce_kernel) for every block, warp and lane; ``cfg`` is
    :func:`cuda_sources.mma_tile`."""
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
    return reduce_splits(partial, out_half)


def wg_desc_fields(desc: int):
    return dict(start=(desc & 0x3FFF) << 4, lbo=((desc >> 16) & 0x3FFF) << 4,
                sbo=((desc >> 32) & 0x3FFF) << 4, base=(desc >> 49) & 7, mode=(desc >> 62) & 3)


def wg_read_operand(smem: np.ndarray, desc: int, rows: int) -> np.ndarray:
    """The [rows x 32] int8 K-major operand a wgmma k32 step reads through `desc`, as this
    repository reads the PTX ISA's 128B-swizzle canonical layout (shared memory starting
    1024-aligned; the reading the H200 confirmed): row i, byte j at
    start + (i // 8) * SBO + (i % 8) * 128 + j, then the 16-byte chunk bits [4:6] XOR the row bits
    [7:9] of the address."""
    f = wg_desc_fields(desc)
    assert f["mode"] == 1, "only the 128B swizzle is used"
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(32, dtype=np.int64)[None, :]
    addr = f["start"] + (i // 8) * f["sbo"] + (i % 8) * 128 + j
    addr = addr ^ (((addr >> 7) & 7) << 4)
    assert addr.min() >= 0 and addr.max() < smem.size
    return smem[addr].view(np.int8).astype(np.int64)


def acc_coords(nacc: int):
    """(rows [4, 32, nacc], cols [4, 32, nacc]) of the m64nN .s32 accumulator fragments of a
    warpgroup (register r of warp w, lane g * 4 + t: row 16w + g + 8 ((r >> 1) & 1), column
    8 (r >> 2) + 2t + (r & 1)); asserts that they tile the 64 x N block exactly once."""
    w = np.arange(4)[:, None, None]
    lane = np.arange(32)[None, :, None]
    r = np.arange(nacc)[None, None, :]
    g, t = lane >> 2, lane & 3
    rows = np.broadcast_to(16 * w + g + 8 * ((r >> 1) & 1), (4, 32, nacc))
    cols = np.broadcast_to(8 * (r >> 2) + 2 * t + (r & 1), (4, 32, nacc))
    cover = np.zeros((64, 2 * nacc), np.int64)
    np.add.at(cover, (rows.ravel(), cols.ravel()), 1)
    assert np.all(cover == 1), "accumulator fragments do not tile the block"
    return rows, cols


class Mbarrier:
    """An mbarrier as the PTX ISA defines it: a phase completes when ``count`` arrivals and every
    announced transaction byte (``arrive(tx=...)``, then ``complete_tx`` as bulk copies land)
    are in; ``done(parity)`` is try_wait.parity."""

    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0  # phase: completed phases

    def arrive(self, tx: int = 0) -> None:
        self.tx += tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        assert self.tx >= 0, "more bytes than expected"
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity: int) -> bool:
        """The phase with this parity has completed."""
        return (self.phase & 1) != parity
