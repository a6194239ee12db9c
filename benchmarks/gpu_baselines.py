"""Baselines for benchmarks/gpu_gemm.py: the roofline of a W4A8 GEMM on the card, and ONNX
Runtime's own 4-bit GEMM (com.microsoft::MatMulNBits, W4A16) on the CUDA provider.

* ``roofline_us(M, N, K, gs, gpu_name)``: the floor time of one call, max(bytes / bandwidth,
  ops / int8 peak), with bytes = packed weights + scales + zero points + X (float32) + Y
  (float32), each moved once, and the datasheet peaks of the card (dense int8 tensor ops 1979
  TOPS on H100 / H200 SXM; 3.35 TB/s H100 SXM, 4.8 TB/s H200). None for other cards.
* ``MatMulNBitsTimer``: one MatMulNBits node (bits 4, block = group size, uint8 zero points,
  float16 A / scales / Y) in a CUDA-EP session with IOBinding on torch device tensors; its
  ``time_us`` is the median wall time of synchronous runs (ORT's per-run overhead included,
  as a user of ORT sees it). Only when onnxruntime-gpu is importable (device_ort_gpu.sh
  installs it into /tmp/site).
"""
from __future__ import annotations

import time

import numpy as np

# name fragment -> (bytes/s, int8 dense ops/s), datasheet values (leads, not measurements)
PEAKS = {"H200": (4.8e12, 1979e12), "H100": (3.35e12, 1979e12)}


def roofline_us(M: int, N: int, K: int, gs: int, gpu_name: str):
    """(floor in us, 'mem' | 'int8') of one W4A8 call, or None for a card not in PEAKS."""
    peak = next((v for k, v in PEAKS.items() if k in gpu_name), None)
    if peak is None:
        return None
    bw, ops = peak
    nbytes = N * K / 2 + N * (K // gs) * 5 + M * K * 4 + M * N * 4
    t_mem, t_ops = nbytes / bw, 2.0 * M * N * K / ops
    return (max(t_mem, t_ops) * 1e6, "mem" if t_mem >= t_ops else "int8")


def ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class MatMulNBitsTimer:
    """A MatMulNBits (W4A16) session on the CUDA EP for one K x N weight."""

    def __init__(self, K: int, N: int, gs: int, rng):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        blocks = K // gs
        b = rng.integers(0, 256, (N, blocks, gs // 2), dtype=np.uint8)
        scales = (rng.random(N * blocks, dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
        zp = rng.integers(0, 256, N * ((blocks + 1) // 2), dtype=np.uint8)  # two 4-bit zero points a byte
        node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=gs)
        graph = helper.make_graph(
            [node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["M", K])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, ["M", N])],
            [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales"),
             numpy_helper.from_array(zp, "zero_points")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                                  ir_version=10)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
        self.N = N

    def time_us(self, torch, x16, iters: int = 50, warmup: int = 5) -> float:
        M, K = x16.shape
        y16 = torch.empty(M, self.N, dtype=torch.float16, device=x16.device)
        binding = self.session.io_binding()
        binding.bind_input("A", "cuda", 0, np.float16, [M, K], x16.data_ptr())
        binding.bind_output("Y", "cuda", 0, np.float16, [M, self.N], y16.data_ptr())
        torch.cuda.synchronize()
        for _ in range(warmup):
            self.session.run_with_iobinding(binding)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.session.run_with_iobinding(binding)  # synchronizes its stream before returning
            times.append((time.perf_counter() - t0) * 1e6)
        times.sort()
        return times[len(times) // 2]
