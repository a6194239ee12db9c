"""Export a causal language model to ONNX for the compiler, with one of two exporters.

:func:`export` (what ``fptq-onnx export`` runs) picks one: ``exporter="auto"`` (the default) tries
the **onnxruntime-genai model builder** and falls back to **our torch exporter** when the builder
is not installed, does not know the architecture or fails (Gemma-3-270m: ``KeyError:
'rope_type'``), saying why in one line; ``"builder"`` or ``"torch"`` forces one.

* The builder (:func:`builder_export`, ``python -m onnxruntime_genai.models.builder -p fp32 -e
  cpu`` in a subprocess, its output shown only when it fails) writes the fused graph
  onnxruntime-genai runs: ``GroupQueryAttention`` with a KV cache (always: ``with_past`` does not
  apply), ``SkipSimplifiedLayerNormalization``, packed QKV: 342 nodes for SmolLM2-135M's 30
  layers where the torch exporter writes 2,175. Its folder holds ``genai_config.json`` and the
  tokenizer beside the model, so ``fptq-onnx generate`` runs it. The model file is named as
  ``output`` says (the builder's ``model.onnx`` renamed, its external data ``<name>.onnx.data``
  beside it and ``genai_config.json`` pointing at it). Its logits are checked against torch's
  as below (SmolLM2-135M: max |diff| 1.2e-4 of max |logit| 31).
* The torch exporter (:func:`export_model`) writes the layout below.

``output`` is an ``.onnx`` path, or a folder that gets ``model.onnx``. The tokenizer files (and
the builder's ``genai_config.json``) go into the model's folder, shared by every model in it.

What the torch exporter's file looks like (the passes rely on it):

* inputs ``input_ids`` and ``attention_mask``, int64 ``[batch, sequence]`` (both dynamic);
  one output ``logits``, float32 ``[batch, sequence, vocab]``; no KV cache (``use_cache=False``);
* or, with ``with_past=True``, optimum's ``text-generation-with-past`` layout: inputs
  ``input_ids [batch, sequence]``, ``attention_mask [batch, past + sequence]``,
  ``position_ids [batch, sequence]`` and ``past_key_values.N.key`` / ``.value``
  ``[batch, kv_heads, past, head_dim]`` per layer N; outputs ``logits`` and ``present.N.key`` /
  ``.value`` ``[batch, kv_heads, past + sequence, head_dim]``. The first step passes an empty past
  (``past = 0``); each later step passes the previous step's ``present`` as ``past``
  (``fptq_onnx.generate.greedy_generate`` does);
* every linear layer is a plain ``MatMul`` whose second input is a constant 2-D ``[K, N]``
  initializer (the exporter's ``Transpose`` of the torch ``[N, K]`` weight is folded here, see
  :func:`fold_weight_transposes`); a tied embedding therefore appears twice, as the ``Gather``
  table ``[V, H]`` and as the ``lm_head`` weight ``[H, V]``;
* models over :data:`EXTERNAL_DATA_THRESHOLD` bytes keep their tensors in one file
  ``<name>.onnx.data`` beside ``<name>.onnx``; smaller ones are a single file;
* **the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...) are saved in the
  same folder as the model**, so every model in a folder shares them.
  ``fptq_onnx.tokenizer.find_tokenizer`` (re-exported here) finds them from a model path;
  :func:`copy_tokenizer` copies them next to a model written elsewhere.

Everything is written under a temporary name in the output folder and renamed at the end,
``<name>.onnx`` last: an ``.onnx`` file that exists is complete. A failed export leaves nothing
(a folder it created is removed again).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import note
from .errors import UserError
from .generate import PAST_PREFIX, PRESENT_PREFIX
from .quiet import quiet_libraries
from .tokenizer import TOKENIZER_FILES, copy_tokenizer, find_tokenizer  # noqa: F401 (one definition)

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024  # bytes of initializers; protobuf alone caps at 2 GB
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
POSITION_IDS = "position_ids"
EXPORTERS = ("auto", "builder", "torch")
GENAI_CONFIG = "genai_config.json"  # as fptq_onnx.genai names it
BUILDER_MODEL = "model.onnx"  # the file name the builder writes


def cache_names(prefix: str, layers: int) -> list[str]:
    """``[prefix0.key, prefix0.value, prefix1.key, ...]`` for ``layers`` decoder layers."""
    return [f"{prefix}{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


# ---------------------------------------------------------------------------------------------
# Tokenizer next to the model
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Loading the source model
# ---------------------------------------------------------------------------------------------


def resolve_source(src: str | os.PathLike, progress: bool = True) -> Path:
    """The Hugging Face folder or ``.gguf`` file ``src`` names (a recipe name is prepared,
    see ``fptq_onnx.models.RECIPES``); a UserError for anything else."""
    from fptq_onnx.models import RECIPES, prepare

    if isinstance(src, str) and src in RECIPES:
        src = prepare(src, progress)
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if path.exists():
        raise UserError(f"cannot export {path}: expected a model folder, a .gguf file or one of {', '.join(RECIPES)}")
    raise UserError(f"no model folder, .gguf file or recipe named {str(src)!r} (recipes: {', '.join(RECIPES)})")


def load_source(src: str | os.PathLike, progress: bool = True):
    """``(model, tokenizer)`` in fp32 eval mode from a Hugging Face folder, a ``.gguf`` file or a
    recipe name (see ``fptq_onnx.models.RECIPES``)."""
    from fptq_onnx.models._recipe import load_gguf

    path = resolve_source(src, progress)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, progress)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    note(f"loading {path}", progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Graph clean-up
# ---------------------------------------------------------------------------------------------


def fold_weight_transposes(model) -> int:
    """Replace ``MatMul(x, Transpose(W))`` with ``MatMul(x, W^T)`` for constant 2-D ``W``.

    The dynamo exporter emits ``linear`` as ``MatMul(x, Transpose(W[N, K]))``; its own optimizer
    folds that for most weights, but not for large ones (SmolLM2's tied ``lm_head``), and the
    quantization passes need the ``[K, N]`` weight as an initializer. ``model`` is an
    ``onnx_ir.Model``, changed in place. Returns the number of MatMuls rewritten.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    folded_values = {}  # one new initializer per Transpose, however many MatMuls read it
    count = 0
    for node in list(model.graph):
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        transpose = node.inputs[1].producer()
        if transpose is None or transpose.op_type != "Transpose":
            continue
        weight = transpose.inputs[0]
        if weight is None or weight.const_value is None:
            continue  # an activation, not a weight
        if len(weight.shape) != 2 or transpose.attributes.get_ints("perm", [1, 0]) not in ([1, 0], (1, 0)):
            logger.debug("skip %s: constant %s is not a 2-D matrix transpose", node.name, weight.name)
            continue
        if id(transpose) not in folded_values:
            folded_values[id(transpose)] = _add_initializer(model.graph, f"{weight.name}_T", weight.const_value.numpy().T)
        node.replace_input_with(1, folded_values[id(transpose)])
        count += 1
    if count:
        RemoveUnusedNodesPass()(model)  # also drops initializers nothing reads any more
    return count


def _add_initializer(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    unique, i = name, 0
    while unique in graph.initializers:
        i += 1
        unique = f"{name}_{i}"
    array = np.ascontiguousarray(array)
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def linear_weight_report(model) -> tuple[int, list[str]]:
    """``(n_constant, others)``: MatMuls with a constant 2-D ``[K, N]`` second input, and the names
    of MatMuls whose second input is computed from an initializer (weights the passes would miss).

    MatMuls between two activations (attention scores) are in neither list.
    """
    constant, others = 0, []
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        b = node.inputs[1]
        if b.const_value is not None and len(b.shape) == 2:
            constant += 1
        elif _reads_only_constants(b):
            others.append(node.name)
    return constant, others


def _reads_only_constants(value) -> bool:
    """True if ``value`` is computed from initializers and constants only (no graph input)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen or v.const_value is not None:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is None:  # a graph input
            return False
        stack.extend(i for i in producer.inputs if i is not None)
    return True


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _logits_module(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        """The graph's interface: two int64 inputs, logits out, no KV cache."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def _with_past_module(model):
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        """The graph's interface with a KV cache: past key/value tensors in, present ones out."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True)
            return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])

    return WithPast(model).eval()


def _cache_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return batch, heads, length, head_dim


def _torch_export(model, opset: int, verbose: bool, with_past: bool = False):
    import torch

    # Batch 2, sequence 8, past 5: sizes 0/1 (and equal sizes) would be specialized by torch.export.
    example = torch.randint(0, model.config.vocab_size, (2, 8), dtype=torch.int64)
    if not with_past:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        module, args, inputs, outputs = _logits_module(model), (example, torch.ones_like(example)), list(INPUT_NAMES), [OUTPUT_NAME]
        dynamic_shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    else:
        layers, past_length = model.config.num_hidden_layers, 5
        past = [torch.randn(_cache_shape(model.config, 2, past_length)) for _ in range(2 * layers)]
        positions = torch.arange(past_length, past_length + 8).expand(2, 8)
        args = (example, torch.ones(2, past_length + 8, dtype=torch.int64), positions, *past)
        module, inputs = _with_past_module(model), [*INPUT_NAMES, POSITION_IDS, *cache_names(PAST_PREFIX, layers)]
        outputs = [OUTPUT_NAME, *cache_names(PRESENT_PREFIX, layers)]
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        past_sequence, total = torch.export.Dim("past_sequence"), torch.export.Dim.DYNAMIC  # total = past + sequence
        dynamic_shapes = ({0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence},
                          tuple({0: batch, 2: past_sequence} for _ in past))
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=opset,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        verbose=verbose,  # its own step lines: exporter internals, shown with --verbose
    )
    if with_past:
        _name_cache_dims(program.model)
    return program.model


def _name_cache_dims(model) -> None:
    """Readable names for the symbolic dims torch.export invented (``s0``, ...): ``batch``,
    ``sequence``, ``past_sequence``, ``total_sequence``, as optimum names them."""
    import onnx_ir as ir

    inputs = {value.name: value for value in model.graph.inputs}
    names = {}
    for name, axis, label in (("input_ids", 0, "batch"), ("input_ids", 1, "sequence"),
                              ("attention_mask", 1, "total_sequence"), (PAST_PREFIX + "0.key", 2, "past_sequence")):
        dim = inputs[name].shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            names.setdefault(dim.value, label)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        value.shape = ir.Shape([ir.SymbolicDim(names.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                                for d in value.shape])


def _save(model, path: Path, progress: bool) -> None:
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = f"{path.name}.data" if size > EXTERNAL_DATA_THRESHOLD else None
    note(f"saving {size / 2**20:.0f} MiB of weights{' as external data' if external else ''}", progress)
    ir.save(model, path, external_data=external)


def _check_against_torch(torch_model, tokenizer, onnx_path: Path) -> tuple[float, float]:
    """``(max |ORT - torch|, max |torch|)`` of the logits of a short sentence (batch 2).

    A model with cache runs the first 5 tokens with an empty past, then the rest with their
    ``present`` as past: both steps of the cache path against one uncached torch pass, one row at
    a time (the builder's GroupQueryAttention takes several new tokens after a past only at batch 1).
    """
    import onnxruntime as ort
    import torch

    from .generate import past_inputs, run_step

    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="np")["input_ids"]
    ids = np.concatenate([ids, ids[:, ::-1]]).astype(np.int64)  # two different rows
    mask = np.ones_like(ids)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    if past_inputs(session):
        rows = []
        for row in ids[:, None]:
            first, present = run_step(session, row[:, :5])
            rows.append(np.concatenate([first, run_step(session, row[:, 5:], present, 5)[0]], axis=1))
        onnx_logits = np.concatenate(rows)
    else:
        onnx_logits = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False).logits
    ref = ref.numpy()
    return float(np.abs(onnx_logits - ref).max()), float(np.abs(ref).max())


def export_model(src: str | os.PathLike, output: str | os.PathLike, opset: int = DEFAULT_OPSET,
                 progress: bool = True, with_past: bool = False, verbose: bool = False) -> Path:
    """Export ``src`` (HF folder, ``.gguf`` file or recipe name) to ``output`` (``.onnx``); returns it.

    ``with_past``: the KV-cache layout (``past_key_values.N.*`` in, ``present.N.*`` out; see the
    module docstring) instead of logits from the whole sequence. ``verbose``: let torch.onnx,
    transformers and the other libraries print their warnings and step lines
    (:func:`fptq_onnx.quiet.quiet_libraries` hides them otherwise).

    Also saves the tokenizer in ``output``'s folder and checks ONNX Runtime's logits against
    torch's on a short input (printed; a difference over 1e-3 of the logit range is an error).
    """
    output = Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"output must be an .onnx path, got {output}")
    with quiet_libraries(not verbose):
        return _export_model(src, output, opset, progress, with_past, verbose)


def _export_model(src, output: Path, opset: int, progress: bool, with_past: bool, verbose: bool) -> Path:
    model, tokenizer = load_source(src, progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    note(f"exporting {type(model).__name__} to {output} (opset {opset})", progress)
    onnx_model = _torch_export(model, opset, verbose, with_past)
    folded = fold_weight_transposes(onnx_model)
    constant, others = linear_weight_report(onnx_model)
    note(f"{constant} MatMuls with constant [K, N] weights ({folded} transposes folded here)", progress)
    if others:
        raise RuntimeError(f"MatMuls with weights computed from initializers remain: {others[:5]}")

    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
        staged = Path(tmp) / output.name
        _save(onnx_model, staged, progress)
        tokenizer.save_pretrained(tmp)
        diff, scale = _check_against_torch(model, tokenizer, staged)
        note(f"ONNX Runtime vs torch: max |logit diff| = {diff:.3g} (max |logit| {scale:.3g})", progress)
        if not diff <= 1e-3 * max(1.0, scale):  # also catches NaN
            raise RuntimeError(f"exported model disagrees with torch: max |logit diff| {diff:.3g}")
        _move_into_place(Path(tmp), output)
    note(f"wrote {output}", progress)
    return output


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the staged files into ``output``'s folder, the ``.onnx`` file last."""
    data = output.with_name(f"{output.name}.data")
    if data.exists() and not (staging / data.name).exists():
        data.unlink()  # a stale external-data file of an earlier, larger export
    for item in sorted(staging.iterdir(), key=lambda p: p.name == output.name):
        os.replace(item, output.parent / item.name)


# ---------------------------------------------------------------------------------------------
# The onnxruntime-genai model builder, and the choice between the exporters
# ---------------------------------------------------------------------------------------------


class BuilderError(Exception):
    """The model builder cannot export this model (not installed, unknown architecture, failed,
    or its model disagrees with torch). The message is one line: why."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the ``.onnx`` ``path``, the ``exporter`` that wrote it
    (``"builder"`` or ``"torch"``) and the one line that says which and why (``summary``)."""

    path: Path
    exporter: str
    summary: str


def export(src: str | os.PathLike, output: str | os.PathLike, exporter: str = "auto", opset: int = DEFAULT_OPSET,
           progress: bool = True, with_past: bool = False, verbose: bool = False) -> ExportResult:
    """Export ``src`` (HF folder, ``.gguf`` file or recipe name) to ``output`` (an ``.onnx``
    path, or a folder for ``model.onnx``) with the builder or the torch exporter (module
    docstring). ``opset`` and ``with_past`` apply to the torch exporter only. ``verbose``: the
    libraries' own warnings, log lines and bars (and the builder's output) are shown too."""
    if exporter not in EXPORTERS:
        raise UserError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    with quiet_libraries(not verbose):
        return _export(src, output, exporter, opset, progress, with_past, verbose)


def _export(src, output, exporter: str, opset: int, progress: bool, with_past: bool, verbose: bool) -> ExportResult:
    path = _onnx_path(Path(output))
    source = resolve_source(src, progress)  # bad sources fail here, before either exporter
    created = _missing_folders(path.parent)
    try:
        reason = None
        if exporter != "torch":
            try:
                fused, nodes = builder_export(source, path, progress, verbose)
                cache = "" if with_past else "; with a KV cache, as the builder's models always have"
                return ExportResult(path, "builder", "exported with the onnxruntime-genai model builder "
                                                     f"(fused graph: {', '.join(fused)}; {nodes} nodes{cache})")
            except BuilderError as error:
                if exporter == "builder":
                    raise UserError(f"the onnxruntime-genai model builder cannot export {src}: {error}") from None
                reason = str(error)
                note(f"the builder failed ({reason}); exporting with the torch exporter", progress)
        export_model(source, path, opset, progress, with_past, verbose)
        _drop_stale_genai_config(path)
        summary = "exported with fptq-onnx's torch exporter" + (f": the builder failed: {reason}" if reason else "")
        return ExportResult(path, "torch", summary)
    except BaseException:
        for folder in created:  # deepest first; only folders this call made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _drop_stale_genai_config(path: Path) -> None:
    """Remove a ``genai_config.json`` beside ``path`` that describes the file ``path`` replaced
    (an earlier builder export of the same name): it does not fit the torch exporter's graph."""
    config = path.parent / GENAI_CONFIG
    try:
        named = json.loads(config.read_text()).get("model", {}).get("decoder", {}).get("filename")
    except (OSError, ValueError):
        return
    if named == path.name:
        config.unlink()


def _onnx_path(output: Path) -> Path:
    if output.suffix == ".onnx":
        return output
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is neither an .onnx path nor a folder")
    return output / BUILDER_MODEL


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def builder_export(source: Path, output: Path, progress: bool = True, verbose: bool = False) -> tuple[list[str], int]:
    """Export the HF folder or ``.gguf`` file ``source`` with the onnxruntime-genai model builder
    (fp32, CPU) to ``output`` (``.onnx``; ``genai_config.json`` and the tokenizer beside it);
    returns the fused (contrib) op types of its graph and its number of nodes. Raises :class:`BuilderError` with one line
    when the builder cannot do it; nothing is left behind then. The builder's own output is
    printed only with ``verbose``."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise BuilderError("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.tmp-") as tmp:
        scratch, staged = Path(tmp) / "scratch", Path(tmp) / "model"
        hf = source
        if source.suffix == ".gguf":
            from fptq_onnx.models._recipe import gguf_to_folder

            hf = gguf_to_folder(source, scratch / "hf", progress)
        note(f"exporting {hf} with the onnxruntime-genai model builder", progress)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(staged),
                   "-p", "fp32", "-e", "cpu", "-c", str(scratch / "cache")]
        done = subprocess.run(command, capture_output=True, text=True)
        if verbose:
            print(done.stdout + done.stderr, end="", file=sys.stderr)
        if done.returncode != 0 or not (staged / BUILDER_MODEL).is_file():
            raise BuilderError(_last_line(done.stderr) or _last_line(done.stdout) or f"exit code {done.returncode}")
        fused, nodes = _rename_builder_model(staged, output.name)
        _check_builder_model(hf, staged / output.name, progress)
        _move_into_place(staged, output)
    note(f"wrote {output}", progress)
    return fused, nodes


def _last_line(text: str | None) -> str:
    """The last non-empty line of ``text`` (progress bars' carriage-return frames split too)."""
    lines = [line.strip() for line in (text or "").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _rename_builder_model(folder: Path, name: str) -> tuple[list[str], int]:
    """Name the builder's ``model.onnx`` in ``folder`` ``name`` (its external data
    ``<name>.data``, and ``genai_config.json``'s ``decoder.filename``); returns the graph's
    op types that are not standard ONNX, in order of first use, and its number of nodes."""
    import onnx
    import onnx.defs

    model = onnx.load(str(folder / BUILDER_MODEL), load_external_data=False)
    fused = list(dict.fromkeys(n.op_type for n in model.graph.node if not onnx.defs.has(n.op_type, n.domain)))
    if name == BUILDER_MODEL:
        return fused, len(model.graph.node)
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
                entry.value = f"{name}.data"
    if len(locations) > 1:
        raise BuilderError(f"the builder's model keeps its weights in {len(locations)} files; expected one")
    onnx.save(model, str(folder / name))
    (folder / BUILDER_MODEL).unlink()
    if locations:
        os.replace(folder / locations.pop(), folder / f"{name}.data")
    config_path = folder / GENAI_CONFIG
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["filename"] = name
    config_path.write_text(json.dumps(config, indent=4))
    return fused, len(model.graph.node)


def _check_builder_model(hf: Path, path: Path, progress: bool) -> None:
    """The builder's model against torch's logits, as the torch exporter's is checked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    diff, scale = _check_against_torch(model, AutoTokenizer.from_pretrained(hf), path)
    note(f"ONNX Runtime vs torch: max |logit diff| = {diff:.3g} (max |logit| {scale:.3g})", progress)
    if not diff <= 1e-3 * max(1.0, scale):  # also catches NaN
        raise BuilderError(f"the builder's model disagrees with torch: max |logit diff| {diff:.3g}")
