"""The GPU correctness suite of the W4A8 CUDA kernels: every variant on many shapes against the
float64 reference, through the standalone library (:mod:`.cuda_library`).

Each case gets fresh random data (every nibble value, zero points across [0, 15], outliers in X, an
all-zero row, a static scale that saturates some activations), NaN-poisoned outputs, guard bytes
after every device buffer and a second run compared bit for bit. Cases: M in {0, 1, 3, 16, 17, 64,
65, 257, ...}, odd N (37, 4097), K tails, group sizes 32/64/128/256, both activation modes,
symmetric and asymmetric weights, float16, unaligned X and Y, rows with NaN / Inf / subnormal
values (docs/ops.md, "NaN and Inf").

A variant's first device runs happen in a child process (:func:`run_probes`), so that one that
faults (an illegal instruction or address, a watchdog trap) cannot take the CUDA context of the
suite down with it. ``tests/test_cuda_gpu.py`` runs the suite (``pytest -m gpu``);
``benchmarks/gpu_gemm.py`` runs the quick cases to decide which variants it times.

    python -m fptq_onnx.testing.cuda_correctness --lib LIB --probe 3,16   # the child of run_probes
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fptq_onnx import quant

from . import cuda_library, cuda_sources

GUARD = 4096  # bytes after every device buffer that must stay untouched


class Case(NamedTuple):
    """One shape; ``dtype`` is float32 / float16, with the suffix ``u``: X and Y one element off
    their allocation's alignment (the scalar load/store paths), ``s``: rows holding NaN, Inf and
    subnormal values (float32 only)."""

    M: int
    N: int
    K: int
    group_size: int
    act_mode: int
    symmetric: bool
    dtype: str

    @property
    def name(self) -> str:
        return (f"M={self.M} N={self.N} K={self.K} gs={self.group_size} mode={self.act_mode} "
                f"sym={int(self.symmetric)} {self.dtype}")


def correctness_cases(quick: bool = False) -> list[Case]:
    """The suite's cases: 129, or 59 with ``quick`` (a third of the small shapes, half of the large ones)."""
    cases = []
    i = 0
    for M in (0, 1, 3, 16, 17, 64, 65, 257):  # small N and K: every gs x mode x sym
        for gs in (32, 64, 128):
            for act_mode in (0, 1):
                for sym in (True, False):
                    i += 1
                    if not quick or i % 3 == 0:
                        cases.append(Case(M, 37, 128, gs, act_mode, sym, "float32"))
    # Large K, odd and large N; cycle the other parameters.
    big = [(1, 4097), (3, 4097), (16, 4097), (17, 4097), (64, 4097), (65, 4097), (257, 4097),
           (1, 37), (16, 256), (17, 37), (257, 37), (1024, 4096)]
    for i, (M, N) in enumerate(big):
        if not quick or i % 2 == 0:
            cases.append(Case(M, N, 4096, (32, 64, 128)[i % 3], i % 2, bool((i // 2) % 2), "float32"))
    # K tails (K not a multiple of 128), group 256, float16, an M that is not a multiple of 4,
    # unaligned X and Y (u), NaN / Inf / subnormal rows (s); then for the Hopper kernels (group
    # sizes multiple of 128): m/n tails, split-K, several k-tiles, float16 output, many blocks.
    cases += case_table("""
          5   130   96   32  1  asym  float32
         33    61  448   64  0  asym  float32
        129   257  160   32  1  sym   float32
          7  4097 4096  256  1  asym  float32
        300   600 1024  256  0  asym  float32
          2    37  128   32  1  asym  float16
         17  4097 4096  128  1  asym  float16
        257  1000  512   64  0  sym   float16
          3    37  128   32  1  asym  float32u
         17    64  256   64  0  sym   float32u
         70  4097 4096  128  1  asym  float32u
          5    38  128  128  1  asym  float16u
          6    37  128   32  0  asym  float32s
          6    37  128   32  1  asym  float32s
          6   300 1024  128  0  asym  float32s
         70   300 1024  128  1  asym  float32s
        129   300 1024  128  1  asym  float32
        200  4097 4096  256  0  sym   float32
         63  1000 2048  128  1  asym  float16
       1000   520 1536  128  1  asym  float32
       2048  2048 1024  128  1  asym  float32
    """)
    return cases


def case_table(text: str) -> list[Case]:
    """Cases from a table of lines ``M N K group_size act_mode symmetric dtype``."""
    cases = []
    for line in text.strip().splitlines():
        M, N, K, gs, mode, sym, dtype = line.split()
        cases.append(Case(int(M), int(N), int(K), int(gs), int(mode), sym == "sym", dtype))
    return cases


# Small, every path (tails, split-K, both group-size families): for compute-sanitizer.
SANITIZE_CASES = case_table("""
      3   37  256   64  1  asym  float32
     17  130  512  128  1  asym  float32
     65  200 1024  128  0  sym   float32
    130  257  384  256  1  asym  float16
      1  300 2048  128  1  asym  float32
""")

# A variant's first device runs, in a child process (run_probes): the small cases with group sizes
# the Hopper kernel takes, and one with many blocks (split-K).
PROBE_CASES = [c for c in SANITIZE_CASES if c.group_size % 128 == 0] + [Case(300, 4096, 2048, 128, 1, False, "float32")]

# Small enough for cuda_library.EmulatedLibrary.
EMULATED_CASES = case_table("""
      0   37  128   32  1  asym  float32
      1   37  256   64  1  asym  float32
      3   37  128  128  0  sym   float32
     17   37  160   32  0  asym  float32
     65   40  128  128  1  asym  float32
      2   37  128   32  1  asym  float16
      3   37  128   32  1  asym  float32u
      5   38  128  128  1  asym  float16u
      6   37  128   32  0  asym  float32s
      6   37  128  128  1  asym  float32s
""")


def random_problem(rng, M, N, K, gs, sym, act_mode, dtype=np.float32):
    """``(x, B, scales, zero_points, act_scale)``: every nibble value, zero points across [0, 15],
    outliers in X, an all-zero row (a_m = 1 in the dynamic mode), and a static scale that makes
    some activations saturate."""
    G = K // gs
    u = rng.integers(0, 16, (N, K), dtype=np.uint8)
    zp = np.full((N, G), 8, np.uint8) if sym else rng.integers(0, 16, (N, G), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, (N, G)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    if M and K >= 8:
        x[rng.integers(0, M, 3), rng.integers(0, K, 3)] *= 20.0  # outliers
    if M > 2:
        x[1] = 0.0
    x = x.astype(dtype)
    amax = float(np.abs(x.astype(np.float32)).max()) if x.size else 1.0
    act_scale = float(np.float32(max(amax, 1e-3) / 127.0 * 0.5))
    return x, quant.pack_int4(u), scales, zp, act_scale


@functools.cache
def case_problem(case: Case):
    """``(x, B, scales, zero_points, act_scale, reference)`` of ``case``, the same for every
    variant (seeded by the case)."""
    rng = np.random.default_rng([*case[:6], zlib.crc32(case.dtype.encode())])
    half = case.dtype.startswith("float16")
    x, B, scales, zp, act_scale = random_problem(rng, case.M, case.N, case.K, case.group_size, case.symmetric,
                                                 case.act_mode, np.float16 if half else np.float32)
    if case.dtype.endswith("s"):  # a NaN row, an Inf row, a subnormal row
        x[0, 5], x[2, 7], x[3] = np.nan, np.inf, x[3] * np.float32(1e-39)
    ref = quant.w4a8_matmul_reference(x.astype(np.float32), B, scales, zp, act_scale, case.act_mode)
    return x, B, scales, zp, act_scale, ref


@dataclass
class VariantReport:
    """A variant's results over the cases: counts, and one line per failed case."""

    passed: int = 0
    failed: int = 0
    not_applicable: int = 0
    failures: list = field(default_factory=list)


def run_case(lib, device: cuda_library.Device, case: Case, variant: int) -> tuple[str, str]:
    """``(status, detail)``: status "ok", "FAIL" or "n/a" (the variant does not support the case),
    detail the relative error or what went wrong. Raises only on setup errors."""
    torch = device.torch
    half = case.dtype.startswith("float16")
    off = 1 if case.dtype.endswith("u") else 0  # elements X and Y are moved off alignment
    M, N, K, gs = case.M, case.N, case.K, case.group_size
    x, B, scales, zp, act_scale, ref = case_problem(case)
    ws_size = ctypes.c_size_t()
    rc = lib.fptq_w4a8_workspace_size_variant(M, N, K, gs, variant, ctypes.byref(ws_size))
    if rc == cuda_library.CUDA_ERROR_NOT_SUPPORTED:
        return "n/a", ""
    if rc:
        return "FAIL", f"workspace_size -> cudaError {rc}"

    def guarded(nbytes, fill):
        return torch.full((nbytes + GUARD,), fill, dtype=torch.uint8, device=device.dev)

    pk_bytes = cuda_library.packed_size(lib, N, K, gs)
    packed = guarded(pk_bytes, 0x5A)
    d_B, d_s, d_z = (torch.from_numpy(a).to(device.dev) for a in (B, scales, zp))
    rc = lib.fptq_w4a8_repack_cuda(d_B.data_ptr(), d_s.data_ptr(), d_z.data_ptr(), N, K, gs, packed.data_ptr(),
                                   device.stream())
    if rc:
        return "FAIL", f"repack -> cudaError {rc}"
    tdt, elem = (torch.float16, 2) if half else (torch.float32, 4)
    x_buf = torch.empty(M * K + 8, dtype=tdt, device=device.dev)
    d_x = x_buf[off: off + M * K]
    d_x.copy_(torch.from_numpy(x.reshape(-1)))
    d_a = torch.tensor([act_scale], dtype=torch.float32, device=device.dev)
    y0 = off * elem  # byte offset of Y in its buffer
    ws = guarded(ws_size.value, 0xA5)
    y_buf = guarded(y0 + M * N * elem, 0x3C)
    y_view = y_buf[y0: y0 + M * N * elem].view(tdt)
    outs = []
    for _ in range(2):  # the second run must give the same bits
        y_view.fill_(float("nan"))
        rc = lib.fptq_w4a8_matmul_cuda_variant(
            d_x.data_ptr() if M else None, cuda_library.DTYPE_FLOAT16 if half else cuda_library.DTYPE_FLOAT32,
            M, N, K, gs, case.act_mode, d_a.data_ptr(), packed.data_ptr(), ws.data_ptr(), ws_size.value,
            y_buf.data_ptr() + y0, variant, device.stream())
        if rc:
            return "FAIL", f"matmul -> cudaError {rc}"
        device.sync()
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
    expected_nan = np.isnan(ref)  # rows the NaN policy poisons (quant.poisoned_rows)
    if not np.array_equal(np.isnan(y), expected_nan):
        problems.append(f"NaN outputs {int(np.isnan(y).sum())}, the policy's {int(expected_nan.sum())}")
    if not np.all(np.isfinite(y[~expected_nan])):
        problems.append(f"{int(np.sum(~np.isfinite(y[~expected_nan])))} non-finite outputs (unwritten?)")
    scale = float(np.nanmax(np.abs(ref), initial=0.0)) if ref.size else 0.0
    err = float(np.max(np.abs(y - ref)[~expected_nan])) if (~expected_nan).any() else 0.0
    rtol = 2e-3 if half else 1e-4
    if err > rtol * max(scale, 1e-30):
        problems.append(f"max|err| {err:.3g} > {rtol:g} * max|ref| {scale:.3g}")
    detail = f"max|err|/max|ref| {err / max(scale, 1e-30):.1e}"
    return ("FAIL", f"{detail}: {'; '.join(problems)}") if problems else ("ok", detail)


def check_variant(lib, device: cuda_library.Device, cases, variant: int, log=print) -> VariantReport:
    """Every case of ``cases`` on ``variant``; one log line per case."""
    report = VariantReport()
    name = cuda_sources.variant_name(variant)
    for index, case in enumerate(cases):
        t0 = time.time()
        try:
            status, detail = run_case(lib, device, case, variant)
        except Exception as error:  # noqa: BLE001 - a setup error fails the case, the rest still run
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        log(f"{status:4s} {name} [{index + 1}/{len(cases)}] {case.name} ({time.time() - t0:.2f}s) {detail}")
        if status == "n/a":
            report.not_applicable += 1
        elif status == "ok":
            report.passed += 1
        else:
            report.failed += 1
            report.failures.append(f"{case.name}: {detail}")
    return report


def probed_variants(lib, compute_capability: int) -> list[int]:
    """The variants whose first device runs belong in a child process: the ones this device runs
    that use sm_90 features (wgmma, bulk copies, programmatic dependent launch)."""
    return [v for v, info in cuda_sources.variants().items()
            if info.on_hopper_only and lib.fptq_w4a8_variant_info(v, compute_capability, 128) == 1]


def run_probes(lib_path: Path, variants, timeout_s: float = 60.0, log=print, emulated: bool = False) -> dict:
    """Runs PROBE_CASES for each variant in child processes. Returns variant -> 'ok' | 'n/a' |
    'FAIL ...'. A child that dies is restarted on the variants it did not report. ``emulated``:
    the children use cuda_library.EmulatedLibrary (no GPU; tests this function)."""
    result: dict = {}
    todo = list(variants)
    while todo:
        cmd = [sys.executable, "-m", __name__, "--lib", str(lib_path), "--probe", ",".join(map(str, todo)),
               *(["--emulated"] if emulated else [])]
        t0 = time.time()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cuda_library.REPO)
            out, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as error:
            out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
            rc = "timeout"
        reported = {}
        for line in out.splitlines():
            if line.startswith("PROBE "):
                _, v, verdict = line.split(" ", 2)
                reported[int(v)] = verdict
        result.update(reported)
        rest = [v for v in todo if v not in reported]
        last = list(reported.values())[-1] if reported else None
        deliberate = rc == 3 and last is not None and last.startswith("FAIL")  # exited after a FAIL verdict
        if rest and not deliberate:  # the child died (crash, timeout) on rest[0]
            result[rest[0]] = f"FAIL (child process ended: rc={rc}); last output: " + " | ".join(out.splitlines()[-4:])
            rest = rest[1:]
        log(f"probe child ({time.time() - t0:.0f}s, rc={rc}): "
            + ", ".join(f"{cuda_sources.variant_name(v)}: {verdict}" for v, verdict in reported.items()))
        todo = rest
    return result


def _probe(lib_path: Path, variants, emulated: bool) -> int:
    """Child of run_probes: PROBE_CASES per variant, one verdict line each; exits with 3 right
    after a failure (the CUDA context may be broken: the parent restarts on the rest)."""
    import torch

    lib = cuda_library.load_library(lib_path)
    device = cuda_library.Device(torch, emulated=emulated)
    cases = EMULATED_CASES if emulated else PROBE_CASES
    if emulated:
        lib = cuda_library.EmulatedLibrary(lib)
    for v in variants:
        try:
            report = check_variant(lib, device, cases, v, log=lambda line: None)
            device.sync()
            if report.failed:
                verdict = f"FAIL ({report.failed} of {report.passed + report.failed} cases: {report.failures[0]})"
            else:
                verdict = "ok" if report.passed else "n/a"
        except Exception as error:  # noqa: BLE001
            verdict = f"FAIL ({error})"
        print(f"PROBE {v} {verdict}", flush=True)
        if verdict.startswith("FAIL"):
            os._exit(3)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the child process of run_probes")
    parser.add_argument("--lib", type=Path, required=True)
    parser.add_argument("--probe", required=True, help="comma-separated variant ids")
    parser.add_argument("--emulated", action="store_true", help="through cuda_library.EmulatedLibrary (no GPU)")
    args = parser.parse_args()
    sys.exit(_probe(args.lib, [int(v) for v in args.probe.split(",")], args.emulated))
