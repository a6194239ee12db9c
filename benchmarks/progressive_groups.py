"""Accuracy of integer group scales (QServe-style progressive group quantization) on CPU (not a test).

    python benchmarks/progressive_groups.py --models smollm2-135m gemma3-270m --tokens 4096 \\
        --piqa-items 400 --samples 32

Issue 13 item 2 asks whether a weight format whose group scales are integers loses accuracy
against today's format. Such a format lets a kernel accumulate ``q * s2 * (u - z)`` in int32 over
all of K and apply one float per output channel (QServe, arXiv 2405.04532, section 4.2).

What is measured, per model: the model converted by ``fptq_onnx.convert`` with today's defaults
(25% of the weights as W8A8MatMul) and with ``w8_layers = 0, w8_fraction = 0`` (pure W4A8); then
the same two models with every ``W4A8MatMul`` node's ``(B, scales, zero_points)`` rewritten by
:func:`quantize_weight_progressive` from the layer's float weight after LAE (``layer.weight`` of
the conversion result, not a dequantization of today's nibbles), keeping the per-group clip
ratio today's conversion chose by output error (:func:`clip_ratios_of`). W8A8MatMul layers, act
scales and everything else stay as converted. The progressive weights are stored in the existing
W4A8MatMul layout (``scales = s1 * s2`` as float32), so the function body and our CPU kernel run
them unchanged. A second calibration sample set (SOTU from a later offset, row-sampling seed 1)
of today's defaults gives the run-to-run noise. Metrics: Brown perplexity and top-1 / KL against
FP32 (``fptq_onnx.evaluate.evaluate``), PIQA acc_norm on the first ``--piqa-items`` validation
items (``evaluate_piqa``), all through ``fptq_onnx.InferenceSession`` (our CPU kernel).

Results are cached in ``--results`` (JSON) so a run resumes; prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

INT4_LEVELS = 15
PROTECTIVE_INT8_MAX = 119  # QServe's level-1 range: (u - z) * s2 then always fits in int8, see below
CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.55, 19), 4))  # fptq_onnx.quant.CLIP_RATIOS


class ProgressiveWeight(NamedTuple):
    """The two levels of :func:`progressive_levels` for ``w[K, N]`` cut into ``G`` groups along K."""

    s1: np.ndarray  # float32 [N]: per-channel scale of level 1
    q8: np.ndarray  # int16 [N, K]: level-1 integers in [-int8_max, int8_max]
    u: np.ndarray  # uint8 [N, K]: level-2 nibbles in [0, 15]
    s2: np.ndarray  # uint8 [N, G]: integer group scales in [1, 255]
    z: np.ndarray  # uint8 [N, G]: integer zero points in [0, 15]


def progressive_levels(w: np.ndarray, group_size: int, clip_ratio: np.ndarray | float = 1.0,
                       int8_max: int = PROTECTIVE_INT8_MAX) -> ProgressiveWeight:
    """QServe's progressive group quantization of ``w[K, N]`` (K a multiple of ``group_size``).

    Level 1, per output channel n, symmetric int8 (``int8_max`` = 119, QServe's protective range)::

        s1[n]    = max_k |w[k, n]| / int8_max                  (float; 1 for an all-zero column)
        q8[n, k] = clip(rint(w[k, n] / s1[n]), -int8_max, int8_max)

    Level 2, per group g of ``group_size`` consecutive k, asymmetric 4-bit on the integers q8, with
    an integer scale and zero point (``c`` the group's clip ratio, 1 = the full range)::

        lo = c * min(min_g q8, 0),  hi = c * max(max_g q8, 0)
        s2[n, g] = max(1, rint((hi - lo) / 15))                (integer, <= rint(238 / 15) = 16)
        z[n, g]  = clip(rint(-lo / s2), 0, 15)                 (integer)
        u[n, k]  = clip(rint(q8[n, k] / s2) + z, 0, 15)

    so ``W[k, n] ~= s1[n] * s2[n, g] * (u[n, k] - z[n, g])``. Where ``u`` is not clipped,
    ``|(u - z) * s2 - q8| <= s2 / 2 <= 8``, and a clipped ``u`` only moves toward ``z``: the level-2
    reconstruction ``(u - z) * s2`` stays within 119 + 8 = 127, so a kernel can expand it to int8
    in registers (why QServe shrinks level 1 to [-119, 119]). A zero weight (K padding) maps to
    ``u = z`` exactly.

    Worked example (one column, group size 4, ``int8_max`` 119)::

        w = [-1.19, 0.0, 0.595, 1.19]: s1 = 0.01, q8 = [-119, 0, 60, 119],
        s2 = rint(238 / 15) = 16, z = rint(119 / 16) = 7, u = [0, 7, 11, 14],
        W ~= 0.01 * 16 * ([0, 7, 11, 14] - 7) = [-1.12, 0, 0.64, 1.12]
    """
    k, n = w.shape
    if group_size < 2 or k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    if not 1 <= int8_max <= 127:
        raise ValueError(f"int8_max must be in [1, 127], got {int8_max}")
    w = np.asarray(w, np.float64)
    s1 = np.max(np.abs(w), axis=0) / int8_max
    s1 = np.where(s1 == 0, 1.0, s1).astype(np.float32)
    q8 = np.clip(np.rint(w / s1.astype(np.float64)), -int8_max, int8_max).T  # [N, K]
    groups = q8.reshape(n, k // group_size, group_size)
    ratio = np.broadcast_to(np.asarray(clip_ratio, np.float64), groups.shape[:-1])
    lo = ratio * np.minimum(groups.min(axis=-1), 0.0)
    hi = ratio * np.maximum(groups.max(axis=-1), 0.0)
    s2 = np.maximum(1.0, np.rint((hi - lo) / INT4_LEVELS))
    z = np.clip(np.rint(-lo / s2), 0, INT4_LEVELS)
    u = np.clip(np.rint(groups / s2[..., None]) + z[..., None], 0, INT4_LEVELS)
    return ProgressiveWeight(s1, q8.astype(np.int16), u.reshape(n, k).astype(np.uint8),
                             s2.astype(np.uint8), z.astype(np.uint8))


def quantize_weight_progressive(w: np.ndarray, group_size: int, clip_ratio: np.ndarray | float = 1.0,
                                int8_max: int = PROTECTIVE_INT8_MAX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`progressive_levels` in W4A8MatMul's layout (docs/ops.md, what
    ``fptq_onnx.quant.quantize_weight_groupwise`` returns): ``(u[N, K] uint8, scales[N, G] float32 =
    s1[n] * s2[n, g], zero_points[N, G] uint8)``; pack ``u`` with ``pack_int4``. The op computes
    ``a_m * sum_g scales[n, g] * sum_{k in g} q (u - z)``, which equals the integer kernel's
    ``a_m * s1[n] * sum_k q * s2 * (u - z)`` up to float32 rounding of the product ``s1 * s2``."""
    levels = progressive_levels(w, group_size, clip_ratio, int8_max)
    scales = (levels.s1.astype(np.float64)[:, None] * levels.s2).astype(np.float32)
    return levels.u, scales, levels.z


def clip_ratios_of(w: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """The clip ratio of each group that today's asymmetric quantization chose: its scale is
    ``c * (max(w_g, 0) - min(w_g, 0)) / 15`` (``quant.quantize_weight_groupwise``), so
    ``c = 15 * scale / range``, snapped to the nearest of :data:`CLIP_RATIOS` (1 for a zero group).
    ``w[K', N]`` padded as the layer was, ``scales[N, G]`` -> ``ratio[N, G]``."""
    k, n = w.shape
    groups = np.asarray(w, np.float64).T.reshape(n, k // group_size, group_size)
    spread = np.maximum(groups.max(axis=-1), 0.0) - np.minimum(groups.min(axis=-1), 0.0)
    raw = np.where(spread > 0, INT4_LEVELS * scales / np.where(spread > 0, spread, 1.0), 1.0)
    grid = np.asarray(CLIP_RATIOS)
    return grid[np.abs(raw[..., None] - grid).argmin(axis=-1)]


# ------------------------------------------------------------------------------ the benchmark


def fp32_model(name: str, root: Path) -> Path:
    """The fp32 export (no-cache layout); the test cache's SmolLM2 export is reused where present."""
    from fptq_onnx import data

    cached = data.cache_dir() / "tests" / f"{name}.onnx"
    if cached.exists():
        return cached
    from accuracy import fp32_model as accuracy_fp32_model  # benchmarks/ is on sys.path when run as a script

    return accuracy_fp32_model(name, root)  # root / name / "fp32.onnx", exported once


def calibration_text(variant: str, root: Path) -> Path:
    """SOTU (what docs/accuracy.md calibrates with), or for the noise row SOTU from 40% of its length on."""
    from fptq_onnx import data

    sotu = data.text_path("sotu")
    if variant == "a":
        return sotu
    path = root / "sotu_offset.txt"
    if not path.exists():
        text = sotu.read_text(encoding="utf-8")
        start = text.find("\n", int(len(text) * 0.4)) + 1
        path.write_text(text[start:], encoding="utf-8")
    return path


def rewrite_progressive(result, source: Path, out: Path) -> dict:
    """Save ``source`` (written by ``convert``, whose result is ``result``) as ``out`` with every
    W4A8MatMul node's weights rewritten by :func:`quantize_weight_progressive`."""
    import onnx
    from onnx import numpy_helper

    from fptq_onnx.quant import dequantize_weight, pack_int4, pad_to_group_multiple

    model = onnx.load(str(source))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    counts = {"w4": 0, "w8": 0, "weight_error_today": [], "weight_error_progressive": []}
    for layer in result.layers:
        if layer.weight_bits == 8:
            counts["w8"] += 1
            continue
        node = nodes[layer.replaced_by]
        if node.op_type != "W4A8MatMul":
            raise RuntimeError(f"{node.name}: expected W4A8MatMul, got {node.op_type}")
        if layer.symmetric:
            raise RuntimeError("the clip ratios are recovered for asymmetric weights only")
        group_size = int(next(a.i for a in node.attribute if a.name == "group_size"))
        padded = pad_to_group_multiple(np.asarray(layer.weight, np.float32), group_size)
        node_k = next(a.i for a in node.attribute if a.name == "K")  # K itself (a partial last group), or a padded K'
        if node_k not in (padded.shape[0], layer.k):
            raise RuntimeError(f"{node.name}: K {node_k} is neither the layer's {layer.k} nor its padded {padded.shape[0]}")
        today = numpy_helper.to_array(inits[node.input[2]])
        ratio = clip_ratios_of(padded, today, group_size)
        u, scales, zero_points = quantize_weight_progressive(padded, group_size, ratio)
        u = u[:, :node_k]  # the zero padding of a partial last group is not stored
        for name, value in zip(node.input[1:4], (pack_int4(u), scales, zero_points)):
            old = inits[name]
            if tuple(old.dims) != value.shape:
                raise RuntimeError(f"{name}: shape {tuple(old.dims)} != {value.shape}")
            old.CopyFrom(numpy_helper.from_array(value, name))
        norm = float(np.linalg.norm(layer.weight))
        restored = dequantize_weight(u, scales, zero_points, group_size)[: layer.k]
        counts["weight_error_progressive"].append(float(np.linalg.norm(layer.weight - restored)) / norm)
        counts["weight_error_today"].append(layer.weight_error)
        counts["w4"] += 1
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    for key in ("weight_error_today", "weight_error_progressive"):
        counts[key] = float(np.mean(counts[key])) if counts[key] else None
    return counts


ROWS = {  # row -> (description, ConvertConfig fields, calibration variant, progressive?)
    "fp32": ("FP32", None, None, False),
    "default": ("today's format, our defaults (25% of weights W8A8)", {}, "a", False),
    "default_prog": ("progressive integer group scales, our defaults (W4 layers only)", {}, "a", True),
    "default_calib_b": ("today's format, our defaults, 2nd calibration set (noise)", {}, "b", False),
    "w4_only": ("today's format, pure W4A8 (w8_layers 0)", dict(w8_layers=0, w8_fraction=0.0), "a", False),
    "w4_only_prog": ("progressive integer group scales, pure W4A8", dict(w8_layers=0, w8_fraction=0.0), "a", True),
}


def build(row: str, fp32: Path, root: Path, samples: int, results: dict, model_name: str) -> Path:
    from fptq_onnx.config import CalibrationConfig, ConvertConfig
    from fptq_onnx.pipeline import convert

    _, fields, variant, progressive = ROWS[row]
    if fields is None:
        return fp32
    folder = root / model_name
    folder.mkdir(parents=True, exist_ok=True)
    base = row.removesuffix("_prog")
    out = folder / f"{row}.onnx"
    if out.exists():
        return out
    seed = 0 if variant == "a" else 1
    config = ConvertConfig(calibration=CalibrationConfig(samples=samples, seq_len=512, seed=seed), **fields)
    today = folder / f"{base}.onnx"
    start = time.perf_counter()
    result = convert(fp32, today, calibration_text(variant, root), config, progress=False)
    results[f"{model_name}|{base}|convert_seconds"] = round(time.perf_counter() - start, 1)
    if progressive or f"{base}_prog" in ROWS:  # the float weights exist only now: write the twin too
        twin = folder / f"{base}_prog.onnx"
        results[f"{model_name}|{base}_prog|rewrite"] = rewrite_progressive(result, today, twin)
    return out


def measure(metric: str, path: Path, fp32: Path, tokens: int, piqa_items: int, root: Path, model_name: str) -> dict:
    from fptq_onnx import data
    from fptq_onnx.evaluate import default_session, evaluate, evaluate_piqa
    from fptq_onnx.session import InferenceSession

    factory = default_session if path == fp32 else InferenceSession
    if metric == "piqa":
        return evaluate_piqa(path, data.piqa_items(progress=False)[:piqa_items], tokenizer_dir=fp32.parent,
                             session_factory=factory, progress=False)
    reference = None if path == fp32 else fp32
    return evaluate(path, data.brown_text(progress=False), tokenizer_dir=fp32.parent, reference_path=reference,
                    max_tokens=tokens, session_factory=factory, reference_session_factory=default_session,
                    reference_cache=root / model_name / f"fp32_logits_brown_{tokens}.npy", progress=False)


def table(results: dict, args) -> str:
    lines = [f"Brown: first {args.tokens} tokens in 512-token windows; PIQA: first {args.piqa_items} validation "
             f"items (acc_norm, acc in brackets); calibration {args.samples} x 512 SOTU tokens.", ""]
    for name in args.models:
        lines += [f"**{name}**", "", "| row | Brown ppl | Brown top-1 / KL vs FP32 | PIQA acc_norm (acc) "
                  "| mean rel. weight error of the W4 layers |", "|---|---|---|---|---|"]
        for row, (description, *_rest) in ROWS.items():
            brown = results.get(f"{name}|{row}|brown|{args.tokens}")
            piqa = results.get(f"{name}|{row}|piqa|{args.piqa_items}")
            rewrite = results.get(f"{name}|{row}|rewrite")
            error = "-"
            if rewrite:
                error = f"{rewrite['weight_error_progressive']:.4f} (today {rewrite['weight_error_today']:.4f})"
            cells = [f"`{row}` {description}",
                     f"{brown['perplexity']:.2f}" if brown else "-",
                     f"{brown['top1_agreement'] * 100:.1f}% / {brown['kl']:.3f}" if brown and "kl" in brown else "-",
                     f"{piqa['piqa_acc_norm'] * 100:.1f} ({piqa['piqa_acc'] * 100:.1f})" if piqa else "-", error]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    from fptq_onnx import data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--metrics", nargs="+", default=["brown", "piqa"], choices=["brown", "piqa"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--piqa-items", type=int, default=400)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of SOTU")
    parser.add_argument("--root", type=Path, default=data.cache_dir() / "progressive_groups")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/progressive_groups.json"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for name in [] if args.table_only else args.models:
        fp32 = fp32_model(name, args.root)
        for row in args.rows:
            for metric in args.metrics:
                size = args.tokens if metric == "brown" else args.piqa_items
                key = f"{name}|{row}|{metric}|{size}"
                if key in results:
                    continue
                path = build(row, fp32, args.root, args.samples, results, name)
                start = time.perf_counter()
                result = measure(metric, path, fp32, args.tokens, args.piqa_items, args.root, name)
                result.update(seconds=round(time.perf_counter() - start, 1), date=time.strftime("%Y-%m-%d"))
                results[key] = result
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(results, indent=1, sort_keys=True))
                print(f"{key}: {result}", file=sys.stderr, flush=True)
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
