"""``convert``: load, find linear layers, calibrate, run the FPTQ passes, save.

::

    model.onnx -> FindLinearLayers -> calibrate (per-channel max |x| of each shared input,
               and a uniform sample of its rows) -> LayerStrategy -> LAE
               -> StaticActivationScales -> QuantizeWeights -> ReplaceMatMul
               -> LayerOutputError -> + W4A8 function body -> model.w4a8.onnx

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
from fptq_onnx.passes.base import ConversionContext, LayerGroup, LinearLayer, Pass, PassManager, Rejection
from fptq_onnx.passes.find_linears import FindLinearLayersPass
from fptq_onnx.passes.functions import MIN_OPSET, add_w4a8_function
from fptq_onnx.passes.lae import LaePass
from fptq_onnx.passes.quantize_weights import QuantizeWeightsPass
from fptq_onnx.passes.replace_matmul import ReplaceMatMulPass
from fptq_onnx.passes.strategy import LayerStrategyPass

from .calibration import CalibrationConfig, collect_channel_max
from .errors import UserError
from .tokenizer import copy_tokenizer
from .model_io import check_output_path, default_opset, load_model, save_model_atomic

logger = logging.getLogger("fptq_onnx")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Every setting of a conversion, validated once here and passed down explicitly."""

    v0: float = 15.0  # below: per-tensor static int8
    v1: float = 150.0  # above: per-token dynamic int8; in between: LAE + per-tensor static
    group_size: int = 128
    symmetric: bool = False  # asymmetric weights measured better on SmolLM2 and Gemma-3
    nodes_to_exclude: str | None = None  # regex on layer / node names
    exclude_lm_head: bool = True
    fold_lae: bool = True  # fold 1/s into the preceding norm where possible
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if not 0 < self.v0 <= self.v1:
            raise UserError(f"need 0 < --v0 <= --v1, got {self.v0} and {self.v1}")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"--group-size must be an even number >= 2, got {self.group_size}")
        if self.nodes_to_exclude:
            import re

            try:
                re.compile(self.nodes_to_exclude)
            except re.error as error:
                raise UserError(f"--nodes-to-exclude is not a valid regular expression: {error}") from None


@dataclasses.dataclass
class ConversionResult:
    output: Path
    layers: list[LinearLayer]
    rejections: list[Rejection]
    seconds: dict[str, float]
    bytes_before: int
    bytes_after: int


def convert(model_path: str | Path, output_path: str | Path, calib: str | Path, config: ConvertConfig,
            progress: bool = True) -> ConversionResult:
    """Convert ``model_path`` to a W4A8 FPTQ model at ``output_path``; see the module docstring."""
    model_path, output_path = Path(model_path), Path(output_path)
    check_output_path(model_path, output_path)
    seconds = {}
    start = time.perf_counter()
    model = load_model(model_path)
    if default_opset(model) < MIN_OPSET:
        raise UserError(f"{model_path} uses ONNX opset {default_opset(model)}; fptq-onnx needs >= {MIN_OPSET}: "
                        "re-export the model (fptq-onnx export uses 18)")
    ctx = ConversionContext(graph=gs.import_onnx(model))
    bytes_before = sum(t.ByteSize() for t in model.graph.initializer)
    seconds["load"] = time.perf_counter() - start

    PassManager([FindLinearLayersPass(config.nodes_to_exclude, config.exclude_lm_head)])(ctx)
    if not ctx.groups:
        reasons = "; ".join(f"{r.node}: {r.reason}" for r in ctx.rejections[:3]) or "the model has no MatMul/Gemm"
        raise UserError(f"no quantizable MatMul in {model_path} ({reasons})")

    start = time.perf_counter()
    names = [group.input.name for group in ctx.groups]
    channel_max = collect_channel_max(model_path, names, Path(calib), config.calibration, progress)
    for group in ctx.groups:
        group.channel_max_abs = channel_max[group.input.name]
    seconds["calibrate"] = time.perf_counter() - start
    del model  # the graph holds the weights now

    results = PassManager([
        LayerStrategyPass(config.v0, config.v1),
        LaePass(fold=config.fold_lae),
        StaticActivationScalesPass(),
        QuantizeWeightsPass(config.group_size, config.symmetric),
        ReplaceMatMulPass(),
    ])(ctx)
    seconds.update({name: result.seconds for name, result in results.items()})

    start = time.perf_counter()
    converted = export_model_proto(ctx)
    bytes_after = sum(t.ByteSize() for t in converted.graph.initializer)
    save_model_atomic(converted, output_path)
    copy_tokenizer(model_path, output_path)  # so eval and later conversions find it beside the model
    seconds["save"] = time.perf_counter() - start
    return ConversionResult(output_path, ctx.layers, ctx.rejections, seconds, bytes_before, bytes_after)


def export_model_proto(ctx: ConversionContext) -> onnx.ModelProto:
    """The graph as a ModelProto with the W4A8 function attached and decisions on the nodes."""
    model = gs.export_onnx(ctx.graph)
    model.ir_version = max(model.ir_version, 8)  # model-local functions need IR >= 8
    add_w4a8_function(model)
    decisions = {}
    for layer in ctx.layers:
        decisions[layer.replaced_by] = layer.decision()
        if layer.lae_folded_into:
            decisions.setdefault(layer.lae_folded_into, {"lae_for": ""})
            entry = decisions[layer.lae_folded_into]
            entry["lae_for"] = ",".join(filter(None, [entry["lae_for"], layer.name]))
    for node in model.graph.node:
        decision = decisions.get(node.name)
        if decision:
            node.doc_string = "fptq: " + ", ".join(f"{key}={value}" for key, value in decision.items())
            del node.metadata_props[:]
            for key, value in decision.items():
                node.metadata_props.add(key=f"fptq.{key}", value=value)
    return model
