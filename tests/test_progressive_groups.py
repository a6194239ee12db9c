"""benchmarks/progressive_groups.py's weight format (integer group scales, QServe-style) against an
independent float64 reconstruction. benchmarks/ is not a package: the module is loaded by path."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "progressive_groups.py"


@pytest.fixture(scope="module")
def pg():
    spec = importlib.util.spec_from_file_location("progressive_groups", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _weights(seed: int, k: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, n)  # channels of very different ranges
    w[rng.integers(0, k, 5), rng.integers(0, n, 5)] *= 20  # a few outliers
    w[-16:] = 0  # K padding: zero rows
    w[:, 0] = 0  # an all-zero column
    return w.astype(np.float32)


@pytest.mark.parametrize("name, seed, k, n, group_size, clip", [
    ("g128 full range", 0, 256, 24, 128, 1.0),
    ("g32 clipped", 1, 192, 17, 32, 0.8),
    ("g64 per-group clip", 2, 128, 9, 64, None),
])
def test_integer_constraints_and_reconstruction(pg, name, seed, k, n, group_size, clip):
    w = _weights(seed, k, n)
    ratio = np.random.default_rng(seed).choice(pg.CLIP_RATIOS, (n, k // group_size)) if clip is None else clip
    levels = pg.progressive_levels(w, group_size, ratio)
    u, scales, zero_points = pg.quantize_weight_progressive(w, group_size, ratio)

    # integer constraints of the format
    assert u.dtype == np.uint8 and u.max() <= 15
    assert zero_points.dtype == np.uint8 and zero_points.max() <= 15
    assert levels.s2.dtype == np.uint8 and levels.s2.min() >= 1 and levels.s2.max() <= 16
    assert np.abs(levels.q8).max() <= 119
    # level 2 expands to int8 in registers: (u - z) * s2 within [-127, 127]
    g = np.arange(k) // group_size
    level2 = (u.astype(np.int64) - levels.z[:, g]) * levels.s2[:, g]
    assert np.abs(level2).max() <= 127
    # the op's scales are s1 * s2, its zero points z
    np.testing.assert_array_equal(zero_points, levels.z)
    np.testing.assert_allclose(scales, levels.s1[:, None].astype(np.float64) * levels.s2, rtol=2 ** -23)

    # independent float64 reconstruction, W[k, n] = s1[n] * s2[n, g] * (u[n, k] - z[n, g])
    restored = levels.s1[None, :].astype(np.float64) * level2.T
    s1 = np.abs(w).max(axis=0) / 119
    # level-1 error <= s1 / 2; level-2 error of an unclipped weight <= s1 * s2 / 2
    unclipped = (u > 0) & (u < 15)
    bound = (s1[:, None] * (0.5 + levels.s2[:, g] / 2)).T
    assert np.all(np.abs(restored - w)[unclipped.T] <= bound[unclipped.T] * (1 + 1e-6))
    # zero weights (the K padding, the zero column) reconstruct exactly
    assert np.all(restored[w == 0] == 0)
    # the op's own dequantization of (u, scales, z) is the same weight
    op_weight = (u.astype(np.float64) - zero_points[:, g]) * scales[:, g].astype(np.float64)
    np.testing.assert_allclose(op_weight.T, restored, rtol=1e-6, atol=0)


def test_full_range_error_close_to_float_scales(pg):
    """Without clipping the integer scales cost little weight error against float group scales."""
    w = _weights(3, 512, 64)
    u, scales, z = pg.quantize_weight_progressive(w, 128)
    g = np.arange(512) // 128
    restored = ((u.astype(np.float64) - z[:, g]) * scales[:, g]).T
    groups = w.T.reshape(64, 4, 128).astype(np.float64)
    lo, hi = np.minimum(groups.min(-1), 0), np.maximum(groups.max(-1), 0)
    s = np.where(hi - lo == 0, 1, (hi - lo) / 15)
    zf = np.clip(np.rint(-lo / s), 0, 15)
    float_restored = ((np.clip(np.rint(groups / s[..., None]) + zf[..., None], 0, 15) - zf[..., None])
                      * s[..., None]).reshape(64, 512).T
    error = np.linalg.norm(restored - w) / np.linalg.norm(w)
    float_error = np.linalg.norm(float_restored - w) / np.linalg.norm(w)
    assert float_error < error < 2 * float_error


def test_clip_ratios_recovered(pg):
    w = _weights(4, 256, 12).astype(np.float64)
    ratio = np.random.default_rng(4).choice(pg.CLIP_RATIOS, (12, 2))
    groups = w.T.reshape(12, 2, 128)
    spread = np.maximum(groups.max(-1), 0) - np.minimum(groups.min(-1), 0)
    scales = np.where(spread == 0, 1.0, ratio * spread / 15).astype(np.float32)
    recovered = pg.clip_ratios_of(w, scales, 128)
    np.testing.assert_array_equal(recovered[spread > 0], ratio[spread > 0])
    assert np.all(recovered[spread == 0] == 1.0)


def test_bad_group_size(pg):
    with pytest.raises(ValueError, match="multiple of the group size"):
        pg.progressive_levels(np.ones((10, 2)), 4)
