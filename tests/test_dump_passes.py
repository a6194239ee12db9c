"""--dump-passes: one Netron-ready file per pass, decisions on every node a pass touched."""
import numpy as np
import onnx
import pytest

from fptq_onnx.cli import EXIT_USER_ERROR, main
from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.pipeline import convert

from conftest import model_from_text, outlier_inputs

DUMPS = ["00_input", "01_find_linears", "02_strategy", "03_lae", "04_act_scales", "05_quantize_weights",
         "06_output_error", "07_mixed_precision", "08_replace_matmul", "09_tied_embedding", "10_rms_norm_div",
         "11_fuse_gelu"]
# what each dump adds to a layer's decision (cumulative), for a layer in the LAE band
NEW_KEYS = {
    "01_find_linears": {"role", "layer"},
    "02_strategy": {"v", "band", "act_mode", "lae"},
    "03_lae": {"lae_scale_range", "lae_folded_into"},
    "04_act_scales": {"act_scale"},
    "05_quantize_weights": {"group_size", "weight_symmetric", "weight_error", "weight_rounding", "weight_clip"},
    "06_output_error": {"output_error"},
    "07_mixed_precision": set(),  # no layer of this block fits the default 3% budget
    "08_replace_matmul": set(),
    "09_tied_embedding": set(),  # the block has no embedding
    "10_rms_norm_div": set(),  # its norm squares with Mul: no export's pattern
    "11_fuse_gelu": set(),
}


def decisions(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key.removeprefix("fptq."): p.value for p in node.metadata_props if p.key.startswith("fptq.")}


def nodes_with(model: onnx.ModelProto, **wanted) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if all(decisions(n).get(key) == value for key, value in wanted.items())]


@pytest.fixture
def dumped(tmp_path, tiny_block, rng):
    """The tiny block converted with every layer in the LAE band: q/k fold into the norm's Mul,
    down (after Relu) gets a Mul node."""
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (4, 1, 8, 128)))
    config = ConvertConfig(v0=0.001, v1=1e9, lm_head="w4", calibration=CalibrationConfig(error_rows=64))
    result = convert(tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz", config, progress=False,
                     dump_passes=tmp_path / "dumps")
    return result, tmp_path


def test_one_checked_file_per_pass_with_external_weights(dumped):
    result, tmp_path = dumped
    assert [p.stem for p in result.dumps] == DUMPS
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == sorted(
        [f"{name}.onnx" for name in DUMPS] + [f"{name}.onnx.data" for name in DUMPS])
    for path in result.dumps:
        assert path.stat().st_size < 16 * 1024, path  # weights are in the .data file, not the graph
        bare = onnx.load(str(path), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in bare.graph.initializer)
        assert {e.value for t in bare.graph.initializer for e in t.external_data if e.key == "location"} == {
            path.name + ".data"}
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_follow_one_layer_through_every_dump(dumped):
    result, _ = dumped
    name = "layers.0.down_proj"
    assert nodes_with(onnx.load(str(result.dumps[0])), layer=name) == []  # the import has no decisions yet
    expected = set()
    for path in result.dumps[1:]:
        model = onnx.load(str(path))
        expected |= NEW_KEYS[path.stem]
        [node] = nodes_with(model, role="layer", layer=name)
        assert set(decisions(node)) == expected, path.stem
        assert f"layer={name}" in node.doc_string and node.doc_string.startswith("fptq: ")
        replaced = path.stem >= "08"
        assert node.op_type == ("W4A8MatMul" if replaced else "MatMul"), path.stem
        if replaced:
            assert node.name == f"{name}/w4a8_matmul"
        if path.stem >= "03":  # the Mul LAE inserted in front of down carries the same decisions
            [mul] = nodes_with(model, role="lae_scale")
            assert mul.name == f"{name}/lae_scale" and mul.op_type == "Mul"
            assert decisions(mul)["layer"] == name and decisions(mul)["band"] == "mid"
    final = {n.name: decisions(n) for n in onnx.load(str(result.output)).graph.node}
    assert final[f"{name}/w4a8_matmul"] == decisions(node)  # the last dump is the converted model
    layer = next(layer for layer in result.layers if layer.name == name)
    assert decisions(node)["output_error"] == f"{layer.output_error:.4g}"
    assert decisions(node)["v"] == f"{layer.v:.4g}" and layer.v == pytest.approx(result.groups[1].v)


def test_folded_norm_carries_the_group_decision(dumped):
    result, _ = dumped
    model = onnx.load(str(result.dumps[-1]))
    [norm] = nodes_with(model, role="lae_folded")
    assert norm.op_type == "Mul"  # the decomposed RMSNorm's Mul by gamma absorbed 1/s
    shared = decisions(norm)
    assert shared["layer"] == "layers.0.q_proj,layers.0.k_proj"
    assert shared["band"] == "mid" and shared["lae"] == "yes"  # equal for both: written once
    assert shared["weight_error"].startswith("layers.0.q_proj: ")  # differs: written per layer


def test_pad_and_bias_nodes_carry_decisions(tmp_path, rng):
    """K = 96 with group 64: the shared Pad and a Gemm's bias Add are annotated too."""
    model = model_from_text("""
        g (float[B, 96] x) => (float[B, 8] y) {
            a = Gemm <transB = 1> (x, fc1.weight, fc1.bias)
            b = MatMul (x, fc2.weight)
            y = Add (a, b)
        }""", {"fc1.weight": rng.standard_normal((8, 96)).astype(np.float32),
               "fc1.bias": rng.standard_normal(8).astype(np.float32),
               "fc2.weight": rng.standard_normal((96, 8)).astype(np.float32)})
    onnx.save(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((3, 4, 96)).astype(np.float32))
    config = ConvertConfig(group_size=64, lm_head="w4", calibration=CalibrationConfig(error_rows=8))
    result = convert(tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz", config, progress=False,
                     dump_passes=tmp_path / "dumps")
    final = onnx.load(str(result.dumps[-1]))
    onnx.checker.check_model(final, full_check=True)
    assert not nodes_with(final, role="pad_k") and not [n for n in final.graph.node if n.op_type == "Pad"]
    [bias] = nodes_with(final, role="bias")
    assert bias.op_type == "Add" and decisions(bias)["layer"] == "fc1"
    assert len(nodes_with(final, role="layer")) == 2


def test_dumps_do_not_run_the_model(tmp_path, tiny_block, rng, monkeypatch):
    """Calibration is the only ONNX Runtime session, with or without dumps."""
    import fptq_onnx.calibration as calibration

    sessions = []
    real = calibration.ort.InferenceSession
    monkeypatch.setattr(calibration.ort, "InferenceSession", lambda *a, **k: sessions.append(1) or real(*a, **k))
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (2, 1, 4, 128)))
    convert(tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz", ConvertConfig(), progress=False,
            dump_passes=tmp_path / "dumps")
    assert len(sessions) == 1


def test_dump_folder_that_is_a_file_is_a_user_error(tmp_path, tiny_block, rng, capsys):
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (2, 1, 4, 128)))
    (tmp_path / "dumps").write_text("not a folder")
    code = main(["-q", "convert", str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "out.onnx"), "--dump-passes", str(tmp_path / "dumps")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and "is a file, not a folder" in err[0]
    assert not (tmp_path / "out.onnx").exists()
