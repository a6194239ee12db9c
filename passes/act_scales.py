"""Static activation scales: ``a = max |X'| / 127`` on the tensor the layer actually sees.

``X' = X / s`` for LAE groups and ``X`` otherwise. Per-channel maxima make this exact without a
second calibration run: ``max |X / s| = max_j (max |X_j| / s_j)``. Per-token dynamic layers
compute their scales at run time and get ``act_scale = 1`` (ignored by the op).
"""
from __future__ import annotations

import numpy as np

from fptq_onnx.quant import INT8_MAX, ActMode

from .base import ConversionContext, Pass


def static_activation_scale(channel_max_abs: np.ndarray, lae_scales: np.ndarray | None = None) -> float:
    """``max_j(channel_max_abs[j] / lae_scales[j]) / 127``; 1.0 for an all-zero input, or one so
    small that the scale would be below 2^-126 (docs/ops.md: kernels refuse a subnormal scale).

    >>> static_activation_scale(np.array([127.0, 254.0]), np.array([1.0, 4.0]))
    1.0
    """
    seen = np.asarray(channel_max_abs, np.float64)
    if lae_scales is not None:
        seen = seen / np.asarray(lae_scales, np.float64)
    amax = float(seen.max(initial=0.0))
    scale = amax / INT8_MAX
    return scale if scale >= np.finfo(np.float32).tiny else 1.0


class StaticActivationScalesPass(Pass):
    """Set ``act_scale`` of every per-tensor static layer from the calibration statistics."""

    name = "act_scales"

    def requires(self, ctx: ConversionContext) -> None:
        self.require_layer_field(ctx, "act_mode", "run the strategy pass first")

    def call(self, ctx: ConversionContext) -> bool:
        for group in ctx.groups:
            scale = static_activation_scale(group.channel_max_abs, group.lae_scales)
            for layer in group.layers:
                layer.act_scale = scale if layer.act_mode == ActMode.PER_TENSOR_STATIC else 1.0
        return False
