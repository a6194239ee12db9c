"""The accuracy options of issue 4 (GPTQ, clipping by output error, SmoothQuant, SLAC, automatic
thresholds, mixed precision), each against an independent float64 reference or a property that
fails when the option does nothing."""
import numpy as np
import onnx
import pytest

from fptq_onnx import quant
from fptq_onnx.calibration import SecondMoment, slac_windows
from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.op_contract import W8A8_OP_TYPE, single_op_model
from fptq_onnx.passes.auto_thresholds import best_split
from fptq_onnx.passes.base import PassPreconditionError
from fptq_onnx.pipeline import calibrate, convert
from fptq_onnx.session import InferenceSession

from conftest import outlier_inputs, run_model


def correlated_inputs(rng, rows, k):
    """Inputs with correlated channels and a few large ones: where GPTQ and clipping matter."""
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, :3] *= 15
    return x


def output_error(x, w, packed):
    return np.linalg.norm(x @ (w - quant.dequantize_weight(*packed))) / np.linalg.norm(x @ w)


def gptq_textbook(w, h, group_size, damp):
    """GPTQ as Optimal Brain Quantization states it: after rounding row k, update the rows not yet
    rounded with the inverse Hessian, then remove k from the inverse (no Cholesky, no batching)."""
    k, n = w.shape
    w = w.astype(np.float64).copy()
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    h_inv = np.linalg.inv(h)
    u = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // group_size), np.float32)
    zeros = np.zeros((n, k // group_size), np.uint8)
    for row in range(k):
        g = row // group_size
        if row % group_size == 0:
            u_g, s_g, z_g = quant.quantize_weight_groupwise(w[row:row + group_size], group_size, False)
            scales[:, g], zeros[:, g] = s_g[:, 0], z_g[:, 0]
        s, z = scales[:, g].astype(np.float64), zeros[:, g].astype(np.float64)
        q = np.clip(np.rint(w[row] / s) + z, 0, 15)
        u[:, row] = q
        error = (w[row] - (q - z) * s) / h_inv[row, row]
        w[row + 1:] -= np.outer(h_inv[row + 1:, row], error)
        h_inv = h_inv - np.outer(h_inv[:, row], h_inv[row, :]) / h_inv[row, row]
    return u, scales, zeros


def test_gptq_matches_the_textbook_algorithm(rng):
    k, n, g = 256, 48, 64
    w = rng.standard_normal((k, n)) * 0.05
    x = correlated_inputs(rng, 1024, k)
    h = x.T @ x / len(x)
    ours = quant.gptq_quantize_weight(w, h, g, symmetric=False, damp=0.01)
    ref = gptq_textbook(w, h, g, 0.01)
    assert np.mean(ours[0] == ref[0]) > 0.999  # float64 paths differ only at exact rounding ties
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5)


def test_gptq_lowers_output_error_and_equals_rtn_without_correlation(rng):
    k, n, g = 256, 64, 128
    w = rng.standard_normal((k, n)) * 0.05
    x = correlated_inputs(rng, 2048, k)
    rtn = quant.quantize_weight_groupwise(w, g, False)
    gptq = quant.gptq_quantize_weight(w, x.T @ x / len(x), g, False)
    assert output_error(x, w, gptq) < 0.7 * output_error(x, w, rtn)
    identity = quant.gptq_quantize_weight(w, np.eye(k), g, False, damp=1e-9)  # no correlation: nothing to compensate
    for ours, plain in zip(identity, rtn):
        np.testing.assert_array_equal(ours, plain)


def test_gptq_zeroes_dead_channels(rng):
    w = rng.standard_normal((128, 8))
    h = np.eye(128)
    h[5, :] = h[:, 5] = 0  # channel 5 never fires
    u, s, z = quant.gptq_quantize_weight(w, h, 128, False)
    assert np.all(quant.dequantize_weight(u, s, z)[5] == 0)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_clip_ratios_minimize_each_groups_output_error(rng, symmetric):
    k, n, g = 256, 40, 128
    w = rng.standard_normal((k, n)) * 0.05
    w[7, 3] = 1.0  # an outlier weight: clipping that group pays off only if its input is small
    x = correlated_inputs(rng, 512, k)
    h = x.T @ x / len(x)
    ratios = quant.output_error_clip_ratios(w, h, g, symmetric, columns_per_chunk=16)  # chunks of 16, 16, 8
    assert ratios.shape == (n, k // g)
    for col in range(n):  # brute force over the grid in float64, every (n, g)
        for grp in range(k // g):
            rows = slice(grp * g, (grp + 1) * g)
            errors = {}
            for ratio in quant.CLIP_RATIOS:
                u, s, z = quant.quantize_weight_groupwise(w[rows, col:col + 1], g, symmetric, ratio)
                d = w[rows, col] - quant.dequantize_weight(u, s, z)[:, 0]
                errors[ratio] = d @ h[rows, rows] @ d
            # the search runs in float32: the ratio it picks is the best, or ties it to 1e-5
            assert errors[ratios[col, grp]] <= min(errors.values()) * (1 + 1e-5), (col, grp)
    clipped = quant.quantize_weight_groupwise(w, g, symmetric, ratios)
    assert output_error(x, w, clipped) < output_error(x, w, quant.quantize_weight_groupwise(w, g, symmetric))
    assert len(set(ratios.ravel())) > 1  # the grid is searched, not every group left at 1.0


def test_smoothquant_scales_formula(rng):
    x_max, w_max = rng.uniform(0.1, 50, 32), rng.uniform(0.01, 1, 32)
    for alpha in (0.5, 0.8):
        np.testing.assert_allclose(quant.smoothquant_scales(x_max, w_max, alpha),
                                   x_max ** alpha / w_max ** (1 - alpha), rtol=1e-6)


def test_second_moment_is_the_mean_outer_product(rng):
    moment = SecondMoment()
    parts = [rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(3)]
    for part in parts:
        moment.update(part)
    rows = np.concatenate([p.reshape(-1, 16) for p in parts]).astype(np.float64)
    full = rows.T @ rows / len(rows)
    np.testing.assert_allclose(moment.value, full, rtol=1e-5, atol=1e-6)
    blocks = SecondMoment(block=6)  # K = 16 padded to 18: three 6 x 6 diagonal blocks
    for part in parts:
        blocks.update(part)
    padded = np.pad(full, ((0, 2), (0, 2)))
    expected = np.stack([padded[i:i + 6, i:i + 6] for i in (0, 6, 12)])
    np.testing.assert_allclose(blocks.value, expected, rtol=1e-5, atol=1e-6)


def test_clip_ratios_from_blocks_equal_those_from_the_full_hessian(rng):
    w = rng.standard_normal((256, 8)) * 0.05
    x = correlated_inputs(rng, 512, 256)
    h = x.T @ x / len(x)
    blocks = np.stack([h[:128, :128], h[128:, 128:]])
    np.testing.assert_array_equal(quant.output_error_clip_ratios(w, h, 128, False),
                                  quant.output_error_clip_ratios(w, blocks, 128, False))


def test_slac_windows_cycle_lengths_and_cover_the_text():
    class Tok:
        lead = [1]
    ids = list(range(100, 1100))
    windows = slac_windows(Tok(), ids, (16, 64), 6)
    assert [len(w) for w in windows] == [16, 64] * 3
    assert all(w[0] == 1 for w in windows)
    assert windows[0][1] == 100 and windows[-1][-1] == 1099  # first and last windows reach both ends


def test_best_split_prefers_static_within_tolerance():
    errors = [{"low": 1.0, "mid": 1.005, "high": 0.99}] * 4
    assert best_split(errors, 0.0) == (0, 0)  # strictly best: all dynamic
    assert best_split(errors, 0.02) == (4, 0)  # 1% worse but no dynamic layer: all static


def w8a8_model(k, n, group_size, symmetric, act_mode, rng):
    u, scales, zeros = quant.quantize_weight_groupwise_int8(rng.standard_normal((k, n)), group_size, symmetric)
    model = onnx.load_from_string(single_op_model({"B": u, "S": scales, "Z": zeros}, 0.04, k=k, n=n,
                                                  group_size=group_size, act_mode=act_mode, op_type=W8A8_OP_TYPE))
    onnx.checker.check_model(model, full_check=True)
    return model, (u, scales, zeros)


@pytest.mark.parametrize("act_mode", [0, 1])
@pytest.mark.parametrize("group_size, symmetric", [pytest.param(32, False, id="g32-asym"),
                                                   pytest.param(96, True, id="per-channel-sym")])
def test_w8a8_function_body_matches_reference(rng, act_mode, group_size, symmetric):
    model, weights = w8a8_model(96, 24, group_size, symmetric, act_mode, rng)
    x = rng.standard_normal((7, 96)).astype(np.float32) * 2
    ref = quant.w8a8_matmul_reference(x, *weights, 0.04, act_mode)
    for got in (run_model(model, {"X": x})[0],  # stock ORT: the body
                InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]):  # with our library: the kernel
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.fixture
def tiny_workdir(tmp_path, tiny_block, rng):
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (6, 1, 16, 128)))
    return tmp_path


def _convert(workdir, name, **fields):
    config = ConvertConfig(lm_head="w4", group_size=64, **fields)
    return convert(workdir / "model.onnx", workdir / f"{name}.onnx", workdir / "calib.npz", config, progress=False)


def test_mixed_precision_moves_the_worst_layer_to_8_bits(tiny_workdir):
    base = _convert(tiny_workdir, "w4")
    worst = max(base.layers, key=lambda layer: layer.output_error)
    mixed = _convert(tiny_workdir, "w8", w8_layers=1, w8_per_channel=False)  # groups of 64, asserted below
    [moved] = [layer for layer in mixed.layers if layer.weight_bits == 8]
    assert moved.name == worst.name
    assert moved.w4_output_error == pytest.approx(worst.output_error)
    assert moved.output_error < 0.5 * worst.output_error
    converted = onnx.load(str(tiny_workdir / "w8.onnx"))
    nodes = {n.name: n.op_type for n in converted.graph.node}
    assert nodes[f"{moved.name}/w8a8_matmul"] == W8A8_OP_TYPE
    assert sum(op == "W4A8MatMul" for op in nodes.values()) == 2
    # W4A8MatMul's contract with one byte per weight: B uint8 [N, K], the 4-bit layers' groups
    node = next(n for n in converted.graph.node if n.op_type == W8A8_OP_TYPE)
    shapes = {t.name: (tuple(t.dims), t.data_type) for t in converted.graph.initializer}
    assert shapes[node.input[1]] == ((moved.n, moved.k), onnx.TensorProto.UINT8)
    assert shapes[node.input[2]][0] == shapes[node.input[3]][0] == (moved.n, moved.k // 64)
    assert {a.name: a.i for a in node.attribute if a.name != "act_mode"} == {"K": moved.k, "N": moved.n,
                                                                             "group_size": 64}
    x = outlier_inputs(np.random.default_rng(7), (1, 16, 128))
    ref = run_model(str(tiny_workdir / "model.onnx"), {"x": x})[0]
    got = InferenceSession(str(tiny_workdir / "w8.onnx")).run(None, {"x": x})[0]
    w4 = InferenceSession(str(tiny_workdir / "w4.onnx")).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) < np.linalg.norm(w4 - ref)
    body = run_model(str(tiny_workdir / "w8.onnx"), {"x": x})[0]  # stock ORT: the function bodies
    np.testing.assert_allclose(got, body, rtol=0, atol=1e-4 * np.abs(body).max())


def test_mixed_precision_per_channel_has_one_group_of_k(tiny_workdir):
    result = _convert(tiny_workdir, "w8pc", w8_layers=1, w8_per_channel=True)
    [moved] = [layer for layer in result.layers if layer.weight_bits == 8]
    converted = onnx.load(str(tiny_workdir / "w8pc.onnx"))
    node = next(n for n in converted.graph.node if n.op_type == W8A8_OP_TYPE)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in converted.graph.initializer}
    u, scales, zeros = (inits[name] for name in node.input[1:4])
    assert scales.shape == zeros.shape == (moved.n, 1)
    assert {a.name: a.i for a in node.attribute}["group_size"] == moved.k
    # the per-channel grid of the layer's own (LAE-scaled) weight, from quant's formulas
    expected = quant.quantize_weight_groupwise_int8(moved.weight, moved.k, symmetric=False)
    for got, want in zip((u, scales, zeros), expected):
        np.testing.assert_array_equal(got, want)
    x = outlier_inputs(np.random.default_rng(7), (1, 16, 128))
    got = InferenceSession(str(tiny_workdir / "w8pc.onnx")).run(None, {"x": x})[0]
    body = run_model(str(tiny_workdir / "w8pc.onnx"), {"x": x})[0]  # stock ORT: the function bodies
    np.testing.assert_allclose(got, body, rtol=0, atol=1e-4 * np.abs(body).max())


def test_mixed_precision_size_budget(tiny_workdir):
    result = _convert(tiny_workdir, "w8", w8_layers=0, w8_fraction=0.34)  # one 128x256 layer of three
    assert sum(layer.weight_bits == 8 for layer in result.layers) == 1


def test_auto_thresholds_pick_bands_by_error(tiny_workdir):
    result = _convert(tiny_workdir, "auto", auto_thresholds=True, auto_tolerance=0.0)
    assert result.layers[0].band is not None
    strict = _convert(tiny_workdir, "auto2", auto_thresholds=True, auto_tolerance=10.0)  # anything goes: no dynamic
    assert all(layer.act_mode == quant.ActMode.PER_TENSOR_STATIC for layer in strict.layers)
    errors = lambda r: sum(layer.output_error for layer in r.layers)  # noqa: E731
    assert errors(result) <= errors(strict) * 1.000001


@pytest.mark.parametrize("fields", [dict(gptq=True), dict(weight_clip="output"),
                                    dict(equalization="smoothquant", lae_bands=("low", "mid", "high"))])
def test_options_lower_output_error_or_run(tiny_workdir, fields):
    base = _convert(tiny_workdir, "base", weight_clip="none", gptq=False)  # round-to-nearest
    other = _convert(tiny_workdir, "other", **fields)
    x = outlier_inputs(np.random.default_rng(3), (1, 16, 128))
    got = InferenceSession(str(tiny_workdir / "other.onnx")).run(None, {"x": x})[0]
    assert np.all(np.isfinite(got))
    if "gptq" in fields or "weight_clip" in fields:  # rounding by output error must beat RTN on its own data
        assert sum(l.output_error for l in other.layers) < sum(l.output_error for l in base.layers)


def test_statistics_calibrated_once_serve_conversions_needing_less(tiny_workdir):
    """Statistics with the clipping blocks serve a round-to-nearest conversion, which then equals
    one that calibrated alone; GPTQ, which needs the full Hessian, refuses them."""
    fields = dict(lm_head="w4", group_size=64)
    stats = calibrate(tiny_workdir / "model.onnx", tiny_workdir / "calib.npz", ConvertConfig(**fields), progress=False)
    rtn = ConvertConfig(weight_clip="none", **fields)
    for name, given in (("given", stats), ("alone", None)):
        convert(tiny_workdir / "model.onnx", tiny_workdir / f"{name}.onnx", tiny_workdir / "calib.npz", rtn,
                progress=False, stats=given)
    given, alone = (onnx.load(str(tiny_workdir / f"{name}.onnx")) for name in ("given", "alone"))
    assert given.graph.SerializeToString() == alone.graph.SerializeToString()
    with pytest.raises(PassPreconditionError, match="GPTQ needs the full Hessian"):
        convert(tiny_workdir / "model.onnx", tiny_workdir / "gptq.onnx", tiny_workdir / "calib.npz",
                ConvertConfig(gptq=True, **fields), progress=False, stats=stats)
