"""A synthetic decoder of any size, written to disk one tensor at a time (for the > 2 GB tests).

``save_synthetic_decoder(path, config)`` writes ``path`` (the graph) and ``path.data`` (every
weight, external data) without ever holding more than one weight matrix in memory: each random
tensor is generated, appended to the data file at a 4 KiB-aligned offset, and dropped; the graph
only records ``(location, offset, length)``. The structure is a LLaMA-style decoder as the
exporters write it, so the compiler sees what it sees in a real model::

    input_ids [B, S] -> Gather(embedding) -> n_layers x block -> RMSNorm -> lm_head -> logits [B, S, V]

    block(h):  a = RMSNorm(h) * gamma_attn                       (decomposed: Pow, ReduceMean, Add, Sqrt, Div, Mul)
               q, k, v = a @ Wq, a @ Wk, a @ Wv                  [B, S, H] -> heads [B, nh, S, d]
               attn = Softmax(q k^T / sqrt(d) + causal) v        -> [B, S, H]
               h = h + attn @ Wo
               m = RMSNorm(h) * gamma_mlp
               h = h + (SiLU(m @ Wgate) * (m @ Wup)) @ Wdown

Weights are ``N(0, 1/K)`` (unit-variance outputs); the MLP norm's gamma has a few outlier
channels (``outlier_gain``) so that conversion meets all the code paths a real model takes
(LAE on gate/up). No positional encoding: it changes nothing the compiler does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGNMENT = 4096  # offsets of tensors in the data file: page-aligned, so they can be memory-mapped


@dataclasses.dataclass(frozen=True)
class SyntheticDecoder:
    hidden: int = 2048
    intermediate: int = 8192
    heads: int = 16
    layers: int = 10
    vocab: int = 8192
    outlier_channels: tuple[int, ...] = (5, 700)  # of the MLP norm gamma
    outlier_gain: float = 12.0
    seed: int = 0

    @property
    def weight_bytes(self) -> int:
        """fp32 bytes of all weights (embedding, blocks, final norm, lm_head)."""
        h, i = self.hidden, self.intermediate
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return 4 * (2 * self.vocab * h + self.layers * per_layer + h)


class _DataWriter:
    """Appends tensors to one external data file and returns their (external) TensorProtos."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = -self.offset % ALIGNMENT
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(array.tobytes())
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        self.file.close()


def save_synthetic_decoder(path: str | Path, config: SyntheticDecoder = SyntheticDecoder()) -> Path:
    """Write the model to ``path`` and its weights to ``path.data``; returns ``path``."""
    path = Path(path)
    rng = np.random.default_rng(config.seed)
    h, d = config.hidden, config.hidden // config.heads
    writer = _DataWriter(path.with_name(path.name + ".data"))
    nodes, initializers = [], []

    def weight(name: str, k: int, n: int) -> str:
        matrix = rng.standard_normal((k, n), dtype=np.float32)
        matrix *= np.float32(1 / np.sqrt(k))
        initializers.append(writer.add(name, matrix))
        return name

    def const(name: str, array) -> str:
        initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def rms_norm(x: str, prefix: str, gamma: np.ndarray) -> str:
        squared = node("Pow", [x, "two"], f"{prefix}/pow")
        mean = node("ReduceMean", [squared, "last_axis"], f"{prefix}/mean", keepdims=1)
        root = node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}/add_eps")], f"{prefix}/sqrt")
        normed = node("Div", [x, root], f"{prefix}/div")
        return node("Mul", [normed, const(f"{prefix}.weight", gamma)], f"{prefix}/mul")

    const("two", np.float32(2.0))
    const("eps", np.float32(1e-6))
    const("last_axis", np.array([-1], np.int64))
    const("heads_shape", np.array([0, 0, config.heads, d], np.int64))
    const("merged_shape", np.array([0, 0, h], np.int64))
    const("inv_sqrt_d", np.float32(1 / np.sqrt(d)))
    const("zero_i", np.int64(0))
    const("one_i", np.int64(1))
    const("one_axis", np.array([1], np.int64))
    const("zero_axis", np.array([0], np.int64))
    const("seq_index", np.array([1], np.int64))
    const("masked", np.float32(-1e9))
    const("unmasked", np.float32(0.0))

    # causal mask [S, S]: -1e9 above the diagonal
    shape = node("Shape", ["input_ids"], "mask/shape")
    length = node("Squeeze", [node("Gather", [shape, "seq_index"], "mask/length_1d", axis=0)], "mask/length")
    positions = node("Range", ["zero_i", length, "one_i"], "mask/positions")
    rows = node("Unsqueeze", [positions, "one_axis"], "mask/rows")
    cols = node("Unsqueeze", [positions, "zero_axis"], "mask/cols")
    causal = node("Where", [node("Greater", [cols, rows], "mask/future"), "masked", "unmasked"], "mask/causal")

    embedding = rng.standard_normal((config.vocab, h), dtype=np.float32)
    initializers.append(writer.add("model.embed_tokens.weight", embedding))
    del embedding
    x = node("Gather", ["model.embed_tokens.weight", "input_ids"], "model/embed", axis=0)
    for layer in range(config.layers):
        p = f"model.layers.{layer}"
        a = rms_norm(x, f"{p}.input_layernorm", rng.uniform(0.8, 1.2, h).astype(np.float32))
        q, k, v = (node("MatMul", [a, weight(f"{p}.self_attn.{n}_proj.weight", h, h)], f"{p}.self_attn.{n}_proj/MatMul")
                   for n in "qkv")
        q, k, v = (node("Transpose", [node("Reshape", [t, "heads_shape"], f"{t}/heads")], f"{t}/bhsd", perm=[0, 2, 1, 3])
                   for t in (q, k, v))
        kt = node("Transpose", [k], f"{p}.self_attn/k_t", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}.self_attn/qk"), "inv_sqrt_d"], f"{p}.self_attn/scaled")
        probs = node("Softmax", [node("Add", [scores, causal], f"{p}.self_attn/masked")], f"{p}.self_attn/probs", axis=-1)
        context = node("MatMul", [probs, v], f"{p}.self_attn/context")
        merged = node("Reshape", [node("Transpose", [context], f"{p}.self_attn/bshd", perm=[0, 2, 1, 3]),
                                  "merged_shape"], f"{p}.self_attn/merged")
        o = node("MatMul", [merged, weight(f"{p}.self_attn.o_proj.weight", h, h)], f"{p}.self_attn.o_proj/MatMul")
        x = node("Add", [x, o], f"{p}/attn_residual")
        gamma = rng.uniform(0.8, 1.2, h).astype(np.float32)
        gamma[[c % h for c in config.outlier_channels]] *= config.outlier_gain
        m = rms_norm(x, f"{p}.post_attention_layernorm", gamma)
        gate = node("MatMul", [m, weight(f"{p}.mlp.gate_proj.weight", h, config.intermediate)], f"{p}.mlp.gate_proj/MatMul")
        up = node("MatMul", [m, weight(f"{p}.mlp.up_proj.weight", h, config.intermediate)], f"{p}.mlp.up_proj/MatMul")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp/sigmoid")], f"{p}.mlp/silu")
        product = node("Mul", [silu, up], f"{p}.mlp/product")
        down = node("MatMul", [product, weight(f"{p}.mlp.down_proj.weight", config.intermediate, h)],
                    f"{p}.mlp.down_proj/MatMul")
        x = node("Add", [x, down], f"{p}/mlp_residual")
    final = rms_norm(x, "model.norm", np.ones(h, np.float32))
    node("MatMul", [final, weight("lm_head.weight", h, config.vocab)], "logits")
    writer.close()

    graph = helper.make_graph(
        nodes, "synthetic_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    return path
