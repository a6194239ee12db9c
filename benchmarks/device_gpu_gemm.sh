#!/usr/bin/env bash
# The W4A8 CUDA kernels on the GPU machine in as few device calls as possible: the correctness
# suite (pytest -m gpu tests/test_cuda_gpu.py), compute-sanitizer, the timing table vs cuBLAS fp16
# with roofline ratios (benchmarks/gpu_gemm.py), then ONNX Runtime's MatMulNBits on the CUDA EP
# and the end-to-end step (benchmarks/device_ort_gpu.sh).
#
# Here, before the session with a GPU (no GPU needed; about 3 minutes of two CPU cores):
#
#     bash benchmarks/device_gpu_gemm.sh prepare
#
#   builds build/cuda_standalone/libfptq_cuda_standalone.so (benchmarks/build_cuda_standalone.sh:
#   sm_80 + sm_90 + sm_90a, SASS checks) and copies it with its check_sass.txt to .dev/ (3 MB;
#   build/cuda_standalone also holds a 27 MB SASS listing that should not travel), copies the
#   pip-installed libfptq_ops.so (which must hold the CUDA kernel) to .dev/ for the ORT step, and
#   checks that the onnxruntime-gpu parts of device_ort_gpu.sh are there
#   (`bash benchmarks/device_ort_gpu.sh prepare` makes them). .dev/ is about 6.5 MB, so a call
#   can carry it with one 48.6 MB part of the wheel (limit 64 MiB with the 1.5 MB tree).
#
# On the GPU machine, back to back (each call names what it carries):
#
#   1. kernels, and the first wheel part (about 5-6 minutes of device time with the machine's
#      start; timeout_s 540):
#        run command: bash benchmarks/device_gpu_gemm.sh kernels; bash benchmarks/device_ort_gpu.sh part 0
#            carry:   [".dev", ".whl/ortgpu/part-0", ".whl/ortgpu/MANIFEST"]
#      the suite over every variant (probes of the sm_90-feature variants in child processes, 129
#      cases each: float64 reference, NaN-poisoned outputs, guard bytes, fresh random data,
#      bit-identical rerun), then gpu_gemm.py: the quick cases again as its gate, and the timing
#      table for K x N = 4096x4096, 4096x11008, 11008x4096, 8192x8192 and M = 1, 16, 64, 256,
#      1024, 4096 vs torch fp16 (cuBLAS) with the roofline ratio; then compute-sanitizer memcheck
#      and racecheck on the suite's sanitize cases for the default path and the TMA variants
#      (16-19). Writes $OUT/gpu_correctness.log, gpu_gemm.log, gpu_gemm.json, memcheck.log,
#      racecheck.log, summary.txt. The last lines of the output are the summary.
#   2. ORT (about 4-5 minutes; the machine must stay warm, so within 30 s of each other): the
#      other onnxruntime-gpu parts, then the synthetic end-to-end check and MatMulNBits timings:
#        run command: bash benchmarks/device_ort_gpu.sh part 1     carry [".whl/ortgpu/part-1", ".whl/ortgpu/MANIFEST"]  timeout_s 120
#        run command: bash benchmarks/device_ort_gpu.sh part 2     carry [".whl/ortgpu/part-2", ".whl/ortgpu/MANIFEST"]  timeout_s 120
#        run command: bash benchmarks/device_ort_gpu.sh part 3 && bash benchmarks/device_gpu_gemm.sh ort
#            carry:   [".whl/ortgpu/part-3", ".whl/ortgpu/MANIFEST", ".dev"]  timeout_s 480
#      `ort` = device_ort_gpu.sh run (op level + synthetic decoder end to end on the CUDA EP),
#      then gpu_gemm.py timing of AUTO and the TMA variants with MatMulNBits beside them.
#
# Exit status of `kernels`: the suite's (pytest: 0 every selected variant correct, 1 a failure,
# among them a variant that failed its probe), or 3 when the library is missing and cannot be
# built. gpu_gemm.py's and the sanitizers' results are in summary.txt.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
lib="$repo/.dev/libfptq_cuda_standalone.so"  # carried from here (prepare)
out="${OUT:-/tmp/device_gpu_gemm}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

log() { echo "[device_gpu_gemm] $*"; }

host_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x "$repo/../venv/bin/python" ]]; then echo "$repo/../venv/bin/python"
  else echo python3
  fi
}

prepare() {
  local py
  py="$(host_python)"
  bash "$here/build_cuda_standalone.sh" "$repo/build/cuda_standalone" || { log "standalone build failed"; return 1; }
  mkdir -p "$repo/.dev"
  cp -f "$repo/build/cuda_standalone/libfptq_cuda_standalone.so" "$repo/build/cuda_standalone/check_sass.txt" "$repo/.dev/"
  local installed
  installed="$("$py" -c 'import fptq_onnx; print(fptq_onnx.library_path())')"
  bash "$here/device_ort_gpu.sh" lib --lib "$installed" || return 1
  ls -l "$repo/.dev" "$repo/.whl/ortgpu" 2>/dev/null
  [[ -f "$repo/.whl/ortgpu/MANIFEST" ]] || log "NOTE: no onnxruntime-gpu parts: run 'bash benchmarks/device_ort_gpu.sh prepare' (network, ~10 min of xz)"
  log ".dev: $(du -sh "$repo/.dev" | cut -f1) (carried by the first and the last call)"
}

# The library carried from here; if it does not load there (another system image), build it.
ensure_lib() {
  if [[ -f "$lib" ]] && python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$lib" 2>/dev/null; then
    log "library $lib ($(du -h "$lib" | cut -f1)) loads"
    return 0
  fi
  log "library missing or not loadable: building it here (nvcc; ~2 min)"
  timeout 300 bash "$here/build_cuda_standalone.sh" "$repo/build/cuda_standalone" > "$out/build.log" 2>&1 \
    || { tail -20 "$out/build.log"; return 3; }
  tail -3 "$out/build.log"
  mkdir -p "$repo/.dev"
  cp -f "$repo/build/cuda_standalone/libfptq_cuda_standalone.so" "$repo/build/cuda_standalone/check_sass.txt" "$repo/.dev/"
}

kernels() {
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
  ensure_lib || return 3
  cp -f "$repo/.dev/check_sass.txt" "$out/" 2>/dev/null || true
  local t0=$SECONDS status timing
  # 1. the correctness suite, every variant (-v: one PASSED / FAILED / SKIPPED line per variant;
  #    the probes run the sm_90-feature variants first in child processes).
  (cd "$repo" && timeout 300 python3 -m pytest -v -m gpu tests/test_cuda_gpu.py --cuda-lib "$lib" \
    -p no:cacheprovider) > "$out/gpu_correctness.log" 2>&1
  status=$?
  log "correctness suite exit $status after $((SECONDS - t0)) s"
  # 2. the timing table (gpu_gemm.py checks the quick cases again and times what passes).
  timeout 240 python3 -u "$here/gpu_gemm.py" --lib "$lib" --variants all --json "$out/gpu_gemm.json" \
    > "$out/gpu_gemm.log" 2>&1
  timing=$?
  log "gpu_gemm.py exit $timing after $((SECONDS - t0)) s"
  # 3. compute-sanitizer on the suite's small cases of the default path and the TMA variants.
  local san=()
  for tool in memcheck racecheck; do
    local t1=$SECONDS
    (cd "$repo" && timeout 150 compute-sanitizer --tool "$tool" python3 -m pytest -q -m gpu tests/test_cuda_gpu.py \
      --cuda-lib "$lib" --cuda-cases sanitize --cuda-variants auto,16,17,18,19 -p no:cacheprovider) > "$out/$tool.log" 2>&1
    local rc=$?
    san+=("$tool: exit $rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$tool.log" | tail -1 | tr -s ' ') ($((SECONDS - t1)) s)")
  done
  {
    echo "== device_gpu_gemm kernels on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
    echo "correctness suite exit status $status (log: gpu_correctness.log); gpu_gemm.py exit status $timing"
    printf '%s\n' "${san[@]}"
    echo "-- correctness per variant (from gpu_correctness.log):"
    grep -E '::test_variant_matches_the_reference_on_the_gpu\[' "$out/gpu_correctness.log" | sed -E 's/^[^[]*\[//; s/\] / /'
    grep -E '^(FAILED|ERROR) ' "$out/gpu_correctness.log" | cut -c1-400
    echo "-- best variant per point (from gpu_gemm.log):"
    sed -n '/== speedup vs torch fp16/,/RECOMMENDED/p' "$out/gpu_gemm.log"
    tail -1 "$out/gpu_gemm.log"
  } > "$out/summary.txt"
  cat "$out/summary.txt"
  log "kernels stage: $((SECONDS - t0)) s"
  return "$status"
}

ort() {
  local t0=$SECONDS status
  bash "$here/device_ort_gpu.sh" run
  status=$?
  log "device_ort_gpu.sh run: exit $status after $((SECONDS - t0)) s"
  ensure_lib || return 3
  timeout 240 bash "$here/device_ort_gpu.sh" env python3 -u "$here/gpu_gemm.py" --lib "$lib" \
    --variants auto,16,17,18,19 --json "$out/gpu_gemm_mnb.json" > "$out/gpu_gemm_mnb.log" 2>&1
  log "gpu_gemm.py with MatMulNBits: exit $? after $((SECONDS - t0)) s (log: gpu_gemm_mnb.log)"
  sed -n '/== speedup vs torch fp16/,/RECOMMENDED/p' "$out/gpu_gemm_mnb.log"
  return "$status"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  prepare) prepare ;;
  kernels) kernels ;;
  ort) ort ;;
  *) sed -n '2,/^set -uo/{/^#/p}' "$0"; exit 2 ;;
esac
