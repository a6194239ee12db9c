"""docs/errors.md, entry by entry: the one line a user sees, the exit code, and what is left on
disk (nothing: no output, no temporary file or folder, in the output folder or in $TMPDIR).

Each test named in docs/errors.md is here (test_every_entry_has_its_test checks that).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import fptq_onnx
from fptq_onnx import model_io
from fptq_onnx.cli import EXIT_INTERRUPTED
from fptq_onnx.config import ConvertConfig
from fptq_onnx.models._tiny import save_tiny_tokenizer, tiny_text
from fptq_onnx.pipeline import convert as convert_model

from conftest import model_from_text, run_model
from test_cli_errors import (  # noqa: F401 -- workdir is a fixture
    _no_quantizable_matmul, _not_onnx, _truncated, assert_one_line_error, cli_command, run_cli, workdir)

ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def scratch(workdir, monkeypatch):
    """``workdir`` with $TMPDIR (Python's tempfile) inside it, so leftovers of any kind show up."""
    tmp = workdir / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return workdir


# onnxruntime writes $TMPDIR/.ses when it is imported: its own marker, not a leftover of ours
ORT_IMPORT_MARKER = ".ses"


def listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (hidden ones too), relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ORT_IMPORT_MARKER)


def convert_fails(capsys, folder: Path, message: str, *argv) -> str:
    """``fptq-onnx convert ARGV`` fails with exit code 2 and one line holding ``message``, and
    leaves ``folder`` (the output folder, with $TMPDIR in it) as it was. Returns the line."""
    before = listing(folder)
    code, _, err = run_cli(capsys, "convert", *argv)
    assert_one_line_error(code, err, message)
    assert listing(folder) == before
    return err.strip()


def convert_ok(capsys, *argv) -> str:
    """``fptq-onnx convert ARGV`` succeeds; returns its stdout."""
    code, out, err = run_cli(capsys, "convert", *argv)
    assert code == 0, err
    return out


# --- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize("spoil, message", [
    pytest.param(_not_onnx, "is not an ONNX model (protobuf parse failed", id="not-protobuf"),
    pytest.param(_truncated, "is not an ONNX model (protobuf parse failed", id="truncated"),
    pytest.param(lambda d: (d / "model.onnx").write_bytes(b""), "is not an ONNX model (no graph nodes)", id="empty"),
    pytest.param(lambda d: ((d / "model.onnx").unlink(), (d / "model.onnx").mkdir()), "is a folder", id="folder"),
    pytest.param(lambda d: (d / "model.onnx").unlink(), "does not exist", id="missing"),
])
def test_corrupt_or_truncated_model(scratch, capsys, spoil, message):
    spoil(scratch)
    convert_fails(capsys, scratch, message, scratch / "model.onnx", "--calib", scratch / "calib.npz",
                  "-o", scratch / "out.onnx")


def test_model_onnx_runtime_cannot_load(scratch, capsys, tiny_block):
    """Parses as ONNX but ONNX Runtime refuses it (here an unknown op): ORT's reason, one line."""
    tiny_block.graph.node[0].op_type = "NoSuchOp"
    onnx.save(tiny_block, str(scratch / "model.onnx"))
    line = convert_fails(capsys, scratch, "ONNX Runtime cannot load", scratch / "model.onnx",
                         "--calib", scratch / "calib.npz", "-o", scratch / "out.onnx")
    assert "No Op registered for NoSuchOp" in line and "[ONNXRuntimeError]" not in line


@pytest.fixture
def external_model(scratch, tiny_block):
    """The tiny block saved with its weights in model.onnx.data."""
    onnx.save(tiny_block, str(scratch / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    return scratch / "model.onnx"


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda data: data.unlink(), id="missing"),
    pytest.param(lambda data: data.write_bytes(data.read_bytes()[:1000]), id="truncated"),
])
def test_missing_or_truncated_external_data(scratch, capsys, external_model, spoil):
    spoil(scratch / "model.onnx.data")
    convert_fails(capsys, scratch, "error: external data", external_model, "--calib", scratch / "calib.npz",
                  "-o", scratch / "out.onnx")


def _set_opset(version):
    def spoil(model):
        del model.opset_import[:]
        if version is not None:
            model.opset_import.add(domain="", version=version)
    return spoil


@pytest.mark.parametrize("spoil, message", [
    pytest.param(_set_opset(13), "uses ONNX opset 13; fptq-onnx needs >= 15", id="too-old"),
    pytest.param(_set_opset(onnx.defs.onnx_opset_version() + 1), "newer than this onnx", id="too-new"),
    pytest.param(_set_opset(None), "imports no default ONNX opset", id="none"),
])
def test_unsupported_opset(scratch, capsys, tiny_block, spoil, message):
    spoil(tiny_block)
    onnx.save(tiny_block, str(scratch / "model.onnx"))
    convert_fails(capsys, scratch, message, scratch / "model.onnx", "--calib", scratch / "calib.npz",
                  "-o", scratch / "out.onnx")


# --- the layers -------------------------------------------------------------------------------

MIXED = """
g (float[B, S, 128] x, float[128, 32] fed_weight) => (float[B, S, 32] y, float[B, S, 32] z) {
    y = MatMul (x, layers.0.weight)
    z = MatMul (x, fed_weight)
}
"""


def test_weights_not_constant_are_left_in_float(scratch, capsys, rng):
    """A MatMul whose weight is a graph input stays a float MatMul; the summary counts it and
    the rejection records why; the layer with a constant weight is converted."""
    model = model_from_text(MIXED, {"layers.0.weight": rng.standard_normal((128, 32)).astype(np.float32)})
    onnx.save(model, str(scratch / "model.onnx"))
    np.savez(scratch / "calib.npz", x=rng.standard_normal((2, 1, 8, 128)).astype(np.float32),
             fed_weight=rng.standard_normal((2, 128, 32)).astype(np.float32))
    out = convert_ok(capsys, scratch / "model.onnx", "--calib", scratch / "calib.npz", "-o", scratch / "out.onnx",
                  "--lm-head", "w4")
    assert "1 layers to W4A8" in out and "1 MatMul without a constant weight (attention products, weights fed at run time) left as they are" in out
    converted = onnx.load(str(scratch / "out.onnx"))
    kept = [n for n in converted.graph.node if n.op_type == "MatMul"]
    assert [list(n.input) for n in kept] == [["x", "fed_weight"]]
    assert [n.op_type for n in converted.graph.node].count("W4A8MatMul") == 1
    result = convert_model(scratch / "model.onnx", scratch / "out2.onnx", scratch / "calib.npz",
                           ConvertConfig(lm_head="w4"), progress=False)
    assert [(r.node, r.reason) for r in result.rejections if r.pass_name == "find_linears"] == [
        ("z", "weight is not a constant initializer")]


def test_no_constant_weight_is_an_error(scratch, capsys):
    _no_quantizable_matmul(scratch)
    line = convert_fails(capsys, scratch, "no quantizable MatMul in", scratch / "model.onnx",
                         "--calib", scratch / "calib.npz", "-o", scratch / "out.onnx")
    assert "weight is not a constant initializer" in line


def test_k_not_multiple_of_group_size_takes_a_partial_group(scratch, capsys, rng):
    """K = 96 with --group-size 64: the layer keeps K = 96 with a partial last group of 32 (no Pad
    node), not skipped; the converted model matches the float one to 4-bit accuracy."""
    weight = (rng.standard_normal((96, 40)) * 0.1).astype(np.float32)
    model = model_from_text("g (float[B, 96] x) => (float[B, 40] y) { y = MatMul (x, layers.0.weight) }",
                            {"layers.0.weight": weight})
    onnx.save(model, str(scratch / "model.onnx"))
    x = rng.standard_normal((16, 96)).astype(np.float32)
    np.savez(scratch / "calib.npz", x=x)
    out = convert_ok(capsys, scratch / "model.onnx", "--calib", scratch / "calib.npz", "-o", scratch / "out.onnx",
                  "--lm-head", "w4", "--group-size", "64")
    assert "1 layers to W4A8" in out
    converted = onnx.load(str(scratch / "out.onnx"))
    ops = {n.op_type: n for n in converted.graph.node}
    assert "Pad" not in ops  # a partial last group, no Pad
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ops["W4A8MatMul"].attribute}
    assert (attrs["K"], attrs["group_size"]) == (96, 64)
    y = run_model(converted, {"x": x})[0]
    reference = x @ weight
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 0.15
    np.testing.assert_allclose(fptq_onnx.InferenceSession(str(scratch / "out.onnx")).run(None, {"x": x})[0], y,
                               rtol=0, atol=1e-5 * np.abs(y).max())


# --- calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [pytest.param(np.nan, id="nan"), pytest.param(np.inf, id="inf")])
def test_nan_or_inf_in_calibration_activations(scratch, capsys, value):
    calib = dict(np.load(scratch / "calib.npz"))
    calib["x"][1, 0, 3, 5] = value
    np.savez(scratch / "calib.npz", **calib)
    convert_fails(capsys, scratch, "contain NaN or Inf: check the model and the data", scratch / "model.onnx",
                  "--calib", scratch / "calib.npz", "-o", scratch / "out.onnx")


# takes token ids like an exported LLM: an embedding table, then one linear layer
TOKEN_MODEL = "g (int64[B, S] input_ids) => (float[B, S, 32] y) { e = Gather (table, input_ids)\n y = MatMul (e, proj) }"


@pytest.fixture
def token_model(scratch, rng):
    """model.onnx taking input_ids, with the tiny word-level tokenizer beside it."""
    model = model_from_text(TOKEN_MODEL, {"table": rng.standard_normal((23, 128)).astype(np.float32),
                                          "proj": rng.standard_normal((128, 32)).astype(np.float32)})
    onnx.save(model, str(scratch / "model.onnx"))
    save_tiny_tokenizer(scratch)
    (scratch / "calib.txt").write_text(tiny_text(2000))
    return scratch / "model.onnx"


def test_text_calibration_works(scratch, capsys, token_model):
    """The setup of the text entries converts when nothing is wrong."""
    (scratch / "out").mkdir()
    out = convert_ok(capsys, token_model, "--calib", scratch / "calib.txt", "--seq-len", "64", "--samples", "4",
                     "--lm-head", "w4", "-o", scratch / "out" / "model.onnx")
    assert "1 layers to W4A8" in out


def test_calibration_text_shorter_than_one_sequence(scratch, capsys, token_model):
    (scratch / "calib.txt").write_text(tiny_text(20))
    convert_fails(capsys, scratch, "is shorter than one sequence of 64 tokens", token_model,
                  "--calib", scratch / "calib.txt", "--seq-len", "64", "--lm-head", "w4", "-o", scratch / "out.onnx")


@pytest.mark.parametrize("where, message", [
    pytest.param("beside", "calibrating on text needs the model's tokenizer: none beside", id="none-beside-model"),
    pytest.param("flag", "no tokenizer.json in", id="tokenizer-flag-without-one"),
])
def test_missing_tokenizer(scratch, capsys, token_model, where, message):
    (scratch / "tokenizer.json").unlink()
    flag = ["--tokenizer", scratch / "tmp"] if where == "flag" else []
    convert_fails(capsys, scratch, message, token_model, "--calib", scratch / "calib.txt", "--seq-len", "64",
                  "--lm-head", "w4", "-o", scratch / "out.onnx", *flag)


# --- the output -------------------------------------------------------------------------------


@pytest.mark.parametrize("output", [
    pytest.param(lambda d: d / "model.onnx", id="same-path"),
    pytest.param(lambda d: d / "tmp" / ".." / "model.onnx", id="same-file-other-spelling"),
    pytest.param(lambda d: (d / "link.onnx").symlink_to(d / "model.onnx") or d / "link.onnx", id="symlink-to-input"),
])
def test_output_equal_to_the_input(scratch, capsys, output):
    output = output(scratch)
    convert_fails(capsys, scratch, "is the input model: choose another path", scratch / "model.onnx",
                  "--calib", scratch / "calib.npz", "-o", output)


@pytest.mark.parametrize("output, message", [
    pytest.param("no/such/folder/out.onnx", "does not exist", id="missing"),
    pytest.param("calib.npz/out.onnx", "is a file, not a folder", id="a-file"),
])
def test_output_folder_missing_or_a_file(scratch, capsys, output, message):
    convert_fails(capsys, scratch, message, scratch / "model.onnx", "--calib", scratch / "calib.npz",
                  "-o", scratch / output)


def _without_root_override() -> list[str]:
    """A command prefix under which permission bits bind: root keeps its uid but loses
    CAP_DAC_OVERRIDE (setpriv), since root may otherwise write to any folder."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder is writable to root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_unwritable_output_folder(scratch):
    readonly = scratch / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        before = listing(scratch)
        result = subprocess.run(
            _without_root_override() + cli_command() + ["-q", "convert", str(scratch / "model.onnx"), "--calib",
                                                        str(scratch / "calib.npz"), "-o", str(readonly / "out.onnx")],
            capture_output=True, text=True, cwd=scratch, env={**os.environ, "TMPDIR": str(scratch / "tmp")})
        assert_one_line_error(result.returncode, result.stderr, "is not writable (Permission denied)")
        assert listing(scratch) == before
    finally:
        readonly.chmod(0o755)


def test_failed_or_interrupted_save_leaves_nothing(scratch, capsys, monkeypatch):
    """The output is written into a temporary folder beside it and renamed when complete: a
    failure (disk full) or Ctrl-C in the middle of writing leaves neither file nor folder."""
    real_save = onnx.save_model

    def save_then_fail(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)  # the complete file exists, not yet renamed
        raise failure

    monkeypatch.setattr(model_io.onnx, "save_model", save_then_fail)
    failure = OSError(28, "No space left on device")
    convert_fails(capsys, scratch, "could not write", scratch / "model.onnx", "--calib", scratch / "calib.npz",
                  "-o", scratch / "out.onnx")
    failure = KeyboardInterrupt()
    before = listing(scratch)
    code, _, err = run_cli(capsys, "convert", scratch / "model.onnx", "--calib", scratch / "calib.npz",
                           "-o", scratch / "out.onnx")
    assert code == EXIT_INTERRUPTED and err.strip() == "fptq-onnx convert: interrupted; no output written"
    assert listing(scratch) == before


def _long_conversion_inputs(folder: Path, rng) -> None:
    """A 24 MB model of 6 layers 1024 x 1024 and 128 calibration samples: about 4 s of
    calibration, time enough to be interrupted in the middle."""
    lines, weights, previous = [], {}, "x"
    for i in range(6):
        lines += [f"h{i} = MatMul ({previous}, layers.{i}.weight)", f"r{i} = Relu (h{i})"]
        weights[f"layers.{i}.weight"] = (rng.standard_normal((1024, 1024)) * 0.03).astype(np.float32)
        previous = f"r{i}"
    text = "g (float[B, S, 1024] x) => (float[B, S, 1024] y) {\n" + "\n".join(lines) + f"\ny = Identity ({previous})\n}}"
    onnx.save(model_from_text(text, weights), str(folder / "model.onnx"))
    np.savez(folder / "calib.npz", x=rng.standard_normal((128, 1, 64, 1024)).astype(np.float32))


def test_interrupted_conversion(scratch, rng):
    """SIGINT (Ctrl-C) while calibrating: exit code 130, one line, and nothing left behind, neither
    beside the output nor in $TMPDIR (where calibration keeps its temporary model copy)."""
    _long_conversion_inputs(scratch, rng)
    tmp = scratch / "tmp"
    before = listing(scratch)
    process = subprocess.Popen(
        cli_command() + ["-q", "convert", str(scratch / "model.onnx"), "--calib", str(scratch / "calib.npz"),
                         "-o", str(scratch / "out.onnx")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=scratch, env={**os.environ, "TMPDIR": str(tmp)},
        # as from a terminal: a test run started in the background (`cmd &` without job control)
        # ignores SIGINT, the child would inherit that, and Python then installs no handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not any(tmp.glob("fptq-calib-*")):  # calibration has started (its model copy exists)
            assert process.poll() is None, f"ended before calibrating: {process.communicate()}"
            assert time.monotonic() < deadline, "calibration did not start within 60 s"
            time.sleep(0.002)
        time.sleep(0.1)  # inside the calibration run (128 samples: seconds here, ~1 s on 16 cores)
        assert process.poll() is None, "finished before the interrupt: give it more work"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_INTERRUPTED, err
    assert err == "fptq-onnx convert: interrupted; no output written\n" and out == ""
    assert listing(scratch) == before


# --- the catalogue itself ---------------------------------------------------------------------


def test_every_entry_has_its_test():
    """Every entry (## section) of docs/errors.md names a test, and each named test exists."""
    import test_cli_errors

    modules = {"test_errors_catalogue": globals(), "test_cli_errors": vars(test_cli_errors)}
    sections = re.split(r"(?m)^(?=## )", ERRORS_DOC.read_text())[1:]
    assert len(sections) >= 12
    for section in sections:
        named = re.findall(r"`tests/(test_errors_catalogue|test_cli_errors)\.py::(\w+)`", section)
        assert named, f"no test named under {section.splitlines()[0]!r}"
        missing = [name for module, name in named if not callable(modules[module].get(name))]
        assert not missing, f"{section.splitlines()[0]!r} names tests that do not exist: {missing}"
