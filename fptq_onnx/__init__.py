"""fptq-onnx: W4A8 FPTQ for ONNX language models, with an ONNX Runtime op library for CPU and CUDA.

>>> import fptq_onnx
>>> session = fptq_onnx.InferenceSession("model.w4a8.onnx")  # doctest: +SKIP
"""
__version__ = "0.1.0"

from pathlib import Path as _Path

# Run from a checkout's root, ``import fptq_onnx`` finds this source folder before the installed
# package, and the install maps two top-level folders of the checkout in as subpackages
# (pyproject.toml: passes/ -> fptq_onnx/passes, models/ -> fptq_onnx/models). Searching the
# checkout's root for subpackages too makes ``fptq_onnx.passes`` and ``fptq_onnx.models`` import
# here as they do installed; the op library is then found in the installed copy (session.py).
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "passes").exists() and (_checkout / "pyproject.toml").is_file() and (
        _checkout / "passes" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (the package's own search path)

from .session import InferenceSession, library_path  # noqa: E402,F401

__all__ = ["InferenceSession", "library_path", "__version__"]
