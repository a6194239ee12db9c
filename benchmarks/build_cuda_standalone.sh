#!/usr/bin/env bash
# Builds the W4A8 CUDA kernels (custom_ops/w4a8_cuda.cu for sm_80 / sm_90 + compute_90 PTX;
# w4a8_cuda_sm90_tma.cu for sm_90a) into a standalone shared library for
# tests/test_cuda_gpu.py and benchmarks/gpu_gemm.py (ctypes; no ONNX Runtime), and checks the machine code: IMMA / IGMMA /
# bulk-copy / mbarrier instructions present, no register spills, no local memory.
#
#   benchmarks/build_cuda_standalone.sh [OUT_DIR]     (default: build/cuda_standalone)
#
# Writes OUT_DIR/libfptq_cuda_standalone.so, OUT_DIR/ptxas.log (-Xptxas -v),
# OUT_DIR/sass.txt (cuobjdump -sass) and OUT_DIR/check_sass.txt (fptq_onnx/testing/check_sass.py).
# Needs nvcc and cuobjdump on PATH (or in /usr/local/cuda/bin). Exits non-zero on a build
# error, a spill, or a failed SASS check.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${1:-$repo/build/cuda_standalone}"
mkdir -p "$out"

export PATH="$PATH:/usr/local/cuda/bin"
nvcc_bin="${NVCC:-nvcc}"
lib="$out/libfptq_cuda_standalone.so"

# No --use_fast_math: the activation scale needs IEEE division and round-half-to-even.
# -cudart static (nvcc's default, spelled out): the library loads next to any framework's
# own CUDA runtime. --threads 0: one compile thread per target.
# Built in a private temporary folder, then moved: build/ is shared with other builds.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
common=(-O3 -std=c++17 -Xcompiler -fPIC --threads 0
        -Xptxas -v -Xptxas -warn-spills -Xptxas -warn-lmem-usage -I "$repo/custom_ops")
# 1. The portable part (planner, dispatch, mma.sync kernels): sm_80, sm_90, compute_90 PTX.
"$nvcc_bin" "${common[@]}" \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 \
  -gencode arch=compute_90,code=compute_90 \
  -c -o "$tmp/w4a8_cuda.o" "$repo/custom_ops/w4a8_cuda.cu" > "$tmp/ptxas.log" 2>&1 || {
    grep -v '^ptxas info\|^    0 bytes stack' "$tmp/ptxas.log" | tail -40 >&2
    echo "ERROR: nvcc failed on w4a8_cuda.cu" >&2
    exit 1
  }
# 2. The Hopper TMA wgmma kernel, sm_90a only: w4a8_cuda_sm90_tma.cu (variants 16-19). A
#    failure here is reported and the library is built without that object (its variants then
#    return cudaErrorNotSupported).
objs=("$tmp/w4a8_cuda.o")
: > "$tmp/ptxas_sm90.log"
if [[ "${FPTQ_NO_SM90A:-0}" == "1" ]]; then
  sm90_status="skipped (FPTQ_NO_SM90A=1)"
elif "$nvcc_bin" "${common[@]}" -gencode arch=compute_90a,code=sm_90a \
     -c -o "$tmp/w4a8_cuda_sm90_tma.o" "$repo/custom_ops/w4a8_cuda_sm90_tma.cu" > "$tmp/ptxas_sm90.log" 2>&1; then
  objs+=("$tmp/w4a8_cuda_sm90_tma.o")
  sm90_status="w4a8_cuda_sm90_tma.cu built"
else
  sm90_status="w4a8_cuda_sm90_tma.cu FAILED (see ptxas.log), library built without it"
  grep -v '^ptxas info\|^    0 bytes stack' "$tmp/ptxas_sm90.log" | tail -40 >&2
fi
cat "$tmp/ptxas_sm90.log" >> "$tmp/ptxas.log" 2>/dev/null || true
"$nvcc_bin" -shared -cudart static -o "$tmp/lib.so" "${objs[@]}" >> "$tmp/ptxas.log" 2>&1 || {
  tail -20 "$tmp/ptxas.log" >&2
  echo "ERROR: link failed" >&2
  exit 1
}
# Compiler diagnostics other than the resource report.
grep -v '^ptxas info\|^    [0-9]* bytes stack' "$tmp/ptxas.log" || true
mkdir -p "$out"
mv -f "$tmp/lib.so" "$lib"
mv -f "$tmp/ptxas.log" "$out/ptxas.log"
echo "sm_90a TMA kernel: $sm90_status"

# cuobjdump: PATH, the CUDA install, or the nvidia-cuda-cuobjdump wheel of a Python here.
cuobjdump_bin="$(command -v cuobjdump || true)"
if [[ -z "$cuobjdump_bin" ]]; then
  for py in python3 "$repo/../venv/bin/python" /work/venv/bin/python; do
    purelib="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)"
    for cand in "$purelib"/nvidia/cu13/bin/cuobjdump "$purelib"/nvidia/cuda_cuobjdump/bin/cuobjdump; do
      if [[ -x "$cand" ]]; then cuobjdump_bin="$cand"; break 2; fi
    done
  done
fi

echo "---- summary ($lib)"
imma=-1
if [[ -n "$cuobjdump_bin" ]]; then
  # cuobjdump -sass runs nvdisasm, which the wheels put beside it.
  PATH="$PATH:$(dirname "$cuobjdump_bin")" "$cuobjdump_bin" -sass "$lib" > "$out/sass.txt"
  imma=$(grep -c 'IMMA' "$out/sass.txt" || true)
  echo "IMMA instructions in SASS: $imma (sm_80 + sm_90; $(grep -E 'IMMA' "$out/sass.txt" | grep -oE 'IMMA[.A-Z0-9]*' | sort | uniq -c | tr -s ' ' | tr '\n' ';'))"
  gmma=$(grep -c 'GMMA' "$out/sass.txt" || true)
  echo "GMMA instructions in SASS (sm_90a wgmma): $gmma ($(grep -oE '[A-Z]GMMA[.A-Z0-9x]*' "$out/sass.txt" | sort | uniq -c | tr -s ' ' | tr '\n' ';'))"
  lmem=$(grep -cE '\b(LDL|STL)\b' "$out/sass.txt" || true)
  echo "local-memory instructions (LDL/STL) in SASS: $lmem"
else
  echo "WARNING: cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm): IMMA check skipped" >&2
fi
# ptxas prints "N bytes spill stores, M bytes spill loads" per kernel and target.
spills=$(grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$out/ptxas.log" || true)
stack=$(grep -E '[1-9][0-9]* bytes stack frame' "$out/ptxas.log" || true)
grep -E 'Compiling entry function|Used [0-9]+ registers' "$out/ptxas.log" \
  | sed -E 's/^ptxas info *: //' \
  | paste - - \
  | sed -E "s/Compiling entry function '([^']*)' for '([^']*)'.*Used ([0-9]+) registers.*/\2 regs=\3 \1/" \
  | sort -t= -k1,1 -k2,2n | uniq | awk '{printf "  %s %s %s\n", $1, $2, $3}' \
  | { if command -v c++filt >/dev/null; then c++filt; else cat; fi } \
  | sed -E 's/fptq::w4a8cuda::\(anonymous namespace\):://g; s/\(fptq::w4a8cuda::GemmArgs\)//' || true
status=0
if [[ "$imma" -eq 0 ]]; then
  echo "ERROR: no IMMA instruction in the SASS" >&2
  status=1
fi
if [[ -n "$spills" ]]; then
  echo "ERROR: register spills:" >&2
  echo "$spills" >&2
  status=1
else
  echo "spills: 0 bytes (all kernels, all targets)"
fi
if [[ -n "$stack" ]]; then
  echo "note: kernels with a stack frame:"
  echo "$stack"
fi
# Per-kernel instruction checks (IMMA / IGMMA / UBLKCP / SYNCS / USETMAXREG, no local memory,
# no wgmma serialization notes): fptq_onnx/testing/check_sass.py, also run by tests/test_build_cuda.py.
if [[ -n "$cuobjdump_bin" ]] && command -v python3 >/dev/null; then
  PATH="$PATH:$(dirname "$cuobjdump_bin")" python3 "$repo/fptq_onnx/testing/check_sass.py" "$lib" --ptxas-log "$out/ptxas.log" \
    > "$out/check_sass.txt" 2>&1 || status=1
  tail -1 "$out/check_sass.txt"
  grep '^FAIL' "$out/check_sass.txt" >&2 || true
fi
exit $status
