"""``convert --report FILE``: what the compiler decided for each layer, and what it cost.

``FILE.html`` is one self-contained page (plots embedded as base64 PNG, no scripts, no external
resources); ``FILE.md`` is the same in Markdown with the plots written beside it as
``FILE.<plot>.png``. Contents:

* summary: model size before and after, layers per band and per activation scheme, the
  settings, time per step, layers left in float and why;
* one table row per converted layer: name, K x N, v = max |x|, band, scheme, LAE (scale range,
  where 1/s went), weight error ``||W - Q(W)|| / ||W||``, output error on calibration rows
  ``||XW - Y_w4a8|| / ||XW||`` (``passes/output_error.py``);
* plots (matplotlib, Agg, no pyplot state): v per layer on a log axis with the v0 / v1 bands;
  per-channel max |x| before and after LAE for the LAE groups with the highest v; output and
  weight error per layer.

matplotlib is an optional dependency (``pip install 'fptq-onnx[report]'``).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .config import ConvertConfig
from .errors import UserError
from .passes.find_linears import NOT_A_LINEAR_LAYER

SUFFIXES = (".html", ".md")
LAE_PLOT_GROUPS = 4  # LAE groups shown channel by channel (the highest v first)
BAND_COLORS = {"low": "#2a9d8f", "mid": "#e9a23b", "high": "#d1495b"}
MISSING_MATPLOTLIB = "--report needs matplotlib: pip install 'fptq-onnx[report]' (or pip install matplotlib)"


def check_report_path(path: Path) -> Path:
    """Refuse a report path that cannot be written, or a missing matplotlib, before any work."""
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--report {path} should end in .html or .md")
    if not path.resolve().parent.is_dir():
        raise UserError(f"--report {path}: folder {path.resolve().parent} does not exist")
    _matplotlib()
    return path


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class LayerRow:
    name: str
    k: int
    n: int
    v: float | None
    band: str
    scheme: str
    lae: str  # "no", or "yes: s in [a, b], 1/s in <node>"
    weight_error: float | None
    output_error: float | None


def scheme_of(layer) -> str:
    """The layer's activation scheme as reports show it: ``per_tensor_static + LAE``."""
    return ("-" if layer.act_mode is None else str(layer.act_mode)) + (" + LAE" if layer.lae else "")


def layer_rows(layers) -> list[LayerRow]:
    """One row per converted layer, in graph order."""
    rows = []
    for layer in layers:
        lae = "no"
        if layer.lae:
            low, high = layer.lae_scale_range or (float("nan"), float("nan"))
            lae = f"yes: s in [{low:.3g}, {high:.3g}], 1/s in {layer.lae_folded_into}"
        rows.append(LayerRow(layer.name, layer.k, layer.n, layer.v, layer.band or "-",
                             scheme_of(layer), lae,
                             layer.weight_error, layer.output_error))
    return rows


def _summary(result) -> dict:
    config = result.config or ConvertConfig()
    calib = config.calibration
    files = [result.output, result.output.with_name(result.output.name + ".data")]
    file_bytes = sum(path.stat().st_size for path in files if path.is_file())
    skipped = [r for r in result.rejections if r.pass_name == "find_linears"]
    return {
        "model": str(result.model or "?"),
        "output": str(result.output),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "bytes_before": result.bytes_before,
        "bytes_after": result.bytes_after,
        "file_bytes": file_bytes,
        "external": files[1].is_file(),
        "bands": Counter(layer.band for layer in result.layers),
        "schemes": Counter(scheme_of(layer) for layer in result.layers),
        "settings": {
            "v0": f"{config.v0:g}", "v1": f"{config.v1:g}", "group size": str(config.group_size),
            "weights": "symmetric" if config.symmetric else "asymmetric",
            "LAE fold into norms": "yes" if config.fold_lae else "no",
            "calibration": f"from text: {calib.samples} samples x {calib.seq_len} tokens; output error on "
                           f"up to {calib.error_rows} sampled rows per layer input",
            "excluded": config.nodes_to_exclude or "-",
            "lm_head": "excluded" if config.exclude_lm_head else "quantized",
        },
        "seconds": dict(result.seconds),
        "attention_products": sum(r.reason == NOT_A_LINEAR_LAYER for r in skipped),
        "kept_in_float": [(r.node, r.reason) for r in skipped if r.reason != NOT_A_LINEAR_LAYER],
        "other_notes": [(r.pass_name, r.node, r.reason) for r in result.rejections if r.pass_name != "find_linears"],
        "v0": config.v0, "v1": config.v1,
    }


# ---------------------------------------------------------------- the summary convert prints


def conversion_summary(result) -> str:
    """What ``convert`` prints: layers converted, sizes, settings, bands, layers left alone, where
    the GenAI folder is, time per step, and the worst layers by output error."""
    counts = Counter((layer.band, layer.act_mode, layer.lae) for layer in result.layers)
    w8 = sum(layer.weight_bits == 8 for layer in result.layers)
    lines = [f"wrote {result.output}: {len(result.layers) - w8} layers to W4A8"
             + (f", {w8} kept at 8-bit weights (W8A8)" if w8 else "")
             + f", initializers {result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB"]
    config = result.config
    if config is not None:
        rounding = "GPTQ" if config.gptq else "round-to-nearest"
        clip = ", ranges clipped by output error" if config.weight_clip == "output" else ""
        lines.append(f"  weights: 4-bit {'symmetric' if config.symmetric else 'asymmetric'} g{config.group_size}, "
                     f"{rounding}{clip}")
        head = next((layer for layer in result.layers if layer.top_k is not None), None)
        if head is not None:
            lines.append(f"  head: {head.name} rescored, 4-bit weights plus a 4-bit residual on each token's "
                         f"{head.top_k} largest logits (W4A8RescoredMatMul; --lm-head {config.lm_head})")
    if result.thresholds is not None:
        lines.append(f"  thresholds chosen for this model: v0 = {result.thresholds[0]:.4g}, v1 = {result.thresholds[1]:.4g}")
    for (band, mode, lae), count in sorted(counts.items()):
        lines.append(f"  {count:4d} x band {band:4s} {mode}{' + LAE' if lae else ''}")
    skipped = [r for r in result.rejections if r.pass_name == "find_linears"]
    products = [r for r in skipped if r.reason == NOT_A_LINEAR_LAYER]
    if products:
        lines.append(f"  {len(products)} MatMul without a constant weight (attention products, weights fed at run time) left as they are")
    kept = [r for r in skipped if r.reason != NOT_A_LINEAR_LAYER]
    if kept:
        lines.append(f"  {len(kept)} linear layer(s) left in float: " +
                     "; ".join(f"{r.node} ({r.reason})" for r in kept[:3]) + (" ..." if len(kept) > 3 else ""))
    if result.genai_config is not None:
        lines.append(f"  onnxruntime-genai model folder: {result.genai_config.parent} "
                     f"({result.genai_config.name} loads our op library; og.Model('{result.genai_config.parent}'))")
    lines.append("  time: " + ", ".join(f"{step} {sec:.1f}s" for step, sec in result.seconds.items() if sec >= 0.05))
    lines.extend(output_error_summary(result.layers))
    return "\n".join(lines)


def output_error_summary(layers, top: int = 10) -> list[str]:
    """The worst ``top`` layers by output error on calibration rows, and a count of the rest."""
    measured = sorted((layer for layer in layers if layer.output_error is not None),
                      key=lambda layer: layer.output_error, reverse=True)
    if not measured:
        return []
    lines = ["output error per layer on calibration rows, ||XW - Y_w4a8|| / ||XW||, worst first:"]
    width = max(len(layer.name) for layer in measured[:top])
    for layer in measured[:top]:
        scheme = scheme_of(layer) + (" (8-bit weights)" if layer.weight_bits == 8 else "")
        lines.append(f"  {layer.output_error:8.4f}  {layer.name:{width}s}  v={layer.v:<8.4g} {layer.band:4s} {scheme}"
                     if layer.v is not None else f"  {layer.output_error:8.4f}  {layer.name:{width}s}  {scheme}")
    rest = measured[top:]
    if rest:
        errors = [layer.output_error for layer in rest]
        lines.append(f"  ... and {len(rest)} more layers, from {max(errors):.4f} down to {min(errors):.4f}")
    return lines


# ---------------------------------------------------------------- plots


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _layer_axis(axes, names: list[str]) -> None:
    positions = np.arange(len(names))
    if len(names) <= 40:
        axes.set_xticks(positions)
        axes.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    else:
        axes.set_xlabel("layer (graph order; numbers as in the table)")
    axes.set_xlim(-0.7, len(names) - 0.3)


def plot_max_abs(rows: list[LayerRow], v0: float, v1: float) -> bytes:
    """v = max |x| per layer on a log axis, the three bands shaded, points colored by band."""
    Figure, _ = _matplotlib()
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.add_subplot()
    values = np.array([row.v if row.v else np.nan for row in rows], float)
    finite = values[np.isfinite(values) & (values > 0)]
    low = min(finite.min(initial=v0), v0) / 3
    high = max(finite.max(initial=v1), v1) * 3
    axes.set_yscale("log")
    axes.axhspan(low, v0, color=BAND_COLORS["low"], alpha=0.10)
    axes.axhspan(v0, v1, color=BAND_COLORS["mid"], alpha=0.12)
    axes.axhspan(v1, high, color=BAND_COLORS["high"], alpha=0.10)
    axes.axhline(v0, color="0.3", linestyle="--", linewidth=1)
    axes.axhline(v1, color="0.3", linestyle="--", linewidth=1)
    axes.text(1.005, v0, f" v0 = {v0:g}", transform=axes.get_yaxis_transform(), va="center", fontsize=8)
    axes.text(1.005, v1, f" v1 = {v1:g}", transform=axes.get_yaxis_transform(), va="center", fontsize=8)
    positions = np.arange(len(rows))
    for band, color in BAND_COLORS.items():
        mask = np.array([row.band == band for row in rows])
        if mask.any():
            label = {"low": "low: per-tensor static", "mid": "mid: LAE + per-tensor static",
                     "high": "high: per-token dynamic"}[band]
            axes.scatter(positions[mask], values[mask], color=color, s=18, label=f"{label} ({mask.sum()})", zorder=3)
    axes.set_ylim(low, high)
    axes.set_ylabel("v = max |x| of the layer input")
    axes.set_title("Activation range per layer and its band")
    axes.legend(loc="upper left", fontsize=8)
    _layer_axis(axes, [row.name for row in rows])
    axes.grid(True, which="major", axis="y", alpha=0.3)
    return _png(figure)


def plot_lae_channels(groups) -> bytes | None:
    """Per-channel max |x| before (``m_j``) and after LAE (``m_j / s_j``) for the LAE groups with
    the highest v; None when no group used LAE."""
    chosen = sorted((g for g in groups if g.lae_scales is not None and g.channel_max_abs is not None),
                    key=lambda g: g.v, reverse=True)[:LAE_PLOT_GROUPS]
    if not chosen:
        return None
    Figure, _ = _matplotlib()
    figure = Figure(figsize=(11, 2.6 * len(chosen) + 0.4), layout="constrained")
    for index, group in enumerate(chosen):
        axes = figure.add_subplot(len(chosen), 1, index + 1)
        before = np.asarray(group.channel_max_abs, np.float64)
        after = before / np.asarray(group.lae_scales, np.float64)
        channels = np.arange(len(before))
        axes.plot(channels, np.maximum(before, 1e-6), color="0.55", linewidth=0.8, label="before: max |X_j|")
        axes.plot(channels, np.maximum(after, 1e-6), color="#1d5fa8", linewidth=0.8, label="after: max |X_j / s_j|")
        axes.set_yscale("log")
        axes.set_title(f"{group.name} ({len(group.layers)} layer{'s' if len(group.layers) > 1 else ''}): "
                       f"max |x| {before.max():.3g} -> {after.max():.3g}", fontsize=9, loc="left")
        axes.set_ylabel("max |x|", fontsize=8)
        axes.legend(loc="upper right", fontsize=7)
        axes.grid(True, axis="y", alpha=0.3)
    axes.set_xlabel("input channel j")
    return _png(figure)


def plot_output_error(rows: list[LayerRow]) -> bytes | None:
    """Output error per layer (bars, colored by band) with the weight error as markers."""
    if not any(row.output_error is not None for row in rows):
        return None
    Figure, _ = _matplotlib()
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(rows))
    errors = np.array([np.nan if row.output_error is None else row.output_error for row in rows])
    axes.bar(positions, np.nan_to_num(errors), color=[BAND_COLORS.get(row.band, "0.5") for row in rows], width=0.8)
    weight = np.array([np.nan if row.weight_error is None else row.weight_error for row in rows])
    marker = axes.plot(positions, weight, linestyle="none", marker="_", markersize=max(4.0, min(24.0, 500 / len(rows))),
                       markeredgewidth=2, color="black", label="weight error ||W - Q(W)|| / ||W||")[0]
    from matplotlib.patches import Patch

    bands = [Patch(color=color, label=f"output error ||XW - Y|| / ||XW||, band {band}")
             for band, color in BAND_COLORS.items() if any(row.band == band for row in rows)]
    top = np.nanmax(np.concatenate([errors, weight, [0.0]]))
    axes.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # headroom for the legend
    axes.set_ylabel("relative error")
    axes.set_title("Per-layer error on calibration rows (each layer alone, float inputs)")
    axes.legend(handles=bands + [marker], loc="upper left", fontsize=8, ncols=2)
    _layer_axis(axes, [row.name for row in rows])
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def make_plots(result, rows: list[LayerRow], summary: dict) -> dict[str, tuple[str, bytes]]:
    """``{key: (caption, png bytes)}`` for the plots that apply to ``result``."""
    plots = {"max_abs": ("max |x| per layer, with the v0 / v1 bands", plot_max_abs(rows, summary["v0"], summary["v1"]))}
    lae = plot_lae_channels(result.groups)
    if lae is not None:
        plots["lae_channels"] = ("per-channel max |x| before and after LAE (highest-v LAE groups)", lae)
    error = plot_output_error(rows)
    if error is not None:
        plots["output_error"] = ("output error and weight error per layer", error)
    return plots


# ---------------------------------------------------------------- rendering


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _size(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"


def _summary_lines(summary: dict, rows: list[LayerRow]) -> list[tuple[str, str]]:
    ratio = summary["bytes_before"] / summary["bytes_after"] if summary["bytes_after"] else 0
    items = [
        ("model", f"{summary['model']} -> {summary['output']}"),
        ("converted", f"{len(rows)} linear layers to W4A8 ({summary['date']})"),
        ("initializers", f"{_size(summary['bytes_before'])} -> {_size(summary['bytes_after'])} ({ratio:.2f}x smaller)"),
        ("output file", f"{_size(summary['file_bytes'])}" + (" (.onnx and .onnx.data)" if summary["external"] else "")),
        ("per band", ", ".join(f"{band} {summary['bands'].get(band, 0)}" for band in ("low", "mid", "high"))),
        ("per scheme", ", ".join(f"{scheme} {count}" for scheme, count in sorted(summary["schemes"].items()))),
    ]
    measured = sorted((row for row in rows if row.output_error is not None), key=lambda r: r.output_error, reverse=True)
    if measured:
        items.append(("worst output error", ", ".join(f"{row.name} {row.output_error:.4f}" for row in measured[:3])))
    if summary["attention_products"]:
        items.append(("left as they are", f"{summary['attention_products']} MatMul of two activations (attention)"))
    if summary["kept_in_float"]:
        items.append(("left in float", f"{len(summary['kept_in_float'])} linear layer(s), see Notes"))
    if summary["other_notes"]:
        items.append(("pass notes", f"{len(summary['other_notes'])}, see Notes"))
    return items


def _notes(summary: dict) -> list[tuple[str, str, str]]:
    """``(where, node, reason)`` for every layer left in float and every node a pass declined."""
    return ([("left in float", node, reason) for node, reason in summary["kept_in_float"]]
            + [(pass_name, node, reason) for pass_name, node, reason in summary["other_notes"]])


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1f2328; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 170px; }
.band-low { color: #1f7a6f; } .band-mid { color: #b5761a; } .band-high { color: #b3263b; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #57606a; font-size: 12px; }
.cols { display: flex; gap: 32px; flex-wrap: wrap; }
"""


def render_html(summary: dict, rows: list[LayerRow], plots: dict[str, tuple[str, bytes]]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>fptq-onnx report: {esc(Path(summary['output']).name)}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>fptq-onnx conversion report</h1><p>{esc(summary['output'])}</p>", "<h2>Summary</h2>",
           '<div class="cols"><table class="kv" id="summary">']
    out += [f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>" for key, value in _summary_lines(summary, rows)]
    out.append('</table><table class="kv" id="settings">')
    out += [f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>" for key, value in summary["settings"].items()]
    out.append('</table><table id="seconds"><tr><th>step</th><th>seconds</th></tr>')
    out += [f'<tr><td>{esc(step)}</td><td class="num">{sec:.2f}</td></tr>' for step, sec in summary["seconds"].items()]
    out.append("</table></div><h2>Plots</h2>")
    for key, (caption, png) in plots.items():
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<figure id="plot-{key}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{esc(caption)}</figcaption></figure>")
    out.append("<h2>Layers</h2>")
    out.append('<table id="layers"><thead><tr><th>#</th><th>layer</th><th>K x N</th><th>v = max |x|</th><th>band</th>'
               "<th>scheme</th><th>LAE</th><th>weight error</th><th>output error</th></tr></thead><tbody>")
    worst = max((row.output_error or 0.0 for row in rows), default=0.0) or 1.0
    for index, row in enumerate(rows):
        shade = "" if row.output_error is None else \
            f' style="background: rgba(209, 73, 91, {0.45 * row.output_error / worst:.2f})"'
        out.append(f"<tr><td class=\"num\">{index}</td><td>{esc(row.name)}</td><td class=\"num\">{row.k} x {row.n}</td>"
                   f'<td class="num">{_fmt(row.v)}</td><td class="band-{esc(row.band)}">{esc(row.band)}</td>'
                   f"<td>{esc(row.scheme)}</td><td>{esc(row.lae)}</td><td class=\"num\">{_fmt(row.weight_error)}</td>"
                   f'<td class="num"{shade}>{_fmt(row.output_error)}</td></tr>')
    out.append("</tbody></table>")
    notes = _notes(summary)
    if notes:
        out.append(f"<h2>Notes</h2><details open><summary>{len(notes)} layer(s) left in float or declined by a pass"
                   '</summary><table id="notes"><tr><th>where</th><th>node</th><th>reason</th></tr>')
        out += [f"<tr><td>{esc(where)}</td><td>{esc(node)}</td><td>{esc(reason)}</td></tr>" for where, node, reason in notes]
        out.append("</table></details>")
    out.append("<p>weight error = ||W - Q(W)||<sub>F</sub> / ||W||<sub>F</sub>; output error = "
               "||X W - Y<sub>w4a8</sub>||<sub>F</sub> / ||X W||<sub>F</sub> on sampled calibration rows X, "
               "each layer alone on the float model's activations.</p></body></html>")
    return "\n".join(out)


def render_markdown(summary: dict, rows: list[LayerRow], images: dict[str, tuple[str, str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    out = ["# fptq-onnx conversion report", "", f"`{summary['output']}`", "", "## Summary", "", "| | |", "|---|---|"]
    out += [f"| {cell(key)} | {cell(value)} |" for key, value in _summary_lines(summary, rows)]
    out += ["", "| setting | value |", "|---|---|"]
    out += [f"| {cell(key)} | {cell(value)} |" for key, value in summary["settings"].items()]
    out += ["", "| step | seconds |", "|---|---:|"]
    out += [f"| {cell(step)} | {sec:.2f} |" for step, sec in summary["seconds"].items()]
    out += ["", "## Plots", ""]
    for caption, filename in images.values():
        out += [f"![{caption}]({filename})", "", f"*{caption}*", ""]
    out += ["## Layers", "", "| # | layer | K x N | v = max \\|x\\| | band | scheme | LAE | weight error | output error |",
            "|---:|---|---:|---:|---|---|---|---:|---:|"]
    for index, row in enumerate(rows):
        out.append(f"| {index} | {cell(row.name)} | {row.k} x {row.n} | {_fmt(row.v)} | {row.band} | {cell(row.scheme)} "
                   f"| {cell(row.lae)} | {_fmt(row.weight_error)} | {_fmt(row.output_error)} |")
    notes = _notes(summary)
    if notes:
        out += ["", "## Notes", "", "| where | node | reason |", "|---|---|---|"]
        out += [f"| {cell(where)} | {cell(node)} | {cell(reason)} |" for where, node, reason in notes]
    out += ["", "weight error = ||W - Q(W)|| / ||W||; output error = ||XW - Y_w4a8|| / ||XW|| on sampled calibration "
            "rows, each layer alone on the float model's activations.", ""]
    return "\n".join(out)


def write_report(result, path: str | Path) -> Path:
    """Write the report of ``result`` (a ``pipeline.ConversionResult``) to ``path`` (.html or .md)."""
    path = check_report_path(Path(path))
    rows = layer_rows(result.layers)
    summary = _summary(result)
    plots = make_plots(result, rows, summary)
    if path.suffix.lower() == ".html":
        path.write_text(render_html(summary, rows, plots), encoding="utf-8")
        return path
    images = {}
    for key, (caption, png) in plots.items():
        image = path.with_name(f"{path.stem}.{key}.png")
        image.write_bytes(png)
        images[key] = (caption, image.name)
    path.write_text(render_markdown(summary, rows, images), encoding="utf-8")
    return path
