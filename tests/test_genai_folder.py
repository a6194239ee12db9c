"""``convert`` writes an onnxruntime-genai model folder: ``og.Model(folder)`` runs the converted
model with our op library and generates what our own greedy loop generates.

Two sources, both tiny random LLaMAs (seconds): the GenAI model builder's fused graph (its
``genai_config.json`` updated) and ``fptq-onnx export --with-past`` (optimum's layout, a new
config of model type ``decoder``).
"""
import json

import numpy as np
import pytest

from fptq_onnx.cli import main
from fptq_onnx.generate import greedy_generate
from fptq_onnx.genai import CONFIG_NAME, LIBRARY_NAME
from fptq_onnx.models._tiny import tiny_text
from fptq_onnx.session import InferenceSession

from genai_fixtures import GENAI_FOLDER, HF_FOLDER, build_tiny_genai_model
from test_cli_errors import assert_one_line_error, run_cli

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ([1, 5, 9, 4, 7], [1, 3, 3, 8], [1, 20, 11, 6, 12, 19, 4])
EOS = 2  # save_tiny_llama's eos_token_id


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(root, hf)``: the tiny random LLaMA's HF folder, its GenAI builder model in root/genai."""
    root = tmp_path_factory.mktemp("genai")
    try:
        build_tiny_genai_model(root)
    except RuntimeError as error:
        pytest.skip(str(error))
    (root / "calib.txt").write_text(tiny_text(2000))
    return root, root / HF_FOLDER


@pytest.fixture(scope="module")
def builder_model(tiny):
    """The GenAI model builder's fp32 model of the tiny LLaMA (GroupQueryAttention, packed QKV)."""
    return tiny[0] / GENAI_FOLDER / "model.onnx"


def convert_cli(source, calib, output) -> None:
    assert main(["-q", "convert", str(source), "--calib", str(calib), "--samples", "4", "--seq-len", "32",
                 "-o", str(output)]) == 0


def genai_greedy(folder, prompt, max_length=24) -> list[int]:
    """New tokens of GenAI's greedy search (it stops at EOS, which it does not append)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]


def ours_until_eos(model_path, prompt, max_length=24) -> list[int]:
    tokens = greedy_generate(InferenceSession(str(model_path)), prompt, max_length - len(prompt))
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def assert_generates_like_our_loop(folder, model_path):
    lengths = []
    for prompt in PROMPTS:
        ours = ours_until_eos(model_path, prompt)
        assert genai_greedy(folder, prompt) == ours, prompt
        lengths.append(len(ours))
    assert max(lengths) >= 5, lengths  # a comparison of more than a token or two


def test_builder_model_converts_to_a_genai_folder(tiny, builder_model):
    root, _ = tiny
    out = root / "builder-w4a8" / "model.onnx"  # the folder does not exist yet: convert makes it
    convert_cli(builder_model, root / "calib.txt", out)
    names = {p.name for p in out.parent.iterdir()}
    assert {CONFIG_NAME, LIBRARY_NAME, "model.onnx", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.startswith(".") for name in names), "temporary files left behind"
    config = json.loads((out.parent / CONFIG_NAME).read_text())
    source = json.loads((builder_model.parent / CONFIG_NAME).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx" and decoder["session_options"]["custom_ops_library"] == LIBRARY_NAME
    assert decoder["head_size"] == source["model"]["decoder"]["head_size"]
    assert config["search"] == source["search"] and config["model"]["type"] == source["model"]["type"]
    assert_generates_like_our_loop(out.parent, out)


def test_own_kv_export_gets_a_new_decoder_config(tiny):
    root, hf = tiny
    past = root / "past" / "model.onnx"
    assert main(["-q", "export", str(hf), "-o", str(past), "--exporter", "torch", "--with-past"]) == 0
    out = root / "past-w4a8" / "model.onnx"
    convert_cli(past, root / "calib.txt", out)
    config = json.loads((out.parent / CONFIG_NAME).read_text())
    model = config["model"]
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    assert model["type"] == "decoder" and model["eos_token_id"] == EOS and model["vocab_size"] == vocab
    decoder = model["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is False  # the model concatenates its cache
    assert_generates_like_our_loop(out.parent, out)


def test_model_without_cache_gets_no_genai_config(tiny):
    root, hf = tiny
    full = root / "full" / "model.onnx"
    assert main(["-q", "export", str(hf), "-o", str(full), "--exporter", "torch"]) == 0
    out = root / "full-w4a8" / "model.onnx"
    convert_cli(full, root / "calib.txt", out)
    assert not (out.parent / CONFIG_NAME).exists() and not (out.parent / LIBRARY_NAME).exists()


def test_bad_calibration_of_a_builder_model_is_one_line_and_writes_nothing(tiny, builder_model, capsys):
    root, _ = tiny
    np.savez(root / "bad.npz", input_ids=np.zeros((2, 8), np.float32))  # ids must be integers
    out = root / "never" / "model.onnx"
    code, _, err = run_cli(capsys, "convert", builder_model, "--calib", root / "bad.npz", "-o", out)
    assert_one_line_error(code, err, "input_ids")
    assert not out.parent.exists()


def test_perplexity_through_genai_equals_ours(tiny, builder_model):
    """GenAI's logits (``evaluate_genai``) and ONNX Runtime's through our feeds (``evaluate``, the
    empty cache synthesized) score the same windows alike, on the builder's model and converted."""
    from fptq_onnx.evaluate import evaluate, evaluate_genai

    root, _ = tiny
    text = tiny_text(600, seed=3)
    out = root / "ppl-w4a8" / "model.onnx"
    convert_cli(builder_model, root / "calib.txt", out)
    for model_path, factory in ((builder_model, None), (out, InferenceSession)):
        ours = evaluate(model_path, text, window=64, session_factory=factory, progress=False)
        genai = evaluate_genai(model_path.parent, text, window=64, progress=False)
        assert genai["tokens"] == ours["tokens"] > 0 and ours["tokens"] % 63 == 0  # whole windows
        assert genai["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-4)


def test_eval_takes_a_genai_folder(tiny, builder_model, capsys):
    from fptq_onnx.evaluate import evaluate

    root, _ = tiny
    (root / "eval.txt").write_text(tiny_text(1500, seed=5))
    code, out, err = run_cli(capsys, "eval", builder_model.parent, "--text", root / "eval.txt", "--window", "128",
                             "--json")
    assert code == 0, err
    expected = evaluate(builder_model, (root / "eval.txt").read_text(), window=128, progress=False)
    assert json.loads(out)["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)


def test_converted_nodes_run_our_kernels_not_their_bodies(tiny, builder_model, tmp_path):
    """The model imports ai.fptq at the version our library registers W8A8MatMul for (2), so
    ONNX Runtime runs the kernels, not the inlined function bodies (graphsurgeon's export had
    imported the domain at version 1, and every 8-bit layer ran as MatMulInteger-like float ops)."""
    import onnx
    import onnxruntime as ort

    from fptq_onnx.op_contract import OP_DOMAIN, OP_VERSION

    root, _ = tiny
    out = root / "kernels" / "model.onnx"
    convert_cli(builder_model, root / "calib.txt", out)
    model = onnx.load(str(out), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[OP_DOMAIN] == OP_VERSION
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = InferenceSession(str(out), options)
    greedy_generate(session, PROMPTS[0], 2)
    profile = json.loads(open(session.end_profiling()).read())
    ran = {event["args"].get("op_name") for event in profile if event.get("cat") == "Node"}
    assert {"W4A8MatMul", "W8A8MatMul"} <= ran, sorted(ran)


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--window", "1000"], "exceeds the model's context length 256", id="window-beyond-context"),
    pytest.param(["--window", "1"], "at least 2 tokens", id="window-too-small"),
    pytest.param(["--reference", "other.onnx"], "scored alone", id="reference-with-a-folder"),
])
def test_eval_of_a_genai_folder_refuses_bad_options_in_one_line(tiny, builder_model, capsys, extra, message):
    root, _ = tiny
    (root / "eval-bad.txt").write_text(tiny_text(1500, seed=6))
    code, _, err = run_cli(capsys, "eval", builder_model.parent, "--text", root / "eval-bad.txt", *extra)
    assert_one_line_error(code, err, message)
