// W4A8 GEMM for Hopper (sm_90a), second design: bulk copies (the TMA engine) into a multi-stage
// shared-memory ring with mbarriers, warp-specialized, and the weights as wgmma's A operand
// *in registers* (Y^T = W * Xq^T, "swap AB" as in CUTLASS's mixed-input Hopper GEMMs / Machete).
// Compiled only for sm_90a (-gencode arch=compute_90a,code=sm_90a); for any other target the
// kernel body is empty and the launcher reports cudaErrorNotSupported.
//
// Why (docs/cuda_kernel.md, "The TMA kernel"): the first wgmma kernel (w4a8_cuda_sm90.cu, since
// deleted) widened every weight into shared memory from one producer warpgroup (32-bit STS, a
// proxy fence, a barrier per k-tile) and each consumer folded its int32 sums only after waiting
// for its own wgmmas: 0.41x cuBLAS fp16 at large M. Here
//   * the copies are single-thread bulk copies (cp.async.bulk ... mbarrier::complete_tx): one
//     instruction per 2 KB of weights or per BT x 128 activation tile, no per-16-byte cp.async
//     issue cost, and the "full" barrier completes when the bytes have landed;
//   * the weights never go back to shared memory as int8: each consumer thread loads its A
//     fragment's nibbles (8 bytes per k-step) and widens them in registers to int8 (u - z);
//   * with OVERLAP, each consumer warpgroup keeps two int32 accumulator sets: the wgmmas of
//     k-tile i + 1 run on the tensor cores while the same warps fold k-tile i into float;
//   * with FUSEQ (decode, 16 tokens) the producer warpgroup quantizes the activations itself
//     (a_m of its rows from the whole row, then each k-tile's 16 x 128 int8 straight into the
//     stage), so a call is one launch when K is not split (two with the split-K reduction).
//
// Block: 384 threads = 3 warpgroups, tile 128 weight rows (n) x BT tokens (m), BT = 16 / 64 (both OVERLAP) or 128 (serial).
//   WG0 (producer): one thread issues the bulk copies of each k-tile (Xq tile, 4 weight atom
//       columns, the group's scales and zero points) into stage i % STAGES after the stage's
//       "empty" barrier, announcing the byte count on its "full" barrier. setmaxnreg.dec 40.
//   WG1, WG2 (consumers): weight rows 64c .. 64c + 63 (c = WG - 1) x all BT tokens,
//       wgmma.m64nBTk32.s32.s8.s8 with A = widened weights (registers), B = Xq (shared memory,
//       128B swizzle, K-major). setmaxnreg.inc 232.
// The zero point is subtracted while widening, so the fold is y += s * (acc - bias), 3
// instructions per element and 128-group (FADD, FFMA, reset: the magic-number int->float
// of w4a8_cuda.h). Epilogue y[m, n] = a_m * y, straight from the accumulator fragments.
//
// Index names: n / m / k global weight row (output column) / token / reduction index; n0, m0 a
// block's first; kt a k-tile (128 k), kk a wgmma k-step (32 k); c the consumer warpgroup, w the
// warp inside it, g = lane / 4 and t = lane % 4 the fragment coordinates; h / e the row / column
// halves of an accumulator quad.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "w4a8_cuda.h"
#include "w4a8_cuda_device.cuh"
#include "w4a8_cuda_sm90.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FPTQ_SM90A_DEVICE 1
#endif

namespace fptq {
namespace w4a8cuda {
namespace tma {
namespace {

constexpr int kThreads = 384;   // 3 warpgroups
constexpr int kBN = 128;        // weight rows per block: 2 consumer warpgroups x 64
constexpr int kProducerRegs = 40;   // setmaxnreg: 128 x 40 + 256 x 232 <= 65536 registers
constexpr int kConsumerRegs = 232;

// Per-stage shared memory for BT tokens per block (all offsets from a 1024-aligned stage):
//   X  int8    [BT][128]          Xq tile, 128B-swizzled (bulk-copied pre-swizzled)
//   W  uint8   [4][4][512]        weight atoms: 4 atom columns (32 n each) x 4 k-steps
//   S  float32 [128]              scales of the k-tile's group for the block's 128 rows
//   Z  uint8   [128]              zero points
template <int BT>
struct Cfg {
  static constexpr int STAGES = BT >= 128 ? 6 : (BT >= 64 ? 8 : 10);
  static constexpr int X_BYTES = BT * kTileK;
  static constexpr int W_BYTES = kBN * kTileK / 2;
  static constexpr int S_BYTES = kBN * 4;
  static constexpr int Z_BYTES = kBN;
  static constexpr int OFF_W = X_BYTES;
  static constexpr int OFF_S = OFF_W + W_BYTES;
  static constexpr int OFF_Z = OFF_S + S_BYTES;
  static constexpr int TX_BYTES = X_BYTES + W_BYTES + S_BYTES + Z_BYTES;  // per full phase
  static constexpr int STAGE_BYTES = (OFF_Z + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int TXW_BYTES = W_BYTES + S_BYTES + Z_BYTES;  // FUSEQ: X is not bulk-copied
  static constexpr int BAR_OFF = STAGES * STAGE_BYTES;
  static constexpr int AM_OFF = BAR_OFF + 2 * STAGES * 8;  // FUSEQ: float a_m[BT], 1 / a_m[BT]
  // + 1024: the dynamic shared memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int SMEM_BYTES = 1024 + AM_OFF + 2 * BT * 4;
  static constexpr int NACC = BT / 2;  // int32 accumulators per thread (64 x BT / 128 threads)
  static_assert(X_BYTES % 1024 == 0, "the swizzled X tile must be whole 8-row groups");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");
};

// 128B-swizzle K-major descriptor of the X tile (the layout the old kernel verified on an
// H200 as its layout 0): start >> 4, LBO 16 (unused when swizzled), SBO 1024 (next 8 rows),
// swizzle mode 1 (128B) in bits 62-63; a k-step of 32 adds 32 bytes to the start address.
__device__ __forceinline__ uint64_t x_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#ifdef FPTQ_SM90A_DEVICE
// One bulk copy (the TMA engine, no tensor map): `bytes` (multiple of 16, both addresses
// 16-byte aligned) from global to shared memory; completion is counted in bytes on `bar`.
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Register budget per warpgroup role (needs the kernel's register cap at entry:
// __launch_bounds__(384, 1) gives 168; each role is one branch of a single if / else).
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

// Nibbles -> int8 (u - z), four weights per word and 3-4 instructions:
// ((u | 0x80) - z) ^ 0x80 per byte. u | 0x80 = u + 128 >= 128 > z (z in [0, 15]), so the
// subtraction never borrows across bytes, and the XOR turns the biased byte 128 + (u - z) into
// the signed byte u - z. z4 = z * 0x01010101 (z in all four bytes).
// lo: nibbles 0, 2, 4, 6 (k = 4t .. 4t + 3 of the k-step); hi: nibbles 1, 3, 5, 7 (k + 16).
__device__ __forceinline__ uint32_t widen_lo(uint32_t w, uint32_t z4) {
  return (((w & 0x0F0F0F0Fu) | 0x80808080u) - z4) ^ 0x80808080u;
}
__device__ __forceinline__ uint32_t widen_hi(uint32_t w, uint32_t z4) {
  return ((((w >> 4) & 0x0F0F0F0Fu) | 0x80808080u) - z4) ^ 0x80808080u;
}

__device__ __forceinline__ void producer_bar() {  // named barrier 1: the producer warpgroup
  asm volatile("bar.sync 1, 128;\n" ::: "memory");
}

// Four elements X[m, k..k+3] as floats (FUSEQ), float32 or float16 X.
__device__ __forceinline__ float4 load_x4(const FptqSm90TmaArgs& p, int64_t m, int k) {
  const int64_t i = m * p.K + k;
  return p.x_half ? load4(static_cast<const __half*>(p.x) + i, p.x_vec != 0)
                  : load4(static_cast<const float*>(p.x) + i, p.x_vec != 0);
}

// Four quantized values in one word (byte j = q of element j), as the quantize kernel packs them.
__device__ __forceinline__ uint32_t pack_q4(float4 v, float inv) {
  return (static_cast<uint32_t>(quantize_one(v.x, inv)) & 0xFFu) |
         ((static_cast<uint32_t>(quantize_one(v.y, inv)) & 0xFFu) << 8) |
         ((static_cast<uint32_t>(quantize_one(v.z, inv)) & 0xFFu) << 16) |
         ((static_cast<uint32_t>(quantize_one(v.w, inv)) & 0xFFu) << 24);
}

// D[64 x 128] += A[64 x 32] (registers a[0..3]) * B[32 x 128] (shared memory, descriptor db).
__device__ __forceinline__ void wgmma_rs_n128(int32_t (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]),
        "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]),
        "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]),
        "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
        "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]),
        "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]),
        "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]),
        "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]),
        "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// D[64 x 64] += A[64 x 32] (registers a[0..3]) * B[32 x 64] (shared memory, descriptor db).
__device__ __forceinline__ void wgmma_rs_n64(int32_t (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]),
        "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]),
        "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]),
        "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
        "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

// D[64 x 16] += A[64 x 32] (registers a[0..3]) * B[32 x 16] (shared memory, descriptor db).
__device__ __forceinline__ void wgmma_rs_n16(int32_t (&d)[8], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "
      "{%8, %9, %10, %11}, %12, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]),
        "+r"(d[6]), "+r"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

template <int NACC>
__device__ __forceinline__ void wgmma_rs(int32_t (&d)[NACC], const uint32_t (&a)[4], uint64_t db);
template <>
__device__ __forceinline__ void wgmma_rs<64>(int32_t (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  wgmma_rs_n128(d, a, db);
}
template <>
__device__ __forceinline__ void wgmma_rs<32>(int32_t (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  wgmma_rs_n64(d, a, db);
}
template <>
__device__ __forceinline__ void wgmma_rs<8>(int32_t (&d)[8], const uint32_t (&a)[4], uint64_t db) {
  wgmma_rs_n16(d, a, db);
}
#endif  // FPTQ_SM90A_DEVICE

// grid (m_tiles, n_tiles, split), block kThreads, dynamic shared memory Cfg<BT>::SMEM_BYTES.
// Block (bx, by, bz): tokens m0 = bx * BT .., weight rows n0 = by * 128 .., k-tiles of split bz.
template <int BT, bool OVERLAP, bool FUSEQ>
__global__ void __launch_bounds__(kThreads, 1) w4a8_tma_kernel(const __grid_constant__ FptqSm90TmaArgs p) {
#ifdef FPTQ_SM90A_DEVICE
  using C = Cfg<BT>;
  constexpr int NACC = C::NACC;
  extern __shared__ uint8_t smem_raw[];
  // Stages must be 1024-byte aligned (the 128B swizzle repeats every 8 rows x 128 bytes and
  // the descriptor's base offset is 0).
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t bar_full = sbase + C::BAR_OFF;          // STAGES x 8 bytes
  const uint32_t bar_empty = bar_full + C::STAGES * 8;   // STAGES x 8 bytes
  auto stage = [&](int i) { return sbase + static_cast<uint32_t>((i % C::STAGES) * C::STAGE_BYTES); };
  auto full = [&](int i) { return bar_full + 8u * static_cast<uint32_t>(i % C::STAGES); };
  auto empty = [&](int i) { return bar_empty + 8u * static_cast<uint32_t>(i % C::STAGES); };
  // Parity of the (i / STAGES)-th phase of stage i % STAGES.
  auto parity = [&](int i) { return static_cast<uint32_t>(i / C::STAGES) & 1u; };

  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int n0 = blockIdx.y * kBN;
  const int kt_begin = blockIdx.z * p.tiles_per_split;
  const int n_kt = min(kt_begin + p.tiles_per_split, p.k_tiles) - kt_begin;

  if (tid == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      // the producer's arrive.expect_tx (+ the copies' bytes); FUSEQ: + its "X written" arrival
      mbar_init(bar_full + 8 * s, FUSEQ ? 2 : 1);
      mbar_init(bar_empty + 8 * s, 8);  // lane 0 of each of the 8 consumer warps
    }
    mbar_fence_init();
  }
  __syncthreads();

  const uint32_t s_am = sbase + C::AM_OFF;         // FUSEQ: a_m of the block's BT rows
  const uint32_t s_inv = s_am + 4 * BT;            // and 1 / a_m
  // Producer: the bulk copies of the weights, scales and zero points of k-tile kt_begin + i
  // (inputs of the op, ready before the call). Atom column nb's 4 k-steps are 2 KB
  // contiguous (w4a8_cuda.h). The caller announces the bytes (arrive.expect_tx) first.
  const int KB = p.K / kAtomK;
  const uint8_t* bp = p.bp + static_cast<int64_t>(n0 / kAtomN) * KB * kAtomBytes;
  auto issue_weights = [&](int i) {
    const int kt = kt_begin + i;
    const int64_t grp = kt / p.sub_per_group;
    const uint32_t st = stage(i), bar = full(i);
#pragma unroll
    for (int nb = 0; nb < kBN / kAtomN; ++nb) {
      bulk_g2s(st + C::OFF_W + nb * kKSteps * kAtomBytes,
               bp + (static_cast<int64_t>(nb) * KB + kt * kKSteps) * kAtomBytes, kKSteps * kAtomBytes, bar);
    }
    bulk_g2s(st + C::OFF_S, p.sp + grp * p.Npad + n0, C::S_BYTES, bar);
    bulk_g2s(st + C::OFF_Z, p.zp + grp * p.Npad + n0, C::Z_BYTES, bar);
  };
  if (FUSEQ && wg == 0) {
    // ------------------------------------------------------------ producer, FUSEQ
    static_assert(!FUSEQ || BT * 8 == 128, "FUSEQ: one 16-byte chunk of the X tile per producer thread");
    setmaxnreg_dec<kProducerRegs>();
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BT;
    auto issue_weights_fused = [&](int i) {  // the weights' bytes only: X is written, not copied
      mbar_arrive_expect_tx(full(i), C::TXW_BYTES);
      issue_weights(i);
    };
    const int pre = min(n_kt, C::STAGES);
    if (tid == 0) {
      for (int i = 0; i < pre; ++i) issue_weights_fused(i);  // before the wait: inputs of the op
    }
    grid_dependency_wait();  // X may be the previous kernel's output
    // a_m (docs/ops.md): warp w takes rows w, w + 4, ...; the same arithmetic as
    // quantize_rows_kernel, so the results are bit for bit those of the unfused variants.
    const int warp = tid >> 5;
    for (int r = warp; r < BT; r += 4) {
      const int64_t m = m0 + r;
      RowScale scale = {1.0f, 1.0f};  // rows past M: zero rows (their Y is not stored)
      if (m < p.M) {
        uint32_t amax = 0;  // both modes: static mode needs it to find a NaN in the row
        for (int k = 4 * lane; k < p.K; k += 128) amax = max(amax, abs_max_bits4(load_x4(p, m, k)));
        scale = row_scale(warp_max(amax), p.act_mode, p.act_mode == 1 ? 1.0f : __ldg(p.act_scale));
      }
      if (lane == 0) {
        sts_f32(s_am + 4 * r, scale.a);
        sts_f32(s_inv + 4 * r, scale.inv);
      }
    }
    producer_bar();
    // Each k-tile: thread tid writes row r = tid / 8, 16-byte chunk c = tid % 8 of the X tile
    // (swizzled as the descriptor reads it), all threads fence the async proxy, then one
    // arrives: with the copies' bytes, the stage's full phase completes.
    const int r = tid >> 3, c = tid & 7;
    const float inv = lds_f32(s_inv + 4 * r);
    for (int i = 0; i < n_kt; ++i) {
      if (i >= C::STAGES) mbar_wait(empty(i), parity(i) ^ 1u);
      if (tid == 0 && i >= pre) issue_weights_fused(i);
      uint4 q = make_uint4(0, 0, 0, 0);
      if (m0 + r < p.M) {
        const int k = (kt_begin + i) * kTileK + 16 * c;
        q.x = pack_q4(load_x4(p, m0 + r, k), inv);
        q.y = pack_q4(load_x4(p, m0 + r, k + 4), inv);
        q.z = pack_q4(load_x4(p, m0 + r, k + 8), inv);
        q.w = pack_q4(load_x4(p, m0 + r, k + 12), inv);
      }
      sts128(stage(i) + r * kTileK + ((c ^ (r & 7)) << 4), q);
      fence_proxy_async();
      producer_bar();
      if (tid == 0) mbar_arrive(full(i));
    }
    return;
  } else if (wg == 0) {
    // ------------------------------------------------------------ producer warpgroup
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) {
      const int8_t* xq = p.xq_tiled + static_cast<int64_t>(blockIdx.x) * p.k_tiles * C::X_BYTES;
      // The Xq tile: written by the quantize kernel, BT x 128 bytes contiguous in xq_tiled.
      auto issue_x = [&](int i) {
        bulk_g2s(stage(i), xq + static_cast<int64_t>(kt_begin + i) * C::X_BYTES, C::X_BYTES, full(i));
      };
      // Programmatic dependent launch: the first stages' weights are requested while the
      // quantize kernel may still run; then wait for it and request the activations. Each
      // stage's full barrier expects all its bytes from the start, so it cannot complete early.
      const int pre = min(n_kt, C::STAGES);
      for (int i = 0; i < pre; ++i) {
        mbar_arrive_expect_tx(full(i), C::TX_BYTES);
        issue_weights(i);
      }
      grid_dependency_wait();
      for (int i = 0; i < pre; ++i) issue_x(i);
      for (int i = pre; i < n_kt; ++i) {
        mbar_wait(empty(i), parity(i) ^ 1u);  // the consumers released the stage's previous use
        mbar_arrive_expect_tx(full(i), C::TX_BYTES);
        issue_weights(i);
        issue_x(i);
      }
    }
    // Leave here: code after the if / else would be shared by both roles, and ptxas could
    // then not give the consumers' branch its larger register budget.
    return;
  } else {
    // ------------------------------------------------------------ consumer warpgroups
    setmaxnreg_inc<kConsumerRegs>();
    const int c = wg - 1, w = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    // The thread's two weight rows (accumulator rows 16w + g + 8h of the warpgroup's m64):
    // n = n0 + 64c + 16w + g + 8h. In the atom layout they are words 2(w & 1) + h of lane
    // `lane` in atom column 2c + (w >> 1), so one 8-byte LDS per k-step gives both rows.
    const int row = 64 * c + 16 * w + g;
    const uint32_t w_off = C::OFF_W + ((2 * c + (w >> 1)) * kKSteps) * kAtomBytes + lane * 16 + 8 * (w & 1);

    // A fragments of one k-tile (4 k-steps x 4 registers, the mma.m16n8k32 A layout: a0 row g,
    // k 4t..; a1 row g + 8; a2 row g, k 16 + 4t..; a3 row g + 8, k 16 + 4t..) and the rows' scales.
    auto load_a = [&](uint32_t st, uint32_t (&a)[kKSteps][4], float (&s)[2]) {
      const uint32_t z40 = lds_u8(st + C::OFF_Z + row) * 0x01010101u;
      const uint32_t z41 = lds_u8(st + C::OFF_Z + row + 8) * 0x01010101u;
      s[0] = lds_f32(st + C::OFF_S + 4 * row);
      s[1] = lds_f32(st + C::OFF_S + 4 * (row + 8));
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const uint2 v = lds64(st + w_off + kk * kAtomBytes);
        a[kk][0] = widen_lo(v.x, z40);
        a[kk][1] = widen_lo(v.y, z41);
        a[kk][2] = widen_hi(v.x, z40);
        a[kk][3] = widen_hi(v.y, z41);
      }
    };
    // The 4 wgmmas of one k-tile, B = the stage's Xq tile (k-step kk: +32 bytes, 128B swizzle).
    auto issue = [&](int32_t (&acc)[NACC], uint32_t (&a)[kKSteps][4], uint32_t st) {
#pragma unroll
      for (int r = 0; r < NACC; ++r) reg_fence(acc[r]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) wgmma_rs<NACC>(acc, a[kk], x_desc(st + kk * 32));
      wgmma_commit();
    };
    // After the wgmmas of a stage completed: hand the stage back to the producer.
    auto release = [&](int i) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(i));
    };
    // y += s * (acc - 1.5 * 2^23) and restart acc. Register 4q + 2h + e of m64nBT is weight
    // row 16w + g + 8h, token 8q + 2t + e.
    float facc[NACC];
    auto fold = [&](int32_t (&acc)[NACC], const float (&s)[2]) {
#pragma unroll
      for (int r = 0; r < NACC; ++r) {
        facc[r] = fmaf(__int_as_float(acc[r]) - kMagicF, s[(r >> 1) & 1], facc[r]);
        acc[r] = kMagicI;
      }
    };

    int32_t acc0[NACC], acc1[NACC];
    uint32_t a0[kKSteps][4], a1[kKSteps][4];
    float s0[2], s1[2];
#pragma unroll
    for (int r = 0; r < NACC; ++r) {
      acc0[r] = kMagicI;
      acc1[r] = kMagicI;
      facc[r] = 0.0f;
    }
    if (OVERLAP) {
      // Two accumulator sets: while k-tile i's wgmmas run, k-tile i + 1 is widened and issued
      // into the other set; wait_group 1 then retires only k-tile i, whose fold overlaps the
      // tensor work of i + 1. The A registers of the in-flight k-tile stay untouched until
      // its wait (reg_fence keeps them live that long). Every path waits explicitly before it
      // folds (ptxas would otherwise insert waits and serialize the wgmmas).
      auto retire = [&](int32_t (&acc)[NACC], uint32_t (&a)[kKSteps][4], const float (&s)[2], int i) {
#pragma unroll
        for (int r = 0; r < NACC; ++r) reg_fence(acc[r]);
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
          for (int j = 0; j < 4; ++j) reg_fence(a[kk][j]);
        }
        release(i);
        fold(acc, s);
      };
      auto start = [&](int32_t (&acc)[NACC], uint32_t (&a)[kKSteps][4], float (&s)[2], int i) {
        mbar_wait(full(i), parity(i));
        load_a(stage(i), a, s);
        issue(acc, a, stage(i));
      };
      start(acc0, a0, s0, 0);
      int i = 0;
      for (; i + 2 < n_kt; i += 2) {  // k-tile i in flight in set 0; i + 1 and i + 2 exist
        start(acc1, a1, s1, i + 1);
        wgmma_wait<1>();
        retire(acc0, a0, s0, i);
        start(acc0, a0, s0, i + 2);
        wgmma_wait<1>();
        retire(acc1, a1, s1, i + 1);
      }
      if (i + 1 < n_kt) {  // the last two k-tiles
        start(acc1, a1, s1, i + 1);
        wgmma_wait<1>();
        retire(acc0, a0, s0, i);
        wgmma_wait<0>();
        retire(acc1, a1, s1, i + 1);
      } else {  // the last k-tile
        wgmma_wait<0>();
        retire(acc0, a0, s0, i);
      }
    } else {
      // One accumulator set: wait, widen, wgmma, wait, fold; the two consumer warpgroups
      // overlap each other's folds and wgmmas.
      for (int i = 0; i < n_kt; ++i) {
        mbar_wait(full(i), parity(i));
        load_a(stage(i), a0, s0);
        issue(acc0, a0, stage(i));
        wgmma_wait<0>();
#pragma unroll
        for (int r = 0; r < NACC; ++r) reg_fence(acc0[r]);
        release(i);
        fold(acc0, s0);
      }
    }

    // Epilogue: y[m, n] = a_m * facc (a_m is the quantize kernel's: wait for that grid; or,
    // FUSEQ, the producer's, written before its first "X written" arrival).
    grid_dependency_wait();
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BT;
    const bool split = p.split > 1;
#pragma unroll
    for (int q = 0; q < NACC / 4; ++q) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t m = m0 + 8 * q + 2 * t + e;
        if (m >= p.M) continue;
        const float am = FUSEQ ? lds_f32(s_am + 4 * (8 * q + 2 * t + e)) : p.act[m];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = n0 + row + 8 * h;
          if (n >= p.N) continue;
          const float v = facc[4 * q + 2 * h + e] * am;
          const int64_t off = m * p.N + n;
          if (split) {
            p.partial[static_cast<int64_t>(blockIdx.z) * p.M * p.N + off] = v;
          } else if (p.out_half) {
            store_one(static_cast<__half*>(p.y) + off, v);
          } else {
            store_one(static_cast<float*>(p.y) + off, v);
          }
        }
      }
    }
  }
#else
  (void)p;
#endif  // FPTQ_SM90A_DEVICE
}

template <int BT, bool OVERLAP, bool FUSEQ = false>
cudaError_t launch(const FptqSm90TmaArgs& a, cudaStream_t stream) {
  using C = Cfg<BT>;
  cudaError_t e = cudaFuncSetAttribute(w4a8_tma_kernel<BT, OVERLAP, FUSEQ>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(a.m_tiles), static_cast<unsigned>(a.n_tiles),
                     static_cast<unsigned>(a.split));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = C::SMEM_BYTES;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = a.pdl ? 1 : 0;
  e = cudaLaunchKernelEx(&cfg, w4a8_tma_kernel<BT, OVERLAP, FUSEQ>, a);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

}  // namespace
}  // namespace tma
}  // namespace w4a8cuda
}  // namespace fptq

using namespace fptq::w4a8cuda;

extern "C" int fptq_w4a8_sm90_tma_smem_bytes(int bt) {
  switch (bt) {
    case 128: return tma::Cfg<128>::SMEM_BYTES;
    case 64: return tma::Cfg<64>::SMEM_BYTES;
    case 16: return tma::Cfg<16>::SMEM_BYTES;
    default: return 0;
  }
}

extern "C" cudaError_t fptq_w4a8_sm90_tma_gemm(const FptqSm90TmaArgs* args, cudaStream_t stream) {
  if (args == nullptr || args->K % kTileK != 0 || args->sub_per_group < 1 || args->Npad % kNPadAlign != 0) {
    return cudaErrorInvalidValue;
  }
  cudaError_t e = require_sm90_device();  // sm_90a code runs on sm_90 only
  if (e != cudaSuccess) return e;
  // The compiled (bt, overlap) pairs. With two accumulator sets, 96 / 112 / 128 tokens spill
  // (ptxas, CUDA 13.0, even at 232 registers per consumer thread: C7512), so 128 runs serial.
  if (args->x != nullptr) {  // FUSEQ: 16 tokens, two accumulator sets only
    return args->bt == 16 && args->overlap ? tma::launch<16, true, true>(*args, stream) : cudaErrorNotSupported;
  }
  if (args->bt == 128 && !args->overlap) return tma::launch<128, false>(*args, stream);
  if (args->bt == 64 && args->overlap) return tma::launch<64, true>(*args, stream);
  if (args->bt == 16 && args->overlap) return tma::launch<16, true>(*args, stream);
  return cudaErrorNotSupported;
}
