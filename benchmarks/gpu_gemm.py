#!/usr/bin/env python3
"""Speed of the W4A8 CUDA kernel variants (custom_ops/w4a8_cuda*.cu) against torch float16 matmul
(cuBLAS), without ONNX Runtime: the standalone library (benchmarks/build_cuda_standalone.sh)
through ctypes, driven with torch CUDA tensors.

CUDA events, median of --iters after warm-up, weights rotated through more memory than L2 holds;
beside each point the roofline floor and, where onnxruntime-gpu is importable, ONNX Runtime's
MatMulNBits (gpu_baselines.py). The tables at the end: speedup per variant, the best usable
variant per point, the geometric mean per M bucket and the ``kSm90AutoVariant`` line to paste.

Correctness is the suite's (``pytest -m gpu tests/test_cuda_gpu.py``); before timing, this
script runs the suite's probes (child processes) and quick cases (fptq_onnx.testing.cuda_correctness)
so that it times only variants that run correctly here: a wrong kernel's time means nothing, and
it may fault.

Exit status: 0 timed, 1 a failure (the default path incorrect, or a timing error), 2 no CUDA device.

    python3 benchmarks/gpu_gemm.py [--lib PATH] [--quick] [--variants auto,16,17] [--json PATH]
    python3 benchmarks/gpu_gemm.py --self-test     # this script on the CPU, through the emulated library
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # fptq_onnx from this checkout, as the tests import it

import gpu_baselines  # noqa: E402  (roofline, ORT MatMulNBits on CUDA; beside this file)
from fptq_onnx.testing import cuda_correctness  # noqa: E402
from fptq_onnx.testing.cuda_library import (CUDA_ERROR_NOT_SUPPORTED, DTYPE_FLOAT32, STANDALONE_LIBRARY,  # noqa: E402
                                            Device, EmulatedLibrary, build_library, load_library, packed_size,
                                            plan_info)
from fptq_onnx.testing.cuda_emulation import ceil_div  # noqa: E402
from fptq_onnx.testing.cuda_sources import AUTO, parse_variant_list, variant_name  # noqa: E402


def log(*args) -> None:
    print(*args, flush=True)


def failed(what: str) -> int:
    """Logs the exception being handled as the failure of `what`; returns 1 (a failure to count)."""
    log(f"FAIL {what}")
    traceback.print_exc()
    return 1


def median_us(device: Device, fn, iters: int, warmup: int = 5) -> float:
    """Median microseconds of fn(i) over ``iters`` calls. On the GPU a spin kernel first keeps the
    device busy while all calls are queued, so host launch overhead stays out of the event
    intervals."""
    torch = device.torch
    for i in range(warmup):
        fn(i)
    device.sync()
    if device.emulated:
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
        device.sync()
        times = [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends)]
    times.sort()
    return times[len(times) // 2]


BENCH_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (K, N)
BENCH_MS = [1, 16, 64, 256, 1024, 4096]


def gpu_bench(lib, device: Device, shapes, ms, results: list, gpu_name: str, sms: int, l2: int,
              smem_per_sm: int, iters: int = 50, variants=(AUTO,)) -> int:
    """Times every variant vs torch float16 matmul; appends dicts to results; returns the failures."""
    torch = device.torch
    gs, act_mode = 128, 1
    failures = 0
    log(f"\n== timing on {gpu_name} ({sms} SMs): group_size={gs}, per-token activations, float32 X/Y; "
        f"fp16 = torch.matmul float16 (cuBLAS); median of {iters}; weights rotated over >= 3x L2")
    use_mnb = not device.emulated and gpu_baselines.ort_cuda_available()
    log(f"roof% = the roofline floor (gpu_baselines.roofline_us: max(bytes / bandwidth, ops / int8 peak)) / our "
        f"time; mnb = ONNX Runtime MatMulNBits W4A16 on the CUDA EP: {'timed' if use_mnb else 'not available'}")
    log(f"{'M':>5} {'K':>6} {'N':>6} {'variant':>12} {'ours us':>9} {'fp16 us':>9} {'speedup':>8} {'our TOPS':>9} "
        f"{'our wGB/s':>10} {'roof%':>6} {'mnb us':>8}  plan (cfg m-tiles x n-tiles x split)")
    for K, N in shapes:
        G = K // gs
        try:
            pk_bytes = packed_size(lib, N, K, gs)
            n_ours = max(1, min(16, ceil_div(3 * l2, pk_bytes)))
            n_fp16 = max(1, min(16, ceil_div(3 * l2, K * N * 2)))
            packs = []
            for _ in range(n_ours):
                d_B = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device.dev)
                d_s = torch.rand(N, G, device=device.dev) * 0.01 + 0.001
                d_z = torch.randint(0, 16, (N, G), dtype=torch.uint8, device=device.dev)
                packed = torch.empty(pk_bytes, dtype=torch.uint8, device=device.dev)
                rc = lib.fptq_w4a8_repack_cuda(d_B.data_ptr(), d_s.data_ptr(), d_z.data_ptr(), N, K, gs,
                                               packed.data_ptr(), device.stream())
                if rc:
                    raise RuntimeError(f"repack -> cudaError {rc}")
                packs.append(packed)
            del d_B, d_s, d_z
            w16 = [torch.randn(K, N, device=device.dev, dtype=torch.float16) * 0.05 for _ in range(n_fp16)]
            mnb = None
            if use_mnb:
                try:
                    mnb = gpu_baselines.MatMulNBitsTimer(K, N, gs, np.random.default_rng(K + N))
                except Exception as e:  # noqa: BLE001 - a baseline only
                    log(f"note: MatMulNBits session K={K} N={N} failed: {str(e)[:200]}")
        except Exception:  # noqa: BLE001
            failures += failed(f"setup K={K} N={N}")
            continue
        for M in ms:
            try:
                x = torch.randn(M, K, device=device.dev)
                x16 = x.half()
                y = torch.empty(M, N, device=device.dev)
                y16 = torch.empty(M, N, device=device.dev, dtype=torch.float16)
                a = torch.ones(1, device=device.dev)

                def fp16(i):
                    torch.matmul(x16, w16[i % n_fp16], out=y16)

                t_fp16 = median_us(device, fp16, iters)
                t_mnb = mnb.time_us(torch, x16, iters) if mnb is not None else None
            except Exception:  # noqa: BLE001
                failures += failed(f"timing fp16 M={M} K={K} N={N}")
                continue
            for v in variants:
                try:
                    ws_size = ctypes.c_size_t()
                    rc = lib.fptq_w4a8_workspace_size_variant(M, N, K, gs, v, ctypes.byref(ws_size))
                    if rc == CUDA_ERROR_NOT_SUPPORTED:
                        continue
                    if rc:
                        raise RuntimeError(f"workspace_size -> cudaError {rc}")
                    ws = torch.empty(max(ws_size.value, 1), dtype=torch.uint8, device=device.dev)
                    rcs = []

                    def ours(i):
                        rcs.append(lib.fptq_w4a8_matmul_cuda_variant(
                            x.data_ptr(), DTYPE_FLOAT32, M, N, K, gs, act_mode, a.data_ptr(),
                            packs[i % n_ours].data_ptr(), ws.data_ptr(), ws_size.value, y.data_ptr(), v,
                            device.stream()))

                    t_ours = median_us(device, ours, iters)
                    if any(rcs):
                        raise RuntimeError(f"matmul -> cudaError {max(rcs)}")
                    tops = 2.0 * M * N * K / (t_ours * 1e-6) / 1e12
                    gbs = (N * K / 2 + N * G * 5) / (t_ours * 1e-6) / 1e9
                    pv = v if v != AUTO else lib.fptq_w4a8_resolve_variant(M, gs, device.compute_capability())
                    p = plan_info(lib, M, N, K, gs, sms, smem_per_sm, pv)
                    plan = f"{variant_name(pv)} cfg{p['cfg']} {p['m_tiles']}x{p['n_tiles']}x{p['split']}"
                    roof = gpu_baselines.roofline_us(M, N, K, gs, gpu_name)
                    roof_pct = f"{100 * roof[0] / t_ours:>5.0f}%" if roof else f"{'-':>6}"
                    mnb_s = f"{t_mnb:>8.1f}" if t_mnb is not None else f"{'-':>8}"
                    log(f"{M:>5} {K:>6} {N:>6} {variant_name(v):>12} {t_ours:>9.1f} {t_fp16:>9.1f} {t_fp16 / t_ours:>8.2f} "
                        f"{tops:>9.1f} {gbs:>10.0f} {roof_pct} {mnb_s}  {plan}")
                    results.append(dict(M=M, K=K, N=N, variant=v, ours_us=t_ours, fp16_us=t_fp16,
                                        speedup=t_fp16 / t_ours, tops=tops, weight_gbs=gbs, plan=p,
                                        roof_us=roof[0] if roof else None, roof_bound=roof[1] if roof else None,
                                        mnb_us=t_mnb))
                except Exception:  # noqa: BLE001
                    failures += failed(f"timing {variant_name(v)} M={M} K={K} N={N}")
        packs = w16 = None  # free this shape's weights before the next
        if not device.emulated:
            torch.cuda.empty_cache()
    return failures


def summarize(results: list, variants, usable: set, shapes, ms) -> None:
    """Compact tables at the end of the output: speedup vs fp16 per variant, the best usable
    variant per point, and the AUTO table line to paste into w4a8_cuda.cu."""
    if not results:
        return
    by = {(r["M"], r["K"], r["N"], r["variant"]): r for r in results}
    cols = [v for v in variants if any(k[3] == v for k in by)]
    log("\n== speedup vs torch fp16 (cuBLAS) per variant; * = best usable (correct) variant; x = failed correctness")
    log("columns: " + "  ".join(f"{'a' if v == AUTO else v}={variant_name(v)}" for v in cols))
    head = f"{'K':>5} {'N':>5} {'M':>5} {'fp16us':>7} " + " ".join(f"{'a' if v == AUTO else v:>6}" for v in cols) + "  best"
    log(head)
    best_by_bucket: dict = {}
    for K, N in shapes:
        for M in ms:
            row = [by.get((M, K, N, v)) for v in cols]
            if not any(row):
                continue
            cand = [(r["ours_us"], r["variant"]) for r in row if r and r["variant"] in usable and r["variant"] != AUTO]
            best = min(cand)[1] if cand else None
            fp16 = next(r["fp16_us"] for r in row if r)
            cells = []
            for v, r in zip(cols, row):
                if r is None:
                    cells.append(f"{'-':>6}")
                else:
                    mark = "*" if v == best else ("x" if v not in usable and v != AUTO else " ")
                    cells.append(f"{r['speedup']:>5.2f}{mark}")
            bt = by[(M, K, N, best)] if best is not None else None
            extra = ""
            if bt and bt.get("roof_us"):
                extra += f" roof {100 * bt['roof_us'] / bt['ours_us']:.0f}% ({bt['roof_bound']})"
            if bt and bt.get("mnb_us"):
                extra += f" vs MatMulNBits {bt['mnb_us'] / bt['ours_us']:.2f}x"
            log(f"{K:>5} {N:>5} {M:>5} {fp16:>7.1f} " + " ".join(cells) +
                (f"  {variant_name(best)} {bt['ours_us']:.1f}us {bt['speedup']:.2f}x {bt['tops']:.0f}TOPS {bt['weight_gbs']:.0f}GB/s"
                 + extra if bt else ""))
            bucket = 0 if M <= 16 else (1 if M <= 64 else (2 if M <= 256 else 3))
            for v in cols:  # geometric-mean speedup per bucket and variant
                r = by.get((M, K, N, v))
                if r and v != AUTO and v in usable:
                    best_by_bucket.setdefault(bucket, {}).setdefault(v, []).append(r["speedup"])
    table = []
    log("\n== geometric-mean speedup per M bucket (usable variants)")
    for b, name in enumerate(["M<=16", "M<=64", "M<=256", "M>256"]):
        d = best_by_bucket.get(b, {})
        if not d:
            table.append(-1)
            continue
        gm = {v: float(np.exp(np.mean(np.log(x)))) for v, x in d.items() if len(x) == max(len(y) for y in d.values())}
        vbest = max(gm, key=gm.get)
        table.append(vbest)
        log(f"  {name:>7}: " + "  ".join(f"{variant_name(v)}={g:.2f}" for v, g in sorted(gm.items())) + f"  -> {variant_name(vbest)}")
    log("\nRECOMMENDED (custom_ops/w4a8_cuda.cu; -1 = sm_80 default): "
        f"constexpr int kSm90AutoVariant[4] = {{{', '.join(str(v) for v in table)}}};")


def correct_variants(lib, lib_path: Path, device: Device, chosen, quick_cases) -> set:
    """The variants of ``chosen`` that pass their probe (child processes) and the suite's
    ``quick_cases`` here; logs one line per variant."""
    probed = [v for v in cuda_correctness.probed_variants(lib, device.compute_capability()) if v in chosen]
    probes = cuda_correctness.run_probes(lib_path, probed, log=log) if probed and not device.emulated else {}
    correct = set()
    for v in chosen:
        if str(probes.get(v, "ok")).startswith("FAIL"):
            log(f"  {variant_name(v):>12}: excluded after its probe: {probes[v]}")
            continue
        report = cuda_correctness.check_variant(lib, device, quick_cases, v, log=lambda line: None)
        log(f"  {variant_name(v):>12}: {report.passed} passed, {report.failed} FAILED, {report.not_applicable} n/a"
            + (f"; first failure: {report.failures[0]}" if report.failures else ""))
        if report.failed == 0:
            correct.add(v)
    return correct


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", type=Path, default=None, help=f"the .so (default {STANDALONE_LIBRARY}, built if missing)")
    ap.add_argument("--rebuild", action="store_true", help="run the build script even if the .so exists")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", type=Path, default=None, help="write the timings here")
    ap.add_argument("--variants", default="all", help="kernel variants to time: 'all' or a list like auto,0,16 "
                                                      "(ids: w4a8_cuda.h)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per point (median)")
    ap.add_argument("--self-test", action="store_true",
                    help="run this script on the CPU through the emulated library (checks the script, times nothing)")
    args = ap.parse_args()
    t_start = time.time()
    lib_path = args.lib or STANDALONE_LIBRARY
    if args.rebuild or (args.lib is None and not lib_path.exists()):
        log(f"building {lib_path} ...")
        build_library(lib_path)
    lib = load_library(lib_path)
    try:
        import torch
    except ImportError:
        log("torch is not installed: nothing to time against")
        return 2
    chosen = parse_variant_list(args.variants)

    if args.self_test:
        device, lib = Device(torch, emulated=True), EmulatedLibrary(lib)
        correct = correct_variants(lib, lib_path, device, chosen, cuda_correctness.EMULATED_CASES[:3])
        results: list = []
        failures = gpu_bench(lib, device, [(256, 64)], [1, 3], results, "CPU (emulated)", EmulatedLibrary.SMS,
                             50 << 20, EmulatedLibrary.SMEM_PER_SM, iters=2, variants=sorted(correct))
        summarize(results, chosen, correct, [(256, 64)], [1, 3])
        failures += len(set(chosen) - correct)
        log(f"\n{'PASS' if not failures else 'FAIL'}: self-test, {failures} failure(s), {time.time() - t_start:.0f}s")
        return 1 if failures else 0

    if not torch.cuda.is_available():
        log(f"No CUDA device (torch {torch.__version__}): nothing to time.")
        return 2
    device = Device(torch, emulated=False)
    props = torch.cuda.get_device_properties(0)
    cc = device.compute_capability()
    log(f"GPU: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
        f"capability {props.major}.{props.minor}; torch {torch.__version__}; sm_90a kernel linked: "
        f"{bool(lib.fptq_w4a8_sm90_linked())}")
    runnable = [v for v in chosen if v == AUTO or lib.fptq_w4a8_variant_info(v, cc, 128) == 1]
    if len(runnable) < len(chosen):
        log("variants not runnable on this device/build: "
            + ", ".join(variant_name(v) for v in chosen if v not in runnable))
    log("\n== correctness before timing (probes, then the quick cases of tests/test_cuda_gpu.py)")
    correct = correct_variants(lib, lib_path, device, runnable, cuda_correctness.correctness_cases(quick=True))
    shapes, ms = (BENCH_SHAPES[:2], [1, 16, 256, 4096]) if args.quick else (BENCH_SHAPES, BENCH_MS)
    results = []
    l2 = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    smem = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 233472)
    failures = gpu_bench(lib, device, shapes, ms, results, props.name, props.multi_processor_count, l2, smem,
                         iters=args.iters, variants=[v for v in runnable if v in correct])
    summarize(results, runnable, correct, shapes, ms)
    if args.json:
        args.json.write_text(json.dumps({"timing": results, "correct": sorted(correct), "runnable": runnable},
                                        indent=1, default=str))
    failures += AUTO not in correct
    log(f"\n{'PASS' if not failures else 'FAIL'}: timed {len(correct)} of {len(runnable)} variants "
        f"(the default path {'correct' if AUTO in correct else 'INCORRECT'}); {time.time() - t_start:.0f}s total")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
