"""Layer-wise activation strategy (FPTQ, arXiv 2308.15987, section 3.2).

For each shared layer input, ``v = max |X|`` over the calibration data picks one of three bands:

=========  ==================  =====================================================
band       condition           activation scheme
=========  ==================  =====================================================
``low``    ``v < v0``          per-tensor static int8
``mid``    ``v0 <= v <= v1``   LAE, then per-tensor static int8 on the scaled input
``high``   ``v > v1``          per-token dynamic int8
=========  ==================  =====================================================

Small ranges quantize well per tensor; medium ranges have a few outlier channels that LAE
flattens; very large ranges (LLaMA's down_proj inputs reach thousands) are left to per-token
scales, which adapt to each token's outliers at run time. ``v0 = 15`` and ``v1 = 150`` are the
paper's values.

``lae_bands`` decides which bands get equalization scales (the paper: ``mid`` only). Equalizing
the low and high bands too keeps each band's activation scheme and changes only the weights'
scaling, which on our models lowers the weight error that dominates W4A8 (``docs/accuracy.md``).
"""
from __future__ import annotations

from fptq_onnx.quant import ActMode

from .base import ConversionContext, Pass, PassPreconditionError


def band_of(v: float, v0: float, v1: float) -> str:
    """``"low"`` if v < v0, ``"mid"`` if v0 <= v <= v1, ``"high"`` if v > v1."""
    if v < v0:
        return "low"
    if v <= v1:
        return "mid"
    return "high"


class LayerStrategyPass(Pass):
    """Assign each layer its band and activation scheme from the calibration statistics.

    Args:
        v0: lower threshold (below: per-tensor static).
        v1: upper threshold (above: per-token dynamic).
        lae_bands: bands whose groups get LAE (equalization) scales.
    """

    name = "strategy"

    def __init__(self, v0: float = 15.0, v1: float = 150.0, lae_bands: tuple[str, ...] = ("mid",)):
        self.v0, self.v1 = v0, v1
        self.lae_bands = frozenset(lae_bands)

    def requires(self, ctx: ConversionContext) -> None:
        missing = [group.name for group in ctx.groups if group.channel_max_abs is None]
        if missing:
            raise PassPreconditionError(f"{self.name}: no calibration statistics for {missing[:3]}; run calibration first")

    def call(self, ctx: ConversionContext) -> bool:
        assign_bands(ctx, self.v0, self.v1, self.lae_bands)
        return False  # decisions only; the graph is unchanged


def assign_bands(ctx: ConversionContext, v0: float, v1: float, lae_bands: frozenset[str]) -> None:
    """Each layer's band, activation scheme and whether it gets LAE, from its group's v."""
    for group in ctx.groups:
        band = band_of(group.v, v0, v1)
        for layer in group.layers:
            layer.band = band
            layer.act_mode = ActMode.PER_TOKEN_DYNAMIC if band == "high" else ActMode.PER_TENSOR_STATIC
            layer.lae = band in lae_bands
