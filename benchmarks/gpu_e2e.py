#!/usr/bin/env python3
"""ai.fptq::W4A8MatMul inside onnxruntime-gpu: the CUDA kernel of libfptq_ops.so as ONNX Runtime
runs it (CUDAExecutionProvider), against the CPU paths and the float64 reference.

Run on the GPU machine by ``benchmarks/device_ort_gpu.sh`` (which installs onnxruntime-gpu
first); runs anywhere, without a GPU, for its CPU-side parts.

1. setup: which onnxruntime, which library (``--lib``, ``$FPTQ_ONNX_LIBRARY``,
   ``.dev/libfptq_ops.so``, the package's copy), whether the library holds the CUDA kernel,
   whether the CUDA provider can be created (its CUDA libraries are loaded from the nvidia-*
   pip packages when present).
2. op level (one W4A8MatMul node per model, built with ``fptq_onnx/op_contract.py`` and weights
   from ``fptq_onnx/quant.py``): the CUDA kernel (CUDA EP + library, CPU fallback disabled, so
   the node provably runs on the GPU; profiling names the provider too) against the float64
   reference and the function body on the CPU EP: both act modes, float32 and float16 X,
   odd N, K tails, group sizes 32/64/128/256, M = 0, 3-D X, X bound on the device, weights
   fed at run time (per-call repack), four threads on one session (first run too), and
   errors (unsupported group size at session creation, wrong K, bad act_scale).
3. end to end: a synthetic decoder (RMSNorm, q/k/v/o, softmax attention, SwiGLU MLP,
   residuals, final norm and float lm_head; default hidden 2048, 4 layers) converted with the
   project's pipeline (find linears -> calibrate on the CPU -> ``pipeline.convert_graph``:
   strategy -> LAE -> static scales -> 4-bit weights -> W4A8MatMul), then logits of the CUDA EP
   vs the CPU kernel (top-1 agreement and max relative error), and forward times at batch x seq 1x1, 1x512, 32x512:
   W4A8 with float32 and float16 activations vs the same model with float16 MatMuls, all on
   the CUDA EP with inputs and outputs on the device.

Exit status: 0 all passed; 1 a correctness failure; 2 no usable CUDAExecutionProvider (the
CPU-side parts ran and passed); 3 setup problem (library missing or built without CUDA,
onnx_graphsurgeon missing for stage 3).

    python3 benchmarks/gpu_e2e.py [--lib PATH] [--small] [--skip-e2e] [--json PATH]
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import importlib
import importlib.util
import json
import os
import site
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
REL_TOL_F32 = 1e-5  # of max |Y|, as the CPU kernel's tests (docs/ops.md)
REL_TOL_F16 = 1e-3  # Y rounded to float16: 2^-11 of |Y| plus the float32 bound
EXIT_OK, EXIT_FAIL, EXIT_NO_GPU, EXIT_SETUP = 0, 1, 2, 3

T0 = time.perf_counter()


def log(*args) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *args, flush=True)


# ------------------------------------------------------------------------------------------
# project modules from the source tree
# ------------------------------------------------------------------------------------------


def import_project():
    """``fptq_onnx.quant`` and ``fptq_onnx.passes.*`` from this checkout, without installing it.

    The wheel maps ``passes/`` to ``fptq_onnx.passes``; the source tree does not, so a shim
    package ``fptq_onnx`` (``__path__`` = ``fptq_onnx/``, no ``__init__`` run: that one imports
    onnxruntime) gets ``passes/`` as its subpackage. Returns (quant, functions).
    """
    pkg = types.ModuleType("fptq_onnx")
    pkg.__path__ = [str(REPO / "fptq_onnx")]
    sys.modules["fptq_onnx"] = pkg
    spec = importlib.util.spec_from_file_location(
        "fptq_onnx.passes", REPO / "passes" / "__init__.py", submodule_search_locations=[str(REPO / "passes")])
    passes = importlib.util.module_from_spec(spec)
    sys.modules["fptq_onnx.passes"] = passes
    spec.loader.exec_module(passes)
    pkg.passes = passes
    return importlib.import_module("fptq_onnx.quant"), importlib.import_module("fptq_onnx.op_contract")


quant, functions = import_project()


# ------------------------------------------------------------------------------------------
# onnxruntime and the library
# ------------------------------------------------------------------------------------------


def preload_cuda_libraries() -> list[str]:
    """Loads (RTLD_GLOBAL) the CUDA libraries the CUDA provider links, from the nvidia-* pip
    packages of this Python (CUDA 13 layout ``nvidia/cu13/lib``, cuDNN ``nvidia/cudnn/lib``)
    or, failing that, from the loader's path. Returns what was loaded, by path."""
    roots = [Path(p) for p in (site.getsitepackages() + [site.getusersitepackages()] + sys.path) if p]
    lib_dirs = []
    for root in roots:
        for pattern in ("nvidia/cu13/lib", "nvidia/cudnn/lib", "nvidia/*/lib"):
            lib_dirs += [Path(d) for d in glob.glob(str(root / pattern))]
    lib_dirs += [Path("/usr/local/cuda/lib64")]
    loaded = []
    # Order matters: cublas needs cublasLt; cudnn is optional for the ops used here.
    for name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12",
                 "libnvrtc.so.13", "libcudnn.so.9"):
        for d in lib_dirs:
            path = d / name
            if path.is_file():
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                    loaded.append(str(path))
                except OSError as e:
                    log(f"  could not load {path}: {e}")
                break
    return loaded


def find_library(arg: str | None) -> Path | None:
    candidates = [arg, os.environ.get("FPTQ_ONNX_LIBRARY"), REPO / ".dev" / "libfptq_ops.so",
                  REPO / "fptq_onnx" / "libfptq_ops.so"]
    candidates += sorted(glob.glob(str(REPO / "build" / "*" / "libfptq_ops.so")))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def library_has_cuda(path: Path) -> bool:
    probe = getattr(ctypes.CDLL(str(path)), "fptq_ops_has_cuda", None)
    if probe is None:
        return False
    probe.restype, probe.argtypes = ctypes.c_int, []
    return bool(probe())


class Env:
    """onnxruntime, the library and the CUDA provider options for every session.

    self_test: the "GPU" stages run on CPUExecutionProvider with host memory (--self-test):
    checks this script's GPU code paths on a machine without a GPU.
    """

    def __init__(self, ort, lib: Path, cuda: bool, self_test: bool = False):
        self.ort = ort
        self.lib = lib
        self.cuda = cuda
        self.cuda_options = {"device_id": "0"}
        self.self_test = self_test
        self.gpu_ep = CPU_EP if self_test else CUDA_EP  # the provider the W4A8 nodes must run on
        self.device = "cpu" if self_test else "cuda"  # OrtValue device of bound inputs/outputs

    def options(self, library=True, no_cpu_fallback=False, profile_dir=None):
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        if library:
            opts.register_custom_ops_library(str(self.lib))
        if no_cpu_fallback:
            opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
        return opts

    def cuda_session(self, model_bytes, no_cpu_fallback=True, profile_dir=None, tf32=False):
        if self.self_test:
            return self.ort.InferenceSession(model_bytes, sess_options=self.options(profile_dir=profile_dir),
                                             providers=[CPU_EP])
        options = dict(self.cuda_options, use_tf32="1" if tf32 else "0")
        return self.ort.InferenceSession(
            model_bytes, sess_options=self.options(no_cpu_fallback=no_cpu_fallback, profile_dir=profile_dir),
            # ORT refuses an explicit CPU EP together with disable_cpu_ep_fallback
            providers=[(CUDA_EP, options)] + ([] if no_cpu_fallback else [CPU_EP]))

    def cpu_session(self, model_bytes, library=True):
        return self.ort.InferenceSession(model_bytes, sess_options=self.options(library=library), providers=[CPU_EP])


def providers_of_w4a8_nodes(profile_path: str) -> dict[str, int]:
    """{provider: number of W4A8MatMul kernel events} from an ORT profile."""
    with open(profile_path) as f:
        events = json.load(f)
    counts: dict[str, int] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and args.get("op_name") == functions.OP_TYPE and "provider" in args:
            counts[args["provider"]] = counts.get(args["provider"], 0) + 1
    return counts


# ------------------------------------------------------------------------------------------
# checks bookkeeping
# ------------------------------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed: list[str] = []
        self.results: dict[str, object] = {}

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        log(f"  ok    {name}{'  ' + detail if detail else ''}")

    def fail(self, name: str, detail: str) -> None:
        self.failed.append(f"{name}: {detail}")
        log(f"  FAIL  {name}  {detail}")

    def check(self, name: str, condition: bool, detail: str = "") -> bool:
        (self.ok if condition else self.fail)(name, detail)
        return condition

    def guarded(self, name: str, fn) -> None:
        """Runs fn(); an exception is a failure of `name` (the run goes on)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- report and go on with the other checks
            self.fail(name, f"{type(e).__name__}: {e}")
            traceback.print_exc()
            sys.stdout.flush()


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected| (0 for two empty or all-zero arrays)."""
    if got.shape != expected.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    scale = float(np.abs(expected).max())
    err = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    return err / scale if scale > 0 else err


# ------------------------------------------------------------------------------------------
# op-level models (as tests/test_kernel_cpu.py builds them)
# ------------------------------------------------------------------------------------------


def quantized_weights(rng, k, n, group_size, symmetric):
    w = rng.standard_normal((k, n)).astype(np.float32)
    u, scales, zeros = quant.quantize_weight_groupwise(w, group_size, symmetric)
    return {"B": quant.pack_int4(u), "S": scales, "Z": zeros}


def w4a8_model(weights, act_scale, **attributes):
    """``functions.single_op_model``, checked by onnx.checker (the benchmark's models are all valid)."""
    import onnx

    model = functions.single_op_model(weights, act_scale, **attributes)
    onnx.checker.check_model(onnx.load_from_string(model))
    return model


# (M or X shape, K, N, group_size, act_mode, symmetric): odd N, K tails past the last 128-wide
# k-tile, every tile config of the kernel (M <= 16, <= 64, > 64), split-K (M = 1, large K).
OP_CASES = [
    ((1, 128), 7, 32, 0, True),
    ((3, 384), 37, 64, 0, False),
    ((17, 384), 1, 128, 0, True),
    ((17, 128), 37, 64, 1, False),
    ((3, 96), 7, 32, 1, True),
    ((1, 4096), 4097, 128, 1, False),
    ((65, 1024), 300, 256, 0, False),
    ((257, 2048), 1000, 128, 1, False),
    ((1024, 512), 4096, 128, 0, True),
    ((2, 3, 192), 11, 64, 1, False),
    ((0, 256), 64, 128, 1, False),
    ((2, 0, 256), 64, 128, 0, True),
]


def op_case_data(rng, shape, n, group_size, act_mode, symmetric, x_dtype):
    k = shape[-1]
    weights = quantized_weights(rng, k, n, group_size, symmetric)
    x = (rng.standard_normal(shape) * 3.0).astype(x_dtype)
    act_scale = np.float32(max(float(np.abs(x.astype(np.float32)).max(initial=0.0)), 1.0) / 127.0)
    if act_mode == 0 and x.size:
        x.reshape(-1, k)[0, :4] = (200 * act_scale)  # a few values beyond 127 * act_scale: saturation
    reference = quant.w4a8_matmul_reference(x.astype(np.float32), weights["B"], weights["S"], weights["Z"],
                                            act_scale, act_mode)
    return weights, x, act_scale, reference


def run_op_level(env: Env, checks: Checks, gpu: bool) -> None:
    """Stage 2. Without a GPU: the same models through the CPU kernel, to check this script."""
    from onnx import TensorProto

    ort = env.ort
    rng = np.random.default_rng(2024)
    log("stage 2: op level" + ("" if gpu else " (no GPU: CPU kernel vs reference only)"))
    profiled = False
    for shape, n, group_size, act_mode, symmetric in OP_CASES:
        for x_dtype, x_type, tol in ((np.float32, TensorProto.FLOAT, REL_TOL_F32),
                                     (np.float16, TensorProto.FLOAT16, REL_TOL_F16)):
            name = (f"op M={'x'.join(map(str, shape[:-1]))} K={shape[-1]} N={n} g={group_size} "
                    f"act={act_mode} {'sym' if symmetric else 'asym'} {np.dtype(x_dtype).name}")

            def one_case():
                nonlocal profiled
                weights, x, act_scale, reference = op_case_data(rng, shape, n, group_size, act_mode, symmetric,
                                                                x_dtype)
                model = w4a8_model(weights, act_scale, k=shape[-1], n=n, group_size=group_size,
                                   act_mode=act_mode, x_rank=len(shape), x_type=x_type)
                expected_shape = shape[:-1] + (n,)
                body = env.cpu_session(model, library=False).run(None, {"X": x})[0]
                if not gpu:
                    got = env.cpu_session(model).run(None, {"X": x})[0]
                    checks.check(name + " [cpu kernel]", got.shape == expected_shape and got.dtype == x_dtype
                                 and rel_err(got, reference) <= tol,
                                 f"rel err {rel_err(got, reference):.2e}")
                    return
                with tempfile.TemporaryDirectory() as tmp:
                    profile = not profiled and x.size > 0
                    session = env.cuda_session(model, profile_dir=tmp if profile else None)
                    got = session.run(None, {"X": x})[0]
                    if profile:
                        counts = providers_of_w4a8_nodes(session.end_profiling())
                        profiled = True
                        checks.check("profile: W4A8MatMul ran on the CUDA EP", set(counts) == {env.gpu_ep},
                                     f"kernel events by provider: {counts}")
                    again = session.run(None, {"X": x})[0]
                e_ref, e_body = rel_err(got, reference), rel_err(got, body)
                good = (got.shape == expected_shape and got.dtype == x_dtype and e_ref <= tol and e_body <= tol
                        and np.array_equal(got, again))
                checks.check(name, good, f"rel err vs float64 {e_ref:.2e}, vs function body {e_body:.2e}, "
                             f"rerun {'bit-identical' if np.array_equal(got, again) else 'DIFFERS'}")

            checks.guarded(name, one_case)
    if not gpu:
        return

    checks.guarded("X and Y bound on the device (IOBinding)", lambda: check_iobinding(env, checks, rng))
    checks.guarded("weights fed at run time (per-call repack)", lambda: check_graph_input_weights(env, checks, rng))
    checks.guarded("4 threads on one session", lambda: check_threads(env, checks, rng))
    checks.guarded("errors", lambda: check_errors(env, checks, rng, ort))


def check_iobinding(env, checks, rng):
    ort = env.ort
    weights, x, act_scale, reference = op_case_data(rng, (33, 640), 129, 128, 1, False, np.float32)
    session = env.cuda_session(w4a8_model(weights, act_scale, k=640, n=129, group_size=128, act_mode=1))
    binding = session.io_binding()
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, env.device, 0)
    binding.bind_ortvalue_input("X", x_dev)
    binding.bind_output("Y", env.device, 0)
    session.run_with_iobinding(binding)
    y_dev = binding.get_outputs()[0]
    on_device = y_dev.device_name().lower() == env.device
    got = binding.copy_outputs_to_cpu()[0]
    checks.check("X and Y bound on the device (IOBinding)", on_device and rel_err(got, reference) <= REL_TOL_F32,
                 f"Y on {y_dev.device_name()}, rel err {rel_err(got, reference):.2e}")


def check_graph_input_weights(env, checks, rng):
    k, n, gs = 256, 40, 64
    model = w4a8_model(quantized_weights(rng, k, n, gs, False), 0.05, k=k, n=n, group_size=gs, act_mode=0,
                       graph_inputs=("B", "S", "Z", "A"))
    session = env.cuda_session(model)
    errors = []
    for trial in range(2):  # new weights at (likely) the same device addresses: no stale cache
        weights = quantized_weights(rng, k, n, gs, False)
        x = rng.standard_normal((5, k)).astype(np.float32)
        act_scale = np.float32(0.03 + 0.01 * trial)
        got = session.run(None, {"X": x, "B": weights["B"], "S": weights["S"], "Z": weights["Z"],
                                 "A": np.asarray(act_scale)})[0]
        errors.append(rel_err(got, quant.w4a8_matmul_reference(x, weights["B"], weights["S"], weights["Z"],
                                                                act_scale, 0)))
    checks.check("weights fed at run time (per-call repack)", max(errors) <= REL_TOL_F32,
                 "rel errs " + ", ".join(f"{e:.2e}" for e in errors))


def check_threads(env, checks, rng):
    k, n, gs = 1024, 515, 128
    weights = quantized_weights(rng, k, n, gs, False)
    model = w4a8_model(weights, 1.0, k=k, n=n, group_size=gs, act_mode=1)
    inputs = [rng.standard_normal((m, k)).astype(np.float32) for m in (1, 7, 64, 300)]
    expected = [quant.w4a8_matmul_reference(x, weights["B"], weights["S"], weights["Z"], 1.0, 1) for x in inputs]
    for fresh in (True, False):  # a fresh session: the four first runs race for the repack
        session = env.cuda_session(model)
        if not fresh:
            session.run(None, {"X": inputs[0]})
        barrier = threading.Barrier(len(inputs))
        worst = [0.0] * len(inputs)
        errors = []

        def worker(i):
            try:
                barrier.wait()
                for _ in range(10):
                    got = session.run(None, {"X": inputs[i]})[0]
                    worst[i] = max(worst[i], rel_err(got, expected[i]))
            except Exception as e:  # noqa: BLE001
                errors.append(f"thread {i}: {e}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        label = "4 threads on one session" + (" (first runs concurrent)" if fresh else " (warm)")
        checks.check(label, not errors and max(worst) <= REL_TOL_F32,
                     "; ".join(errors) or f"worst rel err {max(worst):.2e} over 4 x 10 runs")


def check_errors(env, checks, rng, ort):
    def expect_failure(label, make, needle):
        try:
            make()
        except Exception as e:  # noqa: BLE001
            checks.check(label, needle in str(e), f"raised {type(e).__name__}: {str(e)[:200]}")
            return
        checks.fail(label, "no error raised")

    # Group size 96 is valid for the contract (and the CPU kernel) but not for the CUDA kernel.
    model96 = w4a8_model(quantized_weights(rng, 192, 8, 96, False), 0.05, k=192, n=8, group_size=96, act_mode=0)
    if not env.self_test:
        expect_failure("group_size=96 refused at session creation", lambda: env.cuda_session(model96), "group_size=96")
    cpu_ok = env.cpu_session(model96).run(None, {"X": np.ones((2, 192), np.float32)})[0].shape == (2, 8)
    checks.check("group_size=96 still runs on the CPU EP", cpu_ok)

    model = w4a8_model(quantized_weights(rng, 128, 9, 64, True), 0.05, k=128, n=9, group_size=64, act_mode=0)
    session = env.cuda_session(model)
    expect_failure("X with the wrong last dim fails the run",
                   lambda: session.run(None, {"X": np.ones((2, 64), np.float32)}), "K=128")
    zero_scale = w4a8_model(quantized_weights(rng, 128, 9, 64, True), 0.0, k=128, n=9, group_size=64, act_mode=0)
    expect_failure("act_scale=0 with act_mode=0 fails the run",
                   lambda: env.cuda_session(zero_scale).run(None, {"X": np.ones((2, 128), np.float32)}), "act_scale")
    # The session still works after a failed run.
    got = session.run(None, {"X": np.ones((2, 128), np.float32)})[0]
    checks.check("session usable after a failed run", got.shape == (2, 9) and np.isfinite(got).all())


# ------------------------------------------------------------------------------------------
# end to end: a synthetic decoder through the project's passes
# ------------------------------------------------------------------------------------------


def decoder_weights(rng, hidden, layers, inter, vocab):
    def linear(k, n):
        return (rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))).astype(np.float32)

    w = {"axes": np.array([-1], np.int64), "eps": np.array(1e-6, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = rng.uniform(0.5, 2.0, hidden).astype(np.float32)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[f"{p}.self_attn.{proj}.weight"] = linear(hidden, hidden)
        w[f"{p}.post_attention_layernorm.weight"] = rng.uniform(0.5, 2.0, hidden).astype(np.float32)
        w[f"{p}.mlp.gate_proj.weight"] = linear(hidden, inter)
        w[f"{p}.mlp.up_proj.weight"] = linear(hidden, inter)
        w[f"{p}.mlp.down_proj.weight"] = linear(inter, hidden)
    w["model.norm.weight"] = rng.uniform(0.5, 2.0, hidden).astype(np.float32)
    w["lm_head.weight"] = linear(hidden, vocab)
    return w


def decoder_model(weights, hidden, layers, heads, dtype=np.float32):
    """x[B, S, hidden] -> logits[B, S, vocab]. Attention without a causal mask (the cost is the
    same); RMSNorm written out (Mul, ReduceMean, Add, Sqrt, Div, Mul gamma) as exporters do, so
    that LAE can fold into the gammas. dtype: float type of every float tensor."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    head_dim = hidden // heads
    consts = {
        "split_heads": np.array([0, 0, heads, head_dim], np.int64),
        "merge_heads": np.array([0, 0, hidden], np.int64),
        "attn_scale": np.array(1.0 / np.sqrt(head_dim), np.float32),
    }
    nodes = []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def rmsnorm(x, gamma, tag):
        sq = node("Mul", [x, x], f"{tag}/sq")
        ms = node("ReduceMean", [sq, "axes"], f"{tag}/ms", keepdims=1)
        rms = node("Sqrt", [node("Add", [ms, "eps"], f"{tag}/ms_eps")], f"{tag}/rms")
        return node("Mul", [node("Div", [x, rms], f"{tag}/normed"), gamma], f"{tag}/out")

    x = "x"
    for i in range(layers):
        p = f"model.layers.{i}"
        h = rmsnorm(x, f"{p}.input_layernorm.weight", f"{p}/input_norm")
        qkv = {}
        for proj in ("q", "k", "v"):
            y = node("MatMul", [h, f"{p}.self_attn.{proj}_proj.weight"], f"{p}/{proj}")
            y = node("Reshape", [y, "split_heads"], f"{p}/{proj}_heads")
            qkv[proj] = node("Transpose", [y], f"{p}/{proj}_t", perm=[0, 2, 1, 3] if proj != "k" else [0, 2, 3, 1])
        scores = node("Mul", [node("MatMul", [qkv["q"], qkv["k"]], f"{p}/qk"), "attn_scale"], f"{p}/scores")
        probs = node("Softmax", [scores], f"{p}/probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, qkv["v"]], f"{p}/pv")], f"{p}/ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "merge_heads"], f"{p}/ctx")
        attn = node("MatMul", [ctx, f"{p}.self_attn.o_proj.weight"], f"{p}/o")
        x = node("Add", [x, attn], f"{p}/resid_attn")
        h = rmsnorm(x, f"{p}.post_attention_layernorm.weight", f"{p}/post_norm")
        gate = node("MatMul", [h, f"{p}.mlp.gate_proj.weight"], f"{p}/gate")
        up = node("MatMul", [h, f"{p}.mlp.up_proj.weight"], f"{p}/up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/gate_sigmoid")], f"{p}/silu")
        act = node("Mul", [silu, up], f"{p}/act")
        down = node("MatMul", [act, f"{p}.mlp.down_proj.weight"], f"{p}/down")
        x = node("Add", [x, down], f"{p}/resid_mlp")
    h = rmsnorm(x, "model.norm.weight", "final_norm")
    nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="lm_head"))
    vocab = weights["lm_head.weight"].shape[1]

    def tensor(name, value):
        value = np.asarray(value)
        if value.dtype == np.float32:
            value = value.astype(dtype)
        return numpy_helper.from_array(value, name)

    graph = helper.make_graph(
        nodes, "synthetic_decoder",
        [helper.make_tensor_value_info("x", elem, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "seq", vocab])],
        [tensor(name, value) for name, value in {**weights, **consts}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def decoder_inputs(rng, shape, hidden, dtype=np.float32):
    """Hidden states with a few outlier channels (the pattern LAE is for)."""
    x = rng.standard_normal(tuple(shape) + (hidden,), dtype=np.float32)
    x[..., 3] *= 120.0
    x[..., [hidden // 3, hidden - 5]] *= 30.0
    return x.astype(dtype)


def convert(model, calib_x, env, group_size, v0, v1):
    """`model` through the project's pipeline (``fptq_onnx.pipeline.convert_graph``), calibrated
    on `calib_x` by the float model on the CPU EP: the paper's recipe (LAE on the mid band,
    round-to-nearest 4-bit weights), the lm_head in float. Returns (W4A8 ModelProto, layers)."""
    import onnx

    from fptq_onnx.calibration import CalibrationStats
    from fptq_onnx.config import CalibrationConfig, ConvertConfig
    from fptq_onnx.pipeline import convert_graph, find_layers

    config = ConvertConfig(v0=v0, v1=v1, group_size=group_size, lm_head="float", lae_bands=("mid",),
                           weight_clip="none", w8_fraction=0.0, calibration=CalibrationConfig(error_rows=0))
    names = [group.input.name for group in find_layers(model, config).groups]
    exposed = onnx.ModelProto()  # the float model with each group's input exposed as an output
    exposed.CopyFrom(model)
    for name in names:
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    values = env.cpu_session(exposed.SerializeToString(), library=False).run(names, {"x": calib_x})
    stats = CalibrationStats(channel_max={name: np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                                          for name, value in zip(names, values)}, rows={})
    del exposed, values
    converted, result = convert_graph(model, stats, config)
    return converted, result.layers


def with_float16_activations(model, keep_float32=()):
    """A copy of `model` whose float32 tensors (initializers, graph inputs and outputs) are
    float16, except the initializers named in keep_float32 (W4A8 scales and act_scale: the op
    wants float32 there)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = set(keep_float32)
    for i, init in enumerate(out.graph.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            converted = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
            out.graph.initializer[i].CopyFrom(converted)
    for value in list(out.graph.input) + list(out.graph.output) + list(out.graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


def w4a8_float32_inputs(model):
    return {name for node in model.graph.node if node.op_type == functions.OP_TYPE
            for name in (node.input[2], node.input[4])}


def top1_agreement(a, b):
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def time_forward(env, session, x, iters, warmup=2):
    """Median seconds of one forward with x and the logits on the device (IOBinding)."""
    ort = env.ort
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, env.device, 0))
    binding.bind_output("logits", env.device, 0)
    for _ in range(warmup):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run_with_iobinding(binding)  # synchronizes the CUDA stream at the end
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_e2e(env: Env, checks: Checks, args, gpu: bool) -> None:
    log(f"stage 3: end to end, synthetic decoder hidden={args.hidden} layers={args.layers} heads={args.heads} "
        f"intermediate={args.intermediate} vocab={args.vocab}")
    rng = np.random.default_rng(7)
    weights = decoder_weights(rng, args.hidden, args.layers, args.intermediate, args.vocab)
    n_params = sum(v.size for v in weights.values())
    float_model = decoder_model(weights, args.hidden, args.layers, args.heads)
    log(f"  float model built: {n_params / 1e6:.1f} M parameters")
    calib_x = decoder_inputs(rng, (4, 64), args.hidden)
    w4a8, layers = convert(float_model, calib_x, env, args.group_size, args.v0, args.v1)
    modes = {}
    for layer in layers:
        modes[str(layer.act_mode)] = modes.get(str(layer.act_mode), 0) + 1
    n_nodes = sum(node.op_type == functions.OP_TYPE for node in w4a8.graph.node)
    log(f"  converted (v0={args.v0}, v1={args.v1}): {n_nodes} W4A8MatMul nodes, act modes {modes}, "
        f"LAE on {sum(layer.lae for layer in layers)}")
    checks.check("e2e: every decoder linear layer converted", n_nodes == 7 * args.layers, f"{n_nodes} nodes")
    w4a8_bytes = w4a8.SerializeToString()
    float_bytes = float_model.SerializeToString()

    x = decoder_inputs(np.random.default_rng(11), (2, 64), args.hidden)
    cpu_logits = env.cpu_session(w4a8_bytes).run(None, {"x": x})[0]
    float_logits = env.cpu_session(float_bytes, library=False).run(None, {"x": x})[0]
    quality = {"top1_vs_float": top1_agreement(cpu_logits, float_logits),
               "rel_err_vs_float": rel_err(cpu_logits, float_logits)}
    log(f"  CPU kernel W4A8 vs float32 model (information): top-1 agreement {quality['top1_vs_float']:.3f}, "
        f"max rel err {quality['rel_err_vs_float']:.3e}")
    checks.results["e2e_quality"] = quality
    if not gpu:
        return

    with tempfile.TemporaryDirectory() as tmp:
        try:
            session = env.cuda_session(w4a8_bytes, no_cpu_fallback=True, profile_dir=tmp)
        except Exception as e:  # noqa: BLE001 -- some node has no CUDA kernel: say which, go on
            log(f"  note: with CPU fallback disabled the session failed ({str(e)[:300]}); retrying with fallback")
            session = env.cuda_session(w4a8_bytes, no_cpu_fallback=False, profile_dir=tmp)
        cuda_logits = session.run(None, {"x": x})[0]
        counts = providers_of_w4a8_nodes(session.end_profiling())
    checks.check("e2e: every W4A8MatMul ran on the CUDA EP", counts == {env.gpu_ep: n_nodes},
                 f"kernel events by provider: {counts}")
    top1, err = top1_agreement(cuda_logits, cpu_logits), rel_err(cuda_logits, cpu_logits)
    checks.results["e2e_cuda_vs_cpu"] = {"top1": top1, "rel_err": err}
    checks.check("e2e: CUDA vs CPU kernel logits (float32 activations)", top1 >= 0.98 and err <= 1e-2,
                 f"top-1 agreement {top1:.4f}, max rel err {err:.2e}")

    f16_model = with_float16_activations(w4a8, w4a8_float32_inputs(w4a8)).SerializeToString()
    f16_session = env.cuda_session(f16_model, no_cpu_fallback=False)
    f16_logits = f16_session.run(None, {"x": x.astype(np.float16)})[0].astype(np.float32)
    top1, err = top1_agreement(f16_logits, cpu_logits), rel_err(f16_logits, cpu_logits)
    checks.results["e2e_cuda_f16_vs_cpu"] = {"top1": top1, "rel_err": err}
    checks.check("e2e: CUDA float16 activations vs CPU kernel float32", top1 >= 0.9 and err <= 0.1,
                 f"top-1 agreement {top1:.4f}, max rel err {err:.2e}")

    if args.no_timing:
        return
    baseline = with_float16_activations(float_model).SerializeToString()
    del float_model
    sessions = {"w4a8 f32 act": (session, np.float32), "w4a8 f16 act": (f16_session, np.float16),
                "fp16 MatMul": (env.cuda_session(baseline, no_cpu_fallback=False, tf32=True), np.float16)}
    if args.with_fp32:
        sessions["fp32 MatMul (tf32)"] = (env.cuda_session(float_bytes, no_cpu_fallback=False, tf32=True),
                                          np.float32)
    timing = {}
    log("  forward time, ms (median; x and logits on the device; the float32-activation model keeps its "
        "attention and lm_head in float32 without TF32, the float16 ones are the like-for-like pair):")
    log("    " + f"{'batch x seq':>12}" + "".join(f"{name:>20}" for name in sessions))
    for batch, seq in args.shapes:
        row = {}
        xt = decoder_inputs(np.random.default_rng(batch * 1000 + seq), (batch, seq), args.hidden)
        for name, (sess, dtype) in sessions.items():
            iters = 20 if batch * seq <= 512 else 8
            row[name] = 1e3 * time_forward(env, sess, xt.astype(dtype), iters)
        timing[f"{batch}x{seq}"] = row
        log("    " + f"{f'{batch}x{seq}':>12}" + "".join(f"{row[name]:20.3f}" for name in sessions))
    checks.results["e2e_timing_ms"] = timing


# ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", help="libfptq_ops.so to test (default: $FPTQ_ONNX_LIBRARY, .dev/, the package)")
    parser.add_argument("--small", action="store_true", help="a small decoder and short timings (quick runs)")
    parser.add_argument("--skip-e2e", action="store_true", help="op-level checks only")
    parser.add_argument("--no-timing", action="store_true", help="end to end: correctness only")
    parser.add_argument("--with-fp32", action="store_true", help="also time the float32 model")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--group-size", type=int, default=128)
    # Band thresholds of the strategy pass, set so that the random decoder has layers in all
    # three bands (per-token dynamic, LAE + static, static); the project's defaults are 15/150.
    parser.add_argument("--v0", type=float, default=10.0)
    parser.add_argument("--v1", type=float, default=40.0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--self-test", action="store_true",
                        help="run the GPU stages on the CPU provider (checks this script without a GPU)")
    args = parser.parse_args(argv)
    args.shapes = [(1, 1), (1, 512), (32, 512)]
    if args.small:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 256, 2, 4, 512, 512
        args.shapes = [(1, 1), (1, 64), (4, 64)]
        args.v1 = 20.0
    if args.hidden % args.heads or args.hidden % args.group_size or args.intermediate % args.group_size:
        parser.error("hidden must be a multiple of heads, hidden and intermediate of group size")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    checks = Checks()
    log("stage 1: setup")
    log(f"  python {sys.version.split()[0]}, numpy {np.__version__}, repo {REPO}")
    loaded = preload_cuda_libraries()
    log(f"  CUDA libraries preloaded: {', '.join(Path(p).name for p in loaded) or 'none found'}")
    import onnxruntime as ort

    log(f"  onnxruntime {ort.__version__} from {Path(ort.__file__).parent}, providers {ort.get_available_providers()}")
    lib = find_library(args.lib)
    if lib is None:
        log("SETUP: libfptq_ops.so not found (--lib, $FPTQ_ONNX_LIBRARY, .dev/libfptq_ops.so, fptq_onnx/, build/)")
        return EXIT_SETUP
    has_cuda = library_has_cuda(lib)
    log(f"  library {lib} ({lib.stat().st_size / 1e6:.1f} MB), CUDA kernel: {'yes' if has_cuda else 'NO'}")

    gpu = CUDA_EP in ort.get_available_providers()
    env = Env(ort, lib, gpu, self_test=args.self_test)
    if args.self_test:
        log("  SELF-TEST: the GPU stages run on CPUExecutionProvider (no CUDA involved)")
        gpu, has_cuda = True, True
    elif gpu:
        try:  # the provider is listed whenever the build has it; creating it needs the CUDA libraries
            probe = w4a8_model(quantized_weights(np.random.default_rng(0), 128, 8, 128, True), 1.0, k=128, n=8,
                               group_size=128, act_mode=1)
            sess = ort.InferenceSession(probe, sess_options=env.options(library=False),
                                        providers=[(CUDA_EP, env.cuda_options), CPU_EP])
            gpu = CUDA_EP in sess.get_providers()
            if not gpu:
                log("  the CUDA EP could not be created (see ORT's messages above): GPU stages skipped")
        except Exception as e:  # noqa: BLE001
            log(f"  the CUDA EP could not be created: {e}")
            gpu = False
    if gpu and not has_cuda:
        log("SETUP: the library was built without the CUDA kernel (no nvcc at build time); nothing to test on the GPU")
        return EXIT_SETUP

    run_op_level(env, checks, gpu)
    status_e2e = None
    if not args.skip_e2e:
        try:
            import onnx_graphsurgeon  # noqa: F401
        except ImportError:
            log("SETUP: onnx_graphsurgeon is missing (the passes need it): end-to-end stage skipped "
                "(device_ort_gpu.sh installs it from .dev/)")
            status_e2e = EXIT_SETUP
        else:
            checks.guarded("e2e", lambda: run_e2e(env, checks, args, gpu))

    log(f"summary: {checks.passed} passed, {len(checks.failed)} failed ({time.perf_counter() - T0:.0f} s)")
    for failure in checks.failed:
        log(f"  FAILED {failure}")
    checks.results.update({"passed": checks.passed, "failed": checks.failed, "gpu": gpu,
                           "onnxruntime": ort.__version__, "library": str(lib)})
    if args.json:
        Path(args.json).write_text(json.dumps(checks.results, indent=2))
    if checks.failed:
        return EXIT_FAIL
    if not gpu:
        log("NO GPU: CUDAExecutionProvider is not available here (onnxruntime-gpu and a CUDA device are needed); "
            "the CPU-side parts ran and passed")
        return EXIT_NO_GPU
    return status_e2e or EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
