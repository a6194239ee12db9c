"""Weights that stay on disk: memory-mapped external data in, streamed external data out.

A model over 2 GB keeps its weights in an external data file (protobuf refuses messages over
2 GiB). Loading that file into the ModelProto (``onnx.load``) costs its whole size in memory, and
onnx-graphsurgeon's lazy constants copy it twice more when read. Instead:

* **in**: :func:`map_external_data` replaces every constant of a graph imported with
  ``onnx.load(..., load_external_data=False)`` by a read-only ``numpy.memmap`` of its bytes in
  the data file (``location``, ``offset``, ``length``). Nothing is read until a pass touches a
  tensor, and the pages read are the kernel's page cache, not the process's heap.
* **while converting**: pages of a mapping that were read stay counted in the process's resident
  set while mapped. :func:`release_pages` tells the kernel the process is done with them
  (``madvise(MADV_DONTNEED)``: for a read-only file mapping this drops the pages from the
  process, the data stays on disk and in the page cache and is read back on the next access), so
  a pass that visits every weight once holds about one layer's weights at a time.
* **out**: :func:`export_streaming` exports a graph whose large constants are first written one
  by one into a data file, so no complete copy of the weights is ever built in memory
  (``--dump-passes`` of a model of any size).

Example: a ``[4096, 11008]`` float32 weight at offset 1 GiB of ``model.onnx.data`` becomes
``np.memmap("model.onnx.data", float32, "r", offset=1 << 30, shape=(4096, 11008))``.
"""
from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .errors import UserError

ALIGNMENT = 4096  # tensor offsets in data files we write: page-aligned, so ORT and we can mmap them
STREAM_THRESHOLD = 1024  # bytes: smaller constants stay inside the .onnx file
# element types numpy cannot address one element per item (4-bit and string): read, not mapped
_UNMAPPABLE = {onnx.TensorProto.STRING, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
if hasattr(onnx.TensorProto, "FLOAT4E2M1"):
    _UNMAPPABLE.add(onnx.TensorProto.FLOAT4E2M1)


def external_entry(tensor: onnx.TensorProto) -> tuple[str, int, int | None] | None:
    """``(location, offset, length or None)`` of a tensor stored externally, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    if "location" not in info:
        raise UserError(f"initializer {tensor.name!r} is marked external but names no data file")
    length = int(info["length"]) if "length" in info else None
    return info["location"], int(info.get("offset", 0)), length


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers, those in external data files included (without reading them)."""
    total = 0
    for tensor in model.graph.initializer:
        entry = external_entry(tensor)
        total += tensor.ByteSize() if entry is None else (entry[2] if entry[2] is not None else _nbytes(tensor))
    return total


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def data_file(tensor: onnx.TensorProto, folder: Path) -> Path:
    """The external data file of ``tensor``, checked to exist inside ``folder`` (else UserError)."""
    location = external_entry(tensor)[0]
    if Path(location).is_absolute() or ".." in Path(location).parts:
        raise UserError(f"external data {location!r} of {tensor.name!r} lies outside the model's folder")
    path = folder / location
    if not path.is_file():
        raise UserError(f"external data file {path} of initializer {tensor.name!r} is missing")
    return path


def map_tensor(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    """A read-only ``numpy.memmap`` of an external tensor's bytes (``folder``: the model's folder).

    Raises UserError when the data file is missing, outside ``folder``, or shorter than the tensor.
    """
    path = data_file(tensor, folder)
    _, offset, length = external_entry(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if length is not None and length != nbytes:
        raise UserError(f"external data of {tensor.name!r} is {length} bytes; its shape {list(shape)} "
                        f"of {dtype} needs {nbytes}")
    if offset + nbytes > path.stat().st_size:
        raise UserError(f"external data file {path} is truncated: {tensor.name!r} needs bytes "
                        f"{offset}..{offset + nbytes}, the file has {path.stat().st_size}")
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def map_external_data(graph: gs.Graph, folder: str | Path) -> list[np.ndarray]:
    """Give every constant of ``graph`` (and its subgraphs) stored in an external data file a
    memory-mapped value; returns the mappings (for :func:`release_pages`).

    ``graph`` was imported from a model loaded with ``load_external_data=False``. Types numpy
    cannot map (4-bit, string) are read into memory instead.
    """
    folder = Path(folder)
    mapped = []
    for tensor in _constants(graph):
        if not isinstance(tensor._values, LazyValues):
            continue
        proto = tensor._values.tensor
        if not isinstance(proto, onnx.TensorProto) or external_entry(proto) is None:
            continue
        if proto.data_type in _UNMAPPABLE:
            data_file(proto, folder)
            onnx.external_data_helper.load_external_data_for_tensor(proto, str(folder))
            continue  # now an ordinary in-memory tensor; graphsurgeon loads it on demand
        tensor.values = map_tensor(proto, folder)
        tensor.data_location = None  # exported from the values, wherever the output goes
        mapped.append(tensor.values)
    return mapped


def release_pages(*arrays: np.ndarray | None) -> None:
    """Drop the resident pages of the memory maps behind ``arrays`` (views of a ``numpy.memmap``
    included); a no-op for ordinary arrays. The data stays readable: a later access reads it
    back from the page cache or the file."""
    for array in arrays:
        while array is not None:
            handle = getattr(array, "_mmap", None)
            if isinstance(handle, mmap.mmap):
                if not handle.closed:
                    handle.madvise(mmap.MADV_DONTNEED)
                break
            array = getattr(array, "base", None)


# ---------------------------------------------------------------- streaming export


@contextlib.contextmanager
def constants_written_to(graph: gs.Graph, data_path: Path, threshold: int = STREAM_THRESHOLD) -> Iterator[None]:
    """Within the block, every constant of ``graph`` of at least ``threshold`` bytes is exported
    as a reference into ``data_path``: each is written there first (one at a time, at
    :data:`ALIGNMENT`-aligned offsets) and stands in as an external TensorProto, which
    graphsurgeon's exporter passes through without reading. The values are restored on exit.
    """
    swapped: list[tuple[gs.Constant, object]] = []
    try:
        with open(data_path, "wb") as data:
            for tensor in _constants(graph):
                payload = _payload(tensor, threshold)
                if payload is None:
                    continue
                swapped.append((tensor, tensor._values))
                tensor._values = LazyValues(_write_tensor(data, data_path.name, tensor.name, *payload))
        yield
    finally:
        for tensor, values in swapped:
            tensor._values = values


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    for one in (graph, *graph.subgraphs(recursive=True)):
        yield from (t for t in one.tensors().values() if isinstance(t, gs.Constant))


def _payload(tensor: gs.Constant, threshold: int) -> tuple[np.ndarray, int, tuple[int, ...]] | None:
    """``(bytes as uint8, ONNX data type, shape)`` of a constant to stream, or None to leave it to
    graphsurgeon: small, sparse, string, external (unmapped) or with an export dtype of its own."""
    values = tensor._values
    if isinstance(values, LazyValues):  # a tensor of the input model, still as its TensorProto
        proto = values.tensor
        if not isinstance(proto, onnx.TensorProto) or external_entry(proto) is not None or \
                len(proto.raw_data) < threshold:
            return None
        return np.frombuffer(proto.raw_data, np.uint8), proto.data_type, tuple(proto.dims)
    if not isinstance(values, np.ndarray) or values.nbytes < threshold or values.dtype == object or \
            tensor._export_dtype not in (None, values.dtype):
        return None
    values = np.ascontiguousarray(values)
    return values.reshape(-1).view(np.uint8), onnx.helper.np_dtype_to_tensor_dtype(values.dtype), values.shape


def _write_tensor(data, location: str, name: str, payload: np.ndarray, dtype: int,
                  shape: tuple[int, ...]) -> onnx.TensorProto:
    offset = data.tell()
    pad = -offset % ALIGNMENT
    data.write(b"\0" * pad)
    offset += pad
    chunk = 1 << 26
    for start in range(0, payload.size, chunk):  # slices of a view: no serialized copy of the tensor
        data.write(memoryview(payload[start:start + chunk]))
    release_pages(payload)
    tensor = onnx.TensorProto(name=name, dims=shape, data_type=dtype)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", payload.size)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def export_streaming(graph: gs.Graph, path: str | Path, export: Callable[[], onnx.ModelProto]) -> Path:
    """Save ``export()`` (a ModelProto built from ``graph``) as ``path`` + ``path.data``, the
    large constants streamed into the data file one at a time (see :func:`constants_written_to`)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    with constants_written_to(graph, data):
        model = export()
    onnx.save_model(model, str(path))
    return path
