"""Shared helpers: tiny models from ONNX text with random weights, and ORT runs."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper


def pytest_addoption(parser):
    group = parser.getgroup("cuda", "the CUDA kernels' suite (tests/test_cuda_gpu.py)")
    group.addoption("--cuda-lib", default=None,
                    help="the standalone CUDA library (default: build/cuda_standalone/libfptq_cuda_standalone.so, "
                         "built by benchmarks/build_cuda_standalone.sh)")
    group.addoption("--cuda-cases", choices=("full", "quick", "sanitize"), default="full",
                    help="GPU cases: full (129), quick (59), or sanitize (5 small ones, no probes: for "
                         "compute-sanitizer)")
    group.addoption("--cuda-variants", default="all", help="kernel variants on the GPU: all, or ids such as auto,16,17")


def model_from_text(text: str, weights: dict[str, np.ndarray], opset: int = 18) -> onnx.ModelProto:
    """Parse a graph written in ONNX text and attach ``weights`` as initializers.

    Weight names may contain dots (``layers.0.q_proj.weight``, as exporters name them), which
    the text syntax does not allow: they are swapped for plain identifiers while parsing.
    """
    plain = {name: "w_" + name.replace(".", "_dot_") for name in weights}
    for name in sorted(plain, key=len, reverse=True):
        text = text.replace(name, plain[name])
    model = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\n' + text)
    dotted = {value: name for name, value in plain.items()}
    for node in model.graph.node:
        node.input[:] = [dotted.get(name, name) for name in node.input]
    for name, value in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model)
    return model


def run_model(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of stock ONNX Runtime on CPU (the function body path for W4A8 nodes)."""
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


# A decoder-block-shaped toy: decomposed RMSNorm (Mul by gamma) -> q/k sharing the input,
# then an activation -> down (no foldable producer). K = 128 so group size 128 applies.
TINY_BLOCK = """
tiny (float[B, S, 128] x) => (float[B, S, 128] y) {
    sq = Mul (x, x)
    ms = ReduceMean <keepdims = 1> (sq, axes)
    eps_ms = Add (ms, eps)
    rms = Sqrt (eps_ms)
    normed = Div (x, rms)
    hidden = Mul (normed, norm.weight)
    q = MatMul (hidden, layers.0.q_proj.weight)
    k = MatMul (hidden, layers.0.k_proj.weight)
    qk = Add (q, k)
    act = Relu (qk)
    y = MatMul (act, layers.0.down_proj.weight)
}
"""


def tiny_block_weights(rng: np.random.Generator, n: int = 256) -> dict[str, np.ndarray]:
    return {
        "axes": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
        "norm.weight": rng.uniform(0.5, 2.0, 128).astype(np.float32),
        "layers.0.q_proj.weight": (rng.standard_normal((128, n)) * 0.1).astype(np.float32),
        "layers.0.k_proj.weight": (rng.standard_normal((128, n)) * 0.1).astype(np.float32),
        "layers.0.down_proj.weight": (rng.standard_normal((n, 128)) * 0.1).astype(np.float32),
    }


def outlier_inputs(rng: np.random.Generator, shape, outlier_channels=(3, 77), outlier_gain=40.0) -> np.ndarray:
    """Gaussian activations with a few large channels, the pattern LAE exists for."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., list(outlier_channels)] *= outlier_gain
    return x


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_block(rng):
    return model_from_text(TINY_BLOCK, tiny_block_weights(rng))
