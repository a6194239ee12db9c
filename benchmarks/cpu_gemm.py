#!/usr/bin/env python3
"""Speed of the W4A8 CPU kernel (libfptq_ops.so) against ONNX Runtime's own CPU matmuls.

Each contender is a one-node ONNX model run by onnxruntime on CPUExecutionProvider with the
same intra-op thread count (``--threads``, default 2):

* ``ours dyn``  ai.fptq::W4A8MatMul, act_mode=1 (per-token dynamic int8; the harder mode)
* ``ours sta``  ai.fptq::W4A8MatMul, act_mode=0 (per-tensor static int8)
* ``acc4``      com.microsoft::MatMulNBits, bits=4, block_size=128, accuracy_level=4
                (MLAS' int8-activation path: the like-for-like competitor)
* ``acc1``      com.microsoft::MatMulNBits, same weights, accuracy_level=1 (float32 activations)
* ``fp32``      ONNX MatMul with the dequantized float32 weight [K, N]

All use the same asymmetric group-wise (g = 128) 4-bit weights of a random [K, N] matrix.
Times are the median over ``rounds`` of the mean time per run of a batch of runs (IOBinding,
output preallocated); contenders are interleaved round by round so that noise from other
processes on the machine hits all of them alike. Before each batch the script sleeps
SETTLE_S: after a run, ONNX Runtime's intra-op worker threads spin (busy-wait) for ~30 ms,
and each session has its own pool, so without the pause a contender would share the CPU with
the spinning threads of the one timed before it. After the pause, ~5 ms of untimed runs wake
the session's own (by then sleeping) threads again: on this VM the first runs after idling were
several times slower, which skewed short batches. Weights stay in the caches between runs
(one node runs again and again), as they do for no real model: the numbers compare kernels,
not end-to-end decoding speed (see benchmarks/e2e_genai.py for that).

Ratios are speedups of ours (dynamic mode) over the contender: contender time / our time,
> 1 means ours is faster.

Before timing, every contender's output at M=16 is checked against the float64 product with
the dequantized weight (catches a wrong MatMulNBits layout or a broken kernel).

Our kernel runs with the instruction set $FPTQ_CPU_ISA selects (``--isa``, default ``auto``:
AMX where the CPU and OS allow it, else AVX-512 VNNI, AVX2, portable C++); the table's header
names it.

``--w8`` compares our 8-bit-weight op instead (mixed-precision layers), on SmolLM2's shapes
(``W8_SHAPES``, M = 1, 16, 128, 512), all in per-token dynamic mode:

* ``w8``     ai.fptq::W8A8MatMul: asymmetric group-wise 8-bit weights (``--group``, 0: per channel,
             one group of K, as convert writes 8-bit layers by default; the head-sized N = 49152
             always per channel)
* ``w4``     ai.fptq::W4A8MatMul, the same groups with 4-bit weights
* ``mmint``  ORT's own int8 path as ``onnxruntime.quantization.quantize_dynamic`` writes it:
             DynamicQuantizeLinear(X) -> MatMulInteger(x_q, W int8 [K, N], x_zp) -> Cast -> Mul by
             x_scale * w_scale[N] (per channel); ORT fuses it into DynamicQuantizeMatMul
* ``fp32``   ONNX MatMul with the float32 weight

plus the weight bytes each reads per run (B, scales, zero points; int8 or float32 W), as GB/s at
M = 1, where a matmul is one pass over its weights.

``--cold COPIES`` times M = 1 with the weights coming from memory, as in decoding, where every
layer's weights have left the caches by the time the next token reaches it: one model of COPIES
nodes of the shape (``ours dyn`` and ``acc4``), each with its own weight bytes (a node's B is
the shape's B rotated by its index, so that no two nodes share an initializer, which ORT could
prepack once), all reading X; the time per run over COPIES is the time per layer, printed with
the GB/s of weights it streams.

    python3 benchmarks/cpu_gemm.py [--threads 2] [--quick] [--isa auto] [--shapes 4096x4096,...] [--m 1,16]
    python3 benchmarks/cpu_gemm.py --w8 [--group 0] [--threads 2]
    python3 benchmarks/cpu_gemm.py --cold 100 --shapes 576x3072,1536x576 [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a plain checkout works too when the package is installed editable

import fptq_onnx  # noqa: E402
from fptq_onnx import quant  # noqa: E402
from fptq_onnx.op_contract import OP_DOMAIN, OP_TYPE, W8A8_OP_TYPE, add_w4a8_function  # noqa: E402

GROUP = 128
SETTLE_S = 0.06  # > the ~30 ms that ORT's idle intra-op threads spin after a run
WARM_S = 0.005   # untimed runs after the pause: the first runs after idling pay thread wake-ups
SHAPES = [(2048, 2048), (4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 64, 512]
CONTENDERS = ["ours dyn", "ours sta", "acc4", "acc1", "fp32"]
# Relative error bound (of max |Y|) of each contender against the float64 product with the
# dequantized weight: int8 activations cost ~1e-2, float32 ones only rounding.
CHECK_TOL = {"ours dyn": 3e-2, "ours sta": 3e-2, "acc4": 3e-2, "acc1": 1e-4, "fp32": 1e-4,
             "w8": 3e-2, "w4": 3e-2, "mmint": 3e-2}
ORT_INT8_CONTENDERS = {"acc4", "mmint"}
W8_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]  # SmolLM2-135M: attention, MLP up/down, head
W8_MS = [1, 16, 128, 512]
W8_CONTENDERS = ["w8", "w4", "mmint", "fp32"]
HEAD_N = 32768  # N from which a shape is the language-model head: one group per channel


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Weights:
    """One random [K, N] weight, quantized asymmetrically in groups of GROUP along K."""
    k: int
    n: int
    packed: np.ndarray   # uint8 [N, K/2], even k in the low nibble (docs/ops.md)
    scales: np.ndarray   # float32 [N, G]
    zeros: np.ndarray    # uint8 [N, G] in [0, 15]
    dense: np.ndarray    # float32 [K, N]: the dequantized weight

    @classmethod
    def random(cls, k: int, n: int, seed: int) -> "Weights":
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((k, n), dtype=np.float32)
        u, scales, zeros = quant.quantize_weight_groupwise(w, GROUP, symmetric=False)
        dense = quant.dequantize_weight(u, scales, zeros, GROUP).astype(np.float32)
        return cls(k, n, quant.pack_int4(u), scales, zeros, dense)


def _model(node: onnx.NodeProto, k: int, n: int, initializers: list[onnx.TensorProto],
           opsets: list[onnx.OperatorSetIdProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *opsets], ir_version=10)
    return model


def ours_model(w: Weights, act_mode: int, act_scale: float) -> bytes:
    node = helper.make_node(OP_TYPE, ["X", "B", "S", "Z", "A"], ["Y"], domain=OP_DOMAIN,
                            K=w.k, N=w.n, group_size=GROUP, act_mode=act_mode)
    inits = [numpy_helper.from_array(w.packed, "B"), numpy_helper.from_array(w.scales, "S"),
             numpy_helper.from_array(w.zeros, "Z"), numpy_helper.from_array(np.float32(act_scale), "A")]
    model = _model(node, w.k, w.n, inits, [])
    add_w4a8_function(model)
    return model.SerializeToString()


def matmulnbits_model(w: Weights, accuracy_level: int) -> bytes:
    """com.microsoft MatMulNBits: B uint8 [N, ceil(K/block), block/2], scales float [N * ceil(K/block)],
    zero_points uint8 [N * ceil(K/block / 2)] (two 4-bit zero points per byte, low nibble first)."""
    blocks = -(-w.k // GROUP)  # a K that GROUP does not divide ends in a partial block, padded in B
    b = np.pad(w.packed, ((0, 0), (0, blocks * GROUP // 2 - w.packed.shape[1]))).reshape(w.n, blocks, GROUP // 2)
    zeros = w.zeros if blocks % 2 == 0 else np.pad(w.zeros, ((0, 0), (0, 1)))
    zp = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    node = helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                            K=w.k, N=w.n, bits=4, block_size=GROUP, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(w.scales.reshape(-1), "S"),
             numpy_helper.from_array(zp, "Z")]
    return _model(node, w.k, w.n, inits, [helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def fp32_model(w: Weights) -> bytes:
    node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    return _model(node, w.k, w.n, [numpy_helper.from_array(w.dense, "W")], []).SerializeToString()


class Runner:
    """One session with its input and preallocated output bound (IOBinding)."""

    def __init__(self, model: bytes, threads: int, ours: bool):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if ours:
            self.session = fptq_onnx.InferenceSession(model, options)
        else:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.binding = None

    def bind(self, x: np.ndarray, n: int) -> None:
        self.y = np.empty((x.shape[0], n), np.float32)
        self.x = x
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input("X", self.x)
        self.binding.bind_output("Y", "cpu", 0, np.float32, self.y.shape, self.y.ctypes.data)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def timed(self, repeats: int) -> float:
        """Mean seconds per run over `repeats` back-to-back runs."""
        start = time.perf_counter()
        for _ in range(repeats):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / repeats


def check(runners: dict[str, Runner], k: int, n: int, dense) -> None:
    """Each runner's Y at M = 16 against the float64 product with the weight it holds: ``dense``
    (float32 [K, N]), or ``dense[name]`` when a dict."""
    x = np.random.default_rng(1).standard_normal((16, k), dtype=np.float32)
    for name, runner in runners.items():
        weight = dense[name] if isinstance(dense, dict) else dense
        expected = x.astype(np.float64) @ weight.astype(np.float64)
        bound = float(np.abs(expected).max())
        runner.bind(x, n)
        runner.run()
        err = float(np.abs(runner.y - expected).max()) / bound
        if err <= CHECK_TOL[name]:
            continue
        message = f"{name} K={k} N={n}: max error {err:.3g} of max|Y| > {CHECK_TOL[name]}"
        if name not in ORT_INT8_CONTENDERS:
            raise SystemExit(message)
        # ONNX Runtime's own int8 paths are timed even when wrong, and say so: on CPUs without
        # VNNI, MLAS' u8 x s8 kernels use vpmaddubsw, whose int16 pair sums saturate.
        print(f"warning: {message} (ONNX Runtime's result; timed anyway)", file=sys.stderr)


def bench_shape(k: int, n: int, ms: list[int], threads: int, rounds: int, batch_s: float) -> list[dict]:
    w = Weights.random(k, n, seed=k * 7 + n)
    x_max = 4.0  # standard normal X: |x| rarely beyond 4
    runners = {
        "ours dyn": Runner(ours_model(w, 1, 1.0), threads, ours=True),
        "ours sta": Runner(ours_model(w, 0, x_max / 127.0), threads, ours=True),
        "acc4": Runner(matmulnbits_model(w, 4), threads, ours=False),
        "acc1": Runner(matmulnbits_model(w, 1), threads, ours=False),
        "fp32": Runner(fp32_model(w), threads, ours=False),
    }
    check(runners, w.k, w.n, w.dense)
    return time_runners(runners, k, n, ms, rounds, batch_s)


def time_runners(runners: dict[str, "Runner"], k: int, n: int, ms: list[int], rounds: int,
                 batch_s: float) -> list[dict]:
    """Median us per run of each runner at each M (the interleaved rounds of the module docstring)."""
    rows = []
    for m in ms:
        x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
        repeats, warm = {}, {}
        for name, runner in runners.items():
            runner.bind(x, n)
            runner.run()  # warm-up (first-run packing, thread pool start)
            once = min(runner.timed(1) for _ in range(3))
            repeats[name] = max(1, int(batch_s / max(once, 1e-7)))
            warm[name] = max(1, int(WARM_S / max(once, 1e-7)))
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                time.sleep(SETTLE_S)
                runner.timed(warm[name])  # untimed: wakes the pool's threads (and the vCPU) again
                samples[name].append(runner.timed(repeats[name]))
        row = {"shape": f"{k}x{n}", "M": m}
        row.update({name: statistics.median(s) * 1e6 for name, s in samples.items()})
        rows.append(row)
        print(f"  {k}x{n} M={m}: " + ", ".join(f"{c} {row[c]:.0f}" for c in runners) + " us",
              file=sys.stderr, flush=True)
    return rows


def parse_shapes(text: str | None, default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``--shapes`` ("KxN,KxN"), or `default` when not given."""
    return default if text is None else [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs a count >= 1, got {text}")
    return value


def copies_model(model: bytes, copies: int, n: int) -> bytes:
    """``model``'s one node `copies` times, node i reading B rotated by i + 1 bytes and writing
    output Y<i> (the --cold models of the module docstring)."""
    proto = onnx.load_from_string(model)
    graph = proto.graph
    node, b = graph.node[0], next(t for t in graph.initializer if t.name == "B")
    b_values = numpy_helper.to_array(b)
    nodes, outputs = [], []
    for i in range(copies):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name, copy.input[1], copy.output[0] = f"layer{i}", f"B{i}", f"Y{i}"
        graph.initializer.append(numpy_helper.from_array(np.roll(b_values, i + 1), f"B{i}"))
        nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["m", n]))
    graph.initializer.remove(b)
    del graph.node[:], graph.output[:]
    graph.node.extend(nodes)
    graph.output.extend(outputs)
    return proto.SerializeToString()


def bench_cold(args: argparse.Namespace) -> None:
    shapes = parse_shapes(args.shapes, SHAPES)
    print(f"CPU: {cpu_model_name()}; onnxruntime {ort.__version__}; intra-op threads: {args.threads}; "
          f"our ISA: {args.isa}; M = 1, {args.cold} copies of each layer (weights from memory); "
          f"median of {args.rounds} interleaved rounds; us per layer (GB/s of weights)")
    print("| K x N | copies | MB in all | ours dyn | acc4 | acc4 / ours |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, n in shapes:
        w = Weights.random(k, n, seed=k * 7 + n)
        weight_bytes = w.packed.nbytes + w.scales.nbytes + w.zeros.nbytes
        runners = {"ours dyn": Runner(copies_model(ours_model(w, 1, 1.0), args.cold, n), args.threads, ours=True),
                   "acc4": Runner(copies_model(matmulnbits_model(w, 4), args.cold, n), args.threads, ours=False)}
        x = np.random.default_rng(0).standard_normal((1, k), dtype=np.float32)
        for runner in runners.values():
            runner.binding = runner.session.io_binding()
            runner.binding.bind_cpu_input("X", x)
            for output in runner.session.get_outputs():
                runner.binding.bind_output(output.name, "cpu")
            runner.run()
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                # No settling pause here: decoding runs its layers back to back, and after an
                # idle pause the first run is slower for reasons of its own (clock, threads).
                runner.timed(2)
                samples[name].append(runner.timed(5) / args.cold)
        us = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
        cells = [f"{us[name]:.1f} ({weight_bytes / us[name] / 1e3:.1f})" for name in runners]
        print(f"| {k}x{n} | {args.cold} | {weight_bytes * args.cold / 1e6:.0f} | {' | '.join(cells)} | "
              f"{us['acc4'] / us['ours dyn']:.2f}x |", flush=True)


def w8_models(k: int, n: int, group: int, seed: int) -> tuple[dict[str, bytes], dict[str, int], dict]:
    """The ``--w8`` contenders' models for one random [K, N] weight, the bytes of weights each
    reads per run, and the weight each holds (float64 [K, N], dequantized)."""
    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32)
    u8, s8, z8 = quant.quantize_weight_groupwise_int8(w, group, symmetric=False)
    u4, s4, z4 = quant.quantize_weight_groupwise(w, group, symmetric=False)
    b4 = quant.pack_int4(u4)
    models, weight_bytes = {}, {}
    dense = {"w8": quant.dequantize_weight(u8, s8, z8, group), "w4": quant.dequantize_weight(u4, s4, z4, group), "fp32": w}
    for name, op_type, b, scales, zeros in (("w8", W8A8_OP_TYPE, u8, s8, z8), ("w4", OP_TYPE, b4, s4, z4)):
        node = helper.make_node(op_type, ["X", "B", "S", "Z", "A"], ["Y"], domain=OP_DOMAIN,
                                K=k, N=n, group_size=group, act_mode=1)
        inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S"),
                 numpy_helper.from_array(zeros, "Z"), numpy_helper.from_array(np.float32(1.0), "A")]
        model = _model(node, k, n, inits, [])
        add_w4a8_function(model)
        models[name] = model.SerializeToString()
        weight_bytes[name] = b.nbytes + scales.nbytes + zeros.nbytes
    # quantize_dynamic's per-channel weights: symmetric int8 per column, activations uint8 with a zero point
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    w_int8 = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["X"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "W", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "WS"], ["scale"]),
             helper.make_node("Mul", ["acc_f", "scale"], ["Y"])]
    graph = helper.make_graph(
        nodes, "mmint", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w_int8, "W"), numpy_helper.from_array(w_scale, "WS")])
    models["mmint"] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                        ir_version=10).SerializeToString()
    weight_bytes["mmint"] = w_int8.nbytes + w_scale.nbytes
    dense["mmint"] = w_int8 * w_scale.astype(np.float64)
    models["fp32"] = _model(helper.make_node("MatMul", ["X", "W"], ["Y"]), k, n,
                            [numpy_helper.from_array(w, "W")], []).SerializeToString()
    weight_bytes["fp32"] = w.nbytes
    return models, weight_bytes, dense


def bench_w8(args: argparse.Namespace, batch_s: float) -> None:
    shapes = parse_shapes(args.shapes, W8_SHAPES)
    ms = W8_MS if args.m is None else [int(v) for v in args.m.split(",")]
    rows, traffic = [], {}
    for k, n in shapes:
        group = k + k % 2 if n >= HEAD_N or args.group == 0 else args.group  # per channel as convert writes it
        models, weight_bytes, dense = w8_models(k, n, group, seed=k * 7 + n)
        runners = {name: Runner(model, args.threads, ours=name in ("w8", "w4")) for name, model in models.items()}
        check(runners, k, n, dense)
        for row in time_runners(runners, k, n, ms, args.rounds, batch_s):
            row["group"] = group
            rows.append(row)
        traffic[f"{k}x{n}"] = weight_bytes
    print(f"CPU: {cpu_model_name()}; onnxruntime {ort.__version__}; intra-op threads: {args.threads}; "
          f"our ISA: {args.isa}; rounds: {args.rounds}; median time per run in us (per-token dynamic "
          f"activations everywhere); GB/s: weight bytes read per run / time, at M = 1")
    header = ["K x N", "group", "M", *W8_CONTENDERS, "w8 vs mmint", "w8 vs w4"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i > 0 else "---" for i in range(len(header))) + "|")
    for r in rows:
        cells = [f"{r[c]:.0f}" for c in W8_CONTENDERS]
        if r["M"] == 1:
            cells = [f"{r[c]:.0f} ({traffic[r['shape']][c] / r[c] / 1e3:.1f} GB/s)" for c in W8_CONTENDERS]
        print("| " + " | ".join([r["shape"], str(r["group"]), str(r["M"]), *cells,
                                 f"{r['mmint'] / r['w8']:.2f}x", f"{r['w4'] / r['w8']:.2f}x"]) + " |")


def print_table(rows: list[dict], threads: int, args: argparse.Namespace) -> None:
    print(f"CPU: {cpu_model_name()}; onnxruntime {ort.__version__}; intra-op threads: {threads}; "
          f"our ISA: {args.isa}; rounds: {args.rounds}; median time per run in us; "
          f"x = contender / ours dyn (> 1: ours faster)")
    header = ["K x N", "M", "ours dyn", "ours sta", "acc4", "acc1", "fp32", "vs acc4", "vs acc1", "vs fp32"]
    lines = []
    for r in rows:
        ours = r["ours dyn"]
        lines.append([r["shape"], str(r["M"])] + [f"{r[c]:.0f}" for c in CONTENDERS] +
                     [f"{r[c] / ours:.2f}x" for c in ("acc4", "acc1", "fp32")])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i > 0 else "---" for i in range(len(header))) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every contender (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a rough pass)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 15, quick 3)")
    parser.add_argument("--shapes", default=None, help="comma-separated KxN (default: all four)")
    parser.add_argument("--m", default=None, help="comma-separated M values (default 1,16,64,512)")
    parser.add_argument("--isa", default="auto", help="our kernel's ISA ($FPTQ_CPU_ISA): auto, amx, avx512vnni, "
                        "avx2 or generic (default auto)")
    parser.add_argument("--w8", action="store_true", help="the 8-bit-weight op against W4A8MatMul, ORT's "
                        "MatMulInteger and fp32 on SmolLM2's shapes (module docstring)")
    parser.add_argument("--group", type=int, default=GROUP, help=f"--w8: group size, 0 for per channel (one "
                        f"group of K, the default model's 8-bit layers; default {GROUP})")
    parser.add_argument("--cold", type=positive_int, metavar="COPIES", help="M = 1 with weights from memory: COPIES "
                        "nodes of each shape, each with its own weights (module docstring)")
    args = parser.parse_args()
    os.environ["FPTQ_CPU_ISA"] = args.isa  # read when our sessions are created
    if args.rounds is None:
        args.rounds = 3 if args.quick else 15
    batch_s = 0.01 if args.quick else 0.04
    if args.w8:
        return bench_w8(args, batch_s)
    if args.cold:
        return bench_cold(args)
    shapes = parse_shapes(args.shapes, SHAPES)
    ms = MS if args.m is None else [int(v) for v in args.m.split(",")]
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, ms, args.threads, args.rounds, batch_s)
    print_table(rows, args.threads, args)


if __name__ == "__main__":
    main()
