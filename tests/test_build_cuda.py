"""The CUDA part of the build (no GPU needed): with nvcc on the build machine the installed
libfptq_ops.so holds the W4A8 CUDA kernel for sm_80 and sm_90 (plus compute_90 PTX), links the
CUDA runtime statically, exports nothing of it, and still serves CPU sessions on a machine
without a GPU or CUDA driver; the FPTQ_CUDA option of CMake behaves as documented.

What runs on the GPU (the kernel inside onnxruntime-gpu) is benchmarks/gpu_e2e.py, launched on
the GPU machine by benchmarks/device_ort_gpu.sh.
"""
from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import fptq_onnx
from fptq_onnx import quant
from fptq_onnx.op_contract import OP_DOMAIN, OP_TYPE, add_w4a8_function
from fptq_onnx.session import has_cuda_kernel
from fptq_onnx.testing import check_sass

REPO = Path(__file__).resolve().parent.parent


# --- tools ----------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    """nvcc as CMakeLists.txt looks for it: $CUDACXX, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin,
    /usr/local/bin."""
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"] if os.access(os.environ["CUDACXX"], os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for folder in (os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda", "/usr/local"):
        candidate = Path(folder) / "bin" / "nvcc"
        if folder and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA install or the nvidia-cuda-cuobjdump wheel of this Python."""
    return check_sass.find_tool("cuobjdump")


CUDA_BUILD_EXPECTED = find_nvcc() is not None and os.environ.get("FPTQ_CUDA", "").upper() not in ("OFF", "0", "FALSE", "NO")


# --- a minimal ELF64 reader (no binutils needed) ----------------------------------------------


class Elf:
    """Sections, DT_NEEDED entries and defined dynamic symbols of a little-endian ELF64 file."""

    def __init__(self, path: str):
        self.data = Path(path).read_bytes()
        assert self.data[:4] == b"\x7fELF" and self.data[4] == 2 and self.data[5] == 1, "not a little-endian ELF64"
        shoff, = struct.unpack_from("<Q", self.data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", self.data, 0x3A)
        raw = [struct.unpack_from("<IIQQQQIIQQ", self.data, shoff + i * shentsize) for i in range(shnum)]
        names = raw[shstrndx]
        self.sections = {}
        for name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in raw:
            self.sections[self._string(names[4], name)] = (kind, offset, size, link, entsize)

    def _string(self, table_offset: int, index: int) -> str:
        start = table_offset + index
        return self.data[start:self.data.index(b"\0", start)].decode()

    def section(self, name: str) -> bytes:
        _kind, offset, size, _link, _entsize = self.sections[name]
        return self.data[offset:offset + size]

    def needed(self) -> list[str]:
        _kind, offset, size, _link, _entsize = self.sections[".dynamic"]
        dynstr = self.sections[".dynstr"][1]
        out = []
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", self.data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                out.append(self._string(dynstr, value))
        return out

    def exported(self) -> set[str]:
        """Names of the defined GLOBAL/WEAK dynamic symbols with default or protected visibility."""
        _kind, offset, size, _link, entsize = self.sections[".dynsym"]
        dynstr = self.sections[".dynstr"][1]
        out = set()
        for pos in range(offset, offset + size, entsize):
            name, info, other, shndx, _value, _size = struct.unpack_from("<IBBHQQ", self.data, pos)
            if shndx != 0 and (info >> 4) in (1, 2) and (other & 3) in (0, 3):
                out.add(self._string(dynstr, name))
        return out

    def fatbin_entries(self) -> set[tuple[str, int]]:
        """{("elf" | "ptx", sm)} of the CUDA fat binaries in .nv_fatbin (empty if none). Layout:
        header {u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size}, then entries
        {u16 kind (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size, ..., u32 sm at 28}."""
        if ".nv_fatbin" not in self.sections:
            return set()
        blob = self.section(".nv_fatbin")
        entries, pos = set(), 0
        while pos + 16 <= len(blob):
            magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
            if magic != 0xBA55ED50:
                pos += 8  # fat binaries are 8-byte aligned inside the section
                continue
            entry, end = pos + header_size, pos + header_size + fat_size
            while entry + 32 <= end:
                kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
                sm, = struct.unpack_from("<I", blob, entry + 28)
                entries.add(({1: "ptx", 2: "elf"}.get(kind, f"kind{kind}"), sm))
                entry += entry_header + payload
            pos = end
        return entries


@pytest.fixture(scope="module")
def library() -> str:
    return fptq_onnx.library_path()


@pytest.fixture(scope="module")
def cuda_library(library) -> str:
    if not has_cuda_kernel(library):
        if CUDA_BUILD_EXPECTED:
            pytest.fail(f"nvcc is on this machine ({find_nvcc()}) but {library} has no CUDA kernel: the build "
                        "did not compile it (see the 'fptq_ops: CUDA kernel' line of the CMake output)")
        pytest.skip("no nvcc here (or FPTQ_CUDA=OFF): the library is CPU-only")
    return library


# --- the built library --------------------------------------------------------------------------


def test_library_holds_the_cuda_kernel_when_nvcc_is_available(library):
    if not CUDA_BUILD_EXPECTED:
        pytest.skip("no nvcc here (or FPTQ_CUDA=OFF): a CPU-only library is expected")
    assert has_cuda_kernel(library), f"{library} was built without the CUDA kernel although nvcc is at {find_nvcc()}"


def test_fatbinary_has_sm80_sm90_machine_code_and_compute90_ptx(cuda_library):
    entries = Elf(cuda_library).fatbin_entries()
    assert {("elf", 80), ("elf", 90), ("ptx", 90)} <= entries, entries
    cuobjdump = find_cuobjdump()
    if cuobjdump:  # the same answer from NVIDIA's tool
        listing = subprocess.run([cuobjdump, "--list-elf", cuda_library], capture_output=True, text=True,
                                 check=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing


def test_sass_uses_int8_tensor_cores(cuda_library):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=f"{os.environ.get('PATH', '')}:{Path(cuobjdump).parent}")  # for nvdisasm
    result = subprocess.run([cuobjdump, "-sass", cuda_library], capture_output=True, text=True, env=env)
    if result.returncode != 0 and "nvdisasm" in result.stderr:
        pytest.skip(f"cuobjdump -sass needs nvdisasm: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    per_arch: dict[str, int] = {}
    arch = None
    for line in result.stdout.splitlines():
        if "arch = sm_" in line:
            arch = line.split("arch = ")[1].split()[0]
        elif "IMMA" in line and arch:
            per_arch[arch] = per_arch.get(arch, 0) + 1
    assert per_arch.get("sm_80", 0) > 0 and per_arch.get("sm_90", 0) > 0, per_arch


def test_sass_of_every_kernel_passes_check_sass(cuda_library):
    """fptq_onnx/testing/check_sass.py on the installed library: IMMA int8 in the sm_80 / sm_90 GEMM;
    in the sm_90a code int8 IGMMA, and in the TMA kernel bulk copies (UBLKCP), mbarrier waits
    and transaction arrives (SYNCS), setmaxnreg (USETMAXREG), A from registers and two
    accumulator sets where it overlaps; no local memory anywhere."""
    if find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    failures, rows = check_sass.check(cuda_library)
    assert not failures, failures
    tma = {r["kernel"] for r in rows if r["arch"] == "sm_90a" and r["kernel"].startswith("w4a8_tma_kernel")}
    assert tma == {"w4a8_tma_kernel<128,0,0>", "w4a8_tma_kernel<64,1,0>", "w4a8_tma_kernel<16,1,0>",
                   "w4a8_tma_kernel<16,1,1>"}, tma


def test_tma_kernel_ptxas_report_is_clean(tmp_path):
    """The sm_90a TMA kernel alone through ptxas -v: no spills and no note that wgmma was
    serialized or setmaxnreg ignored (C7508 / C7510 / C7512 / C7517 / C7518)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc here")
    result = subprocess.run([nvcc, "-O3", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", "-cubin",
                             "-Xptxas", "-v", "-I", str(REPO / "custom_ops"), "-o", str(tmp_path / "tma.cubin"),
                             str(REPO / "custom_ops" / "w4a8_cuda_sm90_tma.cu")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("Compiling entry function") == 4, log
    spills = [line for line in log.splitlines() if "spill" in line and not line.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")]
    assert not spills, spills
    notes = [line for line in log.splitlines() if any(code in line for code in ("C7508", "C7510", "C7512", "C7517", "C7518"))]
    assert not notes, notes


def test_cuda_runtime_is_static_and_hidden(cuda_library):
    """No libcudart/libcuda dependency (the library must load where no driver is installed, and
    beside any framework's own libcudart), and no CUDA or launcher symbol exported."""
    elf = Elf(cuda_library)
    assert not [name for name in elf.needed() if name.startswith(("libcuda", "libcudart"))], elf.needed()
    exported = elf.exported()
    assert {"RegisterCustomOps", "fptq_ops_has_cuda"} <= exported
    leaked = sorted(name for name in exported if name.startswith(("fptq_w4a8", "cuda", "__cuda")))
    assert not leaked, leaked


# --- CPU sessions with the CUDA-enabled library -----------------------------------------------


def one_node_model(k=256, n=19, group_size=128, act_mode=1):
    rng = np.random.default_rng(3)
    u, scales, zeros = quant.quantize_weight_groupwise(rng.standard_normal((k, n)).astype(np.float32), group_size,
                                                       False)
    weights = {"B": quant.pack_int4(u), "S": scales, "Z": zeros, "A": np.asarray(1.0, np.float32)}
    node = helper.make_node(OP_TYPE, ["X", "B", "S", "Z", "A"], ["Y"], domain=OP_DOMAIN, K=k, N=n,
                            group_size=group_size, act_mode=act_mode)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(v, name) for name, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    add_w4a8_function(model)
    return model.SerializeToString(), weights


def test_cpu_session_with_the_cuda_library(library):
    """The CUDA op is registered next to the CPU op; a CPU session (no GPU, no CUDA driver here)
    picks the CPU kernel and matches the reference."""
    model, w = one_node_model()
    x = np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32)
    got = fptq_onnx.InferenceSession(model).run(None, {"X": x})[0]
    expected = quant.w4a8_matmul_reference(x, w["B"], w["S"], w["Z"], 1.0, 1)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_cuda_provider_requested_without_a_gpu_build_warns_and_runs_on_cpu():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: benchmarks/gpu_e2e.py covers it")
    model, w = one_node_model()
    x = np.ones((2, 256), np.float32)
    with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own "not available" warning
            session = fptq_onnx.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    expected = quant.w4a8_matmul_reference(x, w["B"], w["S"], w["Z"], 1.0, 1)
    assert np.abs(session.run(None, {"X": x})[0] - expected).max() <= 1e-5 * np.abs(expected).max()


# --- the FPTQ_CUDA option (CMake configure only) ----------------------------------------------


def ort_headers() -> str | None:
    for candidate in sorted(glob.glob(str(REPO / "build" / "*" / "ort-headers" / "usr" / "include" / "onnxruntime"))):
        if (Path(candidate) / "onnxruntime_cxx_api.h").is_file():
            return candidate
    return os.environ.get("ONNXRUNTIME_INCLUDE_DIR")


def configure(tmp_path, *defines, env=None):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    headers = ort_headers()
    if headers is None:
        pytest.skip("no ONNX Runtime headers in build/ (pip install the project first)")
    cmd = ["cmake", "-S", str(REPO / "custom_ops"), "-B", str(tmp_path / "build"),
           f"-DONNXRUNTIME_INCLUDE_DIR={headers}", *defines]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    run_env = {k: v for k, v in os.environ.items() if k != "FPTQ_CUDA"}
    run_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=300)


def test_fptq_cuda_off_builds_the_cpu_only_library(tmp_path):
    result = configure(tmp_path, "-DFPTQ_CUDA=OFF")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fptq_ops: CUDA kernel OFF, building the CPU-only library (FPTQ_CUDA=OFF)" in result.stdout


def test_fptq_cuda_from_the_environment(tmp_path):
    result = configure(tmp_path, env={"FPTQ_CUDA": "off"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA kernel OFF" in result.stdout


def test_fptq_cuda_rejects_unknown_values(tmp_path):
    result = configure(tmp_path, "-DFPTQ_CUDA=maybe")
    assert result.returncode != 0
    assert "FPTQ_CUDA='MAYBE' must be AUTO, ON or OFF" in result.stdout + result.stderr


def test_fptq_cuda_on_without_nvcc_fails_clearly(tmp_path):
    result = configure(tmp_path, "-DFPTQ_CUDA=ON", env={"CUDACXX": str(tmp_path / "no-nvcc")})
    assert result.returncode != 0
    assert "FPTQ_CUDA=ON but no working nvcc found" in result.stdout + result.stderr


def test_fptq_cuda_auto_without_nvcc_builds_the_cpu_only_library(tmp_path):
    result = configure(tmp_path, env={"CUDACXX": str(tmp_path / "no-nvcc")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA kernel OFF, building the CPU-only library (no working nvcc found" in result.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
