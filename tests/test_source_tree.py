"""The checkout imports like the installed package (issue 14, item 1).

Run from a checkout's root, ``import fptq_onnx`` finds the source folder first; the install maps
``passes/`` and ``models/`` in as subpackages, so the source folder must find them too, and the
op library (built only by the install) must be found from there as well.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_errors import run_cli, workdir  # noqa: F401 (workdir: a fixture)

CHECKOUT = Path(__file__).resolve().parent.parent


def test_readme_python_line_runs_from_the_checkout_root(workdir, capsys):
    from importlib import metadata

    try:
        metadata.distribution("fptq-onnx")
    except metadata.PackageNotFoundError:
        pytest.skip("fptq-onnx is not installed into this environment (the library comes with the install)")
    code, _, _ = run_cli(capsys, "convert", workdir / "model.onnx", "--calib", workdir / "calib.npz",
                         "-o", workdir / "model.w4a8.onnx")
    assert code == 0
    line = ("import fptq_onnx, fptq_onnx.pipeline, fptq_onnx.models; "
            f"s = fptq_onnx.InferenceSession({str(workdir / 'model.w4a8.onnx')!r}); "
            "print(fptq_onnx.__file__); print(fptq_onnx.passes.__file__)")
    result = subprocess.run([sys.executable, "-c", line], cwd=CHECKOUT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    package, passes = result.stdout.split()
    assert Path(package).is_relative_to(CHECKOUT / "fptq_onnx")  # the source folder, not site-packages
    assert Path(passes).is_relative_to(CHECKOUT / "passes")
