"""Calibration sources (text, jsonl, npz, protobuf folder), synthesized inputs, streaming reduction."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fptq_onnx.config import CalibrationConfig
from fptq_onnx.calibration import (
    ChannelMaxAbs, calibration_feeds, collect_channel_max, model_inputs, text_windows)
from fptq_onnx.errors import UserError
from fptq_onnx.models._tiny import save_tiny_tokenizer, tiny_text

from conftest import model_from_text

# takes token ids and a mask like an exported LLM; exposes an embedding-like float tensor
ID_MODEL = """
g (int64[B, S] input_ids, int64[B, S] attention_mask, int64[B, S] position_ids) => (float[B, S, 4] y) {
    ids_f = Cast <to = 1> (input_ids)
    mask_f = Cast <to = 1> (attention_mask)
    pos_f = Cast <to = 1> (position_ids)
    a = Mul (ids_f, mask_f)
    b = Add (a, pos_f)
    b3 = Unsqueeze (b, axes)
    y = Mul (b3, gains)
}
"""


@pytest.fixture
def id_model(tmp_path):
    model = model_from_text(ID_MODEL, {"axes": np.array([-1], np.int64),
                                       "gains": np.array([1.0, -2.0, 0.5, 0.0], np.float32)})
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    save_tiny_tokenizer(tmp_path)
    return path


def expected_channel_max(windows):
    """Independent reference: y = (id * 1 + position) * gains, reduced over all tokens."""
    values = [np.asarray(w, np.float64) + np.arange(len(w)) for w in windows]
    top = max(v.max() for v in values)
    return np.abs(np.array([1.0, -2.0, 0.5, 0.0])) * top


def test_channel_max_is_a_running_max_over_samples(rng):
    stat = ChannelMaxAbs()
    chunks = [rng.standard_normal((2, 5, 3)) * scale for scale in (1.0, 10.0, 0.1)]
    for chunk in chunks:
        stat.update(chunk)
    stat.update(np.zeros((0, 3)))
    np.testing.assert_array_equal(stat.value, np.abs(np.concatenate([c.reshape(-1, 3) for c in chunks])).max(0)
                                  .astype(np.float32))


def test_text_is_cut_into_evenly_spread_windows(id_model, tmp_path):
    (tmp_path / "calib.txt").write_text(tiny_text(400))
    windows = text_windows(tmp_path / "calib.txt", id_model, CalibrationConfig(samples=3, seq_len=16))
    assert len(windows) == 3 and all(len(w) == 16 for w in windows)
    stats = collect_channel_max(id_model, ["y"], tmp_path / "calib.txt", CalibrationConfig(samples=3, seq_len=16),
                                progress=False)
    np.testing.assert_allclose(stats["y"], expected_channel_max(windows), rtol=1e-6)


def test_jsonl_text_field(id_model, tmp_path):
    lines = [json.dumps({"text": tiny_text(60, seed=i)}) for i in range(4)]
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n")
    assert len(text_windows(tmp_path / "calib.jsonl", id_model, CalibrationConfig(samples=100, seq_len=32))) >= 4


def test_jsonl_without_text_field_is_refused(id_model, tmp_path):
    (tmp_path / "calib.jsonl").write_text('{"content": "hello"}\n')
    with pytest.raises(UserError, match="calib.jsonl:1: each JSON line needs a string field 'text'"):
        text_windows(tmp_path / "calib.jsonl", id_model, CalibrationConfig())


def test_text_shorter_than_one_sequence(id_model, tmp_path):
    (tmp_path / "calib.txt").write_text(tiny_text(5))
    with pytest.raises(UserError, match="shorter than one sequence of 512 tokens"):
        text_windows(tmp_path / "calib.txt", id_model, CalibrationConfig())


def test_missing_tokenizer(id_model, tmp_path):
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "calib.txt").write_text(tiny_text(100))
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        text_windows(tmp_path / "calib.txt", id_model, CalibrationConfig())


def test_npz_stack_synthesizes_mask_and_positions(id_model, tmp_path):
    ids = np.arange(30, dtype=np.int64).reshape(3, 1, 10)  # [samples, batch, seq]
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    model = onnx.load(str(id_model))
    count, feeds = calibration_feeds(tmp_path / "calib.npz", id_model, model_inputs(model), CalibrationConfig())
    feeds = list(feeds)
    assert count == 3 and len(feeds) == 3
    assert feeds[1]["input_ids"].tolist() == [list(range(10, 20))]
    assert feeds[1]["attention_mask"].tolist() == [[1] * 10]
    assert feeds[1]["position_ids"].tolist() == [list(range(10))]
    stats = collect_channel_max(id_model, ["y"], tmp_path / "calib.npz", CalibrationConfig(), progress=False)
    np.testing.assert_allclose(stats["y"], expected_channel_max([ids[2, 0]]), rtol=1e-6)


def test_npz_batch_is_cut_into_rows(id_model, tmp_path):
    np.savez(tmp_path / "calib.npz", input_ids=np.ones((4, 6), np.int64))  # [batch, seq]: 4 samples
    count, feeds = calibration_feeds(tmp_path / "calib.npz", id_model, model_inputs(onnx.load(str(id_model))),
                                     CalibrationConfig())
    assert count == 4 and all(f["input_ids"].shape == (1, 6) for f in feeds)


def test_protobuf_folder(id_model, tmp_path):
    for index in range(2):
        folder = tmp_path / "data" / f"test_data_set_{index}"
        folder.mkdir(parents=True)
        tensor = numpy_helper.from_array(np.full((1, 7), 5 + index, np.int64), "input_ids")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    stats = collect_channel_max(id_model, ["y"], tmp_path / "data", CalibrationConfig(), progress=False)
    np.testing.assert_allclose(stats["y"], expected_channel_max([[6] * 7]), rtol=1e-6)


def test_nan_activations_are_refused(tmp_path):
    model = model_from_text("g (float[B, 4] x) => (float[B, 4] y) { y = Div (x, zero) }",
                            {"zero": np.zeros(4, np.float32)})
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4), np.float32))  # 0 / 0 = NaN
    with pytest.raises(UserError, match="contain NaN or Inf"):
        collect_channel_max(tmp_path / "m.onnx", ["y"], tmp_path / "c.npz", CalibrationConfig(), progress=False)


def test_external_data_model_is_calibrated_in_place(tmp_path, rng):
    """A model saved with external data: the calibration copy must still find its weights."""
    model = model_from_text("g (float[B, 1024] x) => (float[B, 1024] y) { y = MatMul (x, w) }",
                            {"w": np.eye(1024, dtype=np.float32)})
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
    x = rng.standard_normal((3, 1024)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    stats = collect_channel_max(tmp_path / "m.onnx", ["y"], tmp_path / "c.npz", CalibrationConfig(), progress=False)
    np.testing.assert_allclose(stats["y"], np.abs(x).max(0), rtol=1e-6)


def builder_past_model() -> onnx.ModelProto:
    """A KV-cache input laid out like the GenAI model builder's: last axis symbolic (``kv_cache_dim``)."""
    from onnx import TensorProto, helper

    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["B", 3, "P", "kv_cache_dim"])
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S"])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["y"], to=TensorProto.FLOAT)], "g",
                              [ids, past], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_builder_cache_takes_the_head_size_from_genai_config(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(builder_past_model(), str(path))
    np.savez(tmp_path / "calib.npz", input_ids=np.ones((2, 1, 5), np.int64))
    inputs = model_inputs(onnx.load(str(path)))
    with pytest.raises(UserError, match="cannot synthesize past_key_values.0.key: .*head size"):
        next(calibration_feeds(tmp_path / "calib.npz", path, inputs, CalibrationConfig())[1])
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"head_size": 64}}}))
    feed = next(calibration_feeds(tmp_path / "calib.npz", path, inputs, CalibrationConfig())[1])
    assert feed["past_key_values.0.key"].shape == (1, 3, 0, 64)


def test_saved_external_data_is_readable_by_others(tmp_path):
    import os

    from fptq_onnx.model_io import save_model_atomic

    model = model_from_text(ID_MODEL, {"axes": np.array([-1], np.int64),
                                       "gains": np.arange(512, dtype=np.float32)[:4]})
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1024, np.float32), "big"))
    old = os.umask(0o022)
    try:
        save_model_atomic(model, tmp_path / "m.onnx", external_data=True)
    finally:
        os.umask(old)
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
