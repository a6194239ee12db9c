"""Loading and saving models with clear errors, and saving atomically.

A conversion writes its output into a temporary folder beside the destination and renames it
into place only when everything is written, so an error or Ctrl-C never leaves a half-written
model (or a model whose external data file belongs to another run).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import UserError

# above this many bytes of initializers the model is saved with an external data file: protobuf
# refuses messages over 2 GiB, and a separate file lets tools mmap the weights
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_model(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with one-line errors for a missing, corrupt or incomplete model."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model {path} is a folder: give the .onnx file in it")
    if not path.is_file():
        raise UserError(f"model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not an ONNX model (protobuf parse failed: corrupt or truncated?)") from None
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph nodes)")
    if load_external_data:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:  # the checker: a missing file
            raise UserError(f"external data of {path} could not be read: {error}") from None
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset; a :class:`UserError` when it has none, or one newer than
    the installed onnx knows (ONNX Runtime refuses those too, with a page of C++ context)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            newest = onnx.defs.onnx_opset_version()
            if opset.version > newest:
                raise UserError(f"the model uses ONNX opset {opset.version}, newer than this onnx "
                                f"{onnx.__version__} knows ({newest}): re-export it at opset {newest} or older")
            return opset.version
    raise UserError("the model imports no default ONNX opset")


def check_output_path(input_path: Path, output_path: Path) -> None:
    """Refuse an output that would overwrite the input or cannot be written, before any work."""
    if output_path.resolve() == input_path.resolve():
        raise UserError(f"output {output_path} is the input model: choose another path")
    folder = output_path.resolve().parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file, not a folder")
    # a missing output folder is made when the model is saved (``-o out/model.onnx``, like
    # ``mkdir out``); a deeper missing path is more likely a typo than a wish
    writable = folder if folder.is_dir() else folder.parent
    if not writable.is_dir():
        raise UserError(f"output folder {folder} does not exist, nor does its parent")
    try:  # a real write, not os.access: that says yes to root on a read-only mount
        with tempfile.TemporaryFile(prefix=f".{output_path.name}.", dir=writable):
            pass
    except OSError as error:
        raise UserError(f"output folder {writable} is not writable ({error.strerror})") from None
    if output_path.suffix != ".onnx":
        raise UserError(f"output {output_path} should end in .onnx")


def save_model_atomic(model: onnx.ModelProto, output_path: str | Path, external_data: bool | None = None) -> None:
    """Save ``model`` to ``output_path`` (and ``<name>.data`` when external) via temp file + rename.

    ``external_data=None`` picks external data when the initializers exceed 1 GiB.
    """
    output_path = Path(output_path)
    made_folder = not output_path.parent.exists()
    try:
        output_path.parent.mkdir(exist_ok=True)  # check_output_path allowed one missing level
        _save_staged(model, output_path, external_data)
    except BaseException as error:  # Ctrl-C, or an OSError: disk full, folder made read-only since the start
        if made_folder:
            shutil.rmtree(output_path.parent, ignore_errors=True)
        if isinstance(error, OSError):
            raise UserError(f"could not write {output_path}: {error.strerror or error}") from None
        raise


def _save_staged(model: onnx.ModelProto, output_path: Path, external_data: bool | None) -> None:
    if external_data is None:
        external_data = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_name = output_path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    try:
        staged = staging / output_path.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            _usual_permissions(staging / data_name)
            os.replace(staging / data_name, output_path.parent / data_name)
        else:
            onnx.save_model(model, str(staged))
            stale = output_path.parent / data_name
            if stale.exists() and output_path.exists():
                stale.unlink()  # a previous external-data save of the same name is now orphaned
        _usual_permissions(staged)
        os.replace(staged, output_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_file(target: Path, write, executable: bool = False) -> None:
    """``write(staged)`` a temporary file beside ``target``, then rename it onto ``target``: readers
    see the old file or the new one, never a half-written one."""
    descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(descriptor)
    staged = Path(name)
    try:
        write(staged)
        _usual_permissions(staged, executable)
        os.replace(staged, target)
    except OSError as error:
        raise UserError(f"could not write {target}: {error.strerror or error}") from None
    finally:
        staged.unlink(missing_ok=True)


def _usual_permissions(path: Path, executable: bool = False) -> None:
    """``0666 & ~umask`` (``0777`` for a shared library), like any file a tool creates: onnx's
    external-data writer and ``mkstemp`` create files with mode 0600, which another user (or a
    container) cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if executable else 0o666) & ~mask)
