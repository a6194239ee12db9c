"""Automatic v0/v1: the activation bands chosen per model by measured output error.

The paper's thresholds (15 and 150) are heuristics from LLaMA-class models; on SmolLM2 the layers
with v between 9 and 15 are among the worst (``docs/accuracy.md``). This pass measures, for every
group, the summed output error of its layers under each band's scheme, on the group's sampled
calibration rows with round-to-nearest weights:

* ``low``: per-tensor static (with LAE if ``low`` is in ``lae_bands``),
* ``mid``: LAE + per-tensor static (LAE only if ``mid`` is in ``lae_bands``),
* ``high``: per-token dynamic (LAE if ``high`` is in ``lae_bands``),

and picks the thresholds: with the groups sorted by v, every split "the first a groups low, the
next b mid, the rest high" is scored by its total error. The chosen split has the fewest dynamic
groups among those within ``tolerance`` (relative) of the smallest total, since per-token scales
cost a reduction per row at run time. ``v0``/``v1`` are set between the neighbouring groups' v
(geometric mean), recorded in ``ctx.thresholds`` (for the summary and the report), and the bands
assigned with them as the strategy pass assigns its own (``strategy.assign_bands``): this pass
runs instead of that one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .output_error import layer_output_error
from fptq_onnx.quant import ActMode, lae_scales, pack_int4, quantize_weight_groupwise

from .act_scales import static_activation_scale
from .base import ConversionContext, LayerGroup, Pass, PassPreconditionError
from .strategy import assign_bands

BANDS = ("low", "mid", "high")


def band_errors(group: LayerGroup, lae_bands: frozenset[str], group_size: int, symmetric: bool) -> dict[str, float]:
    """Summed output error of the group's layers under each band's scheme (RTN weights)."""
    scales = lae_scales(group.channel_max_abs)
    errors = {}
    for band in BANDS:
        equalized = band in lae_bands
        mode = ActMode.PER_TOKEN_DYNAMIC if band == "high" else ActMode.PER_TENSOR_STATIC
        act_scale = static_activation_scale(group.channel_max_abs, scales if equalized else None)
        total = 0.0
        for layer in group.layers:
            weight = layer.weight * scales[:, None] if equalized else layer.weight
            u, s, z = quantize_weight_groupwise(weight, group_size, symmetric)
            trial = dataclasses.replace(layer, weight=weight, packed=(pack_int4(u), s, z), k_padded=layer.k,
                                        group_size=group_size, act_mode=mode, act_scale=act_scale, weight_bits=4)
            total += layer_output_error(group.sample_rows, trial, scales if equalized else None)
        errors[band] = total
    return errors


def best_split(errors: list[dict[str, float]], tolerance: float) -> tuple[int, int]:
    """``(a, b)``: the first a groups (sorted by v) low, the next b mid, the rest high.

    The split with the fewest high groups whose total is within ``tolerance`` of the minimum
    (ties: the smaller total).

    >>> best_split([{"low": 1, "mid": 2, "high": 0.9}, {"low": 5, "mid": 1, "high": 3}], 0.0)
    (1, 1)
    """
    count = len(errors)
    prefix = {band: np.concatenate([[0.0], np.cumsum([e[band] for e in errors])]) for band in BANDS}
    candidates = []
    for a in range(count + 1):
        for end in range(a, count + 1):  # mid groups are a .. end-1
            total = prefix["low"][a] + prefix["mid"][end] - prefix["mid"][a] + prefix["high"][count] - prefix["high"][end]
            candidates.append((total, count - end, a, end - a))
    smallest = min(c[0] for c in candidates)
    accepted = [c for c in candidates if c[0] <= smallest * (1 + tolerance) + 1e-12]
    _, _, a, b = min(accepted, key=lambda c: (c[1], c[0]))
    return a, b


class AutoThresholdsPass(Pass):
    """Choose v0/v1 for this model (see the module docstring), set ``ctx.thresholds``, and assign
    each layer its band with them."""

    name = "auto_thresholds"

    def __init__(self, lae_bands: tuple[str, ...] = ("mid",), group_size: int = 128, symmetric: bool = False,
                 tolerance: float = 0.02, dynamic_head: bool = False):
        self.lae_bands, self.group_size, self.symmetric = frozenset(lae_bands), group_size, symmetric
        self.tolerance, self.dynamic_head = tolerance, dynamic_head

    def requires(self, ctx: ConversionContext) -> None:
        if any(group.sample_rows is None or len(group.sample_rows) == 0 for group in ctx.groups):
            raise PassPreconditionError(f"{self.name}: needs sampled calibration rows (error rows > 0)")

    def call(self, ctx: ConversionContext) -> bool:
        groups = sorted(ctx.groups, key=lambda group: group.v)
        errors = [band_errors(group, self.lae_bands, self.group_size, self.symmetric) for group in groups]
        a, b = best_split(errors, self.tolerance)
        values = [group.v for group in groups]
        v0 = _between(values, a)
        v1 = max(v0, _between(values, a + b))
        if a + b < len(values):  # v1 must sit strictly below the first high group: bands use v > v1
            v1 = min(v1, np.nextafter(values[a + b], 0))
        ctx.thresholds = (float(v0), float(v1))
        assign_bands(ctx, *ctx.thresholds, self.lae_bands, self.dynamic_head)
        return False  # decisions only


def _between(values: list[float], index: int) -> float:
    """A threshold with ``values[:index]`` below it and ``values[index:]`` at or above it."""
    if index == 0:
        return max(min(values[0], 1e-6), 1e-9) if values[0] > 0 else 1e-9
    if index == len(values):
        return values[-1] * 2 + 1.0
    lo, hi = values[index - 1], values[index]
    return float(np.sqrt(lo * hi)) if lo > 0 and hi > lo else hi
