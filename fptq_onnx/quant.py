"""Quantization numerics of fptq-onnx as plain numpy functions.

Every number the compiler writes into a model and every number a kernel computes is defined
here, once. The op contract in ``docs/ops.md`` restates these formulas; the ONNX function
body (``fptq_onnx/op_contract.py``) and the C++/CUDA kernels implement them and are tested
against the float64 references below.

Conventions
-----------
* ONNX MatMul weights are ``W[K, N]`` (``Y = X @ W``); K is the reduction axis.
* Rounding is round-half-to-even (``np.rint``), like ONNX ``Round`` and ``QuantizeLinear``.
* int8 activations use the symmetric range [-127, 127] (-128 is never produced), so that
  ``-q`` is always representable and the kernels' zero-point algebra stays exact.
* 4-bit weights are stored as unsigned nibbles ``u`` in [0, 15] with a zero point ``z`` per
  group: ``w ~= (u - z) * scale``. Symmetric quantization is the special case ``z = 8``.
  8-bit weights (mixed-precision layers, ``W8A8MatMul``) are the same with one byte per weight:
  ``u`` in [0, 255], symmetric ``z = 128``.
"""
from __future__ import annotations

import enum

import numpy as np

INT8_MAX = 127
INT4_LEVELS = 15  # unsigned nibble u in [0, 15]
SYMMETRIC_ZERO_POINT = 8
UINT8_LEVELS = 255  # 8-bit weights: unsigned byte u in [0, 255]
SYMMETRIC_ZERO_POINT_UINT8 = 128


def quantize_activation_per_tensor(x: np.ndarray, scale: float) -> np.ndarray:
    """Static per-tensor int8 quantization.

    ``q = clip(rint(x * (1 / scale)), -127, 127)`` with ``1 / scale`` rounded to float32 first,
    exactly as the kernels compute it. Shapes: ``x[..., K]`` -> ``q[..., K]`` (int8).

    >>> quantize_activation_per_tensor(np.array([0.5, 1.5, -300.0], np.float32), 1.0)
    array([   0,    2, -127], dtype=int8)
    """
    inv_scale = np.float32(1.0) / np.float32(scale)
    q = np.rint(np.asarray(x, np.float32) * inv_scale)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)


def per_token_scales(x: np.ndarray) -> np.ndarray:
    """Per-token (per-row) dynamic activation scale ``a_m = max_k |x[m, k]| / 127`` (float32).

    A row of zeros gets ``a_m = 1`` so that its quantized row is zero and no division by zero
    happens; so does a row whose ``a_m`` is below 2^-126 (the smallest normal float32,
    ``max|x| < 1.5e-36``), where ``1 / a_m`` would lose precision or overflow to inf (and
    ``0 * inf`` is NaN). Shapes: ``x[..., K]`` -> ``a[..., 1]``.
    """
    amax = np.max(np.abs(np.asarray(x, np.float32)), axis=-1, keepdims=True)
    scale = amax / np.float32(INT8_MAX)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)


def quantize_activation_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-token int8 quantization: ``q[m, k] = clip(rint(x[m, k] * (1 / a_m)), -127, 127)``.

    Returns ``(q[..., K] int8, a[..., 1] float32)``; ``x ~= q * a``.
    """
    scale = per_token_scales(x)
    inv_scale = np.float32(1.0) / scale
    q = np.rint(np.asarray(x, np.float32) * inv_scale)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def _grid(bits: int) -> tuple[int, int]:
    """``(levels, symmetric zero point)`` of the ``bits``-bit weight grid: (15, 8) or (255, 128)."""
    if bits not in (4, 8):
        raise ValueError(f"weights are 4 or 8 bits, not {bits}")
    return (INT4_LEVELS, SYMMETRIC_ZERO_POINT) if bits == 4 else (UINT8_LEVELS, SYMMETRIC_ZERO_POINT_UINT8)


def _quantize_groups(w: np.ndarray, group_size: int, symmetric: bool, clip_ratio, bits: int):
    """The group-wise quantizer of both widths: ``(u[N, K] uint8, scales[N, G], zero_points[N, G])``
    (formulas in :func:`quantize_weight_groupwise` and :func:`quantize_weight_groupwise_int8`).
    A last partial group is quantized on the weights zero-padded to ``G * group_size``, then the
    padding is dropped: padding with zeros leaves every group's range as it is (both schemes
    include 0), so this is the partial group quantized on its own."""
    k, n = w.shape
    levels, _ = _grid(bits)
    padded = pad_to_group_multiple(np.asarray(w, np.float64), group_size)
    groups = padded.T.reshape(n, -1, group_size)
    scale, zero_point = group_scale_zero_point(groups, symmetric, clip_ratio, bits)
    u = np.clip(np.rint(groups / scale[..., None]) + zero_point[..., None], 0, levels)
    return u.reshape(n, -1)[:, :k].astype(np.uint8), scale, zero_point.astype(np.uint8)


def quantize_weight_groupwise(
    w: np.ndarray, group_size: int, symmetric: bool, clip_ratio: np.ndarray | float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit group-wise weight quantization along K.

    ``w[K, N]`` is cut into ``G = ceil(K / group_size)`` groups of consecutive rows per column n
    (the last one partial when ``K % group_size != 0``, as in ONNX Runtime's MatMulNBits).
    For group g of column n with values ``w_g`` (optionally shrunk by ``clip_ratio`` c):

    * symmetric:  ``scale = c * max|w_g| / 7``, ``z = 8``
    * asymmetric: ``lo = c * min(w_g, 0)``, ``hi = c * max(w_g, 0)``, ``scale = (hi - lo) / 15``,
      ``z = clip(rint(-lo / scale), 0, 15)``

    and ``u = clip(rint(w / scale) + z, 0, 15)``. An all-zero group gets ``scale = 1``.

    Returns ``(u[N, K] uint8 in [0, 15], scales[N, G] float32, zero_points[N, G] uint8)``.
    Use :func:`pack_int4` for the stored layout.

    >>> u, s, z = quantize_weight_groupwise(np.array([[-7.0], [7.0]]), 2, symmetric=True)
    >>> u.tolist(), s.tolist(), z.tolist()
    ([[1, 15]], [[1.0]], [[8]])
    """
    return _quantize_groups(w, group_size, symmetric, clip_ratio, bits=4)


def quantize_weight_groupwise_int8(w: np.ndarray, group_size: int,
                                   symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit group-wise weight quantization along K (``W8A8MatMul``, mixed-precision layers).

    The 4-bit scheme of :func:`quantize_weight_groupwise` on the byte grid, per group ``w_g`` of
    consecutive rows of column n (``G = ceil(K / group_size)``, the last one maybe partial;
    ``group_size = K``: per channel):

    * symmetric:  ``scale = max|w_g| / 127``, ``z = 128``, so ``u = clip(rint(w / scale), -127, 127) + 128``
      (in [1, 255]: 0 is never used, as -128 is not for activations);
    * asymmetric: ``lo = min(w_g, 0)``, ``hi = max(w_g, 0)``, ``scale = (hi - lo) / 255``,
      ``z = clip(rint(-lo / scale), 0, 255)``, ``u = clip(rint(w / scale) + z, 0, 255)``.

    An all-zero group gets ``scale = 1``. Returns ``(u[N, K] uint8, scales[N, G] float32,
    zero_points[N, G] uint8)``; ``u`` is the op's ``B`` as it is (one byte per weight, row n =
    output channel n).

    >>> u, s, z = quantize_weight_groupwise_int8(np.array([[-127.0], [63.5]]), 2, symmetric=True)
    >>> u.tolist(), s.tolist(), z.tolist()
    ([[1, 192]], [[1.0]], [[128]])
    """
    return _quantize_groups(w, group_size, symmetric, 1.0, bits=8)


def group_scale_zero_point(groups: np.ndarray, symmetric: bool, clip_ratio: np.ndarray | float = 1.0,
                           bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(scale float32, zero point float64)`` of each group ``groups[..., g]`` on the ``bits``-bit
    grid (the formulas of :func:`quantize_weight_groupwise`, :func:`quantize_weight_groupwise_int8`:
    symmetric ``scale = c max|w| / (z - 1)``, asymmetric ``(hi - lo) / levels``); ``clip_ratio``
    broadcasts against ``groups.shape[:-1]``."""
    levels, symmetric_zero_point = _grid(bits)
    ratio = np.broadcast_to(np.asarray(clip_ratio, np.float64), groups.shape[:-1])
    if symmetric:
        scale = ratio * np.max(np.abs(groups), axis=-1) / (symmetric_zero_point - 1)
        zero_point = np.full_like(scale, symmetric_zero_point)
    else:
        lo = ratio * np.minimum(groups.min(axis=-1), 0.0)
        hi = ratio * np.maximum(groups.max(axis=-1), 0.0)
        scale = (hi - lo) / levels
        zero_point = np.clip(np.rint(-lo / np.where(scale == 0, 1.0, scale)), 0, levels)
    return np.where(scale == 0, 1.0, scale).astype(np.float32), zero_point


def relative_weight_error(w: np.ndarray, u: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                          group_size: int) -> float:
    """``||w - dequantize(u)||_F / ||w||_F`` for ``w[K, N]`` and its quantization ``u[N, K]``; 0 for
    an all-zero ``w``."""
    restored = dequantize_weight(u, scales, zero_points, group_size)
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - restored)) / norm if norm else 0.0


CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.55, 19), 4))  # 1.0, 0.975, ..., 0.55


def output_error_clip_ratios(w: np.ndarray, hessian: np.ndarray, group_size: int, symmetric: bool,
                             ratios: tuple[float, ...] = CLIP_RATIOS, columns_per_chunk: int = 256) -> np.ndarray:
    """Per-group clip ratio minimizing the layer's output error, not the weight error.

    Shrinking a group's range (``clip_ratio`` c < 1 in :func:`quantize_weight_groupwise`)
    saturates its largest weights but rounds all others more finely. Which c is best depends on
    the inputs: the squared output error that group g of column n adds is

    ``e(c) = d^T H_g d``,  ``d = w_gn - Q_c(w_gn)``,  ``H_g = mean x_g x_g^T``

    (``H_g``: the group's diagonal block of the calibration second moment, see
    ``calibration.SecondMoment``; ``hessian`` is the full ``[K, K]`` or its blocks ``[G, g, g]``).
    Cross-group terms are ignored, so each (n, g) is chosen independently, as AWQ's clip search
    does. Returns ``ratio[N, G]`` from ``ratios``.
    Minimizing the weight MSE instead (H = identity) measured worse (``docs/accuracy.md``).

    Cost: ``len(ratios) * K * N * (2 * group_size + ~10)`` flops, the search's whole price. Three
    things keep it near the matrix product's speed (6.7x on a 8192 x 2048 layer:
    ``benchmarks/clip_search.py``, figures in docs/large-models.md): columns go through in
    chunks whose temporaries stay in cache; the search runs in float32 (it only compares errors; a near-tie may pick the neighbouring
    ratio, whose error is equal to ~1e-6); and each group's scale and zero point come from its
    min and max, found once (:func:`group_scale_zero_point` only looks at those two).
    """
    k, n = w.shape
    count = k // group_size
    blocks = hessian if hessian.ndim == 3 else np.stack(
        [hessian[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size] for g in range(count)])
    blocks = np.asarray(blocks, np.float32)
    best = np.ones((count, n))
    for first in range(0, n, columns_per_chunk):
        columns = slice(first, min(first + columns_per_chunk, n))
        groups = np.ascontiguousarray(  # [G, c, g]
            np.asarray(w[:, columns], np.float32).T.reshape(-1, count, group_size).transpose(1, 0, 2))
        extremes = np.stack([groups.min(axis=-1), groups.max(axis=-1)], axis=-1)  # same scales as groups
        d = np.empty_like(groups)
        best_error = np.full(groups.shape[:2], np.inf)
        for ratio in ratios:
            scale, zero_point = group_scale_zero_point(extremes, symmetric, ratio)
            scale, zero_point = scale[..., None], zero_point.astype(np.float32)[..., None]
            # d = w - (clip(rint(w / scale) + z, 0, 15) - z) * scale, in place
            np.divide(groups, scale, out=d)
            np.rint(d, out=d)
            d += zero_point
            np.clip(d, 0, INT4_LEVELS, out=d)
            d -= zero_point
            d *= scale
            np.subtract(groups, d, out=d)
            error = np.einsum("gnj,gnj->gn", d @ blocks, d)
            better = error < best_error
            best[:, columns][better] = ratio
            best_error[better] = error[better]
    return best.T


def gptq_factor(hessian: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """``(U, dead)`` for :func:`gptq_quantize_weight`: the upper Cholesky factor of the dampened
    ``H^-1`` (``H^-1 = U^T U``) and the mask of channels that never fire (``H[k, k] = 0``, given
    ``H[k, k] = 1`` so that H stays invertible). O(K^3): computed once per layer input and shared
    by the layers reading it (q/k/v, gate/up)."""
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(len(h))] += damp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def gptq_quantize_weight(w: np.ndarray, hessian: np.ndarray | None, group_size: int, symmetric: bool,
                         clip_ratio: np.ndarray | float = 1.0, damp: float = 0.01,
                         factor: tuple[np.ndarray, np.ndarray] | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al., arXiv 2210.17323): round the weight rows one input channel at a time,
    each rounding error compensated by the rows not yet rounded.

    With ``H = mean x x^T`` (+ ``damp * mean(diag H)`` on the diagonal) and the upper Cholesky
    factor ``U`` of ``H^-1`` (``H^-1 = U^T U``; :func:`gptq_factor`, or pass ``factor``), row k
    (input channel k; GPTQ's "column")::

        q_k = Q(w_k)                                 (the group's scale/zero point, fixed when
                                                      the group's first row is reached)
        e_k = (w_k - q_k) / U[k, k]
        w_j -= U[k, j] * e_k      for j > k          (the optimal update of the remaining rows)

    which minimizes ``||X W - X Q||^2`` greedily. Updates are applied lazily per block of
    ``group_size`` rows (one GEMM per block), GPTQ's batching. Channels that never fire
    (``H[k, k] = 0``) get weight 0. Scales and zero points come from the already-updated rows of
    each group, with ``clip_ratio[N, G]`` as in :func:`quantize_weight_groupwise`.

    Returns ``(u[N, K], scales[N, G], zero_points[N, G])`` like :func:`quantize_weight_groupwise`.
    """
    k, n = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    upper, dead = factor if factor is not None else gptq_factor(hessian, damp)
    weight = np.array(w, np.float64)
    weight[dead] = 0.0
    count = k // group_size
    ratio = np.broadcast_to(np.asarray(clip_ratio, np.float64), (n, count))
    u = np.empty((k, n), np.uint8)
    scales = np.empty((n, count), np.float32)
    zero_points = np.empty((n, count), np.float64)
    for g in range(count):
        lo, hi = g * group_size, (g + 1) * group_size
        block = weight[lo:hi]
        scale, zero_point = group_scale_zero_point(block.T, symmetric, ratio[:, g])
        scales[:, g], zero_points[:, g] = scale, zero_point
        errors = np.empty_like(block)
        for i in range(group_size):
            row = block[i]
            q = np.clip(np.rint(row / scale) + zero_point, 0, INT4_LEVELS)
            u[lo + i] = q
            errors[i] = (row - (q - zero_point) * scale) / upper[lo + i, lo + i]
            block[i + 1:] -= np.outer(upper[lo + i, lo + i + 1:hi], errors[i])
        weight[hi:] -= upper[lo:hi, hi:].T @ errors
    return u.T.copy(), scales, zero_points.astype(np.uint8)


def pad_to_group_multiple(w: np.ndarray, group_size: int) -> np.ndarray:
    """``w[K, N]`` with zero rows appended up to ``K' = ceil(K / group_size) * group_size``.

    A last partial group quantizes on these rows exactly like its ``K % group_size`` real
    weights alone: both schemes include 0 in every group's range, and a zero weight maps exactly
    to the zero point. The quantizers (and the clip search and GPTQ, which want whole groups)
    work on K' and drop the padding afterwards; the ops take the partial group as it is.

    >>> pad_to_group_multiple(np.ones((3, 2)), 4).shape
    (4, 2)
    """
    k = w.shape[0]
    padded_k = -(-k // group_size) * group_size
    if padded_k == k:
        return w
    return np.concatenate([w, np.zeros((padded_k - k,) + w.shape[1:], w.dtype)], axis=0)


def dequantize_weight(u: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                      group_size: int | None = None) -> np.ndarray:
    """``w[k, n] = (u[n, k] - z[n, g]) * scale[n, g]`` with ``g = k // group_size``, float64 ``[K, N]``.

    ``group_size`` may be left out when it divides K: it is then taken as ``K / G`` (which a
    partial last group would make wrong without an error where G happens to divide K, so pass
    it whenever the op's group size may not divide K; ``ceil(K / group_size) = G`` is checked).
    """
    n, k = u.shape
    count = scales.shape[1]
    if group_size is None:
        if k % count:
            raise ValueError(f"K={k} is not a multiple of the {count} groups: pass group_size")
        group_size = k // count
    if -(-k // group_size) != count:
        raise ValueError(f"K={k} with group size {group_size} has {-(-k // group_size)} groups, not {count}")
    group_of_k = np.arange(k) // group_size
    centered = u.astype(np.float64) - zero_points[:, group_of_k]
    return (centered * scales[:, group_of_k].astype(np.float64)).T


def pack_int4(u: np.ndarray) -> np.ndarray:
    """Pack nibbles ``u[N, K]`` into bytes ``B[N, ceil(K/2)]``: even k in the low nibble, odd k in
    the high; an odd K's last high nibble is 0.

    This is ONNX Runtime MatMulNBits' layout with its ``[N, blocks, blob]`` flattened.

    >>> pack_int4(np.array([[1, 2, 15, 0, 7]], np.uint8)).tolist()
    [[33, 15, 7]]
    """
    u = np.asarray(u, np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, k: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``B[N, ceil(K/2)]`` -> ``u[N, K]`` (``k`` defaults to ``2 * B.shape[-1]``)."""
    packed = np.asarray(packed, np.uint8)
    u = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    u[..., 0::2] = packed & 0x0F
    u[..., 1::2] = packed >> 4
    return u if k is None else u[..., :k]


class ActMode(enum.IntEnum):
    """An activation scheme: its value is the ops' ``act_mode`` attribute (``docs/ops.md``), its
    ``str()`` the name that decisions, reports and ``inspect`` show (``per_tensor_static``)."""

    PER_TENSOR_STATIC = 0  # one scale a = act_scale, calibrated ahead (:func:`quantize_activation_per_tensor`)
    PER_TOKEN_DYNAMIC = 1  # a_m per row at run time (:func:`quantize_activation_per_token`)

    def __str__(self) -> str:
        return self.name.lower()

    def __format__(self, spec: str) -> str:  # f"{mode:18s}" pads the name, not the number
        return format(str(self), spec)


def w4a8_matmul_reference(
    x: np.ndarray,
    packed_weight: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    act_scale: float,
    act_mode: ActMode,
    group_size: int | None = None,
) -> np.ndarray:
    """float64 reference of the W4A8 op (``docs/ops.md``).

    ``Y[m, n] = a_m * sum_k q[m, k] * (u[n, k] - z[n, g(k)]) * scale[n, g(k)]`` where ``q, a``
    come from :func:`quantize_activation_per_tensor` (``a_m = act_scale``) or
    :func:`quantize_activation_per_token`, and ``u`` from :func:`unpack_int4` of
    ``packed_weight[N, ceil(K/2)]``. ``x[..., K]`` -> ``Y[..., N]`` (float64). ``group_size``: the
    op's attribute, needed only when it does not divide K (see :func:`dequantize_weight`).
    Rows :func:`poisoned_rows` marks give NaN rows (docs/ops.md "NaN and Inf").
    """
    u = unpack_int4(packed_weight, np.shape(x)[-1])
    return _grouped_matmul_reference(x, u, scales, zero_points, act_scale, act_mode, group_size)


def w8a8_matmul_reference(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                          act_scale: float, act_mode: ActMode, group_size: int | None = None) -> np.ndarray:
    """float64 reference of the ``W8A8MatMul`` op (``docs/ops.md``): :func:`w4a8_matmul_reference`'s
    formula with ``u = weight[N, K]`` itself (uint8, one byte per weight, from
    :func:`quantize_weight_groupwise_int8`), ``z`` up to 255."""
    return _grouped_matmul_reference(x, np.asarray(weight, np.uint8), scales, zero_points, act_scale, act_mode,
                                     group_size)


def w4a8_rescored_matmul_reference(x: np.ndarray, weight: tuple, residual: tuple, act_scale: float,
                                   act_mode: ActMode, top_k: int, group_size: int | None = None) -> np.ndarray:
    """float64 reference of ``W4A8RescoredMatMul`` (``docs/ops.md``), the language-model head.

    ``C = W4A8MatMul(x; weight)`` and ``R = W4A8MatMul(x; residual)`` (:func:`w4a8_matmul_reference`
    with the same activations; each a ``(B, scales, zero_points)`` triple). On the ``top_k``
    channels of each row with the largest ``C`` (equal values: the lower channel first)
    ``Y = C + R``, elsewhere ``Y = C``: the residual reaches only the logits the softmax can see.
    """
    coarse = w4a8_matmul_reference(x, *weight, act_scale, act_mode, group_size)
    fine = coarse + w4a8_matmul_reference(x, *residual, act_scale, act_mode, group_size)
    top = np.argsort(-coarse, axis=-1, kind="stable")[..., :top_k]
    y = coarse.copy()
    np.put_along_axis(y, top, np.take_along_axis(fine, top, axis=-1), axis=-1)
    return y


def quantize_weight_residual(w: np.ndarray, u: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                             group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit quantization of what the 4-bit weight ``(u, scales, zero_points)`` of ``w[K, N]``
    leaves out: ``R = w - dequantize(u, scales, zero_points)``, asymmetric min/max groups of
    ``group_size`` (:func:`quantize_weight_groupwise`, no clipping). Per group R spans about one
    step of the first weight, so its step is 1/15 of that: together 8 bits' worth (Gemma-3-270m's
    head: relative error 0.0089, 8 bits per channel 0.0136). Returns ``(u_r, scales_r, zero_points_r)``.
    """
    residual = np.asarray(w, np.float64) - dequantize_weight(u, scales, zero_points, group_size)
    return quantize_weight_groupwise(residual, group_size, symmetric=False)


def _grouped_matmul_reference(x, u, scales, zero_points, act_scale, act_mode: ActMode, group_size=None) -> np.ndarray:
    """Both ops' reference on the unpacked weights ``u[N, K]``."""
    poisoned = poisoned_rows(x, act_mode)
    q, a = quantize_activation(np.where(poisoned[..., None], np.float32(0), x), act_scale, act_mode)
    w = dequantize_weight(u, scales, zero_points, group_size)
    y = (q.astype(np.float64) @ w) * a
    y[poisoned] = np.nan
    return y


def poisoned_rows(x: np.ndarray, act_mode: ActMode) -> np.ndarray:
    """Rows of ``x[..., K]`` whose Y row is all NaN (docs/ops.md "NaN and Inf"): a NaN anywhere in
    the row, either mode, or an Inf in dynamic mode (``a_m`` infinite, ``inf * 0 = NaN``). An Inf
    in static mode saturates to +-127 like any large element."""
    x = np.asarray(x, np.float32)
    poisoned = np.isnan(x).any(axis=-1)
    if act_mode == ActMode.PER_TOKEN_DYNAMIC:
        poisoned |= np.isinf(x).any(axis=-1)
    return poisoned


def quantize_activation(x: np.ndarray, act_scale: float, act_mode: ActMode) -> tuple[np.ndarray, np.ndarray]:
    """``(q int8, a float64)`` of the op's activation scheme (``act_mode`` 0 static, 1 per token)."""
    x = np.asarray(x, np.float32)
    if act_mode == ActMode.PER_TENSOR_STATIC:
        return quantize_activation_per_tensor(x, act_scale), np.float64(np.float32(act_scale))
    if act_mode == ActMode.PER_TOKEN_DYNAMIC:
        q, a = quantize_activation_per_token(x)
        return q, a.astype(np.float64)
    raise ValueError(f"unknown act_mode {act_mode}")


def lae_scales(channel_max_abs: np.ndarray) -> np.ndarray:
    """Logarithmic Activation Equalization scales (FPTQ, arXiv 2308.15987, eq. 4).

    ``s_j = max|X_j| / log2(2 + max|X_j|)`` per input channel j. The layer then sees ``X / s``
    and its weight rows are ``W[j, :] * s_j``, so ``(X / s) @ (s * W) == X @ W``. The log keeps
    large channels large but compressed (a channel of 1000 becomes ~100, one of 10 becomes
    ~2.8), which flattens outlier channels without moving all difficulty into the weights as
    SmoothQuant's sqrt does. Dead channels (max 0) get ``s_j = 1``.

    >>> lae_scales(np.array([0.0, 2.0, 14.0])).round(3).tolist()
    [1.0, 1.0, 3.5]
    """
    m = np.asarray(channel_max_abs, np.float64)
    s = m / np.log2(2.0 + m)
    return np.where(m > 0, s, 1.0).astype(np.float32)


def smoothquant_scales(channel_max_abs: np.ndarray, weight_row_max_abs: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's equalization scales (Xiao et al., arXiv 2211.10438, eq. 4), a baseline for LAE.

    ``s_j = max|X_j|^alpha / max_n |W[j, n]|^(1 - alpha)``: alpha = 0.5 splits the range evenly
    between activations and weights, larger alpha moves more of it into the weights. Used exactly
    like :func:`lae_scales` (X / s into the layer, W rows times s). Channels with a zero activation
    or weight range get ``s_j = 1``.

    >>> smoothquant_scales(np.array([16.0, 0.0]), np.array([1.0, 2.0]), 0.5).tolist()
    [4.0, 1.0]
    """
    x = np.asarray(channel_max_abs, np.float64)
    w = np.asarray(weight_row_max_abs, np.float64)
    alive = (x > 0) & (w > 0)
    s = np.power(np.where(alive, x, 1.0), alpha) / np.power(np.where(alive, w, 1.0), 1.0 - alpha)
    return np.where(alive, s, 1.0).astype(np.float32)
