"""``convert`` = :func:`load`, :func:`calibrate`, :func:`convert_graph`, :func:`save`.

::

    model.onnx -> calibrate: FindLinearLayers, then per-channel max |x| of each shared input, a
                  uniform sample of its rows, and X^T X when clipping or GPTQ need it
               -> convert_graph: FindLinearLayers -> LayerStrategy (or AutoThresholds) -> LAE
                  -> StaticActivationScales -> QuantizeWeights (RTN | clip by output error | GPTQ)
                  -> LayerOutputError -> [MixedPrecision] -> ReplaceMatMul -> TiedEmbedding
                  -> + function bodies
               -> save: model.w4a8.onnx (+ tokenizer, GenAI folder)

A benchmark converting one model many ways calibrates once and hands the statistics to each
``convert(..., stats=...)``, or calls :func:`convert_graph` on a model it holds in memory.

With ``dump_passes=DIR`` the graph is written after each pass as ``DIR/NN_<pass>.onnx`` (and
``00_input.onnx`` as imported), weights in ``NN_<pass>.onnx.data`` beside it, every node a pass
touched carrying the decisions made so far (:func:`node_decisions`). With ``report=FILE`` a
conversion report (``fptq_onnx.report``) is written at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from fptq_onnx.passes.act_scales import StaticActivationScalesPass
from fptq_onnx.passes.auto_thresholds import AutoThresholdsPass
from fptq_onnx.passes.base import ConversionContext, LayerGroup, LinearLayer, Pass, PassManager, Rejection
from fptq_onnx.passes.find_linears import FindLinearLayersPass, is_lm_head, module_paths
from fptq_onnx.passes.fuse_gelu import FuseGeluPass
from fptq_onnx.passes.rms_norm_div import RmsNormDivPass
from fptq_onnx.passes.lae import LaePass
from fptq_onnx.passes.mixed_precision import MixedPrecisionPass
from fptq_onnx.passes.output_error import LayerOutputErrorPass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.passes.replace_matmul import ReplaceMatMulPass
from fptq_onnx.passes.rescored_head import RescoredHeadPass
from fptq_onnx.passes.strategy import LayerStrategyPass
from fptq_onnx.passes.tied_embedding import TiedEmbeddingPass

from .calibration import CalibrationStats, collect_calibration_stats
from .config import ConvertConfig
from .errors import UserError
from .external_data import export_streaming, initializer_bytes, map_external_data, uses_external_data
from .genai import write_model_folder
from .model_io import check_output_path, default_opset, load_model, save_model_atomic
from .op_contract import MIN_OPSET, OP_DOMAIN, add_w4a8_function
from .report import check_report_path, write_report
from .tokenizer import copy_tokenizer

logger = logging.getLogger("fptq_onnx")


@dataclasses.dataclass
class ConversionResult:
    layers: list[LinearLayer]
    rejections: list[Rejection]
    seconds: dict[str, float]
    bytes_before: int
    bytes_after: int
    groups: list[LayerGroup] = dataclasses.field(default_factory=list)
    config: ConvertConfig | None = None
    dumps: list[Path] = dataclasses.field(default_factory=list)  # --dump-passes files, in order
    thresholds: tuple[float, float] | None = None  # v0, v1 chosen by --auto-thresholds
    # set by convert when it saves the model
    output: Path | None = None
    model: Path | None = None
    report: Path | None = None
    genai_config: Path | None = None  # the genai_config.json written beside the model (None: no KV cache)


def convert(model_path: str | Path, output_path: str | Path, calib: str | Path, config: ConvertConfig,
            progress: bool = True, dump_passes: str | Path | None = None,
            report: str | Path | None = None, stats: CalibrationStats | None = None) -> ConversionResult:
    """Convert ``model_path`` to a W4A8 FPTQ model at ``output_path``; see the module docstring.

    ``stats``: :func:`calibrate`'s statistics of this model for this config (or for one needing
    more: a Hessian serves a conversion that needs none), instead of calibrating on ``calib``.
    """
    model_path, output_path = Path(model_path), Path(output_path)
    check_output_path(model_path, output_path)
    report = check_report_path(Path(report)) if report is not None else None
    dumper = PassDumper(Path(dump_passes)) if dump_passes is not None else None
    start = time.perf_counter()
    model = load(model_path)
    seconds = {"load": time.perf_counter() - start}
    if stats is None:
        start = time.perf_counter()
        stats = calibrate(model_path, calib, config, progress)
        seconds["calibrate"] = time.perf_counter() - start
    converted, result = convert_graph(model, stats, config, model_path, dumper)
    external_in = uses_external_data(model)
    del model, stats  # the converted model holds the weights now (a caller's stats stay the caller's)
    start = time.perf_counter()
    result.genai_config = save(converted, model_path, output_path, external_in)
    result.seconds = {**seconds, **result.seconds, "save": time.perf_counter() - start}
    result.output, result.model = output_path, model_path
    if report is not None:
        result.report = write_report(result, report)
    return result


def load(model_path: Path) -> onnx.ModelProto:
    """The model without its external data (:func:`convert_graph` memory-maps the weights), its
    opset checked."""
    model = load_model(model_path, load_external_data=False)
    if default_opset(model) < MIN_OPSET:
        raise UserError(f"{model_path} uses ONNX opset {default_opset(model)}; fptq-onnx needs >= {MIN_OPSET}: "
                        "re-export the model (fptq-onnx export uses 18)")
    return model


def calibrate(model_path: str | Path, calib: str | Path, config: ConvertConfig,
              progress: bool = True) -> CalibrationStats:
    """The statistics of every linear layer's input that ``config``'s passes need, measured on
    ``calib``."""
    model_path = Path(model_path)
    names = [group.input.name for group in find_layers(load(model_path), config, model_path).groups]
    return collect_calibration_stats(model_path, names, Path(calib), config.calibration, progress,
                                     hessian=config.hessian_kind, hessian_block=config.group_size)


def find_layers(model: onnx.ModelProto, config: ConvertConfig, model_path: Path | None = None,
                dumper: PassDumper | None = None) -> ConversionContext:
    """The imported graph (external weights memory-mapped from beside ``model_path``) with its
    linear layers found, or a UserError saying why there are none."""
    module_names = module_paths(model)  # read before graphsurgeon drops node metadata
    ctx = ConversionContext(graph=gs.import_onnx(model))
    if model_path is not None:
        map_external_data(ctx.graph, model_path.parent)  # read lazily, pages released per layer
    if dumper is not None:
        dumper.write("input", ctx)
    PassManager([FindLinearLayersPass(config.nodes_to_exclude, config.exclude_lm_head, module_names)],
                after_each=dumper)(ctx)
    if not ctx.groups:
        reasons = "; ".join(f"{r.node}: {r.reason}" for r in ctx.rejections[:3]) or "the model has no MatMul/Gemm"
        raise UserError(f"no quantizable MatMul in {model_path or 'the model'} ({reasons})")
    return ctx


def conversion_passes(config: ConvertConfig) -> list[Pass]:
    """The passes after finding the layers, with ``config``'s settings."""
    head_at_8, rescored = config.lm_head == "w8", config.lm_head == "rescored"
    passes = [
        AutoThresholdsPass(config.lae_bands, config.group_size, config.symmetric, config.auto_tolerance, rescored)
        if config.auto_thresholds else LayerStrategyPass(config.v0, config.v1, config.lae_bands, rescored),
        LaePass(fold=config.fold_lae, method=config.equalization, alpha=config.sq_alpha),
        StaticActivationScalesPass(),
        QuantizeWeightsPass(config.group_size, config.symmetric, config.weight_clip, config.gptq, config.gptq_damp),
    ]
    if config.calibration.error_rows:
        passes.append(LayerOutputErrorPass())
    if config.w8_layers or config.w8_fraction or head_at_8:
        passes.append(MixedPrecisionPass(config.w8_layers, config.w8_fraction, head=head_at_8,
                                         per_channel=config.w8_per_channel, keep_head=rescored))
    if rescored:
        passes.append(RescoredHeadPass(config.lm_head_top_k))
    passes.append(ReplaceMatMulPass())
    if not config.exclude_lm_head:
        passes.append(TiedEmbeddingPass())
    passes += [RmsNormDivPass(), FuseGeluPass()]  # the torch export's unfused norms and GELUs (Gemma-3)
    return passes


def with_head_choice(config: ConvertConfig, ctx: ConversionContext) -> ConvertConfig:
    """``config`` with ``--lm-head auto`` made concrete for the model's layers:
    :meth:`ConvertConfig.auto_lm_head` of the head's share of the quantized weights."""
    if config.lm_head != "auto":
        return config
    outputs = {tensor.name for tensor in ctx.graph.outputs}
    head = sum(layer.k * layer.n for layer in ctx.layers if is_lm_head(layer, outputs))
    total = sum(layer.k * layer.n for layer in ctx.layers)
    return dataclasses.replace(config, lm_head=config.auto_lm_head(head / total if total else 0.0))


def convert_graph(model: onnx.ModelProto, stats: CalibrationStats, config: ConvertConfig,
                  model_path: Path | None = None, dumper: PassDumper | None = None
                  ) -> tuple[onnx.ModelProto, ConversionResult]:
    """``model`` (loaded from ``model_path``: external weights beside it) converted with ``stats``
    (:func:`calibrate`'s) by ``config``'s passes: the W4A8 model with its function bodies and
    decisions, and what was decided (``output`` and the other fields of saving left unset)."""
    ctx = find_layers(model, config, model_path, dumper)
    for group in ctx.groups:
        group.channel_max_abs = stats.channel_max[group.input.name]
        group.sample_rows = stats.rows.get(group.input.name)
        group.hessian = stats.hessians.get(group.input.name)
        for layer in group.layers:
            layer.v = group.v
    config = with_head_choice(config, ctx)
    results = PassManager(conversion_passes(config), after_each=dumper)(ctx)
    seconds = {name: result.seconds for name, result in results.items()}
    for group in ctx.groups:
        group.sample_rows = group.hessian = None  # used; free them
    if dumper is not None:
        seconds["dump_passes"] = dumper.seconds
    converted = export_model_proto(ctx)
    return converted, ConversionResult(
        ctx.layers, ctx.rejections, seconds, initializer_bytes(model),
        sum(t.ByteSize() for t in converted.graph.initializer), groups=ctx.groups, config=config,
        dumps=dumper.written if dumper is not None else [], thresholds=ctx.thresholds)


def save(converted: onnx.ModelProto, model_path: Path, output_path: Path, external_data: bool = False) -> Path | None:
    """Write ``converted`` at ``output_path`` (weights in ``.onnx.data`` with ``external_data``, as
    the source had them), the source's tokenizer beside it (so eval and later conversions find it)
    and, for a model with a KV cache, the GenAI folder; its genai_config.json, or None."""
    save_model_atomic(converted, output_path, external_data=True if external_data else None)
    tokenizer_dir = copy_tokenizer(model_path, output_path)
    return write_model_folder(model_path, converted, output_path, _library_or_none(), tokenizer_dir)


def _library_or_none() -> str | None:
    """Our op library's path, or None (with a warning) when it is not built: the converted model
    then runs its function bodies, in GenAI too."""
    from .session import library_path

    try:
        return library_path()
    except FileNotFoundError as error:
        logger.warning("the GenAI folder will run the ops' function bodies (slow): %s", error)
        return None


def export_model_proto(ctx: ConversionContext) -> onnx.ModelProto:
    """The graph as a ModelProto with the W4A8 function attached and decisions on the nodes."""
    decisions = node_decisions(ctx)
    model = gs.export_onnx(ctx.graph)
    model.ir_version = max(model.ir_version, 8)  # model-local functions need IR >= 8
    imported = {o.domain for o in model.opset_import}
    for domain in sorted({node.domain for node in model.graph.node} - imported - {"", "ai.onnx", OP_DOMAIN}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))  # e.g. com.microsoft for FastGelu
    add_w4a8_function(model)
    for node in model.graph.node:
        decision = decisions.get(node.output[0]) if node.output else None
        if decision:
            node.doc_string = "fptq: " + ", ".join(f"{key}={value}" for key, value in decision.items())
            kept = [(p.key, p.value) for p in node.metadata_props if not p.key.startswith("fptq.")]
            del node.metadata_props[:]
            for key, value in kept:
                node.metadata_props.add(key=key, value=value)
            for key, value in decision.items():
                node.metadata_props.add(key=f"fptq.{key}", value=value)
    return model


# roles of the nodes that carry decisions (``fptq.role``)
ROLE_LAYER = "layer"  # the node computing the layer: its MatMul/Gemm, then its W4A8MatMul
ROLE_LAE_SCALE = "lae_scale"  # the Mul by 1/s that LAE inserted in front of a group
ROLE_LAE_FOLDED = "lae_folded"  # the norm (or Mul by gamma) whose constants absorbed 1/s
ROLE_PAD_K = "pad_k"  # the Pad that zero-pads a group's input to K'
ROLE_BIAS = "bias"  # the Add of a Gemm's bias after its W4A8MatMul


def node_decisions(ctx: ConversionContext) -> dict[str, dict[str, str]]:
    """Decisions to write on each node the passes touched, keyed by the node's first output.

    The node that currently computes a layer gets the layer's :meth:`LinearLayer.decision`; a
    node serving several layers of a group (LAE Mul, folded norm, Pad) gets them merged (see
    :func:`merge_decisions`). Every entry starts with ``role`` (``ROLE_*``). Nodes are keyed by
    output tensor, which is unique in a graph, since exporters may leave node names empty.
    """
    by_name = {node.name: node for node in ctx.graph.nodes if node.name}
    by_output = {node.outputs[0].name: node for node in ctx.graph.nodes if node.outputs}
    touched: dict[int, tuple[gs.Node, str, list[LinearLayer]]] = {}

    def add(node: gs.Node | None, role: str, layer: LinearLayer) -> None:
        if node is None or not node.outputs:
            return
        entry = touched.setdefault(id(node), (node, role, []))
        if all(other is not layer for other in entry[2]):
            entry[2].append(layer)

    for group in ctx.groups:
        for layer in group.layers:
            add(layer.node, ROLE_LAYER, layer)
            if layer.lae_folded_into:
                target = by_name.get(layer.lae_folded_into) or by_output.get(layer.lae_folded_into)
                # LaePass names the Mul it inserts "<group>/lae_scale" (the stable name users search for)
                role = ROLE_LAE_SCALE if layer.lae_folded_into == f"{group.name}/lae_scale" else ROLE_LAE_FOLDED
                add(target, role, layer)
            if layer.replaced_by is None:
                continue
            source = layer.node.inputs[0] if layer.node.inputs else None
            if layer.k_padded != layer.k and source is not None and source.inputs and source.inputs[0].op == "Pad":
                add(source.inputs[0], ROLE_PAD_K, layer)
            if layer.bias is not None:
                for consumer in layer.node.outputs[0].outputs:
                    if consumer.op == "Add":
                        add(consumer, ROLE_BIAS, layer)
    return {node.outputs[0].name: {"role": role, **merge_decisions(layers)}
            for node, role, layers in touched.values()}


def merge_decisions(layers: list[LinearLayer]) -> dict[str, str]:
    """One decision dict for a node serving ``layers``: ``layer`` lists them all, a key whose value
    all layers share is written once, one that differs as ``name: value; name: value``."""
    decisions = [layer.decision() for layer in layers]
    if len(decisions) == 1:
        return decisions[0]
    merged = {"layer": ",".join(layer.name for layer in layers)}
    keys = [key for decision in decisions for key in decision if key != "layer"]
    for key in dict.fromkeys(keys):
        values = [decision.get(key) for decision in decisions]
        if len(set(values)) == 1:
            merged[key] = values[0]
        else:
            merged[key] = "; ".join(f"{layer.name}: {value}" for layer, value in zip(layers, values) if value)
    return merged


class PassDumper:
    """``PassManager`` hook for ``--dump-passes DIR``: the graph after each pass, for Netron.

    Writes ``DIR/NN_<label>.onnx`` with its weights in ``NN_<label>.onnx.data`` beside it (tensors
    over 1 KiB), so the ``.onnx`` stays small and opens fast; ``NN`` counts the dumps of one
    conversion from 00. Nothing is run: a dump costs one export and one write of the weights.
    """

    def __init__(self, folder: Path):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--dump-passes {folder} is a file, not a folder")
        if not folder.resolve().parent.is_dir():
            raise UserError(f"--dump-passes {folder}: folder {folder.resolve().parent} does not exist")
        self.folder = folder  # created with the first dump, so a conversion refused early leaves nothing
        self.written: list[Path] = []
        self.seconds = 0.0

    def __call__(self, index: int, one_pass: Pass, ctx: ConversionContext) -> None:
        self.write(one_pass.name, ctx)

    def write(self, label: str, ctx: ConversionContext) -> Path:
        start = time.perf_counter()
        self.folder.mkdir(exist_ok=True)
        path = self.folder / f"{len(self.written):02d}_{label}.onnx"
        export_streaming(ctx.graph, path, lambda: export_model_proto(ctx))  # one tensor in memory at a time
        self.written.append(path)
        self.seconds += time.perf_counter() - start
        return path
