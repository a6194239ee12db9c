"""Pass infrastructure: the conversion context, one small class per pass, and a pass manager.

Modelled on onnx-ir's pass infra: a pass is a class whose settings are ``__init__`` arguments,
``call()`` does the work on a :class:`ConversionContext` and returns a :class:`PassResult` that
says truthfully whether anything changed. Passes record their decisions on the
:class:`LinearLayer` objects they touch; the exporter writes those decisions into each node's
``doc_string`` and ``metadata_props`` so that a dump opened in Netron shows them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from fptq_onnx.quant import ActMode

logger = logging.getLogger("fptq_onnx.passes")


@dataclasses.dataclass
class LinearLayer:
    """One linear layer ``Y = X @ W (+ bias)`` found in the graph, and what the passes decided.

    ``weight`` is always the ``[K, N]`` view (a Gemm with ``transB=1`` is transposed once when
    found). Fields below ``bias`` are filled in by later passes.
    """

    name: str  # stable layer name, e.g. "model.layers.3.mlp.down_proj"
    node: gs.Node  # the MatMul or Gemm node
    weight: np.ndarray  # float32 [K, N]
    bias: np.ndarray | None = None  # float32 [N] (Gemm's C times beta), None for MatMul
    v: float | None = None  # max |x| of the layer's input over the calibration data (its group's v)
    # decisions
    band: str | None = None  # "low" | "mid" | "high" (strategy pass)
    act_mode: ActMode | None = None
    act_scale: float | None = None  # static activation scale (1.0 when dynamic); set by act_scales
    lae: bool = False
    lae_scale_range: tuple[float, float] | None = None
    lae_folded_into: str | None = None  # node name whose constant absorbed 1/s, or the Mul we made
    group_size: int | None = None
    # K as the op sees it: K itself since the ops take a partial last group (models converted
    # before that padded X with a Pad node to ceil(K / group_size) * group_size)
    k_padded: int | None = None
    symmetric: bool | None = None
    weight_error: float | None = None  # ||W - Q(W)||_F / ||W||_F
    rounding: str | None = None  # "rtn" or "gptq"
    clipped: bool | None = None  # group ranges clipped by output error
    # the op's (B, scales, zero_points): B uint8 [N, ceil(K/2)] packed nibbles, [N, K] bytes when weight_bits == 8
    packed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    replaced_by: str | None = None  # name of the W4A8 node
    weight_bits: int = 4  # 8 for layers kept at 8-bit weights (mixed precision: W8A8MatMul)
    # the rescored head (W4A8RescoredMatMul): its residual's (B, scales, zero_points) and top_k
    residual: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    top_k: int | None = None
    w4_output_error: float | None = None  # the W4A8 output error of a layer moved to 8 bits
    output_error: float | None = None  # ||X W - Y_w4a8||_F / ||X W||_F on sampled calibration rows

    @property
    def k(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[1])

    def decision(self) -> dict[str, str]:
        """The decisions made so far as strings, for doc_string and metadata_props."""
        fields = {
            "layer": self.name,
            "v": None if self.v is None else f"{self.v:.4g}",
            "band": self.band,
            "act_mode": None if self.act_mode is None else str(self.act_mode),
            "act_scale": None if self.act_mode != ActMode.PER_TENSOR_STATIC or self.act_scale is None
            else f"{self.act_scale:.6g}",
            "lae": None if self.band is None else ("yes" if self.lae else "no"),
            "lae_scale_range": None
            if self.lae_scale_range is None
            else f"[{self.lae_scale_range[0]:.4g}, {self.lae_scale_range[1]:.4g}]",
            "lae_folded_into": self.lae_folded_into,
            "group_size": None if self.group_size is None else str(self.group_size),
            "k_padded": None if self.k_padded in (None, self.k) else f"{self.k} -> {self.k_padded}",
            "weight_symmetric": None if self.symmetric is None else str(self.symmetric).lower(),
            "weight_rounding": self.rounding,
            "weight_clip": None if self.clipped is None else ("output_error" if self.clipped else "none"),
            "weight_error": None if self.weight_error is None else f"{self.weight_error:.4g}",
            "output_error": None if self.output_error is None else f"{self.output_error:.4g}",
            "weight_bits": None if self.weight_bits == 4 else str(self.weight_bits),
            "w4_output_error": None if self.w4_output_error is None else f"{self.w4_output_error:.4g}",
            "rescored_top_k": None if self.top_k is None else str(self.top_k),
        }
        return {key: value for key, value in fields.items() if value is not None}


@dataclasses.dataclass
class LayerGroup:
    """Linear layers that read the same input tensor (q/k/v, gate/up): one activation decision.

    ``channel_max_abs[j]`` is max |X[..., j]| over the calibration data and ``v`` its maximum.
    """

    input: gs.Variable
    layers: list[LinearLayer]
    channel_max_abs: np.ndarray | None = None  # float32 [K]
    lae_scales: np.ndarray | None = None  # float32 [K] when LAE applies
    sample_rows: np.ndarray | None = None  # float32 [M, K]: calibration rows of the input, sampled uniformly
    hessian: np.ndarray | None = None  # float64 [K, K]: mean x x^T of the input over the calibration data

    @property
    def v(self) -> float:
        if self.channel_max_abs is None:
            raise RuntimeError(f"group reading {self.input.name!r} has no calibration statistics")
        return float(self.channel_max_abs.max(initial=0.0))

    @property
    def name(self) -> str:
        """Common dotted prefix of the member names ("model.layers.0.self_attn" for q/k/v)."""
        parts = [layer.name.split(".") for layer in self.layers]
        common = []
        for pieces in zip(*parts):
            if len(set(pieces)) != 1:
                break
            common.append(pieces[0])
        if len(self.layers) == 1 or not common:
            return self.layers[0].name
        return ".".join(common)


@dataclasses.dataclass
class Rejection:
    """A node a pass declined, and why (shown by --report and logged at debug level)."""

    node: str
    pass_name: str
    reason: str


@dataclasses.dataclass
class ConversionContext:
    """What the passes share: the graph, the layers found, and their decisions."""

    graph: gs.Graph
    groups: list[LayerGroup] = dataclasses.field(default_factory=list)
    rejections: list[Rejection] = dataclasses.field(default_factory=list)
    thresholds: tuple[float, float] | None = None  # (v0, v1) chosen by AutoThresholdsPass, if run

    @property
    def layers(self) -> list[LinearLayer]:
        return [layer for group in self.groups for layer in group.layers]

    def reject(self, pass_name: str, node: str, reason: str) -> None:
        logger.debug("%s: skip %s: %s", pass_name, node, reason)
        self.rejections.append(Rejection(node, pass_name, reason))


@dataclasses.dataclass
class PassResult:
    modified: bool
    seconds: float = 0.0


class Pass:
    """Base class. Subclasses set ``name`` and implement ``call``."""

    name = "pass"

    def requires(self, ctx: ConversionContext) -> None:
        """Check preconditions; raise ``PassPreconditionError`` naming the pass and the fix."""

    def require_layer_field(self, ctx: ConversionContext, field: str, fix: str) -> None:
        """The precondition most passes have: every layer's ``field`` set by an earlier pass."""
        if any(getattr(layer, field) is None for layer in ctx.layers):
            raise PassPreconditionError(f"{self.name}: layers without {field}; {fix}")

    def call(self, ctx: ConversionContext) -> bool:
        """Transform ``ctx`` in place; return whether anything changed."""
        raise NotImplementedError

    def __call__(self, ctx: ConversionContext) -> PassResult:
        self.requires(ctx)
        start = time.perf_counter()
        modified = self.call(ctx)
        return PassResult(modified=bool(modified), seconds=time.perf_counter() - start)


class PassPreconditionError(RuntimeError):
    """A pass was run on a context it cannot work with (a bug in the pipeline, not user input)."""


class PassManager:
    """Runs passes in order; ``after_each(index, pass, ctx)`` is called after every pass
    (``--dump-passes`` writes its snapshots from there)."""

    def __init__(
        self,
        passes: Sequence[Pass],
        after_each: Callable[[int, Pass, ConversionContext], None] | None = None,
    ):
        self.passes = list(passes)
        self.after_each = after_each

    def __call__(self, ctx: ConversionContext) -> dict[str, PassResult]:
        results = {}
        for index, one_pass in enumerate(self.passes):
            results[one_pass.name] = one_pass(ctx)
            logger.info("%s: modified=%s (%.2fs)", one_pass.name, results[one_pass.name].modified,
                        results[one_pass.name].seconds)
            if self.after_each is not None:
                self.after_each(index, one_pass, ctx)
        return results
