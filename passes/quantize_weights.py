"""4-bit group-wise weight quantization along K (``fptq_onnx.quant``).

Each layer's ``[K, N]`` weight (already multiplied by its LAE scales) becomes packed nibbles
``B[N, ceil(K/2)]``, ``scales[N, G]`` and ``zero_points[N, G]``, ``G = ceil(K/g)`` (the op's
layout, ``docs/ops.md``). A K that is not a multiple of the group size ends in a partial group,
which the ops take as it is (no Pad of X); the rounding below works on the weight zero-padded to
whole groups (``quant.pad_to_group_multiple``), and the padding is dropped. The relative weight
error ``||W - Q(W)||_F / ||W||_F`` is recorded on the layer.

Rounding, from the calibration second moment ``H = mean x x^T`` of the input the layer sees
(``X / s`` after LAE, so ``H / (s s^T)``):

* ``clip="none"``: round to nearest over each group's full range (RTN);
* ``clip="output"``: each group's range shrunk by the ratio that minimizes its output error
  (``quant.output_error_clip_ratios``);
* ``gptq=True``: GPTQ rounding (``quant.gptq_quantize_weight``), with the clip ratios if any.
"""
from __future__ import annotations

import numpy as np

from fptq_onnx.external_data import release_pages
from fptq_onnx.quant import (gptq_factor, gptq_quantize_weight, output_error_clip_ratios, pack_int4,
                             pad_to_group_multiple, quantize_weight_groupwise, relative_weight_error)

from .base import ConversionContext, LayerGroup, Pass, PassPreconditionError

class QuantizeWeightsPass(Pass):
    """Quantize every layer's weight.

    Args:
        group_size: weights per group along K.
        symmetric: symmetric (zero point 8) instead of asymmetric min/max groups.
        clip: ``"none"`` or ``"output"`` (clip ratios by output error; needs ``group.hessian``).
        gptq: GPTQ rounding (needs ``group.hessian``).
        damp: GPTQ's dampening, a fraction of the mean diagonal of H.
    """

    name = "quantize_weights"

    def __init__(self, group_size: int = 128, symmetric: bool = False, clip: str = "none", gptq: bool = False,
                 damp: float = 0.01):
        self.group_size, self.symmetric, self.clip, self.gptq, self.damp = group_size, symmetric, clip, gptq, damp

    @property
    def needs_hessian(self) -> bool:
        return self.clip == "output" or self.gptq

    def requires(self, ctx: ConversionContext) -> None:
        if self.needs_hessian:
            missing = [group.name for group in ctx.groups if group.hessian is None]
            if missing:
                raise PassPreconditionError(f"{self.name}: clip/gptq need calibration Hessians, missing for "
                                            f"{missing[:3]}; calibrate with hessian='blocks' or 'full'")
        if self.gptq and any(group.hessian.ndim != 2 for group in ctx.groups):
            raise PassPreconditionError(f"{self.name}: GPTQ needs the full Hessian; calibrate with hessian='full'")

    def call(self, ctx: ConversionContext) -> bool:
        for group in ctx.groups:
            hessian = self._seen_hessian(group) if self.needs_hessian else None
            factor = gptq_factor(hessian, self.damp) if self.gptq else None  # O(K^3): once per group
            for layer in group.layers:
                padded = pad_to_group_multiple(layer.weight, self.group_size)
                ratio = (output_error_clip_ratios(padded, hessian, self.group_size, self.symmetric)
                         if self.clip == "output" else 1.0)
                if self.gptq:
                    u, scales, zero_points = gptq_quantize_weight(padded, None, self.group_size, self.symmetric,
                                                                  ratio, factor=factor)
                else:
                    u, scales, zero_points = quantize_weight_groupwise(padded, self.group_size, self.symmetric, ratio)
                u = u[:, : layer.k]  # the padding rows quantized to the zero point: dropped
                layer.weight_error = relative_weight_error(layer.weight, u, scales, zero_points, self.group_size)
                layer.packed = (pack_int4(u), scales, zero_points)
                layer.group_size = self.group_size
                layer.k_padded = layer.k  # the ops take a partial last group: nothing is padded
                layer.symmetric = self.symmetric
                layer.rounding = "gptq" if self.gptq else "rtn"
                layer.clipped = self.clip == "output"
                release_pages(layer.weight)  # memory-mapped: one layer resident at a time
        return False  # the graph changes when the MatMuls are replaced

    def _seen_hessian(self, group: LayerGroup) -> np.ndarray:
        """``H`` of the input the layers see (``X / s`` after LAE) on ``K'`` (zero-padded): full
        ``[K', K']``, or diagonal blocks ``[K' / g, g, g]`` as calibration kept them."""
        h = group.hessian
        k = len(group.channel_max_abs)
        padded_k = -(-k // self.group_size) * self.group_size
        s = np.ones(padded_k)
        if group.lae_scales is not None:
            s[:k] = group.lae_scales
        if h.ndim == 3:  # blocks, already over K'
            s = s.reshape(-1, self.group_size)
            return h / (s[:, :, None] * s[:, None, :])
        if padded_k != k:
            h = np.pad(h, ((0, padded_k - k), (0, padded_k - k)))
        return h / np.outer(s, s)
