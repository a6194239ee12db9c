"""Calibration: stream representative inputs through the model and reduce what the passes need.

Data sources (``--calib``):

* a ``.txt`` file, or a ``.jsonl`` file whose records have a ``text`` field: tokenized with the
  tokenizer beside the model and cut into ``samples`` windows of ``seq_len`` tokens, spread
  evenly over the text (each led by BOS when the model expects one);
* an ``.npz`` file whose arrays are named after the model inputs (first axis: samples);
* a folder of ONNX ``test_data_set_*/input_*.pb`` protobufs.

Inputs the model needs that the data lacks (``attention_mask``, ``position_ids``, and the
``past_key_values.*`` of a KV-cache model, as an empty past of length 0) are synthesized. The
model runs in ONNX Runtime with every tensor of interest exposed as an extra output; each is
reduced at once into :class:`ChannelMaxAbs` (per-input-channel max |x|), so memory stays flat
however many samples stream through. For the per-layer output error a :class:`RowReservoir`
keeps a uniform sample of at most ``error_rows`` rows (tokens) of each tensor, also independent
of the number of samples.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .config import CalibrationConfig
from .errors import UserError
from .generate import PAST_PREFIX, empty_past_shape  # KV-cache inputs: synthesized empty
from .genai import kv_head_size
from .progress import progress_bar
from .tokenizer import find_tokenizer, load_tokenizer

Feed = dict[str, np.ndarray]
SYNTHESIZED_INPUTS = ("attention_mask", "position_ids")


class ChannelMaxAbs:
    """Running per-channel max |x| over the last axis: ``m[j] = max over all other axes of |x[..., j]|``."""

    def __init__(self):
        self.value: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        current = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float32)
        self.value = current if self.value is None else np.maximum(self.value, current)


class RowReservoir:
    """A uniform random sample of at most ``capacity`` rows of everything passed to :meth:`update`.

    Rows are the last axis (``x[..., K]`` is ``prod(x.shape[:-1])`` rows of K). Reservoir sampling
    (Vitter's algorithm R): row number t (0-based, over all updates) enters a full reservoir with
    probability ``capacity / (t + 1)`` and replaces a uniformly chosen slot, so after T rows every
    row is kept with probability ``capacity / T``. Memory is ``capacity * K`` floats however many
    samples stream through. With capacity 2 and rows ``[a, b, c]``, ``c`` is kept with probability
    2/3, replacing ``a`` or ``b`` equally often.
    """

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity, self.rng = capacity, rng
        self.rows: np.ndarray | None = None  # float32 [capacity, K]
        self.seen = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0 or self.capacity == 0:
            return
        rows = x.reshape(-1, x.shape[-1])
        if self.rows is None:
            self.rows = np.empty((self.capacity, rows.shape[1]), np.float32)
        fill = max(0, min(self.capacity - self.seen, rows.shape[0]))
        self.rows[self.seen:self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if len(rest):
            numbers = self.seen + fill + np.arange(len(rest))
            slots = self.rng.integers(0, numbers + 1)  # uniform in [0, t] for row number t
            kept = np.flatnonzero(slots < self.capacity)
            # several rows of one update may draw the same slot: the later one wins, as in sequence
            _, last = np.unique(slots[kept][::-1], return_index=True)
            chosen = kept[::-1][last]
            self.rows[slots[chosen]] = rest[chosen]
        self.seen += rows.shape[0]

    @property
    def value(self) -> np.ndarray | None:
        """The sampled rows, ``[min(capacity, rows seen), K]`` float32 (None before any update)."""
        return None if self.rows is None else self.rows[:min(self.seen, self.capacity)]


@dataclasses.dataclass
class ModelInput:
    name: str
    dtype: np.dtype
    rank: int
    shape: tuple[int | None, ...] = ()  # fixed sizes, None for symbolic ones


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """Graph inputs that are not initializers, with their numpy dtypes."""
    initializers = {init.name for init in model.graph.initializer}
    result = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        result.append(ModelInput(value.name, np.dtype(dtype), len(shape), shape))
    return result


# ---------------------------------------------------------------- data sources


def text_windows(path: Path, model_path: Path, config: CalibrationConfig) -> list[list[int]]:
    """``config.samples`` windows of ``config.seq_len`` token ids, evenly spread over the text."""
    text = _read_text(path)
    folder = Path(config.tokenizer) if config.tokenizer else find_tokenizer(model_path)
    if folder is None:
        raise UserError(f"calibrating on text needs the model's tokenizer: none beside {model_path}; pass --tokenizer DIR")
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(text)
    longest = max(config.seq_lens) if config.seq_lens else config.seq_len
    if not tokenizer.windows(ids, longest):
        raise UserError(f"calibration text {path} is shorter than one sequence of {longest} tokens: "
                        "give more text or a smaller --seq-len")
    if config.seq_lens:
        return slac_windows(tokenizer, ids, config.seq_lens, config.samples)
    windows = tokenizer.windows(ids, config.seq_len)
    if len(windows) <= config.samples:
        return windows
    picks = np.linspace(0, len(windows) - 1, config.samples).round().astype(int)
    return [windows[i] for i in picks]


def slac_windows(tokenizer, ids: list[int], seq_lens: tuple[int, ...], samples: int) -> list[list[int]]:
    """SLAC windows: sample i is ``seq_lens[i % len(seq_lens)]`` tokens long (BOS included when
    the model expects one), its start spread evenly over the text, so every length sees text from
    everywhere. FPTQ (sec. 3.4) found that calibrating with the target task's sequence lengths
    matters: activation ranges depend on length (the first tokens carry the largest outliers, and a
    short window has a larger share of them).

    >>> class T: lead = [0]
    >>> [len(w) for w in slac_windows(T(), list(range(1, 100)), (4, 8), 4)]
    [4, 8, 4, 8]
    """
    lead = tokenizer.lead
    windows = []
    for i in range(samples):
        body = seq_lens[i % len(seq_lens)] - len(lead)
        last_start = max(len(ids) - body, 0)
        start = round(i * last_start / max(samples - 1, 1))
        windows.append(lead + ids[start:start + body])
    return windows


def _read_text(path: Path) -> str:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{number}: each JSON line needs a string field 'text'")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise UserError(f"calibration file {path} is empty")
    return raw


def _npz_feeds(path: Path, inputs: list[ModelInput]) -> Iterator[Feed]:
    """One feed per index of the first axis. An array with the input's rank is a batch cut into
    rows of batch 1; one with an extra leading axis is a stack of whole feeds."""
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as error:  # numpy raises several types for a corrupt archive
        raise UserError(f"cannot read calibration archive {path}: {error}") from None
    if not arrays:
        raise UserError(f"calibration archive {path} holds no arrays")
    ranks = {i.name: i.rank for i in inputs}
    for name, array in arrays.items():
        if name in ranks and array.ndim not in (ranks[name], ranks[name] + 1):
            raise UserError(f"array {name!r} in {path} has rank {array.ndim}; the model input has rank "
                            f"{ranks[name]} (give [samples, ...] or a batch [batch, ...])")
    count = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(count.values())) != 1:
        raise UserError(f"arrays in {path} disagree on the number of samples (first axis): {count}")
    for index in range(next(iter(count.values()))):
        yield {name: array[index] if array.ndim == ranks.get(name, array.ndim - 1) + 1 else array[index:index + 1]
               for name, array in arrays.items()}


def _protobuf_feeds(folder: Path, inputs: list[ModelInput]) -> Iterator[Feed]:
    datasets = sorted(p for p in folder.glob("test_data_set_*") if p.is_dir())
    if not datasets:
        raise UserError(f"{folder} has no test_data_set_* folders")
    for dataset in datasets:
        files = sorted(dataset.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
        feed = {}
        for index, file in enumerate(files):
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(file.read_bytes())
            except Exception:
                raise UserError(f"{file} is not a serialized ONNX TensorProto") from None
            name = tensor.name or (inputs[index].name if index < len(inputs) else f"input_{index}")
            feed[name] = numpy_helper.to_array(tensor)
        yield feed


def calibration_feeds(source: Path, model_path: Path, inputs: list[ModelInput],
                      config: CalibrationConfig) -> tuple[int, Iterator[Feed]]:
    """``(number of samples, iterator of complete feeds)`` for any supported ``--calib`` source."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"calibration data {source} does not exist")
    if source.is_dir():
        count = len([p for p in source.glob("test_data_set_*") if p.is_dir()])
        raw = _protobuf_feeds(source, inputs)
    elif source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as archive:
                first = archive[archive.files[0]] if archive.files else np.zeros((0,))
        except Exception as error:
            raise UserError(f"cannot read calibration archive {source}: {error}") from None
        count = first.shape[0] if first.ndim else 0
        raw = _npz_feeds(source, inputs)
    else:
        windows = text_windows(source, model_path, config)
        count = len(windows)
        raw = ({"input_ids": np.asarray([w], np.int64)} for w in windows)
    head_size = kv_head_size(model_path)
    return count, (complete_feed(feed, inputs, source, head_size) for feed in raw)


def complete_feed(feed: Feed, inputs: list[ModelInput], source: Path, head_size: int | None = None) -> Feed:
    """Check ``feed`` against the model inputs, cast dtypes, and synthesize mask, positions and
    an empty past (``head_size``: of a cache whose last axis is symbolic)."""
    wanted = {i.name: i for i in inputs}
    unknown = sorted(set(feed) - set(wanted))
    if unknown:
        raise UserError(f"calibration data {source} has {unknown} which the model does not take "
                        f"(model inputs: {sorted(wanted)})")
    result = {}
    for name, array in feed.items():
        try:
            result[name] = np.asarray(array).astype(wanted[name].dtype, casting="same_kind")
        except TypeError:
            raise UserError(f"calibration input {name!r} has dtype {np.asarray(array).dtype}, "
                            f"the model wants {wanted[name].dtype}") from None
    reference = next(iter(result.values()), None)
    for item in inputs:
        if item.name in result:
            continue
        synthesized = item.name in SYNTHESIZED_INPUTS or item.name.startswith(PAST_PREFIX)
        if not synthesized or reference is None or reference.ndim < 2:
            raise UserError(f"calibration data {source} lacks model input {item.name!r} (it has {sorted(feed)}; "
                            f"only {list(SYNTHESIZED_INPUTS)} and {PAST_PREFIX}* are synthesized)")
        batch, length = reference.shape[:2]
        if item.name.startswith(PAST_PREFIX):  # an empty cache [batch, heads, 0, head_dim]: no earlier tokens
            try:
                shape = empty_past_shape(item.shape, batch, head_size)
            except ValueError as error:
                raise UserError(f"cannot synthesize {item.name}: {error}") from None
            result[item.name] = np.zeros(shape, item.dtype)
        elif item.name == "attention_mask":
            result[item.name] = np.ones((batch, length), item.dtype)
        else:
            result[item.name] = np.broadcast_to(np.arange(length, dtype=item.dtype), (batch, length)).copy()
    return result


# ---------------------------------------------------------------- statistics


@dataclasses.dataclass
class CalibrationStats:
    """What one calibration run measured, keyed by tensor name."""

    channel_max: dict[str, np.ndarray]  # float32 [K]: per-channel max |x| over all samples
    rows: dict[str, np.ndarray]  # float32 [M, K]: M <= config.error_rows rows sampled uniformly
    # float64 mean x x^T: [K, K] ("full") or its diagonal blocks [ceil(K / b), b, b] ("blocks")
    hessians: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class SecondMoment:
    """Running ``H = (1/T) sum_t x_t x_t^T`` over all rows ``x_t`` (the last axis is K).

    This is GPTQ's Hessian of the layer's squared output error (up to a factor 2):
    ``||X dW||^2 = T * trace(dW^T H dW)``. Products are formed in float32 per update (one GEMM)
    and summed in float64, so T can be large without losing the small contributions.

    With ``block = b`` only the diagonal blocks are kept, ``H[g] = (1/T) sum_t x_tg x_tg^T`` for
    the channels ``x_tg`` of block g (K zero-padded to a multiple of b): ``[G, b, b]``, all that
    clipping group g of a weight needs, at ``b / K`` of the memory and time.
    """

    def __init__(self, block: int | None = None):
        self.block = block
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        rows = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
        if rows.size == 0:
            return
        if self.block:
            k = rows.shape[1]
            padded = -(-k // self.block) * self.block
            if padded != k:
                rows = np.pad(rows, ((0, 0), (0, padded - k)))
            blocks = rows.reshape(len(rows), -1, self.block).transpose(1, 0, 2)  # [G, T, b]
            product = (blocks.transpose(0, 2, 1) @ blocks).astype(np.float64)
        else:
            product = (rows.T @ rows).astype(np.float64)
        self.sum = product if self.sum is None else self.sum + product
        self.count += rows.shape[0]

    @property
    def value(self) -> np.ndarray | None:
        return None if self.sum is None else self.sum / self.count


def collect_channel_max(model_path: Path, tensor_names: list[str], source: Path,
                        config: CalibrationConfig, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor in ``tensor_names`` over all calibration samples."""
    config = dataclasses.replace(config, error_rows=0)
    return collect_calibration_stats(model_path, tensor_names, source, config, progress).channel_max


def collect_calibration_stats(model_path: Path, tensor_names: list[str], source: Path, config: CalibrationConfig,
                              progress: bool = True, hessian: str = "none", hessian_block: int = 128) -> CalibrationStats:
    """Per-channel max |x| of each tensor in ``tensor_names``; when ``config.error_rows > 0``, a
    uniform sample of that many of its rows (seeded by ``config.seed``); and its second moment
    ``X^T X`` (:class:`SecondMoment`): ``hessian="blocks"``, the diagonal blocks of
    ``hessian_block x hessian_block`` (weight clipping: K * 128 floats per input), ``"full"``
    all of it (GPTQ: K^2 floats per input, 970 MB for K = 11008), ``"none"`` nothing."""
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = model_inputs(model)
    count, feeds = calibration_feeds(source, model_path, inputs, config)
    if count == 0:
        raise UserError(f"calibration data {source} holds no samples")
    stats = {name: ChannelMaxAbs() for name in tensor_names}
    seeds = np.random.SeedSequence(config.seed).spawn(len(tensor_names))
    reservoirs = {name: RowReservoir(config.error_rows, np.random.default_rng(seed))
                  for name, seed in zip(tensor_names, seeds)} if config.error_rows else {}
    block = hessian_block if hessian == "blocks" else None
    moments = {name: SecondMoment(block) for name in tensor_names} if hessian != "none" else {}
    with _session_exposing(model, Path(model_path), tensor_names) as session:
        outputs = [o.name for o in session.get_outputs()]
        wanted = [outputs.index(name) for name in tensor_names]
        for feed in progress_bar(feeds, total=count, desc="calibrating", unit="sample", enabled=progress):
            try:
                values = session.run(outputs, feed)
            except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as error:
                raise UserError(f"calibration data {source} does not fit the model: {str(error).splitlines()[0]}") from None
            for name, index in zip(tensor_names, wanted):
                stats[name].update(values[index])
                if reservoirs:
                    reservoirs[name].update(values[index])
                if moments:
                    moments[name].update(values[index])
    result = {}
    for name, stat in stats.items():
        if stat.value is None:
            raise UserError(f"calibration produced no values for {name!r} (empty inputs?)")
        if not np.all(np.isfinite(stat.value)):
            raise UserError(f"calibration activations of {name!r} contain NaN or Inf: check the model and the data")
        result[name] = stat.value
    rows = {name: reservoir.value for name, reservoir in reservoirs.items() if reservoir.value is not None}
    hessians = {name: moment.value for name, moment in moments.items() if moment.value is not None}
    return CalibrationStats(channel_max=result, rows=rows, hessians=hessians)


class _session_exposing:
    """An ORT session on a copy of ``model`` whose graph outputs include ``tensor_names``.

    The copy lives in a temporary folder; external data files are hard-linked beside it (ONNX
    Runtime refuses external data that resolves outside the model's folder, so a symlink will
    not do), copied only when the temporary folder is on another file system. The folder is
    removed as soon as the session exists, so the link lives only while ONNX Runtime loads.
    """

    def __init__(self, model: onnx.ModelProto, model_path: Path, tensor_names: list[str]):
        self.model, self.model_path, self.tensor_names = model, model_path, tensor_names

    def __enter__(self) -> ort.InferenceSession:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        present = {o.name for o in model.graph.output}
        for name in self.tensor_names:
            if name not in present:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self.tmp = tempfile.TemporaryDirectory(prefix="fptq-calib-")
        try:  # from here on, also a Ctrl-C while linking or saving removes the folder
            folder = Path(self.tmp.name)
            for location in _external_locations(model):
                _link_or_copy(self.model_path.parent / location, folder / location)
            path = folder / "calibration.onnx"
            onnx.save(model, str(path))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.NotImplemented,
                ort.capi.onnxruntime_pybind11_state.RuntimeException) as error:
            raise UserError(f"ONNX Runtime cannot load {self.model_path}: {ort_error_reason(error)}") from None
        finally:
            # The session holds the weights now. Drop the hard link at once: while it exists,
            # onnx.load refuses the user's model ("multiple hard links").
            self.tmp.cleanup()

    def __exit__(self, *exc) -> None:
        self.tmp.cleanup()


def ort_error_reason(error: Exception) -> str:
    """The first line of an ONNX Runtime error without its ``[ONNXRuntimeError] : 1 : FAIL :``
    prefix, the temporary path it loaded, or the C++ source location it names."""
    import re

    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", line)
    line = re.sub(r"^Load model from \S+ failed:", "", line)
    return re.sub(r"^/\S+:\d+ [^(]*\([^)]*\)( const)? ", "", line).strip()


def _link_or_copy(source: Path, target: Path) -> None:
    if not source.is_file():
        raise UserError(f"external data file {source} of the model is missing")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return locations
