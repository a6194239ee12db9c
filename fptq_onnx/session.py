"""ONNX Runtime sessions with the fptq op library (``libfptq_ops.so``) registered.

A converted model runs in stock ONNX Runtime through the ``ai.fptq::W4A8MatMul`` function
body; with the library registered, ONNX Runtime uses the library's kernels instead (the CPU
kernel for ``CPUExecutionProvider``, the CUDA kernel for ``CUDAExecutionProvider`` when built
with CUDA). The library is built and installed next to this package by ``pip install`` (with the CUDA
kernel when nvcc was found at build time: :func:`has_cuda_kernel`).

On a GPU (onnxruntime-gpu installed)::

    session = fptq_onnx.InferenceSession(
        "model.w4a8.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])

W4A8MatMul nodes then run the CUDA kernel; sessions that use only ``CPUExecutionProvider`` use the
CPU kernel, with the same library, also on machines without a GPU or CUDA driver.

Environment:

* ``FPTQ_ONNX_LIBRARY``: path of the library to load instead of the installed one.
* ``FPTQ_CPU_ISA``: ``auto`` (default), ``generic``, ``avx2``, ``avx512vnni`` or ``amx``: the CPU
  kernel's instruction set, read when a session is created (for testing the slower paths).
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort

LIBRARY_NAME = "libfptq_ops.so"
LIBRARY_ENV = "FPTQ_ONNX_LIBRARY"
# Session config entry marking options that already carry the library: ONNX Runtime refuses to
# register the ai.fptq domain twice on one SessionOptions ("Domain already set in registry").
_REGISTERED_KEY = "fptq_onnx.ops_library"
CUDA_PROVIDER = "CUDAExecutionProvider"


def library_path() -> str:
    """Absolute path of ``libfptq_ops.so``.

    ``$FPTQ_ONNX_LIBRARY`` if set (it must name an existing file), else the first
    ``libfptq_ops.so`` in the package's directories (``fptq_onnx.__path__``: the installed
    package, or the source tree plus the build's install folder for an editable install), else
    the installed distribution's copy (the source tree imported from a checkout's root, with the
    package installed into the environment as well).

    Raises ``FileNotFoundError`` with the places searched and how to build the library.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{LIBRARY_ENV}={override!r} does not name an existing file")
        return str(path.resolve())
    from . import __path__ as package_dirs  # the package's directories, editable ones included

    searched = [Path(d) / LIBRARY_NAME for d in package_dirs] + _installed_copy()
    for candidate in searched:
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"{LIBRARY_NAME} not found (searched: {', '.join(map(str, searched))}). Build it with "
        "`pip install -e . --no-build-isolation` in the fptq-onnx checkout, or point "
        f"{LIBRARY_ENV} at a built copy."
    )


def _installed_copy() -> list[Path]:
    """Where the installed ``fptq-onnx`` distribution put the library (empty if not installed)."""
    from importlib import metadata

    try:
        return [Path(metadata.distribution("fptq-onnx").locate_file(f"fptq_onnx/{LIBRARY_NAME}"))]
    except metadata.PackageNotFoundError:
        return []


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

    With ``CUDAExecutionProvider`` among ``providers`` it warns (``RuntimeWarning``) when the
    W4A8 nodes cannot run on the GPU: this onnxruntime has no CUDA provider (install
    onnxruntime-gpu), or the library was built without the CUDA kernel (no nvcc at build time;
    the nodes then run the CPU kernel, with copies to and from the GPU).
    """
    options = sess_options if sess_options is not None else ort.SessionOptions()
    if not _has_library(options):
        path = library_path()
        options.register_custom_ops_library(path)
        options.add_session_config_entry(_REGISTERED_KEY, path)
    else:
        path = options.get_session_config_entry(_REGISTERED_KEY)
    if isinstance(path_or_bytes, os.PathLike):
        path_or_bytes = os.fspath(path_or_bytes)
    providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
    if any(_provider_name(p) == CUDA_PROVIDER for p in providers):
        _warn_unless_cuda_ready(path)
    return ort.InferenceSession(path_or_bytes, sess_options=options, providers=providers, **kwargs)


@functools.lru_cache(maxsize=None)
def _has_cuda_kernel(path: str) -> bool:
    library = ctypes.CDLL(path)  # the same handle ONNX Runtime gets: loading twice is free
    probe = getattr(library, "fptq_ops_has_cuda", None)
    if probe is None:  # a build from before the CUDA kernel existed
        return False
    probe.restype, probe.argtypes = ctypes.c_int, []
    return bool(probe())


def has_cuda_kernel(path: str | os.PathLike | None = None) -> bool:
    """Whether the op library (``path``, default :func:`library_path`) holds the CUDA kernel.

    True when it was built with nvcc (``FPTQ_CUDA=AUTO`` found one, or ``ON``); loading the
    library needs no GPU or CUDA driver. Raises ``FileNotFoundError`` like :func:`library_path`.
    """
    return _has_cuda_kernel(str(Path(path).resolve()) if path is not None else library_path())


def _provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _warn_unless_cuda_ready(path: str) -> None:
    if CUDA_PROVIDER not in ort.get_available_providers():
        warnings.warn(f"this onnxruntime ({ort.__version__}) has no {CUDA_PROVIDER}: the session runs on the "
                      "CPU; install onnxruntime-gpu for the CUDA kernel", RuntimeWarning, stacklevel=3)
    elif not has_cuda_kernel(path):
        warnings.warn(f"{path} was built without the CUDA kernel (no nvcc when it was built): W4A8MatMul "
                      "nodes run the CPU kernel, with copies between GPU and CPU; rebuild with nvcc on PATH "
                      "(pip install again, FPTQ_CUDA=ON to insist)", RuntimeWarning, stacklevel=3)


def _has_library(options: ort.SessionOptions) -> bool:
    """Whether :func:`InferenceSession` already registered the library on ``options``."""
    try:
        return bool(options.get_session_config_entry(_REGISTERED_KEY))
    except RuntimeError:  # ORT raises for a key it does not hold
        return False
