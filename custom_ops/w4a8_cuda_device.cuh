// Device helpers shared by the W4A8 CUDA kernels (w4a8_cuda.cu: sm_80+ mma.sync;
// w4a8_cuda_sm90_tma.cu: sm_90a wgmma). Small PTX wrappers only; each says why it exists.
// Include from .cu files only (nvcc), after <cuda_fp16.h>.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace fptq {
namespace w4a8cuda {

// A function issuing one PTX instruction without operands, and one whose only operand is the
// template constant N (the wait instructions). The "memory" clobber keeps the compiler from
// moving loads and stores across it: each orders memory or asynchronous work.
#define FPTQ_PTX_ORDERING(name, ptx) \
  __device__ __forceinline__ void name() { asm volatile(ptx ";\n" ::: "memory"); }
#define FPTQ_PTX_WAIT_N(name, ptx) \
  template <int N>                 \
  __device__ __forceinline__ void name() { asm volatile(ptx " %0;\n" ::"n"(N) : "memory"); }

// Shared-memory (.shared window) address of a generic pointer, for PTX operands that take a
// 32-bit shared address (cp.async, ldmatrix, mbarrier, bulk copies).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (each byte is used once per block). When
// `valid` is false it reads nothing and zero-fills the 16 bytes (src-size 0): out-of-range
// rows, k-steps and sub-groups then contribute exact zeros, with no branch in the math.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16(smem_u32(smem), gmem, valid);
}

FPTQ_PTX_ORDERING(cp_async_commit, "cp.async.commit_group")
// Waits until at most N of this thread's cp.async groups are still in flight.
FPTQ_PTX_WAIT_N(cp_async_wait, "cp.async.wait_group")

// Programmatic dependent launch (sm_90+; no-ops before, and when not launched as a dependent).
// wait: blocks until the preceding grid has completed and its writes are visible.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// launch_dependents: lets the next (programmatic-dependent) grid start launching now.
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Stores Y[row, n] = v0 and Y[row, n + 1] = v1 where they exist (n is even; N may be odd).
// vec: row + n is 8-byte (float) / 4-byte (half) aligned whenever n + 1 < N.
__device__ __forceinline__ void store_pair(float* row, int n, int N, float v0, float v1,
                                           bool vec) {
  if (n + 1 < N) {
    if (vec) {
      *reinterpret_cast<float2*>(row + n) = make_float2(v0, v1);
    } else {
      row[n] = v0;
      row[n + 1] = v1;
    }
  } else if (n < N) {
    row[n] = v0;
  }
}

__device__ __forceinline__ void store_pair(__half* row, int n, int N, float v0, float v1,
                                           bool vec) {
  if (n + 1 < N) {
    if (vec) {
      *reinterpret_cast<__half2*>(row + n) = __floats2half2_rn(v0, v1);
    } else {
      row[n] = __float2half_rn(v0);
      row[n + 1] = __float2half_rn(v1);
    }
  } else if (n < N) {
    row[n] = __float2half_rn(v0);
  }
}

// q = clip(rint(x * inv), -127, 127); __float2int_rn rounds half to even and saturates.
__device__ __forceinline__ int quantize_one(float x, float inv) {
  const int q = __float2int_rn(x * inv);
  return max(-127, min(127, q));
}

// a_m, docs/ops.md step 2 and "NaN and Inf", the arithmetic of the CPU kernel
// (w4a8_cpu_tile.h: abs_max_bits, token_scale, quantize_rows) so that both give the same rows.
// The row max is taken over |x| as bits (sign cleared): for non-negative floats the integer
// order is the float order, and NaNs sort above +Inf. fmaxf cannot be used: it drops NaN, and a
// NaN row would quietly get the scale of its other elements.
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t abs_max_bits4(float4 v) {
  return max(max(abs_bits(v.x), abs_bits(v.y)), max(abs_bits(v.z), abs_bits(v.w)));
}

// max over the 32 lanes of a warp, every lane gets it
__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

struct RowScale {
  float a;    // a_m as the epilogue multiplies it: NaN for a poisoned row, so its Y row is NaN
  float inv;  // 1 / a_m that quantizes the row
};

// amax_bits: the row's abs_max_bits; static_scale: the op's act_scale (act_mode 0).
// Dynamic: a_m = max|x| / 127, or 1 below 2^-126 (a zero row, or one whose 1 / a_m overflows).
// Poisoned (Y row all NaN): a NaN in the row (either mode), or an infinite dynamic a_m; static
// mode saturates an Inf to +-127 like any large element.
__device__ __forceinline__ RowScale row_scale(uint32_t amax_bits, int act_mode, float static_scale) {
  constexpr uint32_t kInfBits = 0x7f800000u;
  constexpr float kMinTokenScale = 1.17549435e-38f;  // 2^-126, the smallest normal float32
  constexpr float kFloatMax = 3.40282347e+38f;
  float scale = static_scale;
  if (act_mode == 1) {
    scale = __uint_as_float(amax_bits) / 127.0f;
    if (scale < kMinTokenScale) scale = 1.0f;
  }
  const bool poisoned = amax_bits > kInfBits || !(scale <= kFloatMax);
  return {poisoned ? __uint_as_float(0x7fc00000u) : scale, 1.0f / scale};
}

// Four consecutive elements as floats. vec: the address is 16-byte (float) / 8-byte (half)
// aligned, so one vector load does.
__device__ __forceinline__ float4 load4(const float* x, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const float4*>(x));
  return make_float4(__ldg(x), __ldg(x + 1), __ldg(x + 2), __ldg(x + 3));
}

__device__ __forceinline__ float4 load4(const __half* x, bool vec) {
  if (vec) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(x));
    const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  }
  return make_float4(__half2float(x[0]), __half2float(x[1]), __half2float(x[2]),
                     __half2float(x[3]));
}

// One output element, float32 or float16 (rounded to nearest even).
__device__ __forceinline__ void store_one(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_one(__half* p, float v) { *p = __float2half_rn(v); }

// ---- mbarriers (sm_90): the pipelines' stage handshakes ----------------------------------

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the async proxy (bulk copies complete on them).
FPTQ_PTX_ORDERING(mbar_fence_init, "fence.mbarrier_init.release.cluster")
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.release.cta.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
      : "memory");
}
// Arrives and announces `bytes` of bulk-copy data that will complete on this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.release.cta.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}
__device__ __forceinline__ uint32_t mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done;
}
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Waits for the phase of parity `parity` to complete. Watchdog: a wait of more than ~4 s can
// only be a pipeline bug; the kernel traps (a launch error) instead of hanging the device.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = global_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_ns() - t0 > 4000000000ull) __trap();
  }
}

// ---- explicit shared-memory accesses (addresses computed as integers, so plain pointers
// would compile to generic loads/stores) ------------------------------------------------------
__device__ __forceinline__ uint2 lds64(uint32_t a) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(a));
  return v;
}
__device__ __forceinline__ uint32_t lds_u8(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ float lds_f32(uint32_t a) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ void sts_f32(uint32_t a, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(a), "f"(v) : "memory");
}
__device__ __forceinline__ void sts128(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// ---- wgmma ordering (sm_90a) ------------------------------------------------------------
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Orders this thread's register / shared-memory writes before the following wgmmas read them.
FPTQ_PTX_ORDERING(wgmma_fence, "wgmma.fence.sync.aligned")
FPTQ_PTX_ORDERING(wgmma_commit, "wgmma.commit_group.sync.aligned")
// Waits until at most N committed wgmma groups of this warpgroup are still in flight.
FPTQ_PTX_WAIT_N(wgmma_wait, "wgmma.wait_group.sync.aligned")
// Shared memory written by ordinary stores that the async proxy (wgmma, bulk copies) reads next.
FPTQ_PTX_ORDERING(fence_proxy_async, "fence.proxy.async.shared::cta")
#endif

// Keeps the compiler from moving accumulator accesses across the wgmma fences.
__device__ __forceinline__ void reg_fence(int32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void reg_fence(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// Host: cudaSuccess if the current device is sm_90 (the only one that runs sm_90a code),
// cudaErrorNotSupported if it is another GPU, or the CUDA error of asking.
inline cudaError_t require_sm90_device() {
  int dev = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e != cudaSuccess) return e;
  return major == 9 && minor == 0 ? cudaSuccess : cudaErrorNotSupported;
}

#undef FPTQ_PTX_ORDERING
#undef FPTQ_PTX_WAIT_N

}  // namespace w4a8cuda
}  // namespace fptq
