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

``dynamic_head``: the rescored head (``rescored_head``) takes per-token dynamic int8 without
LAE whatever its band. Its 4-bit weight alone decides every logit outside the top-k, and LAE
raises that weight's error (Gemma-3-270m's head, band mid: 0.134 -> 0.190, benchmarks/head_precision.py); measured through
GenAI (Brown, session 11): 32.36 against 33.48 with LAE and static int8, at the same speed.
"""
from __future__ import annotations

from fptq_onnx.quant import ActMode

from .base import ConversionContext, Pass, PassPreconditionError
from .find_linears import is_lm_head


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
        dynamic_head: the language-model head per-token dynamic, without LAE (the rescored head).
    """

    name = "strategy"

    def __init__(self, v0: float = 15.0, v1: float = 150.0, lae_bands: tuple[str, ...] = ("mid",),
                 dynamic_head: bool = False):
        self.v0, self.v1 = v0, v1
        self.lae_bands = frozenset(lae_bands)
        self.dynamic_head = dynamic_head

    def requires(self, ctx: ConversionContext) -> None:
        missing = [group.name for group in ctx.groups if group.channel_max_abs is None]
        if missing:
            raise PassPreconditionError(f"{self.name}: no calibration statistics for {missing[:3]}; run calibration first")

    def call(self, ctx: ConversionContext) -> bool:
        assign_bands(ctx, self.v0, self.v1, self.lae_bands, self.dynamic_head)
        return False  # decisions only; the graph is unchanged


def assign_bands(ctx: ConversionContext, v0: float, v1: float, lae_bands: frozenset[str],
                 dynamic_head: bool = False) -> None:
    """Each layer's band, activation scheme and whether it gets LAE, from its group's v (the
    head's group with ``dynamic_head``: per-token dynamic, no LAE)."""
    outputs = {tensor.name for tensor in ctx.graph.outputs}
    for group in ctx.groups:
        band = band_of(group.v, v0, v1)
        head = dynamic_head and any(is_lm_head(layer, outputs) for layer in group.layers)
        for layer in group.layers:
            layer.band = band
            layer.act_mode = ActMode.PER_TOKEN_DYNAMIC if head or band == "high" else ActMode.PER_TENSOR_STATIC
            layer.lae = not head and band in lae_bands
