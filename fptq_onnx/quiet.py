"""Keeps the libraries that ``export`` and ``demo`` drive from printing over fptq-onnx's progress.

torch.onnx, transformers (with its GGUF loader), onnxscript, onnx_ir and huggingface_hub print
their internal state while they work: Python warnings (``FutureWarning``, ``UserWarning``), log
lines (torch's ``torchvision is not installed. Skipping torchvision::nms``) and tqdm bars
(``Loading weights``, ``Converting and de-quantizing GGUF tensors...``). None of it is about the
user's model, and it buries the one line per step that is. :func:`quiet_libraries` hides it for
the duration of a ``with`` block and restores every setting after; ``--verbose`` (``enabled=False``)
leaves everything as the libraries set it. fptq-onnx's own warnings and progress lines stay.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import warnings

# Top-level loggers of the libraries; their children (torch.onnx._internal...) inherit the level.
LIBRARY_LOGGERS = ("torch", "transformers", "onnxscript", "onnx_ir", "huggingface_hub")
# Modules that create their own tqdm bars with no switch to turn them off.
MODULES_WITH_OWN_BARS = ("transformers.modeling_gguf_pytorch_utils",)


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True):
    """Inside the block: third-party warnings ignored, the libraries' loggers at ERROR, their
    progress bars off. ``enabled=False``: a no-op (``--verbose``)."""
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"fptq_onnx(\.|$)")
        for name in LIBRARY_LOGGERS:
            stack.enter_context(_logger_level(name, logging.ERROR))
        stack.enter_context(_library_progress_bars_off())
        yield


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@contextlib.contextmanager
def _library_progress_bars_off():
    """huggingface_hub's and transformers' own switches, and a disabled tqdm for the modules
    that build bars without one."""
    with contextlib.ExitStack() as stack:
        # transformers first: it reads huggingface_hub's switch once, when it is imported.
        if _installed("transformers"):
            from transformers.utils import logging as transformers_logging

            if transformers_logging.is_progress_bar_enabled():
                transformers_logging.disable_progress_bar()
                stack.callback(transformers_logging.enable_progress_bar)
        if _installed("huggingface_hub"):
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

            if not are_progress_bars_disabled():
                disable_progress_bars()
                stack.callback(enable_progress_bars)
        for name in MODULES_WITH_OWN_BARS:
            if _installed(name):
                module = importlib.import_module(name)
                stack.callback(setattr, module, "tqdm", module.tqdm)
                module.tqdm = functools.partial(module.tqdm, disable=True)
        yield
