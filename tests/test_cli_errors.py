"""Bad input gets one line on stderr, exit code 2, and no output file."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fptq_onnx.cli import EXIT_USER_ERROR, main

from conftest import model_from_text, outlier_inputs


@pytest.fixture
def workdir(tmp_path, tiny_block, rng):
    onnx.save(tiny_block, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=outlier_inputs(rng, (4, 1, 8, 128)))
    return tmp_path


def run_cli(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, match):
    assert code == EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert match in lines[0]
    assert "Traceback" not in err


def test_convert_works_on_the_tiny_block(workdir, capsys):
    code, out, err = run_cli(capsys, "convert", workdir / "model.onnx", "--calib", workdir / "calib.npz",
                             "-o", workdir / "out.onnx", "--lm-head", "w4")
    assert code == 0, err
    assert "3 layers to W4A8" in out
    assert len([n for n in onnx.load(str(workdir / "out.onnx")).graph.node if n.op_type == "W4A8MatMul"]) == 3


def _no_quantizable_matmul(tmp_path):
    model = model_from_text("g (float[2, 64] x, float[64, 8] w) => (float[2, 8] y) { y = MatMul (x, w) }", {})
    onnx.save(model, str(tmp_path / "model.onnx"))


def _not_onnx(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf \xff\xfe")


def _truncated(tmp_path):
    data = (tmp_path / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 3])


def _wrong_input_name(tmp_path):
    np.savez(tmp_path / "calib.npz", tokens=np.zeros((2, 8, 128), np.float32))


def _wrong_input_shape(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 1, 8, 100), np.float32))


def _empty_text(tmp_path):
    (tmp_path / "calib.npz").unlink()
    (tmp_path / "calib.txt").write_text("   \n")


CASES = [
    pytest.param(_not_onnx, "calib.npz", "out.onnx", "is not an ONNX model", id="not-onnx"),
    pytest.param(_truncated, "calib.npz", "out.onnx", "is not an ONNX model", id="truncated-model"),
    pytest.param(_no_quantizable_matmul, "calib.npz", "out.onnx", "no quantizable MatMul", id="no-quantizable-matmul"),
    pytest.param(_wrong_input_name, "calib.npz", "out.onnx", "which the model does not take", id="calib-wrong-input"),
    pytest.param(_wrong_input_shape, "calib.npz", "out.onnx", "does not fit the model", id="calib-wrong-shape"),
    pytest.param(_empty_text, "calib.txt", "out.onnx", "is empty", id="empty-calib-file"),
    pytest.param(None, "missing.npz", "out.onnx", "does not exist", id="calib-missing"),
    pytest.param(None, "calib.npz", "no/such/folder/out.onnx", "does not exist", id="output-folder-missing"),
    pytest.param(None, "calib.npz", "model.onnx", "is the input model", id="output-equals-input"),
]


@pytest.mark.parametrize("spoil, calib, output, message", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(workdir, capsys, spoil, calib, output, message):
    if spoil is not None:
        spoil(workdir)
    before = sorted(p.name for p in workdir.rglob("*"))
    code, _, err = run_cli(capsys, "convert", workdir / "model.onnx", "--calib", workdir / calib, "-o", workdir / output)
    assert_one_line_error(code, err, message)
    assert sorted(p.name for p in workdir.rglob("*")) == before  # no output, no temp files


def test_bad_option_values_are_user_errors(workdir, capsys):
    code, _, err = run_cli(capsys, "convert", workdir / "model.onnx", "--calib", workdir / "calib.npz",
                           "-o", workdir / "out.onnx", "--v0", "200", "--v1", "100")
    assert_one_line_error(code, err, "--v0")
    assert not (workdir / "out.onnx").exists()


def cli_command() -> list[str]:
    """The installed ``fptq-onnx`` entry point, as a user runs it (run it from a folder outside the
    repository: from the repository root the source tree would shadow the install)."""
    script = Path(sys.executable).with_name("fptq-onnx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fptq_onnx.cli"]


def test_console_script_exit_code(workdir):
    """The installed entry point, as a user runs it."""
    result = subprocess.run(cli_command() + ["convert", str(workdir / "model.onnx"), "--calib", str(workdir / "calib.npz"),
                                             "-o", str(workdir / "model.onnx")], capture_output=True, text=True, cwd=workdir)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip().endswith("is the input model: choose another path")


@pytest.mark.parametrize("argv, message", [
    pytest.param(["export", "no-such-model", "-o", "{tmp}/m.onnx"], "no model folder, .gguf file or recipe named",
                 id="export-unknown-source"),
    pytest.param(["eval", "{tmp}/model.onnx", "--text", "{tmp}/missing.txt"], "does not exist", id="eval-missing-text"),
    pytest.param(["eval", "{tmp}/model.onnx", "--text", "{tmp}/calib.npz"], "no tokenizer", id="eval-no-tokenizer"),
])
def test_export_and_eval_user_errors(workdir, capsys, argv, message):
    code, _, err = run_cli(capsys, *[a.format(tmp=workdir) for a in argv])
    assert_one_line_error(code, err, message)
    assert not (workdir / "m.onnx").exists()


def _genai_folder(workdir):
    """A folder that passes the genai_config.json check (nothing runs it)."""
    (workdir / "genai").mkdir()
    (workdir / "genai" / "genai_config.json").write_text("{}")
    return workdir / "genai"


@pytest.mark.parametrize("argv, message", [
    pytest.param(["generate", "{tmp}/missing", "--prompt", "a"], "model folder", id="generate-folder-missing"),
    pytest.param(["chat", "{tmp}"], "is not an onnxruntime-genai model folder: convert writes one (no genai_config.json)",
                 id="chat-no-genai-config"),
    pytest.param(["generate", "{tmp}/model.onnx", "--prompt", "a"], "not an onnxruntime-genai model folder",
                 id="generate-model-file-without-config"),
    pytest.param(["generate", "{genai}", "--prompt", "a", "--top-p", "1.5"], "--top-p must be in (0, 1]", id="bad-top-p"),
    pytest.param(["generate", "{genai}", "--prompt", "a", "--temperature", "0"], "--temperature must be > 0",
                 id="bad-temperature"),
    pytest.param(["chat", "{genai}", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1", id="bad-max-new-tokens"),
    pytest.param(["chat", "{genai}", "--threads", "-2"], "--threads must be 0", id="bad-threads"),
    pytest.param(["generate", "{genai}", "--prompt", "a"], "onnxruntime-genai is not installed: pip install onnxruntime-genai",
                 id="genai-not-installed"),
])
def test_generate_and_chat_user_errors(workdir, capsys, monkeypatch, argv, message):
    """Checked before onnxruntime-genai loads anything (it is made unimportable here); its own
    load errors are in tests/test_genai_run.py::test_generate_errors."""
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    genai = _genai_folder(workdir)
    code, out, err = run_cli(capsys, *[a.format(tmp=workdir, genai=genai) for a in argv])
    assert_one_line_error(code, err, message)
    assert out == ""


def test_forced_builder_export_failure_leaves_nothing(workdir, capsys, monkeypatch):
    """``export --exporter builder`` where the builder cannot run: one line, no folder made."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else find_spec(name, *a))
    (workdir / "hf").mkdir()
    (workdir / "hf" / "config.json").write_text("{}")  # enough to be a source; the builder never reads it
    code, _, err = run_cli(capsys, "export", workdir / "hf", "-o", workdir / "new" / "out", "--exporter", "builder")
    assert_one_line_error(code, err, "the onnxruntime-genai model builder cannot export")
    assert "onnxruntime-genai is not installed" in err
    assert not (workdir / "new").exists() and not [p for p in workdir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("options, message", [
    (["--lae-bands", "low,top"], "--lae-bands takes low, mid, high"),
    (["--sq-alpha", "2"], "--sq-alpha must be in [0, 1]"),
    (["--calib-seq-lens", "64,1"], "--calib-seq-lens needs lengths >= 2"),
    (["--w8-layers", "150%"], "--w8-layers takes a count >= 0 or a percentage"),
    (["--auto-thresholds", "--error-rows", "0"], "--auto-thresholds measures output errors"),
    (["--w8-layers", "3", "--error-rows", "0"], "--w8-layers measures output errors"),
    (["--error-rows", "0"], "mixed precision is on by default: --w8-layers 0 turns it off"),
])
def test_bad_accuracy_option_values(workdir, capsys, options, message):
    before = sorted(p.name for p in workdir.rglob("*"))
    code, _, err = run_cli(capsys, "convert", workdir / "model.onnx", "--calib", workdir / "calib.npz",
                           "-o", workdir / "out.onnx", *options)
    assert_one_line_error(code, err, message)
    assert sorted(p.name for p in workdir.rglob("*")) == before


@pytest.mark.parametrize("options", [["--w8-layers", "many"], ["--calib-seq-lens", "64,x"]])
def test_unparsable_accuracy_options_are_refused_by_the_parser(workdir, capsys, options):
    with pytest.raises(SystemExit) as stopped:
        main(["convert", str(workdir / "model.onnx"), "--calib", str(workdir / "calib.npz"),
              "-o", str(workdir / "out.onnx"), *options])
    assert stopped.value.code == 2 and options[1] in capsys.readouterr().err
    assert not (workdir / "out.onnx").exists()
