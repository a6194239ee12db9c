"""Row sampling, per-layer output error, the convert summary, and --report (HTML in Chromium, Markdown)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from fptq_onnx import quant
from fptq_onnx.calibration import RowReservoir, collect_calibration_stats
from fptq_onnx.cli import EXIT_USER_ERROR, main
from fptq_onnx.config import CalibrationConfig, ConvertConfig
from fptq_onnx.errors import UserError
from fptq_onnx.passes.base import LinearLayer
from fptq_onnx.passes.output_error import layer_output_error
from fptq_onnx.pipeline import convert
from fptq_onnx.report import check_report_path, output_error_summary

from conftest import TINY_BLOCK, model_from_text, outlier_inputs

# ------------------------------------------------------------------ row reservoir


def test_reservoir_keeps_everything_until_full():
    reservoir = RowReservoir(10, np.random.default_rng(0))
    reservoir.update(np.arange(12, dtype=np.float32).reshape(2, 3, 2))
    np.testing.assert_array_equal(reservoir.value, np.arange(12).reshape(6, 2))


def test_reservoir_is_uniform_and_bounded():
    """Row t of T = 400 (streamed in uneven batches) is kept with probability 40 / 400, and the
    memory is capacity x K whatever T is."""
    capacity, total, trials = 40, 400, 300
    counts = np.zeros(total)
    for seed in range(trials):
        reservoir = RowReservoir(capacity, np.random.default_rng(seed))
        rows = np.arange(total, dtype=np.float32)[:, None].repeat(3, axis=1)
        for start, stop in [(0, 7), (7, 150), (150, 151), (151, 400)]:
            reservoir.update(rows[start:stop])
        assert reservoir.rows.shape == (capacity, 3)
        kept = reservoir.value[:, 0].astype(int)
        assert len(set(kept)) == capacity  # distinct rows, each a real input row
        counts[kept] += 1
    frequency = counts / trials
    assert abs(frequency.mean() - capacity / total) < 1e-12
    # first and second half equally likely (a biased reservoir favours early or late rows)
    assert abs(frequency[:200].mean() - frequency[200:].mean()) < 0.01


def test_calibration_samples_real_rows_reproducibly(tmp_path, rng):
    model = model_from_text("g (float[B, S, 16] x) => (float[B, S, 16] y) { y = Relu (x) }", {})
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((5, 1, 30, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    config = CalibrationConfig(error_rows=32)
    first = collect_calibration_stats(tmp_path / "m.onnx", ["y"], tmp_path / "c.npz", config, progress=False)
    again = collect_calibration_stats(tmp_path / "m.onnx", ["y"], tmp_path / "c.npz", config, progress=False)
    all_rows = np.maximum(x, 0).reshape(-1, 16)
    assert first.rows["y"].shape == (32, 16)
    assert all(any(np.array_equal(row, other) for other in all_rows) for row in first.rows["y"])
    np.testing.assert_array_equal(first.rows["y"], again.rows["y"])
    np.testing.assert_array_equal(first.channel_max["y"], all_rows.max(axis=0))


# ------------------------------------------------------------------ output error


def _layer(weight, group_size, act_scale, act_mode=quant.ActMode.PER_TENSOR_STATIC, lae_scales=None):
    layer = LinearLayer(name="fc", node=None, weight=weight.astype(np.float32), act_mode=act_mode, act_scale=act_scale)
    if lae_scales is not None:
        layer.weight = (weight * lae_scales[:, None]).astype(np.float32)
    u, scales, zeros = quant.quantize_weight_groupwise(layer.weight, group_size, symmetric=False)
    layer.packed, layer.k_padded, layer.group_size = (quant.pack_int4(u), scales, zeros), layer.k, group_size
    return layer


def test_output_error_is_zero_when_nothing_is_lost():
    """Weights on the 4-bit grid and integer activations in [-127, 127] with act_scale 1: exact."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-7, 9, (64, 8)).astype(np.float32)
    weight[[0, 32]], weight[[1, 33]] = -7, 8  # every group of 32 spans [-7, 8]: scale 1, zero point 7
    x = rng.integers(-127, 128, (20, 64)).astype(np.float32)
    assert layer_output_error(x, _layer(weight, 32, 1.0), None) == 0.0


@pytest.mark.parametrize("act_mode", list(quant.ActMode), ids=str)
@pytest.mark.parametrize("k", [pytest.param(64, id="k64"), pytest.param(48, id="k48-partial-group")])
def test_output_error_against_direct_computation(act_mode, k):
    """LAE'd layer: the error is that of X W (original W) against the op on X / s."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((k, 16)).astype(np.float32)
    x = outlier_inputs(rng, (40, k), outlier_channels=(2, 9))
    s = quant.lae_scales(np.abs(x).max(axis=0))
    scale = float(np.abs(x / s).max() / 127)
    layer = _layer(weight, 32, scale, act_mode, lae_scales=s)
    y = quant.w4a8_matmul_reference(x / s, *layer.packed, scale, act_mode, 32)
    reference = x.astype(np.float64) @ weight.astype(np.float64)
    expected = np.linalg.norm(reference - y) / np.linalg.norm(reference)
    assert layer_output_error(x, layer, s) == pytest.approx(expected, rel=1e-6)
    assert 0.005 < expected < 0.3


def test_summary_lists_worst_layers_first_and_counts_the_rest():
    layers = [SimpleNamespace(name=f"layers.{i}.proj", output_error=e, v=3.0, band="low",
                              act_mode=quant.ActMode.PER_TENSOR_STATIC, lae=False, weight_bits=4)
              for i, e in enumerate([0.01, 0.5, 0.02, 0.3] + [0.001 * i for i in range(1, 10)])]
    lines = output_error_summary(layers, top=3)
    assert "worst first" in lines[0]
    assert [line.split()[1] for line in lines[1:4]] == ["layers.1.proj", "layers.3.proj", "layers.2.proj"]
    assert lines[4] == "  ... and 10 more layers, from 0.0100 down to 0.0010"
    assert output_error_summary([SimpleNamespace(output_error=None)]) == []


# ------------------------------------------------------------------ reports


# one group per band with the paper's v0 = 15, v1 = 150: q/k read ~93 (mid, LAE folded into the
# Mul by gamma), o reads ~6.5 (low), down reads ~2900 (high, after the Mul by 500). TINY_BLOCK with
# a plain gamma for its RMS norm and an o_proj and the gain between ReLU and down_proj.
THREE_BANDS = (TINY_BLOCK.replace("tiny (", "three (")
               .replace(TINY_BLOCK[TINY_BLOCK.index("    sq = "):TINY_BLOCK.index("    q = ")],
                        "    hidden = Mul (x, norm.weight)\n")
               .replace("    y = MatMul (act, layers.0.down_proj.weight)\n",
                        "    o = MatMul (act, layers.0.o_proj.weight)\n    big = Mul (o, gain)\n"
                        "    y = MatMul (big, layers.0.down_proj.weight)\n"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """THREE_BANDS converted (all four layers) with an HTML and a Markdown report."""
    from fptq_onnx.report import write_report

    rng = np.random.default_rng(7)
    weights = {"norm.weight": rng.uniform(0.5, 2.0, 128).astype(np.float32),
               "layers.0.q_proj.weight": (rng.standard_normal((128, 128)) * 0.02).astype(np.float32),
               "layers.0.k_proj.weight": (rng.standard_normal((128, 128)) * 0.02).astype(np.float32),
               "layers.0.o_proj.weight": (rng.standard_normal((128, 128)) * 0.1).astype(np.float32),
               "gain": np.array(500.0, np.float32),
               "layers.0.down_proj.weight": (rng.standard_normal((128, 128)) * 0.1).astype(np.float32)}
    folder = tmp_path_factory.mktemp("report")
    onnx.save(model_from_text(THREE_BANDS, weights), str(folder / "model.onnx"))
    np.savez(folder / "calib.npz", x=outlier_inputs(rng, (4, 1, 8, 128), outlier_gain=20.0))
    config = ConvertConfig(lm_head="w4", calibration=CalibrationConfig(error_rows=64))
    result = convert(folder / "model.onnx", folder / "out.onnx", folder / "calib.npz", config, progress=False,
                     report=folder / "report.html")
    write_report(result, folder / "report.md")
    return result, folder


def test_html_report_is_self_contained(converted):
    result, folder = converted
    text = (folder / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|src)=\"(https?:|file:|/)", text) and "<script" not in text
    for layer in result.layers:
        assert f"<td>{layer.name}</td>" in text
    assert [layer.band for layer in result.layers] == ["mid", "mid", "low", "high"]


CHROMIUM = shutil.which("chromium")
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const rows = document.querySelectorAll('table#layers tbody tr').length;
  document.title = `images=${loaded}/${images.length} rows=${rows}`;
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(converted, tmp_path):
    result, folder = converted
    probe = tmp_path / "probe.html"
    probe.write_text((folder / "report.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    title = re.search(r"<title>([^<]*)</title>", dom.stdout)
    assert title is not None, dom.stderr[-2000:]
    assert title.group(1) == f"images=3/3 rows={len(result.layers)}"

    screenshot = tmp_path / "report.png"
    shot = _chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1400,3000",
                     (folder / "report.html").as_uri())
    assert screenshot.is_file(), shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 50_000


def test_markdown_report_writes_pngs_beside_it(converted):
    result, folder = converted
    text = (folder / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == ["report.max_abs.png", "report.lae_channels.png", "report.output_error.png"]
    for name in images:
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    table = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [line.split(" | ")[1] for line in table] == [layer.name for layer in result.layers]


def test_convert_cli_prints_errors_and_report_path(tmp_path, tiny_block, rng, capsys):
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (2, 1, 8, 128)))
    code = main(["-q", "convert", str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.md"), "--error-rows", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "worst first" in out and re.search(r"^\s+0\.\d{4}\s+layers\.0\.(q|k)_proj", out, re.M)
    assert out.strip().endswith(f"report: {tmp_path / 'r.md'}")


def test_no_error_rows_means_no_error_plot(tmp_path, tiny_block, rng):
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (2, 1, 8, 128)))
    config = ConvertConfig(v0=1e6, v1=1e7, lae_bands=(), w8_fraction=0.0, lm_head="float",
                           calibration=CalibrationConfig(error_rows=0))
    result = convert(tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz", config, progress=False,
                     report=tmp_path / "r.html")
    assert all(layer.output_error is None for layer in result.layers) and "output_error" not in result.seconds
    text = (tmp_path / "r.html").read_text()
    assert len(re.findall(r"<img ", text)) == 1  # no LAE, no error: v plot only
    notes = text[text.index('<table id="notes">'):]
    assert "layers.0.down_proj" in notes and "language-model head" in notes  # why the head stayed in float


@pytest.mark.parametrize("name, message", [
    pytest.param("report.pdf", "should end in .html or .md", id="bad-suffix"),
    pytest.param("no/such/report.html", "does not exist", id="missing-folder"),
])
def test_bad_report_path_fails_before_converting(tmp_path, tiny_block, capsys, name, message):
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    code = main(["-q", "convert", str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "missing.npz"),
                 "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / name)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and message in err[0]


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(UserError, match=r"pip install 'fptq-onnx\[report\]'"):
        check_report_path(tmp_path / "r.html")
