"""Each pass on tiny graphs: what it changed, what it declined and why, and that ORT agrees."""
import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from fptq_onnx import quant
from fptq_onnx.passes.act_scales import StaticActivationScalesPass, static_activation_scale
from fptq_onnx.passes.base import ConversionContext, PassManager, PassPreconditionError
from fptq_onnx.passes.find_linears import FindLinearLayersPass, module_paths
from fptq_onnx.passes.lae import LaePass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.passes.replace_matmul import ReplaceMatMulPass
from fptq_onnx.passes.strategy import LayerStrategyPass, band_of
from fptq_onnx.pipeline import export_model_proto

from conftest import TINY_BLOCK, model_from_text, outlier_inputs, run_model, tiny_block_weights


def context_of(model) -> ConversionContext:
    return ConversionContext(graph=gs.import_onnx(model))


def calibrate_exactly(ctx, model, x):
    """Set each group's per-channel max |x| by running the float model with its inputs exposed."""
    names = [group.input.name for group in ctx.groups]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names:
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    values = run_model(exposed, {"x": x})[len(model.graph.output):]
    for group, value in zip(ctx.groups, values):
        group.channel_max_abs = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
    return dict(zip(names, values))


# ------------------------------------------------------------------ find_linears


def test_find_linears_groups_shared_inputs(tiny_block):
    ctx = context_of(tiny_block)
    FindLinearLayersPass(exclude_lm_head=False)(ctx)
    assert [[layer.name for layer in group.layers] for group in ctx.groups] == [
        ["layers.0.q_proj", "layers.0.k_proj"], ["layers.0.down_proj"]]
    assert ctx.groups[0].name == "layers.0"


def test_find_linears_excludes_lm_head_by_default(tiny_block):
    """down_proj writes the graph output here, so it plays the lm_head."""
    ctx = context_of(tiny_block)
    FindLinearLayersPass()(ctx)
    assert [layer.name for layer in ctx.layers] == ["layers.0.q_proj", "layers.0.k_proj"]
    assert "language-model head" in ctx.rejections[0].reason


@pytest.mark.parametrize("pattern, kept", [
    pytest.param("k_proj", ["layers.0.q_proj", "layers.0.down_proj"], id="by-name"),
    pytest.param("^layers\\.0\\.(q|k)_proj$", ["layers.0.down_proj"], id="anchored-regex"),
])
def test_find_linears_nodes_to_exclude(tiny_block, pattern, kept):
    ctx = context_of(tiny_block)
    FindLinearLayersPass(nodes_to_exclude=pattern, exclude_lm_head=False)(ctx)
    assert [layer.name for layer in ctx.layers] == kept
    assert any("--nodes-to-exclude" in r.reason for r in ctx.rejections)


def test_find_linears_rejects_non_constant_weight_with_reason():
    model = model_from_text("g (float[2, 64] x, float[64, 8] w) => (float[2, 8] y) { y = MatMul (x, w) }", {})
    ctx = context_of(model)
    FindLinearLayersPass(exclude_lm_head=False)(ctx)
    assert ctx.groups == []
    assert "not a constant" in ctx.rejections[0].reason


@pytest.mark.parametrize("opset", [pytest.param(18, id="opset18-pad-axes"), pytest.param(17, id="opset17-full-pads")])
def test_k_not_multiple_of_group_is_padded(rng, opset):
    """K = 96 with group 64: one Pad node shared by both layers, and results equal the reference
    computed on zero-padded inputs (a partial last group)."""
    w1, w2 = (rng.standard_normal((96, 8)).astype(np.float32) for _ in range(2))
    model = model_from_text("""
        g (float[2, 3, 96] x) => (float[2, 3, 8] y) {
            a = MatMul (x, l1.weight)
            b = MatMul (x, l2.weight)
            y = Add (a, b)
        }""", {"l1.weight": w1, "l2.weight": w2}, opset=opset)
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    ctx = context_of(model)
    FindLinearLayersPass(exclude_lm_head=False)(ctx)
    calibrate_exactly(ctx, model, x)
    PassManager([LayerStrategyPass(), LaePass(), StaticActivationScalesPass(), QuantizeWeightsPass(64),
                 ReplaceMatMulPass()])(ctx)
    out = export_model_proto(ctx)
    onnx.checker.check_model(out, full_check=True)
    assert not [n for n in out.graph.node if n.op_type == "Pad"]  # the ops take the partial group: no Pad
    ops = [n for n in out.graph.node if n.op_type == "W4A8MatMul"]
    assert len(ops) == 2 and all(op.input[0] == "x" for op in ops)
    assert all({a.name: a.i for a in op.attribute}["K"] == 96 for op in ops)
    expected = 0
    for layer in ctx.layers:
        assert layer.packed[0].shape == (8, 48) and layer.packed[1].shape == (8, 2)  # B [N, K/2], G = ceil(96/64)
        expected = expected + quant.w4a8_matmul_reference(x, *layer.packed, layer.act_scale, layer.act_mode, 64)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_gemm_transposed_with_bias_is_converted_exactly(rng):
    """Gemm(x, W^T, b, alpha, beta) becomes W4A8 + Add; compare with the numpy reference."""
    w = rng.standard_normal((16, 128)).astype(np.float32)  # [N, K] because transB = 1
    bias = rng.standard_normal(16).astype(np.float32)
    model = model_from_text("""
        g (float[4, 128] x) => (float[4, 16] z) {
            y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, fc.weight, fc.bias)
            z = Relu (y)
        }""", {"fc.weight": w, "fc.bias": bias})
    ctx = context_of(model)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    FindLinearLayersPass()(ctx)
    calibrate_exactly(ctx, model, x)
    PassManager([LayerStrategyPass(), LaePass(), StaticActivationScalesPass(), QuantizeWeightsPass(64),
                 ReplaceMatMulPass()])(ctx)
    layer = ctx.layers[0]
    packed, scales, zeros = layer.packed
    expected = quant.w4a8_matmul_reference(x, packed, scales, zeros, layer.act_scale, 0) + 2.0 * bias
    np.testing.assert_allclose(layer.weight, 0.5 * w.T, rtol=1e-6)
    got = run_model(export_model_proto(ctx), {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(expected, 0), atol=1e-4)


# ------------------------------------------------------------------ strategy


@pytest.mark.parametrize("v, band", [
    pytest.param(14.99, "low", id="below-v0"),
    pytest.param(15.0, "mid", id="v0-is-mid"),
    pytest.param(150.0, "mid", id="v1-is-mid"),
    pytest.param(150.01, "high", id="above-v1"),
])
def test_band_thresholds(v, band):
    assert band_of(v, 15.0, 150.0) == band


def test_strategy_needs_statistics(tiny_block):
    ctx = context_of(tiny_block)
    FindLinearLayersPass()(ctx)
    with pytest.raises(PassPreconditionError, match="strategy: no calibration statistics"):
        LayerStrategyPass()(ctx)


# ------------------------------------------------------------------ LAE


def prepared(model, x, v0, v1, fold=True):
    ctx = context_of(model)
    FindLinearLayersPass(exclude_lm_head=False)(ctx)
    seen = calibrate_exactly(ctx, model, x)
    PassManager([LayerStrategyPass(v0, v1), LaePass(fold=fold)])(ctx)
    return ctx, seen


def test_lae_folds_into_norm_gamma_and_keeps_the_function(rng, tiny_block):
    x = outlier_inputs(rng, (2, 8, 128))
    ctx, seen = prepared(tiny_block, x, v0=0.001, v1=1e9)  # every layer in the LAE band
    qk = ctx.groups[0]
    expected_scales = np.abs(seen[qk.layers[0].node.inputs[0].name]).reshape(-1, 128).max(0)
    expected_scales = expected_scales / np.log2(2 + expected_scales)
    np.testing.assert_allclose(qk.lae_scales, expected_scales, rtol=1e-5)
    # q/k: folded into the Mul by gamma; down (after Relu): a visible Mul node
    assert qk.layers[0].lae_folded_into == qk.layers[1].lae_folded_into != "layers.0/lae_scale"
    assert ctx.groups[1].layers[0].lae_folded_into == "layers.0.down_proj/lae_scale"
    assert [n.name for n in ctx.graph.nodes if n.name.endswith("/lae_scale")] == ["layers.0.down_proj/lae_scale"]
    after = export_model_proto(ctx)
    onnx.checker.check_model(after)
    np.testing.assert_allclose(run_model(after, {"x": x})[0], run_model(tiny_block, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_lae_without_fold_inserts_mul_everywhere(rng, tiny_block):
    x = outlier_inputs(rng, (2, 8, 128))
    ctx, _ = prepared(tiny_block, x, v0=0.001, v1=1e9, fold=False)
    assert sorted(n.name for n in ctx.graph.nodes if n.op == "Mul" and n.name.endswith("lae_scale")) == [
        "layers.0.down_proj/lae_scale", "layers.0/lae_scale"]
    np.testing.assert_allclose(run_model(export_model_proto(ctx), {"x": x})[0],
                               run_model(tiny_block, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_lae_does_not_fold_when_norm_output_has_other_consumers(rng):
    weights = tiny_block_weights(rng)
    text = TINY_BLOCK.replace("=> (float[B, S, 128] y)", "=> (float[B, S, 128] y, float[B, S, 128] hidden)")
    model = model_from_text(text, weights)
    x = outlier_inputs(rng, (1, 4, 128))
    ctx, _ = prepared(model, x, v0=0.001, v1=1e9)
    assert ctx.groups[0].layers[0].lae_folded_into == "layers.0/lae_scale"
    assert any("other nodes" in r.reason or "graph input or output" in r.reason for r in ctx.rejections)
    outputs_after = run_model(export_model_proto(ctx), {"x": x})
    outputs_before = run_model(model, {"x": x})
    np.testing.assert_allclose(outputs_after[1], outputs_before[1], rtol=1e-6)  # hidden is untouched


def test_lae_folds_into_layer_normalization(rng):
    gamma, beta = rng.uniform(0.5, 2, 128).astype(np.float32), rng.standard_normal(128).astype(np.float32)
    model = model_from_text("""
        g (float[B, 128] x) => (float[B, 16] y) {
            h = LayerNormalization <axis = -1> (x, ln.weight, ln.bias)
            y = MatMul (h, fc.weight)
        }""", {"ln.weight": gamma, "ln.bias": beta, "fc.weight": rng.standard_normal((128, 16)).astype(np.float32)})
    x = outlier_inputs(rng, (6, 128))
    ctx, _ = prepared(model, x, v0=0.001, v1=1e9)
    norm = [n for n in ctx.graph.nodes if n.op == "LayerNormalization"][0]
    np.testing.assert_allclose(norm.inputs[1].values * ctx.groups[0].lae_scales, gamma, rtol=1e-6)
    np.testing.assert_allclose(norm.inputs[2].values * ctx.groups[0].lae_scales, beta, rtol=1e-6)
    np.testing.assert_allclose(run_model(export_model_proto(ctx), {"x": x})[0], run_model(model, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_lae_folds_into_the_up_projection_of_a_gated_mlp(rng):
    """down_proj reads silu(gate) * up: its 1/s goes into up's output columns (no Mul node), and
    the float function is unchanged; with Relu(gate) + up (no product) it stays a Mul node."""
    weights = {"gate.weight": (rng.standard_normal((64, 96)) * 0.3).astype(np.float32),
               "up.weight": (rng.standard_normal((64, 96)) * 0.3).astype(np.float32),
               "down.weight": (rng.standard_normal((96, 64)) * 0.3).astype(np.float32)}
    for combine, folded in (("Mul", True), ("Add", False)):
        model = model_from_text(f"""
            g (float[B, 64] x) => (float[B, 64] y) {{
                gate = MatMul (x, gate.weight)
                up = MatMul (x, up.weight)
                sig = Sigmoid (gate)
                act = Mul (gate, sig)
                hidden = {combine} (act, up)
                y = MatMul (hidden, down.weight)
            }}""", weights)
        x = outlier_inputs(rng, (16, 64), outlier_channels=(5,))
        ctx, _ = prepared(model, x, v0=0.001, v1=1e9)
        [down] = [layer for layer in ctx.layers if layer.name == "down"]
        [up] = [layer for layer in ctx.layers if layer.name == "up"]
        inserted = [n.name for n in ctx.graph.nodes if n.name.endswith("/lae_scale")]
        if folded:
            assert down.lae_folded_into == (up.node.name or "up") and "down/lae_scale" not in inserted
            up_scales = ctx.groups[0].lae_scales  # up's own LAE scales its rows
            np.testing.assert_allclose(up.weight, weights["up.weight"] * up_scales[:, None]
                                       / ctx.groups[1].lae_scales[None, :], rtol=1e-6)
        else:
            assert down.lae_folded_into == "down/lae_scale" and "down/lae_scale" in inserted
        np.testing.assert_allclose(run_model(export_model_proto(ctx), {"x": x})[0], run_model(model, {"x": x})[0],
                                   rtol=1e-4, atol=1e-4)


def test_lae_skips_groups_outside_the_mid_band(rng, tiny_block):
    ctx, _ = prepared(tiny_block, outlier_inputs(rng, (1, 4, 128)), v0=1e8, v1=1e9)
    assert all(not layer.lae and layer.band == "low" for layer in ctx.layers)
    assert not any(n.name.endswith("lae_scale") for n in ctx.graph.nodes)


# ------------------------------------------------------------------ activation scales


def test_static_scale_is_taken_on_the_scaled_activation(rng, tiny_block):
    x = outlier_inputs(rng, (2, 8, 128))
    ctx, _ = prepared(tiny_block, x, v0=0.001, v1=1e9)
    StaticActivationScalesPass()(ctx)
    # the tensor the q/k layers really read after LAE, measured by running the rewritten graph
    after = export_model_proto(ctx)
    qk_input = ctx.layers[0].node.inputs[0].name
    after.graph.output.append(onnx.helper.make_tensor_value_info(qk_input, onnx.TensorProto.FLOAT, None))
    scaled = run_model(after, {"x": x})[-1]
    assert ctx.layers[0].act_scale == pytest.approx(np.abs(scaled).max() / 127, rel=1e-5)


def test_static_scale_of_zero_input_is_one():
    assert static_activation_scale(np.zeros(4)) == 1.0


def test_static_scale_below_2_to_the_minus_126_is_one():
    """The kernels refuse a subnormal act_scale (1 / a would overflow): such an input counts as zero."""
    assert static_activation_scale(np.array([1e-37, 0.0])) == 1.0
    assert static_activation_scale(np.array([1e-35])) == pytest.approx(1e-35 / 127)


# ------------------------------------------------------------------ weights and replacement


@pytest.mark.parametrize("symmetric", [pytest.param(False, id="asym"), pytest.param(True, id="sym")])
def test_quantize_weights_records_relative_error(rng, tiny_block, symmetric):
    ctx, _ = prepared(tiny_block, outlier_inputs(rng, (1, 4, 128)), v0=15, v1=150)
    QuantizeWeightsPass(group_size=64, symmetric=symmetric)(ctx)
    for layer in ctx.layers:
        packed, scales, zeros = layer.packed
        restored = quant.dequantize_weight(quant.unpack_int4(packed), scales, zeros)
        expected = np.linalg.norm(restored - layer.weight) / np.linalg.norm(layer.weight)
        assert layer.weight_error == pytest.approx(expected, rel=1e-9)
        assert 0.02 < layer.weight_error < 0.3
        assert scales.shape == (layer.n, layer.k // 64) and layer.symmetric == symmetric


def test_replace_matmul_output_matches_numpy_simulation(rng, tiny_block):
    """The whole rewritten block against a float64 simulation of W4A8 built from the layers."""
    x = outlier_inputs(rng, (2, 8, 128))
    ctx, _ = prepared(tiny_block, x, v0=15, v1=150)
    PassManager([StaticActivationScalesPass(), QuantizeWeightsPass(128), ReplaceMatMulPass()])(ctx)
    model = export_model_proto(ctx)
    onnx.checker.check_model(model, full_check=True)
    assert sorted(n.name for n in model.graph.node if n.op_type == "W4A8MatMul") == [
        "layers.0.down_proj/w4a8_matmul", "layers.0.k_proj/w4a8_matmul", "layers.0.q_proj/w4a8_matmul"]
    node = next(n for n in model.graph.node if n.name == "layers.0.q_proj/w4a8_matmul")
    assert "band=" in node.doc_string and any(p.key == "fptq.weight_error" for p in node.metadata_props)

    def w4a8(layer, inp):
        packed, scales, zeros = layer.packed
        return quant.w4a8_matmul_reference(inp, packed, scales, zeros, layer.act_scale, layer.act_mode)

    q_layer, k_layer, down_layer = ctx.layers
    hidden = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    gamma = next(onnx.numpy_helper.to_array(t) for t in tiny_block.graph.initializer if t.name == "norm.weight")
    hidden = hidden * gamma
    if q_layer.lae:
        hidden = hidden / ctx.groups[0].lae_scales
    act = np.maximum(w4a8(q_layer, hidden.astype(np.float32)) + w4a8(k_layer, hidden.astype(np.float32)), 0)
    if down_layer.lae:
        act = act / ctx.groups[1].lae_scales
    expected = w4a8(down_layer, act.astype(np.float32))
    got = run_model(model, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())


def test_layer_names_come_from_exporter_metadata(tiny_block):
    """torch.onnx (dynamo) records the calling module per node; that beats weight names like val_12."""
    for node in tiny_block.graph.node:
        if node.op_type == "MatMul" and "q_proj" in node.input[1]:
            node.name = "node_linear_7"
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                                    value="['', 'inner', 'inner.model', 'inner.model.layers.0.self_attn.q_proj', 'linear']")
    ctx = context_of(tiny_block)
    FindLinearLayersPass(exclude_lm_head=False, module_names=module_paths(tiny_block))(ctx)
    assert ctx.layers[0].name == "model.layers.0.self_attn.q_proj"
    assert ctx.layers[1].name == "layers.0.k_proj"  # no metadata: the weight's name


def test_lae_folds_a_shared_gamma_into_copies_of_their_own(rng):
    """Two norms sharing one gamma initializer (exporters store equal tensors once) each get a
    folded copy with its own name: one name for two values would make the model wrong."""
    model = model_from_text("""
        g (float[B, 64] x) => (float[B, 16] y1, float[B, 16] y2) {
            a = Mul (x, gamma)
            doubled = Add (x, x)
            b = Mul (doubled, gamma)
            y1 = MatMul (a, w1)
            y2 = MatMul (b, w2)
        }
    """, {"gamma": rng.uniform(0.5, 2, 64).astype(np.float32), "w1": rng.standard_normal((64, 16)).astype(np.float32),
          "w2": rng.standard_normal((64, 16)).astype(np.float32)})
    x = outlier_inputs(rng, (8, 64), outlier_channels=(3,))
    ctx, _ = prepared(model, x, v0=0.001, v1=1e9)
    after = export_model_proto(ctx)
    names = [t.name for t in after.graph.initializer]
    assert len(names) == len(set(names)) and sum("lae_folded" in n for n in names) == 2
    for got, expected in zip(run_model(after, {"x": x}), run_model(model, {"x": x})):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_strategy_uses_its_own_thresholds(rng, tiny_block):
    """A threshold choice recorded in the context (auto thresholds) does not override the pass's."""
    ctx, _ = prepared(tiny_block, outlier_inputs(rng, (1, 4, 128)), v0=1e8, v1=1e9)
    ctx.thresholds = (1e-9, 1e-9)
    LayerStrategyPass(1e8, 1e9)(ctx)
    assert all(layer.band == "low" for layer in ctx.layers)


def test_lae_folds_o_proj_into_the_value_columns_of_group_query_attention(tmp_path):
    """The GenAI builder's tiny LLaMA (packed QKV -> GroupQueryAttention, 4 query heads on 2 KV
    heads): o_proj's 1/s goes into the V columns of qkv_proj (no Mul node), with one scale per V
    column shared by the query heads that read it, and logits are unchanged in float over a
    prompt and a next step that reads the KV cache back."""
    from genai_fixtures import build_tiny_genai_model

    folder = build_tiny_genai_model(tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    ctx = context_of(model)
    FindLinearLayersPass(exclude_lm_head=False)(ctx)
    rng = np.random.default_rng(7)
    for group in ctx.groups:
        group.channel_max_abs = rng.uniform(0.5, 60, group.layers[0].k).astype(np.float32)
    PassManager([LayerStrategyPass(0.001, 1e9), LaePass()])(ctx)
    o_groups = [group for group in ctx.groups if group.layers[0].name.endswith("o_proj.MatMul")]
    assert o_groups and not [n for n in ctx.graph.nodes if n.name.endswith("o_proj.MatMul/lae_scale")]
    for group in o_groups:
        assert group.layers[0].lae_folded_into.endswith("qkv_proj/MatMul")
        per_head = group.lae_scales.reshape(4, 16)  # hidden 64 = 4 heads x 16
        np.testing.assert_array_equal(per_head[0], per_head[1])  # query heads 0, 1 read KV head 0
        np.testing.assert_array_equal(per_head[2], per_head[3])

    after = export_model_proto(ctx)
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (model, after)]
    inputs = {i.name: i for i in sessions[0].get_inputs()}
    layers = sorted({int(name.split(".")[1]) for name in inputs if name.startswith("past_key_values")})

    def step(session, ids, past, total):
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        for layer in layers:
            for kind in ("key", "value"):
                feed[f"past_key_values.{layer}.{kind}"] = past.get((layer, kind), np.zeros((1, 2, 0, 16), np.float32))
        outputs = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        presents = {(int(n.split(".")[1]), n.split(".")[2]): v for n, v in zip(names, outputs) if n.startswith("present")}
        return outputs[names.index("logits")], presents

    before_logits, before_past = step(sessions[0], [5, 9, 4, 7], {}, 4)
    after_logits, after_past = step(sessions[1], [5, 9, 4, 7], {}, 4)
    np.testing.assert_allclose(after_logits, before_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step(sessions[1], [3], after_past, 5)[0], step(sessions[0], [3], before_past, 5)[0],
                               rtol=1e-4, atol=1e-4)
