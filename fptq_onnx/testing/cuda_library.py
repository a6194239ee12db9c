"""The standalone W4A8 CUDA library (``libfptq_cuda_standalone.so``) through ctypes, and an emulated
stand-in that runs its GPU entry points on the CPU.

``benchmarks/build_cuda_standalone.sh`` builds the library: the launchers of ``custom_ops/w4a8_cuda.h``
exported as they are (the op library ``libfptq_ops.so`` hides them), no ONNX Runtime.
:class:`EmulatedLibrary` answers the same calls with the numpy emulations on host memory, so the
GPU correctness suite (:mod:`.cuda_correctness`) and the timing script can be run on a machine
without a GPU (the library's host-only functions, such as the planner, are the real ones).
"""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np

from . import cuda_emulation as emu
from . import cuda_emulation_tma as emu_tma
from . import cuda_sources

REPO = cuda_sources.CHECKOUT
STANDALONE_LIBRARY = REPO / "build" / "cuda_standalone" / "libfptq_cuda_standalone.so"
BUILD_SCRIPT = REPO / "benchmarks" / "build_cuda_standalone.sh"

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue
CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported: the variant cannot run this call
DTYPE_FLOAT32 = cuda_sources.defines("w4a8_cuda.h")["FPTQ_DTYPE_FLOAT32"]
DTYPE_FLOAT16 = cuda_sources.defines("w4a8_cuda.h")["FPTQ_DTYPE_FLOAT16"]
PLAN_FIELDS = ("cfg", "split", "tiles_per_split", "k_tiles", "m_tiles", "n_tiles", "smem", "occupancy")


def build_library(path: Path) -> None:
    """Runs the build script into ``path``'s folder (nvcc; a few minutes)."""
    subprocess.run(["bash", str(BUILD_SCRIPT), str(Path(path).parent)], check=True)


def load_library(path: Path):
    """The library at ``path`` with the ctypes signatures of w4a8_cuda.h."""
    lib = ctypes.CDLL(str(path))
    c_int, c_i64, p_sz, vp = ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p
    signatures = {
        "fptq_w4a8_packed_size": [c_int, c_int, c_int, p_sz],
        "fptq_w4a8_repack_cuda": [vp, vp, vp, c_int, c_int, c_int, vp, vp],
        "fptq_w4a8_workspace_size": [c_i64, c_int, c_int, c_int, p_sz],
        "fptq_w4a8_matmul_cuda": [vp, c_int, c_i64, c_int, c_int, c_int, c_int, vp, vp, vp, ctypes.c_size_t, vp, vp],
        "fptq_w4a8_plan_info": [c_i64, c_int, c_int, c_int, c_int, c_int, ctypes.POINTER(c_i64), p_sz],
        "fptq_w4a8_workspace_size_variant": [c_i64, c_int, c_int, c_int, c_int, p_sz],
        "fptq_w4a8_matmul_cuda_variant": [vp, c_int, c_i64, c_int, c_int, c_int, c_int, vp, vp, vp, ctypes.c_size_t,
                                          vp, c_int, vp],
        "fptq_w4a8_plan_info_variant": [c_i64, c_int, c_int, c_int, c_int, c_int, c_int, ctypes.POINTER(c_i64), p_sz],
        "fptq_w4a8_variant_info": [c_int, c_int, c_int],
        "fptq_w4a8_sm90_linked": [],
        "fptq_w4a8_resolve_variant": [c_i64, c_int, c_int],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, c_int
    return lib


def packed_size(lib, N: int, K: int, gs: int) -> int:
    out = ctypes.c_size_t()
    rc = lib.fptq_w4a8_packed_size(N, K, gs, ctypes.byref(out))
    if rc:
        raise RuntimeError(f"fptq_w4a8_packed_size({N}, {K}, {gs}) -> {rc}")
    return out.value


def plan_info(lib, M: int, N: int, K: int, gs: int, sms: int, smem_per_sm: int,
              variant: int = cuda_sources.AUTO) -> dict:
    """fptq_w4a8_plan_info_variant as ``{cfg, split, ..., occupancy, workspace}``."""
    out = (ctypes.c_int64 * len(PLAN_FIELDS))()
    workspace = ctypes.c_size_t()
    rc = lib.fptq_w4a8_plan_info_variant(M, N, K, gs, sms, smem_per_sm, variant, out, ctypes.byref(workspace))
    if rc:
        raise RuntimeError(f"fptq_w4a8_plan_info_variant({M}, {N}, {K}, {gs}, variant {variant}) -> {rc}")
    return dict(zip(PLAN_FIELDS, list(out)), workspace=workspace.value)


class Device:
    """Where the suite's tensors live and how it waits: the CUDA device, or host memory for
    :class:`EmulatedLibrary` (``emulated``)."""

    def __init__(self, torch, emulated: bool):
        self.torch = torch
        self.emulated = emulated
        self.dev = torch.device("cpu" if emulated else "cuda")

    def stream(self) -> int:
        return 0 if self.emulated else self.torch.cuda.current_stream().cuda_stream

    def sync(self) -> None:
        if not self.emulated:
            self.torch.cuda.synchronize()

    def compute_capability(self) -> int:
        """major * 10 + minor; the emulated library plays an sm_90 device."""
        if self.emulated:
            return 90
        props = self.torch.cuda.get_device_properties(0)
        return props.major * 10 + props.minor


class EmulatedLibrary:
    """The library's GPU entry points emulated on host memory (an sm_90 device with the sm_90a
    kernel linked), its host-only ones passed through."""

    SMS, SMEM_PER_SM = 132, 233472

    def __init__(self, real):
        self.real = real
        for name in ("fptq_w4a8_packed_size", "fptq_w4a8_plan_info", "fptq_w4a8_plan_info_variant",
                     "fptq_w4a8_variant_info", "fptq_w4a8_resolve_variant"):
            setattr(self, name, getattr(real, name))

    def fptq_w4a8_sm90_linked(self) -> int:
        return 1

    def _variant(self, M: int, gs: int, variant: int):
        """The variant that runs the call, or None when it does not support it."""
        if variant == cuda_sources.AUTO:
            return self.real.fptq_w4a8_resolve_variant(M, gs, 90)
        if cuda_sources.variants()[variant].kernel != "mma" and gs % emu.TILE_K:
            return None
        return variant

    def fptq_w4a8_workspace_size_variant(self, M, N, K, gs, variant, out):
        v = self._variant(M, gs, variant)
        if v is None:
            return CUDA_ERROR_NOT_SUPPORTED
        out._obj.value = plan_info(self.real, M, N, K, gs, self.SMS, self.SMEM_PER_SM, v)["workspace"] if M else 0
        return CUDA_SUCCESS

    def fptq_w4a8_workspace_size(self, M, N, K, gs, out):
        return self.fptq_w4a8_workspace_size_variant(M, N, K, gs, cuda_sources.AUTO, out)

    def fptq_w4a8_repack_cuda(self, pB, ps, pz, N, K, gs, packed, stream):
        G = K // gs
        B = np.frombuffer(ctypes.string_at(pB, N * K // 2), np.uint8).reshape(N, K // 2)
        sc = np.frombuffer(ctypes.string_at(ps, N * G * 4), np.float32).reshape(N, G)
        zp = np.frombuffer(ctypes.string_at(pz, N * G), np.uint8).reshape(N, G)
        buf = emu.emu_repack(B, sc, zp, N, K, gs)
        ctypes.memmove(packed, buf.ctypes.data, buf.size)
        return CUDA_SUCCESS

    def fptq_w4a8_matmul_cuda_variant(self, X, dtype, M, N, K, gs, act_mode, pa, packed, ws, ws_bytes, Y, variant,
                                      stream):
        if M == 0:
            return CUDA_SUCCESS
        v = self._variant(M, gs, variant)
        if v is None:
            return CUDA_ERROR_NOT_SUPPORTED
        p = plan_info(self.real, M, N, K, gs, self.SMS, self.SMEM_PER_SM, v)
        if ws_bytes < p["workspace"]:
            return CUDA_ERROR_INVALID_VALUE
        ctypes.memset(ws, 0x77, p["workspace"])  # the workspace is the kernel's to scribble on
        npdt = np.float16 if dtype == DTYPE_FLOAT16 else np.float32
        x = np.frombuffer(ctypes.string_at(X, M * K * np.dtype(npdt).itemsize), npdt).reshape(M, K).astype(np.float32)
        act_scale = float(np.frombuffer(ctypes.string_at(pa, 4), np.float32)[0])
        lay = emu.packed_layout(N, K, gs)
        pk = np.frombuffer(ctypes.string_at(packed, lay["total"]), np.uint8)
        sg = emu.sub_group_size(gs)
        Mp = emu.ceil_div(M, 4) * 4
        xq, act, rowsum = emu.emu_quantize(x, act_mode, act_scale, sg, Mp)
        info, half = cuda_sources.variants()[v], dtype == DTYPE_FLOAT16
        if info.kernel == "tma":
            fused = (x, act_mode, act_scale) if "fused_quant" in info.flags else None
            y = emu_tma.emu_gemm_tma(info.rows, p["split"], xq, act, pk, lay, M, N, K, gs, out_half=half, fused=fused)
        else:
            y = emu.emu_gemm(cuda_sources.mma_tile(p["cfg"], sg), p["split"], xq, act, rowsum, pk, M, N, K, gs, Mp,
                             out_half=half)
        y = np.ascontiguousarray(y)
        ctypes.memmove(Y, y.ctypes.data, y.nbytes)
        return CUDA_SUCCESS

    def fptq_w4a8_matmul_cuda(self, X, dtype, M, N, K, gs, act_mode, pa, packed, ws, ws_bytes, Y, stream):
        return self.fptq_w4a8_matmul_cuda_variant(X, dtype, M, N, K, gs, act_mode, pa, packed, ws, ws_bytes, Y,
                                                  cuda_sources.AUTO, stream)
