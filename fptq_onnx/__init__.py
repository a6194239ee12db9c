"""fptq-onnx: W4A8 FPTQ for ONNX language models, with an ONNX Runtime op library for CPU and CUDA.

>>> import fptq_onnx
>>> session = fptq_onnx.InferenceSession("model.w4a8.onnx")  # doctest: +SKIP
"""
__version__ = "0.1.0"

from .session import InferenceSession, library_path  # noqa: E402,F401

__all__ = ["InferenceSession", "library_path", "__version__"]
