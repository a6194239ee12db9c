"""fptq_onnx.quiet.quiet_libraries: the libraries' warnings, log lines and progress bars are hidden
inside the block and every setting is back after it; fptq-onnx's own warnings stay. The export
command end to end: tests/test_export.py."""
from __future__ import annotations

import importlib
import logging
import warnings

import pytest

from fptq_onnx.quiet import LIBRARY_LOGGERS, MODULES_WITH_OWN_BARS, quiet_libraries


def warn_from(module: str) -> None:
    warnings.warn_explicit(f"a warning from {module}", FutureWarning, "somewhere.py", 1, module=module)


@pytest.mark.parametrize("enabled", [True, False], ids=["quiet", "verbose"])
def test_library_warnings_are_hidden_ours_are_not(enabled):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries(enabled):
            warn_from("torch.onnx._internal.exporter")
            warn_from("fptq_onnx.export")
    assert [str(w.message) for w in seen] == (["a warning from fptq_onnx.export"] if enabled else
                                              ["a warning from torch.onnx._internal.exporter",
                                               "a warning from fptq_onnx.export"])


def test_library_loggers_go_to_error_and_come_back(caplog):
    torch_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    before = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    with quiet_libraries():
        assert all(logging.getLogger(name).level == logging.ERROR for name in LIBRARY_LOGGERS)
        assert not torch_logger.isEnabledFor(logging.WARNING)
    assert {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS} == before


def test_progress_bars_are_off_inside_and_restored_after():
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    modules = [importlib.import_module(name) for name in MODULES_WITH_OWN_BARS]
    own_bars = [module.tqdm for module in modules]
    assert transformers_logging.is_progress_bar_enabled()
    with quiet_libraries():
        assert not transformers_logging.is_progress_bar_enabled()
        for module in modules:
            assert module.tqdm([1, 2]).disable  # a bar that draws nothing
    assert transformers_logging.is_progress_bar_enabled()
    assert [module.tqdm for module in modules] == own_bars


def test_settings_come_back_after_an_error():
    before = logging.getLogger("transformers").level
    with pytest.raises(RuntimeError, match="boom"):
        with quiet_libraries():
            raise RuntimeError("boom")
    assert logging.getLogger("transformers").level == before
