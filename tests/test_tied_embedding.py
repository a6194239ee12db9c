"""The tied embedding reads the quantized head's weights (``passes/tied_embedding.py``).

On a tiny random LLaMA with tied embeddings, exported by our torch exporter (embedding and head
stored as two equal constants): after ``convert`` (head quantized: ``ConvertConfig(lm_head="w8")``,
``"w4"`` or ``"rescored"``) the float table is gone and the embedding output equals a float64
numpy dequantization of the head's stored weights (the rescored head's: weight plus residual),
rows picked by the token ids, LAE undone; and it stays within the quantization error of the
fp32 table.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.export import export_model
from fptq_onnx.models._tiny import save_tiny_llama, tiny_text
from fptq_onnx.pipeline import convert

IDS = np.array([[1, 5, 9, 4, 7, 22, 0], [3, 3, 8, 12, 2, 19, 6]], np.int64)


@pytest.fixture(scope="module", params=["w8", "w4", "rescored"], ids=["8-bit head", "4-bit head", "rescored head"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    source = export_model(save_tiny_llama(root / "hf"), root / "fp32" / "model.onnx", progress=False)
    (root / "calib.txt").write_text(tiny_text(2000))
    config = ConvertConfig(lm_head=request.param, lm_head_top_k=5, calibration=CalibrationConfig(samples=4, seq_len=32))
    result = convert(source, root / "w4a8" / "model.onnx", root / "calib.txt", config, progress=False)
    return source, result


def embedding_output(model: onnx.ModelProto) -> str:
    """The tensor the float embedding lookup (the Gather reading input_ids) writes."""
    return next(n.output[0] for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input)


def run_with_output(model: onnx.ModelProto, name: str, ids: np.ndarray) -> np.ndarray:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    return session.run([name], {k: v for k, v in feeds.items() if k in inputs})[0]


def dequantized_rows(model: onnx.ModelProto, head: str, k: int, ids: np.ndarray) -> np.ndarray:
    """float64 ``(u - z) * scale / s`` of rows ``ids`` of the head's stored weights, written out
    element by element from docs/ops.md's layouts (8 bits: a byte per k; 4 bits: even k low
    nibble, odd k high); for W4A8RescoredMatMul the sum of its weight's and its residual's."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type in ("W4A8MatMul", "W8A8MatMul", "W4A8RescoredMatMul")
                and n.name.startswith(head))
    eight_bits = node.op_type == "W8A8MatMul"
    weights = [node.input[1:4]] + ([node.input[5:8]] if node.op_type == "W4A8RescoredMatMul" else [])
    group = next(a.i for a in node.attribute if a.name == "group_size")
    inverse_s = init.get(f"{head}/tied_embedding.inverse_lae_scales", np.ones(k, np.float32)).astype(np.float64)
    out = np.zeros(ids.shape + (k,))
    for packed, scales, zeros in ([init[name] for name in names] for names in weights):
        for index in np.ndindex(ids.shape):
            row = ids[index]
            for j in range(k):
                if eight_bits:
                    u = int(packed[row, j])
                else:
                    byte = int(packed[row, j // 2])
                    u = (byte >> 4) if j % 2 else (byte & 15)
                g = j // group
                out[index + (j,)] += (u - float(zeros[row, g])) * float(scales[row, g]) * inverse_s[j]
    return out


def test_tied_float_table_is_gone(models):
    source, result = models
    fp32 = onnx.load(str(source))
    vocab, hidden = 23, 64
    tables = [t.name for t in fp32.graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]
    assert len(tables) == 2  # the source stores embedding and head separately
    converted = onnx.load(str(result.output))
    floats = [t.name for t in converted.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == sorted([vocab, hidden])]
    assert floats == []
    assert any(n.name.startswith("lm_head/tied_embedding") for n in converted.graph.node)


def test_embedding_equals_dequantized_head_rows(models):
    source, result = models
    converted = onnx.load(str(result.output))
    name = next(n.output[0] for n in converted.graph.node if n.name == "lm_head/tied_embedding/embedding")
    got = run_with_output(converted, name, IDS)
    expected = dequantized_rows(converted, "lm_head", 64, IDS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    fp32 = onnx.load(str(source))
    reference = run_with_output(fp32, embedding_output(fp32), IDS)
    error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert 0 < error < 0.15, error  # 4-bit g128 weights: a few percent (8-bit: well under 1%), never exact


def test_untied_embedding_of_the_same_shape_is_left_alone(tmp_path):
    """A table with the head's shape but other values keeps its float Gather, with a reason."""
    from fptq_onnx.passes.tied_embedding import TiedEmbeddingPass

    root = tmp_path
    source = export_model(save_tiny_llama(root / "hf"), root / "fp32" / "model.onnx", progress=False)
    model = onnx.load(str(source))
    table = next(n for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input).input[0]
    for tensor in model.graph.initializer:
        if tensor.name == table:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 1.01, tensor.name))
    onnx.save(model, str(source))
    (root / "calib.txt").write_text(tiny_text(2000))
    config = ConvertConfig(calibration=CalibrationConfig(samples=4, seq_len=32))
    result = convert(source, root / "w4a8" / "model.onnx", root / "calib.txt", config, progress=False)
    reasons = [r.reason for r in result.rejections if r.pass_name == TiedEmbeddingPass.name]
    assert reasons and "not tied" in reasons[0]
    converted = onnx.load(str(result.output))
    assert not any("tied_embedding" in n.name for n in converted.graph.node)
    assert any(t.name == table for t in converted.graph.initializer)
