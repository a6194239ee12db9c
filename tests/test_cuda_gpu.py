"""The W4A8 CUDA kernels through the standalone library (no ONNX Runtime):

* host-only entry points (sizes, plans, variant support, argument checks), no GPU needed;
* the GPU correctness suite (fptq_onnx.testing.cuda_correctness) through the emulated library on
  the CPU, which checks the suite itself;
* ``gpu``: the suite on the device, every variant on every case (``pytest -m gpu``; skips
  without a CUDA device). Options: ``--cuda-lib``, ``--cuda-cases full|quick|sanitize``,
  ``--cuda-variants`` (tests/conftest.py).

The library is ``--cuda-lib``, else ``build/cuda_standalone/libfptq_cuda_standalone.so``
(``bash benchmarks/build_cuda_standalone.sh`` builds it), else one built here for this module when
nvcc is on the machine (about a minute); without any, these skip.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
from test_build_cuda import find_nvcc

from fptq_onnx.testing import cuda_correctness, cuda_library
from fptq_onnx.testing import cuda_emulation as emu
from fptq_onnx.testing import cuda_emulation_tma as emu_tma
from fptq_onnx.testing.cuda_sources import AUTO, mma_tile, parse_variant_list, variant_name, variants

SMS, SMEM_PER_SM = 132, 233472  # an H200's
CUDA_ERROR_INVALID_VALUE = cuda_library.CUDA_ERROR_INVALID_VALUE


@pytest.fixture(scope="module")
def library_path(request, tmp_path_factory) -> Path:
    named = request.config.getoption("--cuda-lib")
    path = Path(named) if named else cuda_library.STANDALONE_LIBRARY
    if path.is_file():
        return path
    if named or find_nvcc() is None:
        pytest.skip(f"no standalone CUDA library at {path} and no nvcc to build one "
                    "(bash benchmarks/build_cuda_standalone.sh)")
    path = tmp_path_factory.mktemp("cuda_standalone") / path.name
    env = dict(os.environ, NVCC=find_nvcc())
    done = subprocess.run(["bash", str(cuda_library.BUILD_SCRIPT), str(path.parent)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert path.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    return path


@pytest.fixture(scope="module")
def lib(library_path):
    return cuda_library.load_library(library_path)


def plan(lib, M, N, K, gs, variant=AUTO):
    return cuda_library.plan_info(lib, M, N, K, gs, SMS, SMEM_PER_SM, variant)


def plan_rc(lib, M, N, K, gs, variant):
    return lib.fptq_w4a8_plan_info_variant(M, N, K, gs, SMS, SMEM_PER_SM, variant, (ctypes.c_int64 * 8)(), None)


def of_kernel(kernel: str) -> list[int]:
    return [v for v, info in variants().items() if info.kernel == kernel]


# --- host-only entry points ----------------------------------------------------------------------


@pytest.mark.parametrize("N,K,gs", [(37, 128, 32), (4097, 4096, 128), (11008, 4096, 64), (33, 512, 256)])
def test_packed_size_is_the_emulated_layout(lib, N, K, gs):
    assert cuda_library.packed_size(lib, N, K, gs) == emu.packed_layout(N, K, gs)["total"]


@pytest.mark.parametrize("N,K,gs", [(0, 128, 32), (37, 100, 32), (37, 96, 48), (37, 128, 16), (37, 384, 192)],
                         ids=["N = 0", "K % gs", "gs 48", "gs 16", "gs 192"])
def test_packed_size_rejects_unsupported_shapes(lib, N, K, gs):
    assert lib.fptq_w4a8_packed_size(N, K, gs, ctypes.byref(ctypes.c_size_t())) == CUDA_ERROR_INVALID_VALUE


@pytest.mark.parametrize("cfg,M", [(0, 1), (1, 40), (2, 300)])
@pytest.mark.parametrize("gs", [32, 64, 128, 256])
def test_planner_shared_memory_is_the_tile_the_source_defines(lib, cfg, M, gs):
    p = plan(lib, M, 4096, 4096, gs)
    assert p["cfg"] == cfg and p["smem"] == mma_tile(cfg, emu.sub_group_size(gs)).SMEM_BYTES


@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (16, 37, 4096), (256, 4096, 4096), (4096, 4096, 4096), (0, 64, 128)])
def test_split_k_never_leaves_a_split_empty(lib, M, N, K):
    p = plan(lib, M, N, K, 128)
    assert 1 <= p["split"] <= 16 and emu.ceil_div(p["k_tiles"], p["tiles_per_split"]) == p["split"]


@pytest.mark.parametrize("variant", of_kernel("tma"), ids=variant_name)
def test_tma_plans(lib, variant):
    info = variants()[variant]
    linked = lib.fptq_w4a8_variant_info(variant, 90, 128) == 1
    p = plan(lib, 300, 4096, 4096, 128, variant)
    xq_bytes = 0 if "fused_quant" in info.flags else p["m_tiles"] * info.rows * 4096
    assert p["cfg"] == 5 and p["m_tiles"] == emu.ceil_div(300, info.rows) and p["n_tiles"] == 32
    assert p["occupancy"] == 1 and p["workspace"] >= xq_bytes
    if linked:
        assert p["smem"] == emu_tma.cfg(info.rows).SMEM_BYTES
    assert plan_rc(lib, 300, 4096, 4096, 64, variant) == -1
    assert lib.fptq_w4a8_variant_info(variant, 89, 128) == 0 and lib.fptq_w4a8_variant_info(variant, 90, 64) == 0


def test_fused_quantization_keeps_no_xq_in_the_workspace(lib):
    unfused, fused = (next(v for v, i in variants().items() if i.kernel == "tma" and i.rows == 16
                           and ("fused_quant" in i.flags) == f) for f in (False, True))
    a, b = plan(lib, 16, 4096, 4096, 128, unfused), plan(lib, 16, 4096, 4096, 128, fused)
    assert b["split"] == a["split"] and b["workspace"] + 16 * 4096 <= a["workspace"]


@pytest.mark.parametrize("variant", [v for v, i in variants().items() if i.kernel == "mma" and "pdl" in i.flags],
                         ids=variant_name)
def test_pdl_variants_run_the_mma_tile_of_their_rows_on_sm90_only(lib, variant):
    info = variants()[variant]
    p = plan(lib, 40, 4096, 4096, 64, variant)
    assert mma_tile(p["cfg"], 64).BM == info.rows
    assert lib.fptq_w4a8_variant_info(variant, 90, 64) == 1 and lib.fptq_w4a8_variant_info(variant, 80, 64) == 0


@pytest.mark.parametrize("M", [1, 40, 300])
def test_auto_on_sm80_is_the_mma_tile_for_m(lib, M):
    chosen = variants()[lib.fptq_w4a8_resolve_variant(M, 128, 80)]
    assert chosen.kernel == "mma" and not chosen.flags and chosen.rows == (16 if M <= 16 else (32 if M <= 64 else 128))


@pytest.mark.parametrize("variant", [3, 5, 8, 12, 14, 20, -2],
                         ids=["deleted 3", "deleted 5", "deleted 8", "deleted 12", "deleted 14", "past the table", "below AUTO"])
def test_ids_that_name_no_variant_are_invalid(lib, variant):
    assert lib.fptq_w4a8_variant_info(variant, 90, 128) == -1
    assert plan_rc(lib, 16, 4096, 4096, 128, variant) == -1
    rc = lib.fptq_w4a8_workspace_size_variant(16, 4096, 4096, 128, variant, ctypes.byref(ctypes.c_size_t()))
    assert rc == CUDA_ERROR_INVALID_VALUE


def test_calls_without_work_or_with_bad_shapes_need_no_device(lib):
    size = ctypes.c_size_t(123)
    assert lib.fptq_w4a8_workspace_size(0, 37, 128, 32, ctypes.byref(size)) == 0 and size.value == 0
    assert lib.fptq_w4a8_matmul_cuda(None, 0, 0, 37, 128, 32, 1, None, None, None, 0, None, None) == 0
    assert lib.fptq_w4a8_matmul_cuda(None, 0, 1, 37, 100, 32, 1, None, None, None, 0, None, None) != 0


# --- the suite through the emulated library (CPU) ------------------------------------------------


@pytest.mark.parametrize("variant", [AUTO, *variants()], ids=variant_name)
def test_suite_passes_on_the_emulated_library(lib, variant):
    torch = pytest.importorskip("torch")
    report = cuda_correctness.check_variant(cuda_library.EmulatedLibrary(lib), cuda_library.Device(torch, emulated=True),
                                            cuda_correctness.EMULATED_CASES, variant, log=lambda line: None)
    assert report.failed == 0, report.failures
    assert report.passed > 0


def test_probes_run_in_child_processes_and_survive_a_failing_one(library_path):
    """run_probes on the emulated library: the child that fails (id 5 names no variant) exits,
    and a new child takes the variants after it."""
    pytest.importorskip("torch")
    verdicts = cuda_correctness.run_probes(library_path, [9, 5, 16], log=lambda line: None, emulated=True)
    assert verdicts[9] == "ok" and verdicts[16] == "ok", verdicts
    assert verdicts[5].startswith("FAIL"), verdicts


# --- on the GPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu(lib):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return cuda_library.Device(torch, emulated=False)


@pytest.fixture(scope="module")
def gpu_cases(request):
    which = request.config.getoption("--cuda-cases")
    return cuda_correctness.SANITIZE_CASES if which == "sanitize" else cuda_correctness.correctness_cases(which == "quick")


@pytest.fixture(scope="module")
def probes(request, gpu, lib, library_path) -> dict:
    """Verdicts of the sm_90-feature variants' first runs, each in a child process (none under
    --cuda-cases sanitize: compute-sanitizer follows one process)."""
    if request.config.getoption("--cuda-cases") == "sanitize":
        return {}
    chosen = set(parse_variant_list(request.config.getoption("--cuda-variants")))
    todo = [v for v in cuda_correctness.probed_variants(lib, gpu.compute_capability()) if v in chosen]
    return cuda_correctness.run_probes(library_path, todo) if todo else {}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [AUTO, *variants()], ids=variant_name)
def test_variant_matches_the_reference_on_the_gpu(request, variant, gpu, lib, gpu_cases, probes):
    if variant not in parse_variant_list(request.config.getoption("--cuda-variants")):
        pytest.skip("not in --cuda-variants")
    cc = gpu.compute_capability()
    if variant != AUTO and lib.fptq_w4a8_variant_info(variant, cc, 128) != 1:
        pytest.skip(f"{variant_name(variant)} does not run on this device (sm_{cc}) or build")
    verdict = probes.get(variant, "ok")
    if verdict != "ok":
        pytest.fail(f"its probe in a child process: {verdict}")  # not run here: it may break the CUDA context
    report = cuda_correctness.check_variant(lib, gpu, gpu_cases, variant)
    assert report.failed == 0, "\n".join(report.failures)
