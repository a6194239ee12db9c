"""``fptq-onnx inspect`` on every model the conversion tests produce, and on files that are not ours."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fptq_onnx.cli import EXIT_USER_ERROR, main
from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.inspect_model import NEEDS_LIBRARY, RUNS_STOCK, inspect_model
from fptq_onnx.pipeline import convert

from conftest import model_from_text, outlier_inputs

PADDED_GEMM = """
g (float[B, 96] x) => (float[B, 8] y) {
    a = Gemm <transB = 1> (x, fc1.weight, fc1.bias)
    b = MatMul (x, fc2.weight)
    y = Add (a, b)
}
"""


def run_cli(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Converted models as the tests make them: the tiny block (LAE Mul + fold, with pass dumps),
    and a K = 96 Gemm-with-bias model at group size 64 (Pad + bias Add)."""
    from conftest import TINY_BLOCK, tiny_block_weights

    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("inspect")
    onnx.save(model_from_text(TINY_BLOCK, tiny_block_weights(rng)), str(folder / "block.onnx"))
    np.savez(folder / "block.npz", x=outlier_inputs(rng, (3, 1, 8, 128)))
    block = convert(folder / "block.onnx", folder / "block.w4a8.onnx", folder / "block.npz",
                    ConvertConfig(v0=0.001, v1=1e9, lm_head="w4", calibration=CalibrationConfig(error_rows=16)),
                    progress=False, dump_passes=folder / "dumps")
    onnx.save(model_from_text(PADDED_GEMM, {"fc1.weight": rng.standard_normal((8, 96)).astype(np.float32),
                                            "fc1.bias": rng.standard_normal(8).astype(np.float32),
                                            "fc2.weight": rng.standard_normal((96, 8)).astype(np.float32)}),
              str(folder / "gemm.onnx"))
    np.savez(folder / "gemm.npz", x=rng.standard_normal((2, 4, 96)).astype(np.float32))
    gemm = convert(folder / "gemm.onnx", folder / "gemm.w4a8.onnx", folder / "gemm.npz",
                   ConvertConfig(group_size=64, symmetric=True, lm_head="w4", lae_bands=()), progress=False)
    mixed = convert(folder / "block.onnx", folder / "block.w8.onnx", folder / "block.npz",
                    ConvertConfig(lm_head="w4", w8_layers=1), progress=False)
    return {"block": block, "gemm": gemm, "mixed": mixed, "folder": folder}


def packed_bytes_of(path) -> int:
    model = onnx.load(str(path))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sum(initializers[name].nbytes for node in model.graph.node if node.op_type in ("W4A8MatMul", "W8A8MatMul")
               for name in node.input[1:4])


def test_inspect_block_text(models, capsys):
    path = models["block"].output
    code, out, _ = run_cli(capsys, "inspect", path, "--layers")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "block.w4a8.onnx: 3 W4A8MatMul nodes (ai.fptq), opset 18"
    assert "by scheme: 3 x per_tensor_static + LAE" in out and "group size: 128" in out
    assert "LAE: 1 Mul node(s) by 1/s, 1 folded into a norm (layers.0.down_proj/lae_scale)" in out
    assert f"op library: not needed: {RUNS_STOCK}" in out
    for layer in models["block"].layers:
        assert any(line.split()[:1] == [layer.name] and f"{layer.weight_error:.4g}" in line for line in lines)


def test_inspect_json_bytes_match_the_initializers(models, capsys):
    path = models["block"].output
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "converted" and info["w4a8_nodes"] == 3
    assert info["packed_bytes"] == packed_bytes_of(path)
    fp32 = sum(4 * layer.k * layer.n for layer in models["block"].layers)
    assert info["replaced_fp32_bytes"] == fp32 and info["bytes_saved"] == fp32 - info["packed_bytes"]
    assert info["inserted_nodes"]["lae_scale"] == ["layers.0.down_proj/lae_scale"]
    assert [layer["layer"] for layer in info["layers"]] == [layer.name for layer in models["block"].layers]


def test_inspect_padded_gemm(models):
    info = inspect_model(models["gemm"].output)
    assert info["by_scheme"] == {"per_tensor_static": 2} and info["group_sizes"] == [64]
    assert [(layer["K"], layer["K_op"]) for layer in info["layers"]] == [(96, 96), (96, 96)]  # no Pad: partial group
    assert info["inserted_nodes"]["pad_k"] == [] and info["inserted_nodes"]["bias"] == ["fc1/bias"]
    assert info["replaced_fp32_bytes"] == 2 * 4 * 96 * 8 and info["packed_bytes"] == packed_bytes_of(
        models["gemm"].output)


def test_inspect_knows_w8a8_layers(models, capsys):
    """A layer mixed precision kept at 8-bit weights is a layer too: counted, sized, listed."""
    path, result = models["mixed"].output, models["mixed"]
    [moved] = [layer for layer in result.layers if layer.weight_bits == 8]
    info = inspect_model(path)
    assert (info["w4a8_nodes"], info["w8a8_nodes"], info["other_fptq_nodes"]) == (2, 1, [])
    assert info["packed_bytes"] == packed_bytes_of(path) and info["op_library"] == RUNS_STOCK
    assert info["replaced_fp32_bytes"] == sum(4 * layer.k * layer.n for layer in result.layers)
    assert {layer["layer"]: layer["weight_bits"] for layer in info["layers"]} == {
        layer.name: layer.weight_bits for layer in result.layers}
    code, out, _ = run_cli(capsys, "inspect", path, "--layers")
    assert code == 0 and out.splitlines()[0] == "block.w8.onnx: 2 W4A8MatMul nodes, 1 W8A8MatMul (8-bit weights) (ai.fptq), opset 18"
    assert "(4- and 8-bit + scales + zero points)" in out
    assert any(line.split()[:3] == [moved.name, f"{moved.k}x{moved.n}", "8"] for line in out.splitlines())


def test_inspect_every_pass_dump(models, capsys):
    """Dumps with decisions are recognized; the bare import (00_input) is not ours."""
    for path in models["block"].dumps:
        code, out, err = run_cli(capsys, "inspect", path)
        if path.stem == "00_input":
            assert code == EXIT_USER_ERROR and "is not a model converted by fptq-onnx" in err
        elif path.stem < "08_replace_matmul":  # every pass before the replacement
            assert code == 0 and "pass dump before replace_matmul: 3 linear layers annotated" in out, path.stem
        else:
            assert code == 0 and "3 W4A8MatMul nodes" in out, path.stem


def test_inspect_does_not_read_external_data(models, tmp_path):
    """Sizes come from shapes: the .data file is never opened (deleted here)."""
    model = onnx.load(str(models["block"].output))
    onnx.save_model(model, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.data",
                    size_threshold=0)
    (tmp_path / "big.onnx.data").unlink()
    info = inspect_model(tmp_path / "big.onnx")
    assert info["external_data"] and info["packed_bytes"] == packed_bytes_of(models["block"].output)


def test_inspect_without_function_body_needs_the_library(models, tmp_path):
    model = onnx.load(str(models["block"].output))
    del model.functions[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    assert inspect_model(tmp_path / "bare.onnx")["op_library"] == NEEDS_LIBRARY


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda folder: (folder / "block.onnx"), "is not a model converted by fptq-onnx (no ai.fptq nodes)",
                 id="float-model"),
    pytest.param(lambda folder: (folder / "block.npz"), "is not an ONNX model", id="not-onnx"),
    pytest.param(lambda folder: (folder / "missing.onnx"), "does not exist", id="missing"),
])
def test_inspect_rejects_files_that_are_not_ours(models, capsys, make, message):
    code, out, err = run_cli(capsys, "inspect", make(models["folder"]))
    assert code == EXIT_USER_ERROR and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
