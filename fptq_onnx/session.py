"""ONNX Runtime sessions with the fptq op library (``libfptq_ops.so``) registered.

A converted model runs in stock ONNX Runtime through the ``ai.fptq::W4A8MatMul`` function
body; with the library registered, ONNX Runtime uses the library's kernels instead (the CPU
kernel for ``CPUExecutionProvider``, the CUDA kernel for ``CUDAExecutionProvider`` when built
with CUDA). The library is built and installed next to this package by ``pip install``.

Environment:

* ``FPTQ_ONNX_LIBRARY``: path of the library to load instead of the installed one.
* ``FPTQ_CPU_ISA``: ``auto`` (default), ``generic``, ``avx2`` or ``avx512vnni``: the CPU
  kernel's instruction set, read when a session is created (for testing the slower paths).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort

LIBRARY_NAME = "libfptq_ops.so"
LIBRARY_ENV = "FPTQ_ONNX_LIBRARY"
# Session config entry marking options that already carry the library: ONNX Runtime refuses to
# register the ai.fptq domain twice on one SessionOptions ("Domain already set in registry").
_REGISTERED_KEY = "fptq_onnx.ops_library"


def library_path() -> str:
    """Absolute path of ``libfptq_ops.so``.

    ``$FPTQ_ONNX_LIBRARY`` if set (it must name an existing file), else the first
    ``libfptq_ops.so`` in the package's directories (``fptq_onnx.__path__``: the installed
    package, or the source tree plus the build's install folder for an editable install).

    Raises ``FileNotFoundError`` with the places searched and how to build the library.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={override!r} does not name an existing file")
        return str(path.resolve())
    from . import __path__ as package_dirs  # the package's directories, editable ones included

    searched = [Path(d) / LIBRARY_NAME for d in package_dirs]
    for candidate in searched:
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"{LIBRARY_NAME} not found (searched: {', '.join(map(str, searched))}). Build it with "
        "`pip install -e . --no-build-isolation` in the fptq-onnx checkout, or point "
        f"{LIBRARY_ENV} at a built copy."
    )


def InferenceSession(  # noqa: N802 -- mirrors onnxruntime.InferenceSession, which it returns
    path_or_bytes: str | os.PathLike | bytes,
    sess_options: ort.SessionOptions | None = None,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    **kwargs: Any,
) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` with the fptq op library registered.

    Arguments are those of ``onnxruntime.InferenceSession``: ``path_or_bytes`` the model (path
    or serialized bytes); ``sess_options`` options to extend (the library is registered on
    them, once, so one ``SessionOptions`` may serve several sessions; a fresh one when None);
    ``providers`` default ``["CPUExecutionProvider"]``; ``kwargs`` passed through (e.g.
    ``provider_options``).
    """
    options = sess_options if sess_options is not None else ort.SessionOptions()
    if not _has_library(options):
        path = library_path()
        options.register_custom_ops_library(path)
        options.add_session_config_entry(_REGISTERED_KEY, path)
    if isinstance(path_or_bytes, os.PathLike):
        path_or_bytes = os.fspath(path_or_bytes)
    return ort.InferenceSession(
        path_or_bytes,
        sess_options=options,
        providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
        **kwargs,
    )


def _has_library(options: ort.SessionOptions) -> bool:
    """Whether :func:`InferenceSession` already registered the library on ``options``."""
    try:
        return bool(options.get_session_config_entry(_REGISTERED_KEY))
    except RuntimeError:  # ORT raises for a key it does not hold
        return False
