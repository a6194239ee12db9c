"""``fptq-onnx export`` through the onnxruntime-genai model builder, and the fallback to our torch
exporter, on tiny random models (seconds each).

The builder's folder must be the builder's own output (the same graph and config as running the
builder by hand), complete (genai_config.json, tokenizer, a model with GroupQueryAttention that
onnxruntime-genai loads), named as ``-o`` says; an architecture the builder refuses (GPT-2) must
fall back to the torch exporter and say why; a failure must leave nothing behind.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fptq_onnx import export as ex
from fptq_onnx.generate import greedy_generate

from genai_fixtures import HF_FOLDER, build_tiny_genai_model
from test_cli_errors import assert_one_line_error, run_cli

og = pytest.importorskip("onnxruntime_genai")

PROMPT = [5, 9, 4, 7, 30]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(hf_folder, builder_folder)``: a tiny LLaMA and the builder's folder made by hand."""
    root = tmp_path_factory.mktemp("export_builder")
    genai = build_tiny_genai_model(root)
    return root / HF_FOLDER, genai


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 (an architecture the builder does not know) with the word tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fptq_onnx.models._tiny import BOS_ID, SPECIAL, WORDS, save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("gpt2") / "hf"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(SPECIAL) + len(WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                        bos_token_id=BOS_ID, eos_token_id=2)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return save_tiny_tokenizer(folder)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_builder_export_writes_the_builders_folder(tiny, tmp_path, capsys):
    hf, by_hand = tiny
    code, out, err = run_cli(capsys, "export", hf, "-o", tmp_path / "out", "--exporter", "builder")
    assert code == 0, err
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in by_hand.iterdir())
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "genai_config.json").read_text()) == json.loads((by_hand / "genai_config.json").read_text())
    assert op_types(folder / "model.onnx") == op_types(by_hand / "model.onnx")
    assert op_types(folder / "model.onnx").count("GroupQueryAttention") == 2  # one per layer
    lines = out.strip().splitlines()
    assert lines[0].startswith("exported with the onnxruntime-genai model builder (fused graph: ")
    assert "GroupQueryAttention" in lines[0] and "KV cache" in lines[0]
    assert lines[1] == f"wrote {folder / 'model.onnx'}"
    og.Model(str(folder))  # onnxruntime-genai loads it


def test_auto_export_to_a_named_file(tiny, tmp_path, capsys):
    """``-o out/foo.onnx``: the builder's model renamed with its external data, the config
    pointing at it; the same logits as the builder's own file."""
    hf, by_hand = tiny
    path = tmp_path / "out" / "foo.onnx"
    code, out, err = run_cli(capsys, "export", hf, "-o", path)
    assert code == 0, err
    assert "exported with the onnxruntime-genai model builder" in out
    names = {p.name for p in path.parent.iterdir()}
    assert {"foo.onnx", "foo.onnx.data", "genai_config.json"} <= names and "model.onnx" not in names
    assert not leftovers(path.parent)
    assert json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "foo.onnx"
    assert greedy_generate(session(path), PROMPT, 8) == greedy_generate(session(by_hand / "model.onnx"), PROMPT, 8)
    model = og.Model(str(path.parent))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 3, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(PROMPT, np.int32))
    generator.generate_next_token()  # the renamed file runs under GenAI


def test_auto_falls_back_to_torch_when_the_builder_refuses(tiny_gpt2, tmp_path, capsys):
    path = tmp_path / "out" / "model.onnx"
    code, out, err = run_cli(capsys, "export", tiny_gpt2, "-o", path)
    assert code == 0, err
    summary = out.strip().splitlines()[0]
    assert summary.startswith("exported with fptq-onnx's torch exporter: the builder failed: ")
    assert "not currently supported" in summary  # the builder's own last line
    assert [i.name for i in session(path).get_inputs()] == ["input_ids", "attention_mask"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "tokenizer.json", "tokenizer_config.json"]


def test_forced_builder_on_a_model_it_refuses_leaves_nothing(tiny_gpt2, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", tiny_gpt2, "-o", tmp_path / "new" / "deeper", "--exporter", "builder")
    assert_one_line_error(code, err, "the onnxruntime-genai model builder cannot export")
    assert "not currently supported" in err
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary files


def test_torch_export_into_a_builder_folder_drops_its_config(tiny, tmp_path, capsys):
    """The torch exporter replacing a builder export of the same name: the old genai_config.json
    described the builder's graph, so it goes."""
    hf, _ = tiny
    folder = tmp_path / "out"
    assert run_cli(capsys, "export", hf, "-o", folder)[0] == 0
    code, out, err = run_cli(capsys, "export", hf, "-o", folder, "--exporter", "torch", "--with-past")
    assert code == 0, err
    assert out.startswith("exported with fptq-onnx's torch exporter\n")
    assert not (folder / "genai_config.json").exists() and not (folder / "model.onnx.data").exists()
    assert "GroupQueryAttention" not in op_types(folder / "model.onnx")
    assert "position_ids" in [i.name for i in session(folder / "model.onnx").get_inputs()]  # optimum's layout


def test_without_genai_the_builder_is_skipped(tiny, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else find_spec(name, *a))
    hf, _ = tiny
    code, out, err = run_cli(capsys, "export", hf, "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert out.startswith("exported with fptq-onnx's torch exporter: the builder failed: onnxruntime-genai is not "
                          "installed (pip install onnxruntime-genai)\n")


@pytest.mark.parametrize("argv, message", [
    pytest.param(["{tmp}/missing", "-o", "{tmp}/o"], "no model folder, .gguf file or recipe named", id="missing source"),
    pytest.param(["{hf}", "-o", "{tmp}/file.bin"], "exists and is neither an .onnx path nor a folder", id="output is a file"),
])
def test_export_errors(tiny, tmp_path, capsys, argv, message):
    (tmp_path / "file.bin").write_text("x")
    argv = [a.format(tmp=tmp_path, hf=tiny[0]) for a in argv]
    code, out, err = run_cli(capsys, "export", *argv)
    assert_one_line_error(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_export_result_names_the_exporter(tiny, tmp_path):
    result = ex.export(tiny[0], tmp_path, exporter="builder", progress=False, with_past=True)
    assert (result.path, result.exporter) == (tmp_path / "model.onnx", "builder")
    assert "KV cache" not in result.summary  # asked for with --with-past: nothing to remark
    with pytest.raises(ex.UserError, match="exporter must be one of auto, builder, torch"):
        ex.export(tiny[0], tmp_path, exporter="optimum")
