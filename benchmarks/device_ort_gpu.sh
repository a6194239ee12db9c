#!/usr/bin/env bash
# The W4A8 CUDA kernel inside onnxruntime-gpu, on the GPU machine: carries onnxruntime-gpu there
# in parts, installs it, and runs benchmarks/gpu_e2e.py with a CUDA build of libfptq_ops.so.
#
# Why parts: the GPU machine has onnxruntime (CPU build) but not onnxruntime-gpu, cannot
# download, and one device call carries at most 64 MiB. The onnxruntime-gpu 1.31.0 wheel
# (CUDA 13 build, cp312) is 244 MiB; `prepare` drops what Python does not load (the C API's
# libonnxruntime.so, the TensorRT provider), stores it uncompressed, compresses it with xz
# (186 MiB) and splits it into N parts of <= 58 MiB (N is printed: 4). Each call copies its
# part into /tmp/ortgpu on the device, which survives between calls only while the machine is
# warm (30 s after a call ends): make the calls back to back.
#
# 1. Here (no GPU needed; network for the wheel; nvcc for the library), once:
#
#      bash benchmarks/device_ort_gpu.sh prepare [--lib PATH]
#
#    writes .whl/ortgpu/part-0 .. part-<N-1> and .whl/ortgpu/MANIFEST (both folders are
#    git-ignored), .dev/libfptq_ops.so (the op library built from custom_ops/ with FPTQ_CUDA=ON
#    in build/device-cuda, or the --lib file, which must hold the CUDA kernel) and
#    .dev/onnx_graphsurgeon-*.whl (the passes need it; the GPU image lacks it). It prints the
#    device calls below with the actual N. The parts are reused while current; after kernel
#    changes `bash benchmarks/device_ort_gpu.sh lib [--lib PATH]` redoes only the library.
#
# 2. On the GPU machine, one device call per part, back to back (N = 4):
#
#      run  command: bash benchmarks/device_ort_gpu.sh part 0
#           carry:   [".whl/ortgpu/part-0", ".whl/ortgpu/MANIFEST"]        timeout_s: 120
#      run  command: bash benchmarks/device_ort_gpu.sh part 1
#           carry:   [".whl/ortgpu/part-1", ".whl/ortgpu/MANIFEST"]        timeout_s: 120
#      run  command: bash benchmarks/device_ort_gpu.sh part 2
#           carry:   [".whl/ortgpu/part-2", ".whl/ortgpu/MANIFEST"]        timeout_s: 120
#      run  command: bash benchmarks/device_ort_gpu.sh part 3 && bash benchmarks/device_ort_gpu.sh run
#           carry:   [".whl/ortgpu/part-3", ".whl/ortgpu/MANIFEST", ".dev"] timeout_s: 480
#
#    `run` checks that every part is in /tmp/ortgpu (else it names the missing ones, exit 4:
#    the machine went cold in between; send those parts again, then `run`), reassembles and
#    checks the wheel (SHA-256), pip-installs it and onnx_graphsurgeon with --no-deps --target
#    /tmp/site, puts the nvidia-* pip packages' CUDA libraries on LD_LIBRARY_PATH, and runs
#
#      python3 benchmarks/gpu_e2e.py --lib .dev/libfptq_ops.so --json $OUT/gpu_e2e.json [ARGS]
#
#    (extra arguments of `run` go to gpu_e2e.py, e.g. --skip-e2e or --no-timing). After `run`,
#    `bash benchmarks/device_ort_gpu.sh env CMD ARGS` runs CMD in the same environment (used by
#    benchmarks/device_gpu_gemm.sh ort for ORT's MatMulNBits timing). The log is
#    also written to $OUT/gpu_e2e.log. Exit status: gpu_e2e.py's (0 passed, 1 correctness
#    failure, 2 no usable CUDA provider, 3 setup), 4 parts missing, 5 install failed.
#    Expected device time: machine start 1-2 min, ~20 s per part call, `run` 2-3 min.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
ORT_VERSION=1.31.0
WHEEL="onnxruntime_gpu-${ORT_VERSION}-cp312-cp312-manylinux_2_28_x86_64.whl"
GS_VERSION=0.6.1
PART_LIMIT=$((58 * 1024 * 1024))  # + the working tree and .dev stays under the 64 MiB a call carries
parts_dir="$repo/.whl/ortgpu"
dev_dir="$repo/.dev"
stage=/tmp/ortgpu
site_dir=/tmp/site

log() { echo "[device_ort_gpu] $*"; }
die() { local code=$1; shift; echo "[device_ort_gpu] ERROR: $*" >&2; exit "$code"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# ---------------------------------------------------------------------------------- here
parse_lib_arg() {
  lib_arg=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --lib) lib_arg="$2"; shift 2 ;;
      *) die 2 "unknown argument $1" ;;
    esac
  done
}

host_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x "$repo/../venv/bin/python" ]]; then echo "$repo/../venv/bin/python"
  else echo python3
  fi
}

ensure_ignored() {
  mkdir -p "$repo/.whl" "$parts_dir" "$dev_dir"
  for d in .whl .dev; do
    git -C "$repo" check-ignore -q "$d/x" || echo "/$d/" >> "$repo/.git/info/exclude"
  done
}

# True when the parts on disk are those the MANIFEST names (then the wheel needs no new xz run).
parts_current() {
  [[ -f "$parts_dir/MANIFEST" ]] || return 1
  grep -q "^wheel $WHEEL " "$parts_dir/MANIFEST" || return 1
  local n
  n=$(awk '$1 == "parts" {print $2}' "$parts_dir/MANIFEST")
  for ((i = 0; i < n; i++)); do
    [[ -f "$parts_dir/part-$i" ]] || return 1
    [[ "$(sha "$parts_dir/part-$i")" == "$(awk -v p="part-$i" '$1 == p {print $2}' "$parts_dir/MANIFEST")" ]] || return 1
  done
}

prepare_wheel() {
  local py
  py="$(host_python)"
  if parts_current; then
    log "wheel parts in $parts_dir are current (delete them to redo)"
    return
  fi
  if [[ ! -f "$repo/.whl/$WHEEL" ]]; then
    log "downloading onnxruntime-gpu $ORT_VERSION (cp312, manylinux_2_28)"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$repo/.whl" "onnxruntime-gpu==$ORT_VERSION"
  fi
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  log "slimming the wheel (stored, without libonnxruntime.so and the TensorRT provider)"
  "$py" - "$repo/.whl/$WHEEL" "$tmp/$WHEEL" <<'EOF'
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
# Python loads onnxruntime_pybind11_state (which holds ONNX Runtime) and the provider libraries;
# libonnxruntime.so is for C/C++ users only.
drop = ("onnxruntime/capi/libonnxruntime.so.", "onnxruntime/capi/libonnxruntime_providers_tensorrt.so")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(drop):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            prefixes = tuple(d.encode() for d in drop)
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(prefixes))
        out = zipfile.ZipInfo(info.filename, info.date_time)
        out.external_attr = info.external_attr
        zout.writestr(out, data, zipfile.ZIP_STORED)
EOF
  log "compressing (xz -9e; ~10 minutes on two cores)"
  xz -9e -T2 -c "$tmp/$WHEEL" > "$tmp/ortgpu.whl.xz"
  local size n
  size=$(stat -c %s "$tmp/ortgpu.whl.xz")
  n=$(( (size + PART_LIMIT - 1) / PART_LIMIT ))
  rm -f "$parts_dir"/part-* "$parts_dir/MANIFEST"
  split -n "$n" -d -a 1 "$tmp/ortgpu.whl.xz" "$parts_dir/part-"
  {
    echo "wheel $WHEEL $(sha "$tmp/$WHEEL")"
    echo "parts $n"
    for ((i = 0; i < n; i++)); do echo "part-$i $(sha "$parts_dir/part-$i")"; done
  } > "$parts_dir/MANIFEST"
  log "wheel: $(du -h "$tmp/$WHEEL" | cut -f1) stored, $(du -h "$tmp/ortgpu.whl.xz" | cut -f1) xz, $n parts"
}

prepare_lib() {
  local py
  py="$(host_python)"
  if [[ -n "$lib_arg" ]]; then
    cp -f "$lib_arg" "$dev_dir/libfptq_ops.so"
  else
    log "building libfptq_ops.so with CUDA from custom_ops/ (build/device-cuda; a few minutes)"
    local ort_inc=()
    for d in "$repo"/build/*/ort-headers/usr/include/onnxruntime; do
      [[ -f "$d/onnxruntime_cxx_api.h" ]] && ort_inc=(-DONNXRUNTIME_INCLUDE_DIR="$d") && break
    done
    cmake -S "$repo/custom_ops" -B "$repo/build/device-cuda" -DCMAKE_BUILD_TYPE=Release -DFPTQ_CUDA=ON \
      "${ort_inc[@]}" > "$repo/build/device-cuda.log" 2>&1 || { tail -20 "$repo/build/device-cuda.log"; die 1 "cmake failed"; }
    cmake --build "$repo/build/device-cuda" -j 2 >> "$repo/build/device-cuda.log" 2>&1 \
      || { tail -30 "$repo/build/device-cuda.log"; die 1 "build failed"; }
    cp -f "$repo/build/device-cuda/libfptq_ops.so" "$dev_dir/libfptq_ops.so"
  fi
  "$py" -c "import ctypes, sys; sys.exit(0 if ctypes.CDLL(sys.argv[1]).fptq_ops_has_cuda() else 1)" \
    "$dev_dir/libfptq_ops.so" || die 1 "$dev_dir/libfptq_ops.so has no CUDA kernel"
  log "library: $dev_dir/libfptq_ops.so ($(du -h "$dev_dir/libfptq_ops.so" | cut -f1), CUDA kernel: yes)"
  if ! ls "$dev_dir"/onnx_graphsurgeon-"$GS_VERSION"-*.whl > /dev/null 2>&1; then
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$dev_dir" "onnx-graphsurgeon==$GS_VERSION"
  fi
}

print_calls() {
  local n tree_kib dev_kib
  n=$(awk '$1 == "parts" {print $2}' "$parts_dir/MANIFEST")
  tree_kib=$( (cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1) )
  dev_kib=$(du -sk "$dev_dir" | cut -f1)
  ls -l "$parts_dir" "$dev_dir"
  log "per call: working tree ${tree_kib} KiB + a part (<= $((PART_LIMIT / 1048576)) MiB) + .dev ${dev_kib} KiB on the last"
  log "device calls, back to back:"
  for ((i = 0; i < n; i++)); do
    if ((i < n - 1)); then
      echo "  run command: bash benchmarks/device_ort_gpu.sh part $i"
      echo "      carry: [\".whl/ortgpu/part-$i\", \".whl/ortgpu/MANIFEST\"]  timeout_s: 120"
    else
      echo "  run command: bash benchmarks/device_ort_gpu.sh part $i && bash benchmarks/device_ort_gpu.sh run"
      echo "      carry: [\".whl/ortgpu/part-$i\", \".whl/ortgpu/MANIFEST\", \".dev\"]  timeout_s: 480"
    fi
  done
}

# ---------------------------------------------------------------------------------- device
manifest() { [[ -f "$parts_dir/MANIFEST" ]] || die 4 "$parts_dir/MANIFEST not here: carry .whl/ortgpu/MANIFEST"; cat "$parts_dir/MANIFEST"; }

part() {
  local i="$1" src="$parts_dir/part-$1" want
  [[ -f "$src" ]] || die 4 "$src not here: carry .whl/ortgpu/part-$i"
  want=$(manifest | awk -v p="part-$i" '$1 == p {print $2}')
  [[ -n "$want" ]] || die 4 "part-$i is not in the MANIFEST"
  mkdir -p "$stage"
  cp -f "$parts_dir/MANIFEST" "$stage/MANIFEST"
  cp -f "$src" "$stage/part-$i.tmp"
  [[ "$(sha "$stage/part-$i.tmp")" == "$want" ]] || die 4 "part-$i: SHA-256 mismatch (transfer broken? send it again)"
  mv -f "$stage/part-$i.tmp" "$stage/part-$i"
  log "part-$i stored in $stage ($(du -h "$stage/part-$i" | cut -f1)); have: $(cd "$stage" && ls part-* | tr '\n' ' ')"
}

run_e2e() {
  [[ -f "$stage/MANIFEST" ]] || die 4 "$stage/MANIFEST missing: no part was stored on this machine (it went cold?): send every part again"
  local n wheel_sha missing=()
  n=$(awk '$1 == "parts" {print $2}' "$stage/MANIFEST")
  wheel_sha=$(awk '$1 == "wheel" {print $3}' "$stage/MANIFEST")
  if [[ ! -f "$site_dir/onnxruntime/capi/libonnxruntime_providers_cuda.so" ]]; then
    for ((i = 0; i < n; i++)); do
      [[ -f "$stage/part-$i" ]] || missing+=("$i")
    done
    ((${#missing[@]} == 0)) || die 4 "parts missing in $stage: ${missing[*]} (the machine went cold between calls?): send them again with 'part I', then 'run'"
    log "reassembling $WHEEL"
    local parts=()
    for ((i = 0; i < n; i++)); do parts+=("$stage/part-$i"); done
    if command -v xz > /dev/null; then
      cat "${parts[@]}" | xz -d -T0 > "$stage/$WHEEL"
    else
      cat "${parts[@]}" | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 22)" > "$stage/$WHEEL"
    fi
    [[ "$(sha "$stage/$WHEEL")" == "$wheel_sha" ]] || die 5 "reassembled wheel: SHA-256 mismatch"
    local gs_wheel
    gs_wheel=$(ls "$dev_dir"/onnx_graphsurgeon-*.whl 2> /dev/null | head -1 || true)
    [[ -n "$gs_wheel" ]] || log "WARNING: no .dev/onnx_graphsurgeon-*.whl (carry .dev): the end-to-end stage will be skipped"
    log "installing into $site_dir"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site_dir" \
      "$stage/$WHEEL" ${gs_wheel:+"$gs_wheel"} || die 5 "pip install failed"
    rm -f "$stage/$WHEEL"
  else
    log "onnxruntime-gpu already installed in $site_dir"
  fi
  [[ -f "$dev_dir/libfptq_ops.so" ]] || die 3 ".dev/libfptq_ops.so not here: carry .dev"
  ort_env
  local out="${OUT:-/tmp}"
  set +e
  python3 "$repo/benchmarks/gpu_e2e.py" --lib "$dev_dir/libfptq_ops.so" --json "$out/gpu_e2e.json" "$@" 2>&1 \
    | tee "$out/gpu_e2e.log"
  local status=${PIPESTATUS[0]}
  set -e
  log "gpu_e2e.py exit status $status"
  return "$status"
}

# The environment in which the installed onnxruntime-gpu (in $site_dir) finds its CUDA libraries.
ort_env() {
  export PYTHONPATH="$site_dir${PYTHONPATH:+:$PYTHONPATH}"
  # The CUDA provider links libcublas/libcudart/libcurand/libcufft (CUDA 13): take them from the
  # nvidia-* pip packages that torch uses (gpu_e2e.py also preloads them).
  local libs
  libs=$(python3 - <<'EOF'
import glob, site, sys
dirs = []
for root in site.getsitepackages() + sys.path:
    for pattern in ("nvidia/cu13/lib", "nvidia/cudnn/lib", "nvidia/*/lib"):
        dirs += [d for d in glob.glob(f"{root}/{pattern}") if d not in dirs]
print(":".join(dirs))
EOF
)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONUNBUFFERED=1
  nvidia-smi -L || true
}

cmd="${1:-}"
shift || true
case "$cmd" in
  prepare) parse_lib_arg "$@"; ensure_ignored; prepare_wheel; prepare_lib; print_calls ;;
  lib) parse_lib_arg "$@"; ensure_ignored; prepare_lib; print_calls ;;
  part) [[ $# -eq 1 ]] || die 2 "usage: $0 part I"; part "$1" ;;
  run) run_e2e "$@" ;;
  env) [[ -f "$site_dir/onnxruntime/capi/libonnxruntime_providers_cuda.so" ]] \
         || die 4 "onnxruntime-gpu is not installed in $site_dir (run 'run' first, on the same warm machine)"
       ort_env; "$@" ;;
  *) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 2 ;;
esac
